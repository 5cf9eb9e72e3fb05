//! transformers' `CLIPTextConfig`, `CLIPVisionConfig` and `CLIPConfig`, read from `config.json`
//! with transformers' defaults.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

fn d_vocab() -> usize {
    49408
}
fn d_text_hidden() -> usize {
    512
}
fn d_text_inter() -> usize {
    2048
}
fn d_proj() -> usize {
    512
}
fn d_layers() -> usize {
    12
}
fn d_text_heads() -> usize {
    8
}
fn d_max_pos() -> usize {
    77
}
fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_bos() -> i64 {
    49406
}
fn d_eos() -> i64 {
    49407
}
fn d_pad() -> i64 {
    1
}
fn d_vis_hidden() -> usize {
    768
}
fn d_vis_inter() -> usize {
    3072
}
fn d_vis_heads() -> usize {
    12
}
fn d_channels() -> usize {
    3
}
fn d_image() -> usize {
    224
}
fn d_patch() -> usize {
    32
}

/// `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size (49408).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Width (512; ViT-L/14: 768).
    #[serde(default = "d_text_hidden")]
    pub hidden_size: usize,
    /// MLP width (2048).
    #[serde(default = "d_text_inter")]
    pub intermediate_size: usize,
    /// Projection width of `CLIPTextModelWithProjection` (512).
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    /// Encoder layers (12).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (8).
    #[serde(default = "d_text_heads")]
    pub num_attention_heads: usize,
    /// Positions (77).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// MLP activation (`quick_gelu`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// BOS id (49406).
    #[serde(default = "d_bos")]
    pub bos_token_id: i64,
    /// EOS id (49407); `2` selects transformers' legacy pooling at `argmax(input_ids)`.
    #[serde(default = "d_eos")]
    pub eos_token_id: i64,
    /// Pad id (1).
    #[serde(default = "d_pad")]
    pub pad_token_id: i64,
}

/// `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipVisionConfig {
    /// Width (768; ViT-L/14: 1024).
    #[serde(default = "d_vis_hidden")]
    pub hidden_size: usize,
    /// MLP width (3072).
    #[serde(default = "d_vis_inter")]
    pub intermediate_size: usize,
    /// `visual_projection` output width (512; ViT-L/14: 768).
    #[serde(default = "d_proj")]
    pub projection_dim: usize,
    /// Encoder layers (12).
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    /// Attention heads (12).
    #[serde(default = "d_vis_heads")]
    pub num_attention_heads: usize,
    /// Input channels (3).
    #[serde(default = "d_channels")]
    pub num_channels: usize,
    /// Input resolution (224).
    #[serde(default = "d_image")]
    pub image_size: usize,
    /// Patch size (32; ViT-L/14: 14).
    #[serde(default = "d_patch")]
    pub patch_size: usize,
    /// MLP activation (`quick_gelu`).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon (1e-5).
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults parse")
    }
}

impl ClipTextConfig {
    /// The text tower of openai/clip-vit-large-patch14 (Stable Diffusion 1.5's text encoder).
    pub fn vit_l_14() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_attention_heads: 12,
            eos_token_id: 2,
            pad_token_id: 1,
            bos_token_id: 0,
            ..Self::default()
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        check_heads(self.hidden_size, self.num_attention_heads, &self.hidden_act)
    }
}

impl ClipVisionConfig {
    /// The vision tower of openai/clip-vit-large-patch14.
    pub fn vit_l_14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::default()
        }
    }

    /// Patches per image side.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    pub(crate) fn check(&self) -> Result<()> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            bail!(
                "image_size {} is not a multiple of patch_size {}",
                self.image_size,
                self.patch_size
            )
        }
        check_heads(self.hidden_size, self.num_attention_heads, &self.hidden_act)
    }
}

fn check_heads(hidden: usize, heads: usize, act: &str) -> Result<()> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        bail!("hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    }
    if nn::Activation::from_config_name(act).is_none() {
        bail!("hidden_act `{act}` is not supported")
    }
    Ok(())
}

/// Which tower a `config.json` describes.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfigs {
    /// The text tower, if described.
    pub text: Option<ClipTextConfig>,
    /// The vision tower, if described.
    pub vision: Option<ClipVisionConfig>,
    /// Top-level `projection_dim` of a full `CLIPConfig` (overrides the towers').
    pub projection_dim: Option<usize>,
}

impl ClipConfigs {
    /// Parses a `config.json` of `CLIPTextModel(WithProjection)` (`model_type` `clip_text_model`),
    /// `CLIPVisionModel(WithProjection)` (`clip_vision_model`) or `CLIPModel` (`clip`, with
    /// `text_config` / `vision_config`).
    pub fn from_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        let parse_text = |x: &Value| -> Result<ClipTextConfig> {
            let c: ClipTextConfig = serde_json::from_value(x.clone())?;
            c.check()?;
            Ok(c)
        };
        let parse_vision = |x: &Value| -> Result<ClipVisionConfig> {
            let c: ClipVisionConfig = serde_json::from_value(x.clone())?;
            c.check()?;
            Ok(c)
        };
        let projection_dim = v
            .get("projection_dim")
            .and_then(Value::as_u64)
            .map(|p| p as usize);
        Ok(match model_type {
            "clip_text_model" => Self {
                text: Some(parse_text(v)?),
                vision: None,
                projection_dim: None,
            },
            "clip_vision_model" => Self {
                text: None,
                vision: Some(parse_vision(v)?),
                projection_dim: None,
            },
            _ if v.get("text_config").is_some() || v.get("vision_config").is_some() => {
                let mut text = v.get("text_config").map(parse_text).transpose()?;
                let mut vision = v.get("vision_config").map(parse_vision).transpose()?;
                if let Some(p) = projection_dim {
                    if let Some(t) = text.as_mut() {
                        t.projection_dim = p;
                    }
                    if let Some(vc) = vision.as_mut() {
                        vc.projection_dim = p;
                    }
                }
                Self {
                    text,
                    vision,
                    projection_dim,
                }
            }
            other => bail!("model_type `{other}` is not a CLIP config (clip, clip_text_model, clip_vision_model)"),
        })
    }

    /// Reads `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read CLIP config {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("invalid JSON in {}", path.display()))?;
        Self::from_json(&v).with_context(|| format!("CLIP config {}", path.display()))
    }
}
