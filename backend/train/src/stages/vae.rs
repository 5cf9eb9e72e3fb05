//! Stage `vae`: the toy world's AutoencoderKL, trained on the dataset's frames with a
//! reconstruction loss and a small KL term, exported in the diffusers layout with its latent
//! scale factor measured from the data (SD's 0.18215 was chosen the same way: 1 / std of the
//! latents).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use models::vae::{AutoencoderKL, VaeConfig};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{grid, pixels_to_images, FrameSet};
use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// `[vae]`: the autoencoder's shape, the loss and how much data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VaeSection {
    /// Channels per resolution; `len - 1` halvings give the downsampling factor (4 -> f = 8).
    pub block_out_channels: Vec<usize>,
    /// ResNets per encoder block.
    pub layers_per_block: usize,
    /// Latent channels.
    pub latent_channels: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Self-attention in the mid blocks.
    pub mid_block_add_attention: bool,
    /// Weight of the KL term, relative to the per-pixel reconstruction loss as in SD's
    /// autoencoder (KL summed over the latent, reconstruction summed over the pixels).
    pub kl_weight: f64,
    /// Weight of the characters' pixels (the dataset's masks) in the reconstruction loss,
    /// against 1 for the rest. Characters cover about a tenth of a toy frame, and a plain MSE
    /// spends the decoder on backgrounds first: with 5 the reconstructions keep who is who far
    /// better at the same step count (docs/TRAINING.md). 1 is the plain MSE.
    pub character_weight: f64,
    /// Training frames held in memory (distinct frames of the train split, in story order).
    pub train_frames: usize,
    /// Validation frames for PSNR.
    pub val_frames: usize,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
}

impl Default for VaeSection {
    fn default() -> Self {
        Self {
            block_out_channels: vec![32, 32, 64, 64],
            layers_per_block: 1,
            latent_channels: 4,
            norm_num_groups: 32,
            mid_block_add_attention: true,
            kl_weight: 1e-6,
            character_weight: 1.0,
            train_frames: 8000,
            val_frames: 256,
            story_len: 4,
        }
    }
}

impl StageSection for VaeSection {
    const NAME: &'static str = "vae";
}

impl VaeSection {
    /// The diffusers `config.json` of this autoencoder for `size`-pixel frames.
    pub fn diffusers_config(&self, size: u32, scaling_factor: f64) -> serde_json::Value {
        let n = self.block_out_channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": vec!["DownEncoderBlock2D"; n],
            "up_block_types": vec!["UpDecoderBlock2D"; n],
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_num_groups,
            "sample_size": size,
            "scaling_factor": scaling_factor,
            "act_fn": "silu",
            "mid_block_add_attention": self.mid_block_add_attention,
        })
    }
}

/// One batch: frames in `[-1, 1]`, the posterior-sampling noise and, when characters are
/// weighted, the per-pixel loss weights.
pub struct VaeBatch {
    pixels: Vec<f32>,
    weights: Option<Vec<f32>>,
    noise: Vec<f32>,
    n: usize,
}

/// Training frames and the latent shape the noise needs.
pub struct VaeSource {
    frames: FrameSet,
    latent_elems: usize,
    character_weight: f64,
}

