//! Stage `vae-decoder`: the VAE's decoder fine-tuned with the encoder frozen, as SD's released
//! autoencoders were (`ft-EMA`, `ft-MSE`). The latent space, and so its scale factor and every
//! model trained on it, stays exactly as `vae` left it; only the pixels decoded from a latent
//! get sharper. With the encoder frozen, each frame's posterior is computed once, and a step
//! runs the decoder alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use models::vae::{AutoencoderKL, VaeConfig};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::vae::gaussian;
use super::FrameSet;
use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// `[vae_decoder]`: the loss and how much data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeDecoderSection {
    /// Weight of the characters' pixels in the reconstruction loss (1: the plain MSE, which is
    /// what PSNR measures); see `[vae] character_weight`.
    pub character_weight: f64,
    /// Decode a posterior sample (`mean + std * noise`), as the `vae` stage trains, rather
    /// than the mean: the decoder then also learns to take latents slightly off the encoder's,
    /// which is what a diffusion model's samples are.
    pub sample_posterior: bool,
    /// Training frames (distinct frames of the train split, in story order).
    pub train_frames: usize,
    /// Validation frames for PSNR.
    pub val_frames: usize,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
}

impl Default for VaeDecoderSection {
    fn default() -> Self {
        Self {
            character_weight: 1.0,
            sample_posterior: true,
            train_frames: 8000,
            val_frames: 256,
            story_len: 4,
        }
    }
}

impl StageSection for VaeDecoderSection {
    const NAME: &'static str = "vae_decoder";
}

/// Whether a VAE tensor belongs to the decoding half (trained here) rather than the encoding
/// half (frozen).
fn is_decoder_tensor(name: &str) -> bool {
    name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
}

/// Every frame's posterior, `(mean, std)` per latent element, frame after frame.
struct Posteriors {
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Elements of one frame's latent.
    elems: usize,
}

impl Posteriors {
    fn gather(&self, indices: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let e = self.elems;
        let mut mean = Vec::with_capacity(indices.len() * e);
        let mut std = Vec::with_capacity(indices.len() * e);
        for &i in indices {
            mean.extend_from_slice(&self.mean[i * e..(i + 1) * e]);
            std.extend_from_slice(&self.std[i * e..(i + 1) * e]);
        }
        (mean, std)
    }
}

/// One batch: target frames, their latents (sampled or the mean) and the loss weights.
pub struct VaeDecoderBatch {
    pixels: Vec<f32>,
    latents: Vec<f32>,
    weights: Option<Vec<f32>>,
    n: usize,
}

/// Training frames with their frozen posteriors.
pub struct VaeDecoderSource {
    frames: FrameSet,
    posteriors: Posteriors,
    section: VaeDecoderSection,
}

impl BatchSource for VaeDecoderSource {
    type Batch = VaeDecoderBatch;
    fn len(&self) -> usize {
        self.frames.len()
    }
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<VaeDecoderBatch> {
        let (mean, std) = self.posteriors.gather(indices);
        let latents = if self.section.sample_posterior {
            let noise = gaussian(rng, mean.len());
            mean.iter()
                .zip(&std)
                .zip(&noise)
                .map(|((m, s), n)| m + s * n)
                .collect()
        } else {
            mean
        };
        let cw = self.section.character_weight;
        Ok(VaeDecoderBatch {
            pixels: self.frames.batch_pixels(indices),
            latents,
            weights: (cw != 1.0).then(|| self.frames.batch_pixel_weights(indices, cw as f32)),
            n: indices.len(),
        })
    }
}

/// The autoencoder (decoder trainable), its validation frames and their latent means.
pub struct VaeDecoderStage {
    varmap: VarMap,
    vae: AutoencoderKL,
    config_json: serde_json::Value,
    dir: PathBuf,
    device: Device,
    val: FrameSet,
    val_latents: Vec<f32>,
    size: usize,
    latent_shape: (usize, usize, usize),
}

