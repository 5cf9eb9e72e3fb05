//! CLIP for StoryGPT-V: the BPE tokenizer, the text encoder (frozen, conditions the UNet and
//! feeds the FuseModule), the vision tower with projection (character portraits -> image
//! embeddings; frames -> Mapper_LLM input) and the image preprocessor.
//!
//! Mirrors transformers: configs from `config.json`, tensor names from `save_pretrained`
//! checkpoints (`text_model.*`, `vision_model.*`, `visual_projection.weight`), numerics checked
//! against transformers by the `clip_*` tests.

mod config;
mod encoder;
pub mod preprocess;
mod text;
pub mod tokenizer;
mod vision;

pub use config::{ClipConfigs, ClipTextConfig, ClipVisionConfig};
pub use encoder::{ClipAttention, ClipEncoder, ClipEncoderLayer, ClipMlp, EncoderShape};
pub use preprocess::{pad_to_square, resize_bicubic, ClipImageProcessor};
pub use text::{eos_positions, ClipTextModel, ClipTextOutput};
pub use tokenizer::{ClipTokenizer, Encoding};
pub use vision::{ClipVisionModel, ClipVisionOutput};

use std::path::{Path, PathBuf};

/// `dir` itself if it has a `config.json`, else `dir/sub` (a diffusers pipeline's
/// `text_encoder/` or `image_encoder/`) when that exists.
pub(crate) fn resolve_dir(dir: &Path, sub: &str) -> PathBuf {
    if !dir.join("config.json").exists() && dir.join(sub).join("config.json").exists() {
        dir.join(sub)
    } else {
        dir.to_path_buf()
    }
}