/// Standard normal values from `rng` (Box-Muller).
pub fn gaussian(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1: f64 = 1.0 - rng.gen::<f64>();
            let u2: f64 = rng.gen::<f64>();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

impl BatchSource for VaeSource {
    type Batch = VaeBatch;
    fn len(&self) -> usize {
        self.frames.len()
    }
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<VaeBatch> {
        Ok(VaeBatch {
            pixels: self.frames.batch_pixels(indices),
            weights: (self.character_weight != 1.0).then(|| {
                self.frames
                    .batch_pixel_weights(indices, self.character_weight as f32)
            }),
            noise: gaussian(rng, indices.len() * self.latent_elems),
            n: indices.len(),
        })
    }
}

/// The trainable autoencoder and its validation frames.
pub struct VaeStage {
    varmap: VarMap,
    vae: AutoencoderKL,
    section: VaeSection,
    device: Device,
    val: FrameSet,
    size: u32,
    latent: (usize, usize),
}

/// Loads the data and builds the stage: `(stage, training source)`.
pub fn prepare(
    section: &VaeSection,
    data: &Path,
    seed: u64,
    device: &Device,
) -> Result<(VaeStage, Arc<VaeSource>, String)> {
    anyhow::ensure!(
        section.character_weight.is_finite() && section.character_weight > 0.0,
        "[vae] character_weight must be > 0 (1 is the plain MSE)"
    );
    let (train, val) = train_and_val_frames(
        data,
        section.story_len,
        section.train_frames,
        section.val_frames,
    )?;
    let (w, h) = train.size();
    let cfg: VaeConfig = serde_json::from_value(section.diffusers_config(w, 1.0))?;
    cfg.validate()
        .context("[vae] describes an unsupported autoencoder")?;
    let down = cfg.downscale() as u32;
    anyhow::ensure!(
        w % down == 0,
        "{w}-pixel frames do not divide by the downsampling factor {down}"
    );
    let latent = ((h / down) as usize, (w / down) as usize);
    let varmap = VarMap::new();
    let vb = crate::stages::seeded_var_builder(&varmap, seed, DType::F32, device);
    let vae = AutoencoderKL::new(vb, &cfg)?;
    let fingerprint = format!("{:016x}-{:016x}", train.fingerprint(), val.fingerprint());
    let source = Arc::new(VaeSource {
        frames: train,
        latent_elems: section.latent_channels * latent.0 * latent.1,
        character_weight: section.character_weight,
    });
    let stage = VaeStage {
        varmap,
        vae,
        section: section.clone(),
        device: device.clone(),
        val,
        size: w,
        latent,
    };
    Ok((stage, source, fingerprint))
}

impl VaeStage {
    fn pixels(&self, values: Vec<f32>, n: usize) -> Result<Tensor> {
        let s = self.size as usize;
        Ok(Tensor::from_vec(values, (n, 3, s, s), &Device::Cpu)?.to_device(&self.device)?)
    }

    /// Reconstructions (posterior mode) of validation frames `range`, `(N, 3, H, W)` in `[-1, 1]`.
    fn reconstruct(&self, indices: &[usize]) -> Result<(Tensor, Tensor)> {
        let x = self.pixels(self.val.batch_pixels(indices), indices.len())?;
        let z = self.vae.encode(&x)?.mode().detach();
        let xr = self.vae.decode(&z)?.detach();
        Ok((x, xr))
    }

    /// Mean PSNR (dB, on `[0, 1]` pixels) and MSE over the validation frames.
    pub fn psnr(&self) -> Result<(f64, f64)> {
        validation_psnr(self.val.len(), |idx| self.reconstruct(idx))
    }

    /// `1 / std` of the latent means over up to 512 training frames: the scale that gives the
    /// diffusion model unit-variance latents.
    pub fn measure_scaling_factor(&self, source: &VaeSource) -> Result<f64> {
        let n = source.frames.len().min(512);
        let mut sum = 0f64;
        let mut sq = 0f64;
        let mut count = 0f64;
        let idx: Vec<usize> = (0..n).collect();
        for chunk in idx.chunks(32) {
            let x = self.pixels(source.frames.batch_pixels(chunk), chunk.len())?;
            let z = self
                .vae
                .encode(&x)?
                .mode()
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?;
            count += z.len() as f64;
            sum += z.iter().sum::<f64>();
            sq += z.iter().map(|v| v * v).sum::<f64>();
        }
        let mean = sum / count;
        let std = (sq / count - mean * mean).max(1e-12).sqrt();
        Ok(1.0 / std)
    }

    /// Originals (top row) over reconstructions (bottom row) of the first `n` validation frames.
    pub fn reconstruction_grid(&self, n: usize) -> Result<image::RgbImage> {
        let idx: Vec<usize> = (0..n.min(self.val.len())).collect();
        let (x, xr) = self.reconstruct(&idx)?;
        originals_over_reconstructions(&x, &xr, self.size)
    }

    /// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors`.
    pub fn export(&self, dir: &Path, scaling_factor: f64) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cfg = self.section.diffusers_config(self.size, scaling_factor);
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
        self.varmap
            .save(dir.join("diffusion_pytorch_model.safetensors"))
            .with_context(|| format!("writing the VAE weights into {}", dir.display()))?;
        Ok(())
    }

    /// The latent grid size `(h, w)`.
    pub fn latent_size(&self) -> (usize, usize) {
        self.latent
    }
}

