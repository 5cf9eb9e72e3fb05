//! The `component llm` conformance command: run a transformers LLM directory on given inputs
//! and hand back its outputs, for comparison with PyTorch.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};

use super::CausalLm;

/// Runs the causal LM in `model_dir` (in `dtype`) on `inputs`: `input_ids` (i64 / i32 / u32,
/// `(b, s)`) or `inputs_embeds` (`(b, s, embed_dim)`), plus an optional `attention_mask`
/// `(b, s)`. Returns `logits` `(b, s, vocab)` and `last_hidden_state` `(b, s, embed_dim)`.
pub fn run_llm(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<HashMap<String, Tensor>> {
    let lm = CausalLm::load(model_dir, dtype, device)?;
    let mask = inputs
        .get("attention_mask")
        .map(|m| m.to_device(device))
        .transpose()?;
    let mut cache = lm.new_cache();
    let out = if let Some(ids) = inputs.get("input_ids") {
        let ids = match ids.dtype() {
            DType::I64 | DType::U32 => ids.clone(),
            DType::U8 => ids.to_dtype(DType::U32)?,
            other => {
                // i32 and float ids: go through f64, exact for any realistic vocabulary.
                if other.is_float() {
                    bail!("input_ids must be integers, got {other:?}")
                }
                ids.to_dtype(DType::F64)?.to_dtype(DType::I64)?
            }
        };
        lm.forward_ids(&ids.to_device(device)?, &mut cache, mask.as_ref())
            .with_context(|| format!("running {} on input_ids", model_dir.display()))?
    } else if let Some(e) = inputs.get("inputs_embeds") {
        lm.forward_embeds(
            &e.to_dtype(dtype)?.to_device(device)?,
            &mut cache,
            mask.as_ref(),
        )
        .with_context(|| format!("running {} on inputs_embeds", model_dir.display()))?
    } else {
        let mut names: Vec<_> = inputs.keys().cloned().collect();
        names.sort();
        bail!("component llm needs `input_ids` or `inputs_embeds`; got {names:?}")
    };
    Ok(HashMap::from([
        ("logits".to_string(), out.logits.to_dtype(DType::F32)?),
        (
            "last_hidden_state".to_string(),
            out.last_hidden_state.to_dtype(DType::F32)?,
        ),
    ]))
}
