//! Training: one loop for every stage (`trainer`), its configuration (`config`), the seeded
//! batch loader (`loader`), atomic checkpoints (`checkpoint`), and the stages themselves
//! (`stages`). See docs/TRAINING.md.

pub mod all;
pub mod checkpoint;
pub mod classifier;
pub mod config;
pub mod loader;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod stages;
pub mod trainer;

pub use config::{OptimConfig, RunConfig, Schedule, StageFile, StageSection};
pub use loader::{BatchSource, Loader};
pub use trainer::{run, Ending, RunOptions, RunSummary, Stage, StepLoss};
pub mod driver;
pub mod eval;