/// The train and validation frames of `data` (the first `story_len` of each story, up to
/// `train_frames` / `val_frames` distinct ones), refused unless square and of one size.
pub(crate) fn train_and_val_frames(
    data: &Path,
    story_len: usize,
    train_frames: usize,
    val_frames: usize,
) -> Result<(FrameSet, FrameSet)> {
    use data::dataset::Split;
    let train = FrameSet::load(data, Split::Train, story_len, 0, train_frames)?;
    let val = FrameSet::load(data, Split::Val, story_len, 0, val_frames)?;
    let (w, h) = train.size();
    anyhow::ensure!(w == h, "frames must be square, got {w}x{h}");
    anyhow::ensure!(
        val.size() == (w, h),
        "validation frames are {:?}, training frames {:?}",
        val.size(),
        (w, h)
    );
    Ok((train, val))
}

/// Mean PSNR and MSE (see [`mean_psnr`]) of `n` validation frames, which `reconstruct` returns
/// with their reconstructions, both `(N, 3, H, W)` in `[-1, 1]`, 32 at a time.
pub(crate) fn validation_psnr(
    n: usize,
    reconstruct: impl Fn(&[usize]) -> Result<(Tensor, Tensor)>,
) -> Result<(f64, f64)> {
    let all: Vec<usize> = (0..n).collect();
    let mut per_image = Vec::new();
    for chunk in all.chunks(32) {
        let (x, xr) = reconstruct(chunk)?;
        per_image.extend(
            (xr.clamp(-1f32, 1f32)? - &x)?
                .sqr()?
                .flatten_from(1)?
                .mean(1)?
                .to_vec1::<f32>()?,
        );
    }
    Ok(mean_psnr(&per_image))
}

/// The validation record of both VAE stages: `psnr_db` and `mse`.
pub(crate) fn psnr_metrics((psnr, mse): (f64, f64)) -> BTreeMap<String, f64> {
    BTreeMap::from([("psnr_db".to_owned(), psnr), ("mse".to_owned(), mse)])
}

/// Frames `x` (top row) over their reconstructions `xr` (bottom row), both `(N, 3, s, s)`.
pub(crate) fn originals_over_reconstructions(
    x: &Tensor,
    xr: &Tensor,
    s: u32,
) -> Result<image::RgbImage> {
    let n = x.dim(0)?;
    let mut images = pixels_to_images(&x.flatten_all()?.to_vec1::<f32>()?, n, s, s);
    images.extend(pixels_to_images(
        &xr.flatten_all()?.to_vec1::<f32>()?,
        n,
        s,
        s,
    ));
    Ok(grid(&images, n))
}

/// `(mean PSNR in dB on [0, 1] pixels, mean MSE)` of images whose per-image MSEs on `[-1, 1]`
/// pixels are `per_image`.
pub(crate) fn mean_psnr(per_image: &[f32]) -> (f64, f64) {
    let n = per_image.len().max(1) as f64;
    let (mut psnr, mut mse) = (0f64, 0f64);
    for &m in per_image {
        let m01 = (m as f64 / 4.0).max(1e-12); // [-1, 1] -> [0, 1] scales the MSE by 1/4
        psnr += 10.0 * (1.0 / m01).log10();
        mse += m as f64;
    }
    (psnr / n, mse / n)
}

