//! Conformance entry point for the `component` command: run a diffusers UNet directory on
//! named input tensors and return named outputs, for comparison with diffusers' own outputs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::UNet2DConditionModel;

/// Looks up a required input tensor, naming what is missing.
pub(crate) fn input<'a>(inputs: &'a HashMap<String, Tensor>, name: &str) -> Result<&'a Tensor> {
    inputs.get(name).ok_or_else(|| {
        let mut have: Vec<_> = inputs.keys().cloned().collect();
        have.sort();
        anyhow!(
            "input tensor `{name}` is missing (have: {})",
            have.join(", ")
        )
    })
}

/// Runs the UNet in `model_dir` (a `unet/` directory or a pipeline directory containing one)
/// in `dtype` on `sample (B, C, H, W)`, `timestep` (i64 / i32 / float, scalar or `(B,)`) and
/// `encoder_hidden_states (B, tokens, dim)`; returns `{"sample": prediction}`.
pub fn run_unet(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let unet = UNet2DConditionModel::load(model_dir, dtype, device)?;
    let sample = input(inputs, "sample")?
        .to_dtype(dtype)?
        .to_device(device)?;
    let timestep = input(inputs, "timestep")?
        .to_dtype(DType::F32)?
        .to_device(device)?;
    let ctx = input(inputs, "encoder_hidden_states")?
        .to_dtype(dtype)?
        .to_device(device)?;
    let out = unet
        .forward(&sample, &timestep, &ctx)
        .with_context(|| format!("running UNet from {}", model_dir.display()))?;
    Ok(HashMap::from([("sample".to_string(), out)]))
}
