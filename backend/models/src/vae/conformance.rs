//! Conformance entry points for the `component` command: run a diffusers VAE directory on
//! named input tensors and return named outputs.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

use super::AutoencoderKL;
use crate::unet::conformance::input;

/// Encodes `sample (N, 3, H, W)` with the VAE in `model_dir` (a `vae/` or pipeline
/// directory), in `dtype`; returns `mean` and (clamped) `logvar` of the posterior.
pub fn run_vae_encode(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let vae = AutoencoderKL::load(model_dir, dtype, device)?;
    let x = input(inputs, "sample")?
        .to_dtype(dtype)?
        .to_device(device)?;
    let post = vae
        .encode(&x)
        .with_context(|| format!("encoding with VAE from {}", model_dir.display()))?;
    Ok(HashMap::from([
        ("mean".to_string(), post.mean),
        ("logvar".to_string(), post.logvar),
    ]))
}

/// Decodes the unscaled `latent (N, C, h, w)` with the VAE in `model_dir`, in `dtype`; returns
/// `sample`.
pub fn run_vae_decode(
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let vae = AutoencoderKL::load(model_dir, dtype, device)?;
    let z = input(inputs, "latent")?
        .to_dtype(dtype)?
        .to_device(device)?;
    let out = vae
        .decode(&z)
        .with_context(|| format!("decoding with VAE from {}", model_dir.display()))?;
    Ok(HashMap::from([("sample".to_string(), out)]))
}
