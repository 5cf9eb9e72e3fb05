//! Component conformance runs: load one network from a reference directory, run it on named
//! input tensors from a safetensors file, write named outputs to another safetensors file.
//!
//! This is what `storygpt-v component KIND --model DIR --inputs IN --out OUT` calls; a Python
//! script can then compare the outputs with transformers / diffusers on the same inputs (and
//! the fixture tests do the same in Rust). Weights and float inputs are cast to the requested
//! dtype (f32 for the parity fixtures, f16 / bf16 for half-precision checks on a GPU); outputs are
//! written in f32.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use crate::clip::{ClipTextModel, ClipVisionModel};

/// Which network to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    /// diffusers `UNet2DConditionModel`: inputs `sample`, `timestep`, `encoder_hidden_states`;
    /// output `sample`.
    Unet,
    /// `AutoencoderKL.encode`: input `sample`; outputs `mean`, `logvar`.
    VaeEncode,
    /// `AutoencoderKL.decode`: input `latent`; output `sample`.
    VaeDecode,
    /// `CLIPTextModel`: input `input_ids` (i64 / i32 / u32, optional `attention_mask`); outputs
    /// `last_hidden_state`, `pooler_output` (and `text_embeds` with a projection).
    ClipText,
    /// `CLIPVisionModelWithProjection`: input `pixel_values`; outputs `last_hidden_state`,
    /// `pooler_output`, `image_embeds` (when the checkpoint has `visual_projection`).
    ClipVision,
    /// Causal LM (transformers Llama / OPT): input `input_ids` (i64 / i32) or `inputs_embeds`
    /// (optional `attention_mask`); outputs `logits`, `last_hidden_state`.
    Llm,
}

impl std::str::FromStr for ComponentKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "unet" => Self::Unet,
            "vae-encode" => Self::VaeEncode,
            "vae-decode" => Self::VaeDecode,
            "clip-text" => Self::ClipText,
            "clip-vision" => Self::ClipVision,
            "llm" => Self::Llm,
            other => {
                return Err(format!(
                    "unknown component `{other}`: use unet, vae-encode, vae-decode, clip-text, clip-vision or llm"
                ))
            }
        })
    }
}

/// Runs `kind` from `model_dir` on the tensors of `inputs` (safetensors) and writes the outputs
/// to `out` (safetensors, f32), the network and its float inputs in `dtype`.
pub fn run_component(
    kind: ComponentKind,
    model_dir: &Path,
    inputs: &Path,
    out: &Path,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    let tensors = candle_core::safetensors::load(inputs, device)
        .with_context(|| format!("cannot read input tensors from {}", inputs.display()))?;
    let outputs = run_component_tensors(kind, model_dir, &tensors, dtype, device)?;
    let outputs: HashMap<String, Tensor> = outputs
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)))
        .collect::<candle_core::Result<_>>()?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    candle_core::safetensors::save(&outputs, out)
        .with_context(|| format!("cannot write outputs to {}", out.display()))?;
    Ok(())
}

/// As [`run_component`], on tensors in memory.
pub fn run_component_tensors(
    kind: ComponentKind,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    if !model_dir.is_dir() {
        bail!("model directory {} does not exist", model_dir.display())
    }
    match kind {
        ComponentKind::Unet => crate::unet::conformance::run_unet(model_dir, inputs, dtype, device),
        ComponentKind::VaeEncode => {
            crate::vae::conformance::run_vae_encode(model_dir, inputs, dtype, device)
        }
        ComponentKind::VaeDecode => {
            crate::vae::conformance::run_vae_decode(model_dir, inputs, dtype, device)
        }
        ComponentKind::ClipText => run_clip_text(model_dir, inputs, dtype, device),
        ComponentKind::ClipVision => run_clip_vision(model_dir, inputs, dtype, device),
        ComponentKind::Llm => crate::llm::conformance::run_llm(model_dir, inputs, dtype, device),
    }
}

fn input<'a>(inputs: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| {
        let mut have: Vec<_> = inputs.keys().cloned().collect();
        have.sort();
        anyhow!(
            "input tensor `{name}` is missing (have: {})",
            have.join(", ")
        )
    })
}

/// Integer ids as u32 for the embedding lookup (i64 / i32 / u32 / u8 accepted).
fn ids_u32(t: &Tensor, name: &str) -> Result<Tensor> {
    match t.dtype() {
        DType::I64 | DType::U32 | DType::U8 => Ok(t.to_dtype(DType::U32)?),
        DType::I32 => Ok(t.to_dtype(DType::I64)?.to_dtype(DType::U32)?),
        other => bail!("input tensor `{name}` must hold integer ids, found {other:?}"),
    }
}

fn run_clip_text(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let model = ClipTextModel::load(model_dir, dtype, device)?;
    let ids = ids_u32(input(inputs, "input_ids")?, "input_ids")?.to_device(device)?;
    if ids.rank() != 2 {
        bail!(
            "input tensor `input_ids` must be (batch, seq), found {:?}",
            ids.dims()
        )
    }
    let mask = inputs
        .get("attention_mask")
        .map(|m| m.to_dtype(DType::F32)?.to_device(device))
        .transpose()?;
    let out = model
        .forward(&ids, mask.as_ref())
        .with_context(|| format!("running the CLIP text model from {}", model_dir.display()))?;
    let mut map = HashMap::from([
        ("last_hidden_state".to_string(), out.last_hidden_state),
        ("pooler_output".to_string(), out.pooler_output),
    ]);
    if let Some(t) = out.text_embeds {
        map.insert("text_embeds".to_string(), t);
    }
    Ok(map)
}

fn run_clip_vision(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let model = ClipVisionModel::load(model_dir, dtype, device)?;
    let pix = input(inputs, "pixel_values")?
        .to_dtype(dtype)?
        .to_device(device)?;
    let out = model
        .forward(&pix)
        .with_context(|| format!("running the CLIP vision model from {}", model_dir.display()))?;
    let mut map = HashMap::from([
        ("last_hidden_state".to_string(), out.last_hidden_state),
        ("pooler_output".to_string(), out.pooler_output),
    ]);
    if let Some(t) = out.image_embeds {
        map.insert("image_embeds".to_string(), t);
    }
    Ok(map)
}