/// The reconstruction term: the plain MSE, or with per-pixel `weights` `(N, 1, H, W)` the
/// weighted mean `sum(w * err^2) / (3 * sum(w))`, which is the plain MSE when every weight is 1.
pub(crate) fn reconstruction_loss(
    xr: &Tensor,
    x: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    Ok(match weights {
        Some(w) => {
            let channels = x.dim(1)? as f64;
            let total = w.sum_all()?.to_scalar::<f32>()? as f64 * channels;
            ((xr - x)?.sqr()?.broadcast_mul(w)?.sum_all()? / total)?
        }
        None => nn::mse(xr, x)?,
    })
}

impl Stage for VaeStage {
    type Batch = VaeBatch;

    fn name(&self) -> &'static str {
        "vae"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        crate::stages::named_vars(&self.varmap)
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("norm")
    }

    fn loss(&mut self, b: &VaeBatch, _step: u64) -> Result<StepLoss> {
        let x = self.pixels(b.pixels.clone(), b.n)?;
        let post = self.vae.encode(&x)?;
        let (lh, lw) = self.latent;
        let noise = Tensor::from_vec(
            b.noise.clone(),
            (b.n, self.section.latent_channels, lh, lw),
            &Device::Cpu,
        )?
        .to_device(&self.device)?;
        let z = post.sample(&noise)?;
        let xr = self.vae.decode(&z)?;
        let weights = match &b.weights {
            Some(w) => {
                let s = self.size as usize;
                Some(
                    Tensor::from_vec(w.clone(), (b.n, 1, s, s), &Device::Cpu)?
                        .to_device(&self.device)?,
                )
            }
            None => None,
        };
        let recon = reconstruction_loss(&xr, &x, weights.as_ref())?;
        // KL(N(mu, sigma) || N(0, 1)) summed over the latent, per pixel of the image.
        let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?.sub(&post.logvar)?;
        let pixels = (3 * self.size * self.size) as f64;
        let kl = (kl.sum_all()? * (0.5 / (b.n as f64 * pixels)))?;
        let loss = (&recon + (&kl * self.section.kl_weight)?)?;
        let parts = vec![
            ("recon_mse", recon.to_scalar::<f32>()? as f64),
            ("kl_per_pixel", kl.to_scalar::<f32>()? as f64),
        ];
        Ok(StepLoss { loss, parts })
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        Ok(psnr_metrics(self.psnr()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loss(xr: &Tensor, x: &Tensor, w: Option<&Tensor>) -> f32 {
        reconstruction_loss(xr, x, w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn character_pixels_weigh_more_in_the_reconstruction_loss() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 2, 2), DType::F32, &dev).unwrap();
        // An error of 1 in every channel of pixel (0, 0) only.
        let mut err = vec![0f32; 12];
        for c in 0..3 {
            err[c * 4] = 1.0;
        }
        let xr = Tensor::from_vec(err, (1, 3, 2, 2), &dev).unwrap();
        let plain = loss(&xr, &x, None);
        assert!((plain - 0.25).abs() < 1e-6);
        let ones = Tensor::ones((1, 1, 2, 2), DType::F32, &dev).unwrap();
        assert!(
            (loss(&xr, &x, Some(&ones)) - plain).abs() < 1e-6,
            "weights of 1 are the plain MSE"
        );
        // Pixel (0, 0) is a character's, weighted 5: 5 / (5 + 3).
        let on_character = Tensor::from_vec(vec![5f32, 1.0, 1.0, 1.0], (1, 1, 2, 2), &dev).unwrap();
        assert!((loss(&xr, &x, Some(&on_character)) - 5.0 / 8.0).abs() < 1e-6);
        // The same error on a background pixel counts less than in the plain MSE.
        let elsewhere = Tensor::from_vec(vec![1f32, 5.0, 1.0, 1.0], (1, 1, 2, 2), &dev).unwrap();
        assert!((loss(&xr, &x, Some(&elsewhere)) - 1.0 / 8.0).abs() < 1e-6);
    }
}
