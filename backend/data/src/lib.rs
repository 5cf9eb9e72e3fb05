//! Stories, captions and datasets for StoryGPT-V, without tensors.
//!
//! - [`rules`] and [`mentions`]: who the characters are and where captions name them.
//! - [`referential`]: the referential extension (Algorithm 1) and [`stats`] (Table 11).
//! - [`npy`], [`pickle`], [`ndarray`]: the file formats the authors' datasets use.
//! - [`dataset`]: FlintstonesSV / PororoSV readers (and the writer the toy world uses).
//! - [`toyworld`]: a seeded procedural stand-in for FlintstonesSV that runs on a CPU.
//! - [`jsonl`]: the JSON-lines tools behind `storygpt-v data ...`.

pub mod dataset;
pub mod error;
pub mod jsonl;
pub mod mentions;
pub mod ndarray;
pub mod npy;
pub mod pickle;
pub mod referential;
pub mod rules;
pub mod stats;
pub mod toyworld;
pub mod writer;

pub use error::{DataError, Result};
pub use mentions::{find_mentions, Mention, MentionKind};
pub use referential::{make_referential, StoryFrame};
pub use rules::{Case, CharacterDef, Pronoun, RuleMode, RuleSet};