/// Loads `OUT/sd/vae` (written by stage `vae`), the data and every frame's posterior:
/// `(stage, training source, data fingerprint)`.
pub fn prepare(
    section: &VaeDecoderSection,
    data: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<(VaeDecoderStage, Arc<VaeDecoderSource>, String)> {
    anyhow::ensure!(
        section.character_weight.is_finite() && section.character_weight > 0.0,
        "[vae_decoder] character_weight must be > 0 (1 is the plain MSE)"
    );
    let dir = out.join("sd").join("vae");
    let config_path = dir.join("config.json");
    let weights_path = dir.join("diffusion_pytorch_model.safetensors");
    anyhow::ensure!(
        config_path.exists() && weights_path.exists(),
        "{} holds no trained VAE (config.json and diffusion_pytorch_model.safetensors): run `train vae` into {} first",
        dir.display(),
        out.display()
    );
    let config_text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let config_json: serde_json::Value = serde_json::from_str(&config_text)
        .with_context(|| format!("parsing {}", config_path.display()))?;
    let cfg: VaeConfig = serde_json::from_value(config_json.clone())
        .with_context(|| format!("{} is not an AutoencoderKL config", config_path.display()))?;
    cfg.validate().with_context(|| {
        format!(
            "{} describes an unsupported autoencoder",
            config_path.display()
        )
    })?;

    let (train, val) = super::vae::train_and_val_frames(
        data,
        section.story_len,
        section.train_frames,
        section.val_frames,
    )?;
    let (w, h) = train.size();
    anyhow::ensure!(
        cfg.sample_size.is_none_or(|s| s == w as usize),
        "the VAE in {} was trained on {:?}-pixel frames, the dataset's are {w}",
        dir.display(),
        cfg.sample_size
    );
    let down = cfg.downscale();
    let latent_shape = (cfg.latent_channels, h as usize / down, w as usize / down);

    // Variables for every tensor, then the trained values: missing, extra or misshapen tensors
    // are errors, so a file that does not match its config is refused here.
    let varmap = VarMap::new();
    let vb = crate::stages::seeded_var_builder(&varmap, seed, DType::F32, device);
    let vae = AutoencoderKL::new(vb, &cfg)?;
    load_into(&varmap, &weights_path, device)?;

    let elems = latent_shape.0 * latent_shape.1 * latent_shape.2;
    let posteriors = encode_all(&vae, &train, w as usize, elems, device)?;
    let val_latents = encode_all(&vae, &val, w as usize, elems, device)?.mean;

    let fingerprint = format!(
        "{:016x}-{:016x}-{:016x}",
        train.fingerprint(),
        val.fingerprint(),
        super::fnv1a(
            std::fs::read(&weights_path)?
                .into_iter()
                .chain(config_text.into_bytes()),
            super::FNV_OFFSET
        )
    );
    let source = Arc::new(VaeDecoderSource {
        frames: train,
        posteriors,
        section: section.clone(),
    });
    let stage = VaeDecoderStage {
        varmap,
        vae,
        config_json,
        dir,
        device: device.clone(),
        val,
        val_latents,
        size: w as usize,
        latent_shape,
    };
    Ok((stage, source, fingerprint))
}

/// Sets every variable of `varmap` from the safetensors file at `path` (any float dtype, read
/// as f32), refusing a file whose tensors do not match the variables one for one.
fn load_into(varmap: &VarMap, path: &Path, device: &Device) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    let data = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("the VAE's variables are poisoned by an earlier panic"))?;
    for (name, var) in data.iter() {
        let t = tensors
            .get(name)
            .with_context(|| format!("{} has no tensor `{name}`", path.display()))?;
        anyhow::ensure!(
            t.shape() == var.shape(),
            "{}: `{name}` is {:?}, the config needs {:?}",
            path.display(),
            t.shape(),
            var.shape()
        );
        var.set(&t.to_dtype(DType::F32)?)?;
    }
    if let Some(extra) = tensors.keys().find(|k| !data.contains_key(*k)) {
        anyhow::bail!(
            "{} holds `{extra}`, which the config's autoencoder does not have",
            path.display()
        );
    }
    Ok(())
}

