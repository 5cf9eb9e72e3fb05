//! The networks of StoryGPT-V: CLIP, UNet, VAE, schedulers, LLMs, mappers and the story pipeline.
//!
//! Networks and schedulers are kept apart as in diffusers: networks are built from the `nn`
//! crate's differentiable layers and read their shapes from the checkpoint's `config.json`;
//! schedulers are pure maths built from `scheduler_config.json`.

pub mod bundle;
pub mod char_ldm;
pub mod clip;
pub mod conformance;
pub mod fuse;
pub mod limits;
pub mod llm;
pub mod lreg;
pub mod mappers;
pub mod pipeline;
pub mod prompt;
pub mod schedulers;
pub mod stage2_losses;
pub mod unet;
pub mod vae;
