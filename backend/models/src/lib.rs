//! The networks of StoryGPT-V: CLIP, UNet, VAE, schedulers, LLMs, mappers and the story pipeline.
//!
//! Networks and schedulers are kept apart as in diffusers: networks are built from the `nn`
//! crate's differentiable layers and read their shapes from the checkpoint's `config.json`;
//! schedulers are pure maths built from `scheduler_config.json`.

pub mod clip;
pub mod conformance;
pub mod schedulers;
pub mod unet;
pub mod vae;
pub mod fuse;
pub mod lreg;
pub mod llm;
pub mod mappers;
pub mod prompt;
pub mod stage2_losses;