/// The posterior of every frame of `frames` under the (frozen) encoder.
fn encode_all(
    vae: &AutoencoderKL,
    frames: &FrameSet,
    size: usize,
    elems: usize,
    device: &Device,
) -> Result<Posteriors> {
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    let all: Vec<usize> = (0..frames.len()).collect();
    for chunk in all.chunks(64) {
        let x = Tensor::from_vec(
            frames.batch_pixels(chunk),
            (chunk.len(), 3, size, size),
            &Device::Cpu,
        )?
        .to_device(device)?;
        let post = vae.encode(&x)?;
        mean.extend(post.mean.detach().flatten_all()?.to_vec1::<f32>()?);
        std.extend(post.std()?.detach().flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(Posteriors { mean, std, elems })
}

impl VaeDecoderStage {
    fn tensor(&self, values: Vec<f32>, shape: (usize, usize, usize, usize)) -> Result<Tensor> {
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(&self.device)?)
    }

    /// Validation frames `indices` and their reconstructions from the posterior mean, both
    /// `(N, 3, H, W)` in `[-1, 1]`.
    fn reconstruct(&self, indices: &[usize]) -> Result<(Tensor, Tensor)> {
        let (c, lh, lw) = self.latent_shape;
        let e = c * lh * lw;
        let z: Vec<f32> = indices
            .iter()
            .flat_map(|&i| self.val_latents[i * e..(i + 1) * e].iter().copied())
            .collect();
        let z = self.tensor(z, (indices.len(), c, lh, lw))?;
        let x = self.tensor(
            self.val.batch_pixels(indices),
            (indices.len(), 3, self.size, self.size),
        )?;
        Ok((x, self.vae.decode(&z)?.detach()))
    }

    /// Mean PSNR (dB, on `[0, 1]` pixels) and MSE over the validation frames.
    pub fn psnr(&self) -> Result<(f64, f64)> {
        super::vae::validation_psnr(self.val.len(), |idx| self.reconstruct(idx))
    }

    /// Originals (top row) over reconstructions (bottom row) of the first `n` validation frames.
    pub fn reconstruction_grid(&self, n: usize) -> Result<image::RgbImage> {
        let idx: Vec<usize> = (0..n.min(self.val.len())).collect();
        let (x, xr) = self.reconstruct(&idx)?;
        super::vae::originals_over_reconstructions(&x, &xr, self.size as u32)
    }

    /// Rewrites the VAE's weights in `OUT/sd/vae` (the frozen encoder's unchanged, the config,
    /// scale factor included, untouched), through a temporary file so a failed write leaves
    /// the previous VAE whole.
    pub fn export(&self) -> Result<()> {
        let path = self.dir.join("diffusion_pytorch_model.safetensors");
        let tmp = self.dir.join(".diffusion_pytorch_model.safetensors.tmp");
        self.varmap
            .save(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replacing {}", path.display()))?;
        Ok(())
    }

    /// The VAE's `config.json`, as read.
    pub fn config_json(&self) -> &serde_json::Value {
        &self.config_json
    }
}

impl Stage for VaeDecoderStage {
    type Batch = VaeDecoderBatch;

    fn name(&self) -> &'static str {
        "vae-decoder"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        crate::stages::named_vars(&self.varmap)
            .into_iter()
            .filter(|(name, _)| is_decoder_tensor(name))
            .collect()
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("norm")
    }

    fn loss(&mut self, b: &VaeDecoderBatch, _step: u64) -> Result<StepLoss> {
        let (c, lh, lw) = self.latent_shape;
        let z = self.tensor(b.latents.clone(), (b.n, c, lh, lw))?;
        let x = self.tensor(b.pixels.clone(), (b.n, 3, self.size, self.size))?;
        let weights = match &b.weights {
            Some(w) => Some(self.tensor(w.clone(), (b.n, 1, self.size, self.size))?),
            None => None,
        };
        let xr = self.vae.decode(&z)?;
        let loss = super::vae::reconstruction_loss(&xr, &x, weights.as_ref())?;
        let parts = vec![("recon_mse", loss.to_scalar::<f32>()? as f64)];
        Ok(StepLoss { loss, parts })
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        Ok(super::vae::psnr_metrics(self.psnr()?))
    }
}

#[cfg(test)]
mod tests {
    use super::is_decoder_tensor;

    #[test]
    fn only_the_decoding_half_is_trained() {
        assert!(is_decoder_tensor("decoder.conv_in.weight"));
        assert!(is_decoder_tensor("post_quant_conv.bias"));
        assert!(!is_decoder_tensor("encoder.conv_in.weight"));
        assert!(!is_decoder_tensor("quant_conv.weight"));
    }
}
