//! Stage `char-ldm` (StoryGPT-V stage 1): the character-aware latent diffusion model.
//!
//! Trainable: the whole UNet (from scratch for the toy bundle), the FuseModule and the last
//! `vision_trainable_layers` layers of the CLIP vision tower; frozen: the CLIP text encoder and
//! the VAE, both read from the bundle the earlier stages wrote. Loss: epsilon MSE plus
//! `lreg_weight * L_reg` over every cross-attention layer, with the dataset's character masks
//! (method.md, Eq. 2-3). Conditioning mix per sample: empty caption (classifier-free guidance),
//! plain CLIP text, or the fused embedding (the named characters' tokens fused with their
//! portraits). The frames' VAE latents are computed once and cached in the run directory.
//!
//! Writes `OUT/sd/unet` (diffusers layout, EMA weights), `OUT/sd/scheduler` and
//! `OUT/storygpt-v/stage1.safetensors` (`postfuse_module.*` and the tuned tower as
//! `image_encoder.*`), the layout the bundle loader reads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::VarMap;
use data::dataset::{DatasetKind, DatasetReader, Split};
use image::RgbImage;
use models::char_ldm::{CharLdm, SampleOptions};
use models::clip::{ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel};
use models::fuse::{CharacterSlot, FuseModule, MAX_CHARACTERS};
use models::lreg::{lreg_loss, CharacterTokens};
use models::schedulers::{DdpmScheduler, PredictionType, SchedulerConfig, SchedulerKind};
use models::unet::{AttentionCapture, UNet2DConditionModel, UNetConfig};
use models::vae::AutoencoderKL;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::vae::gaussian;
use super::{fnv1a, grid, FNV_OFFSET};
use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// `[char_ldm]`: the UNet's shape, the loss, the conditioning mix and how much data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CharLdmSection {
    /// UNet channels per resolution (each but the last halves the latent).
    pub block_out_channels: Vec<usize>,
    /// Whether each resolution has cross-attention (`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`).
    pub cross_attention: Vec<bool>,
    /// ResNets per down block.
    pub layers_per_block: usize,
    /// Channels per attention head.
    pub attention_head_dim: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Weight of L_reg (1e-3 as the authors; 0 for the ablation without it).
    pub lreg_weight: f64,
    /// Probability of the empty caption (classifier-free guidance).
    pub empty_prob: f64,
    /// Probability of the plain CLIP text condition (the rest is fused).
    pub text_prob: f64,
    /// Probability of restricting the loss to the characters' pixels (0 turns it off; the
    /// paper's option uses 0.3).
    pub masked_loss_prob: f64,
    /// Min-SNR-gamma loss weighting (Hang et al. 2023): each sample's epsilon MSE is weighted
    /// by `min(SNR(t), gamma) / SNR(t)`, so the many nearly noise-free timesteps, whose
    /// gradients fight the layout-forming noisy ones, count less. 0 turns it off (plain MSE).
    pub snr_gamma: f64,
    /// What the UNet predicts: `epsilon` (SD 1.5, the paper) or `v_prediction`. The toy
    /// bundle predicts v: at 8x8 latents an epsilon model learns almost nothing about the
    /// layout from the noisiest timesteps (its loss there is tiny whatever the caption), and
    /// sampling starts from exactly those (docs/TRAINING.md).
    pub prediction_type: PredictionType,
    /// Rescale the noise schedule to zero terminal SNR (Lin et al. 2023), so the last training
    /// timestep is pure noise as sampling's first one is. Needs `v_prediction`.
    pub zero_terminal_snr: bool,
    /// Trailing CLIP vision layers trained (the authors train 2).
    pub vision_trainable_layers: usize,
    /// Training frames (distinct frames of the train split, in story order).
    pub train_frames: usize,
    /// Validation frames for the denoising loss.
    pub val_frames: usize,
    /// Validation frames sampled into the grid at each validation.
    pub sample_frames: usize,
    /// Sampling steps for the grid.
    pub sample_steps: usize,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
}

impl Default for CharLdmSection {
    fn default() -> Self {
        Self {
            block_out_channels: vec![64, 128],
            cross_attention: vec![true, false],
            layers_per_block: 1,
            attention_head_dim: 8,
            norm_num_groups: 32,
            lreg_weight: 1e-3,
            empty_prob: 0.1,
            text_prob: 0.1,
            masked_loss_prob: 0.0,
            snr_gamma: 0.0,
            prediction_type: PredictionType::Epsilon,
            zero_terminal_snr: false,
            vision_trainable_layers: 2,
            train_frames: 8000,
            val_frames: 128,
            sample_frames: 8,
            sample_steps: 30,
            story_len: 4,
        }
    }
}

impl StageSection for CharLdmSection {
    const NAME: &'static str = "char_ldm";
}

impl CharLdmSection {
    /// The noise schedule: SD 1.5's, with this section's parameterisation and terminal SNR.
    pub fn scheduler_config(&self) -> SchedulerConfig {
        SchedulerConfig {
            prediction_type: self.prediction_type,
            rescale_betas_zero_snr: self.zero_terminal_snr,
            ..SchedulerConfig::stable_diffusion_v1_5()
        }
    }

    /// The scheduler's `scheduler_config.json` written into the bundle.
    pub fn scheduler_json(&self) -> serde_json::Value {
        let mut v = models::bundle::random::sd15_scheduler_json();
        v["prediction_type"] = serde_json::to_value(self.prediction_type).unwrap_or_default();
        v["rescale_betas_zero_snr"] = json!(self.zero_terminal_snr);
        v
    }

    /// The diffusers `config.json` of the UNet for `latent`-sized latents of `channels`
    /// channels (the VAE's) and context width `context_dim`.
    pub fn diffusers_config(
        &self,
        channels: usize,
        latent: usize,
        context_dim: usize,
    ) -> serde_json::Value {
        let down: Vec<&str> = self
            .cross_attention
            .iter()
            .map(|&a| {
                if a {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = self
            .cross_attention
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        json!({
            "_class_name": "UNet2DConditionModel",
            "sample_size": latent,
            "in_channels": channels,
            "out_channels": channels,
            "down_block_types": down,
            "up_block_types": up,
            "block_out_channels": self.block_out_channels,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.attention_head_dim,
            "cross_attention_dim": context_dim,
            "norm_num_groups": self.norm_num_groups,
            "act_fn": "silu",
        })
    }

    fn check(&self) -> Result<()> {
        anyhow::ensure!(
            !self.block_out_channels.is_empty()
                && self.block_out_channels.len() == self.cross_attention.len(),
            "[char_ldm] block_out_channels ({}) and cross_attention ({}) need one entry per resolution",
            self.block_out_channels.len(),
            self.cross_attention.len()
        );
        anyhow::ensure!(
            self.cross_attention.iter().any(|&a| a),
            "[char_ldm] cross_attention: at least one resolution needs cross-attention (the captions condition through it)"
        );
        let p = [self.empty_prob, self.text_prob, self.masked_loss_prob];
        anyhow::ensure!(
            p.iter().all(|x| (0.0..=1.0).contains(x)) && self.empty_prob + self.text_prob <= 1.0,
            "[char_ldm] empty_prob, text_prob and masked_loss_prob are probabilities, and empty_prob + text_prob <= 1"
        );
        anyhow::ensure!(
            !self.zero_terminal_snr || self.prediction_type == PredictionType::VPrediction,
            "[char_ldm] zero_terminal_snr needs prediction_type = \"v_prediction\" (at zero SNR the noise is the input itself, and an epsilon model learns nothing there)"
        );
        anyhow::ensure!(
            self.snr_gamma >= 0.0,
            "[char_ldm] snr_gamma must be >= 0 (0: plain MSE)"
        );
        anyhow::ensure!(
            self.lreg_weight >= 0.0,
            "[char_ldm] lreg_weight must be >= 0"
        );
        anyhow::ensure!(
            self.val_frames > 0 && self.sample_frames > 0 && self.sample_steps > 0,
            "[char_ldm] val_frames, sample_frames and sample_steps must be positive"
        );
        Ok(())
    }
}

/// One training frame, ready for batching.
struct Frame {
    caption: String,
    /// Scaled VAE latent (posterior mean times the bundle's scaling factor), `(C, h, w)`.
    latent: Vec<f32>,
    /// Caption ids (77).
    ids: Vec<u32>,
    /// Named characters: `(token index, cast index)`, at most [`MAX_CHARACTERS`].
    slots: Vec<(usize, usize)>,
    /// The mask of each slot's character, `H * W` of the frame.
    masks: Vec<Vec<bool>>,
}

/// How a sample is conditioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CondMode {
    /// Empty caption.
    Empty,
    /// Plain CLIP text.
    Text,
    /// Text with the named characters fused with their portraits.
    Fused,
}

/// One batch (host memory).
pub struct CharLdmBatch {
    n: usize,
    latents: Vec<f32>,
    noise: Vec<f32>,
    timesteps: Vec<usize>,
    /// The frozen text encoder's output for each sample's caption (or the empty one),
    /// `(n, tokens, d)`, read from the cache computed once before training.
    text: Vec<f32>,
    modes: Vec<CondMode>,
    slots: Vec<Vec<(usize, usize)>>,
    /// Per sample, the token index of each slot whose character has a mask (L_reg's targets).
    lreg_tokens: Vec<Vec<usize>>,
    /// `(n, MAX_CHARACTERS, H, W)`: mask `k` belongs to `lreg_tokens[i][k]` (zeros after).
    masks: Vec<f32>,
    /// Whether each sample's loss is restricted to its characters' pixels.
    masked: Vec<bool>,
}

/// The training frames and how batches are drawn.
pub struct CharLdmSource {
    frames: Vec<Frame>,
    /// Text encoder outputs of the frames' captions, `tokens * d` floats per frame.
    texts: Vec<f32>,
    /// The text encoder output of the empty caption.
    empty_text: Vec<f32>,
    latent_shape: (usize, usize, usize),
    frame_size: (usize, usize),
    section: CharLdmSection,
    train_timesteps: usize,
}

impl BatchSource for CharLdmSource {
    type Batch = CharLdmBatch;
    fn len(&self) -> usize {
        self.frames.len()
    }
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<CharLdmBatch> {
        let n = indices.len();
        let (c, h, w) = self.latent_shape;
        let (fh, fw) = self.frame_size;
        let plane = fh * fw;
        let mut b = CharLdmBatch {
            n,
            latents: Vec::with_capacity(n * c * h * w),
            noise: gaussian(rng, n * c * h * w),
            timesteps: Vec::with_capacity(n),
            text: Vec::with_capacity(n * self.empty_text.len()),
            modes: Vec::with_capacity(n),
            slots: Vec::with_capacity(n),
            lreg_tokens: Vec::with_capacity(n),
            masks: vec![0f32; n * MAX_CHARACTERS * plane],
            masked: Vec::with_capacity(n),
        };
        for (bi, &i) in indices.iter().enumerate() {
            let f = &self.frames[i];
            b.latents.extend_from_slice(&f.latent);
            b.timesteps.push(rng.gen_range(0..self.train_timesteps));
            let u: f64 = rng.gen();
            let mode = if u < self.section.empty_prob {
                CondMode::Empty
            } else if u < self.section.empty_prob + self.section.text_prob {
                CondMode::Text
            } else {
                CondMode::Fused
            };
            b.modes.push(mode);
            let per = self.empty_text.len();
            b.text.extend_from_slice(if mode == CondMode::Empty {
                &self.empty_text
            } else {
                &self.texts[i * per..(i + 1) * per]
            });
            // The empty caption names nobody: no fusion and no attention target.
            let slots = if mode == CondMode::Empty {
                Vec::new()
            } else {
                f.slots.clone()
            };
            // A named character with no pixels in the frame has no attention target: L_reg
            // would only push its attention down everywhere.
            let mut tokens = Vec::new();
            for (&(t, _), m) in slots.iter().zip(&f.masks) {
                if !m.iter().any(|&on| on) {
                    continue;
                }
                let base = (bi * MAX_CHARACTERS + tokens.len()) * plane;
                for (p, &on) in m.iter().enumerate() {
                    if on {
                        b.masks[base + p] = 1.0;
                    }
                }
                tokens.push(t);
            }
            b.lreg_tokens.push(tokens);
            b.slots.push(slots);
            let masked = rng.gen::<f64>() < self.section.masked_loss_prob && !f.slots.is_empty();
            b.masked.push(masked);
        }
        Ok(b)
    }
}

/// A validation frame: its caption, characters and ground truth.
struct ValFrame {
    frame: Frame,
    image: RgbImage,
    names: Vec<String>,
}

/// The networks, the validation data and where figures go.
pub struct CharLdmStage {
    unet_vars: VarMap,
    fuse_vars: VarMap,
    vision_vars: VarMap,
    ldm: CharLdm,
    scheduler: DdpmScheduler,
    portraits: Tensor,
    cast: Vec<(String, RgbImage)>,
    val: Vec<ValFrame>,
    val_noise: Vec<f32>,
    val_timesteps: Vec<usize>,
    section: CharLdmSection,
    unet_config: serde_json::Value,
    latent_shape: (usize, usize, usize),
    frame_size: (usize, usize),
    device: Device,
    out: PathBuf,
    figures: PathBuf,
    vision_dir: PathBuf,
}

/// A frame record and its image.
type Loaded = (data::dataset::FrameRecord, RgbImage);

fn images_of(set: &[Loaded]) -> Vec<&RgbImage> {
    set.iter().map(|(_, i)| i).collect()
}

/// Reads up to `max` distinct frames of `split` with captions, characters, masks and images.
fn load_frames(reader: &DatasetReader, split: Split, max: usize) -> Result<Vec<Loaded>> {
    let ids = reader.story_ids(split);
    anyhow::ensure!(!ids.is_empty(), "the {} split has no stories", split.key());
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    'outer: for id in ids {
        let story = reader
            .load_story(&id, 0)
            .with_context(|| format!("loading story {id}"))?;
        for f in story.frames {
            if out.len() >= max {
                break 'outer;
            }
            if seen.insert(f.id.clone()) {
                let mut f = f;
                let img = f
                    .image
                    .take()
                    .with_context(|| format!("frame {} has no image", f.id))?;
                out.push((f, img));
            }
        }
    }
    Ok(out)
}

/// What a frame conditions on: caption ids, named-character slots `(token, cast index)` and
/// each slot's mask.
type Conditioning = (Vec<u32>, Vec<(usize, usize)>, Vec<Vec<bool>>);

/// Caption ids, named-character slots and their masks of one frame.
fn frame_conditioning(
    f: &data::dataset::FrameRecord,
    tokenizer: &ClipTokenizer,
    cast: &[(String, RgbImage)],
) -> Conditioning {
    let ids = tokenizer.encode(&f.caption).ids;
    let (mut slots, mut masks): (Vec<(usize, usize)>, Vec<Vec<bool>>) = (Vec::new(), Vec::new());
    for name in &f.characters {
        if slots.len() == MAX_CHARACTERS {
            break;
        }
        let Some(k) = cast.iter().position(|(n, _)| n == name) else {
            continue;
        };
        let Some(t) = tokenizer.last_token_index(&f.caption, name) else {
            continue;
        };
        if slots.iter().any(|(j, _)| *j == t) {
            continue;
        }
        // A named character without a mask (occluded, off frame) is still fused; it only
        // gets no L_reg target (see `CharLdmSource::batch`).
        let mask = f
            .masks
            .iter()
            .find(|m| &m.name == name)
            .map(|m| m.mask.clone())
            .unwrap_or_default();
        slots.push((t, k));
        masks.push(mask);
    }
    (ids, slots, masks)
}

/// Loads the frozen networks from the bundle in `out`, the data, the latent cache, and builds
/// the trainable networks: `(stage, training source, data fingerprint)`.
pub fn prepare(
    section: &CharLdmSection,
    data: &Path,
    out: &Path,
    run_dir: &Path,
    seed: u64,
    device: &Device,
) -> Result<(CharLdmStage, Arc<CharLdmSource>, String)> {
    section.check()?;
    let need = |p: PathBuf, what: &str| -> Result<PathBuf> {
        anyhow::ensure!(
            p.exists(),
            "{} is missing: the char-ldm stage needs the {what} (run `storygpt-v train {what} --out {}` first)",
            p.display(),
            out.display()
        );
        Ok(p)
    };
    let vae_dir = need(out.join("sd/vae"), "vae")?;
    let tok_dir = need(out.join("sd/tokenizer"), "clip")?;
    let text_dir = need(out.join("sd/text_encoder"), "clip")?;
    let vision_dir = need(out.join("clip-vision"), "clip")?;
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;
    let text_encoder = ClipTextModel::load(&text_dir, DType::F32, device)?;
    let vae = AutoencoderKL::load(&vae_dir, DType::F32, device)?;
    let vision_vars = VarMap::new();
    let vision = ClipVisionModel::load_partially_trainable(
        &vision_dir,
        &vision_vars,
        section.vision_trainable_layers,
        DType::F32,
        device,
    )?;
    let processor = ClipImageProcessor::for_image_size(vision.config().image_size as u32);

    let reader = DatasetReader::open(data, DatasetKind::Auto, section.story_len)
        .with_context(|| format!("opening dataset {}", data.display()))?;
    let cast: Vec<(String, RgbImage)> = super::load_cast(data, "char-ldm")?
        .into_iter()
        .map(|(c, img)| (c.name, img))
        .collect();
    anyhow::ensure!(!cast.is_empty(), "characters.json names no characters");
    let train = load_frames(&reader, Split::Train, section.train_frames)?;
    let val = load_frames(
        &reader,
        Split::Val,
        section.val_frames.max(section.sample_frames),
    )?;
    let (fw, fh) = train[0].1.dimensions();
    let f = vae.config().downscale() as u32;
    anyhow::ensure!(
        fw % f == 0 && fh % f == 0,
        "{fw}x{fh} frames do not divide by the VAE's downscale factor {f}"
    );
    let latent_shape = (
        vae.config().latent_channels,
        (fh / f) as usize,
        (fw / f) as usize,
    );
    for (r, img) in train.iter().chain(&val) {
        anyhow::ensure!(
            img.dimensions() == (fw, fh),
            "frame {} is {:?}, others {fw}x{fh}",
            r.id,
            img.dimensions()
        );
    }

    // Fingerprint: frames, captions and the frozen networks' files.
    let mut fp = FNV_OFFSET;
    for (r, img) in train.iter().chain(&val) {
        fp = fnv1a(r.id.bytes(), fp);
        fp = fnv1a(r.caption.bytes(), fp);
        fp = fnv1a(img.as_raw().iter().copied(), fp);
    }
    for file in [
        vae_dir.join("diffusion_pytorch_model.safetensors"),
        text_dir.join("model.safetensors"),
        vision_dir.join("model.safetensors"),
    ] {
        if let Ok(bytes) = std::fs::read(&file) {
            fp = fnv1a(bytes, fp);
        }
    }
    let fingerprint = format!("{fp:016x}");

    let scale = vae.config().scaling_factor;
    let train_images = images_of(&train);
    let latents = cached_rows(run_dir, "latents", &fingerprint, train.len(), || {
        encode_latents(&vae, &train_images, scale, device)
    })?;
    let val_latents = encode_latents(&vae, &images_of(&val), scale, device)?;
    let to_frames = |records: &[Loaded], lat: Vec<Vec<f32>>| -> Vec<Frame> {
        records
            .iter()
            .zip(lat)
            .map(|((r, _), latent)| {
                let (ids, slots, masks) = frame_conditioning(r, &tokenizer, &cast);
                Frame {
                    caption: r.caption.clone(),
                    latent,
                    ids,
                    slots,
                    masks,
                }
            })
            .collect()
    };
    let train_frames = to_frames(&train, latents);
    // The text encoder is frozen: each caption's output is computed once, not every step.
    let train_ids: Vec<&[u32]> = train_frames.iter().map(|f| f.ids.as_slice()).collect();
    let texts: Vec<f32> = cached_rows(run_dir, "texts", &fingerprint, train_frames.len(), || {
        encode_texts(&text_encoder, &train_ids, device)
    })?
    .into_iter()
    .flatten()
    .collect();
    let val_frames: Vec<ValFrame> = to_frames(&val, val_latents)
        .into_iter()
        .zip(val)
        .map(|(frame, (r, image))| ValFrame {
            frame,
            image,
            names: r.characters,
        })
        .collect();

    let context_dim = text_encoder.config().hidden_size;
    anyhow::ensure!(
        vision.config().projection_dim == context_dim,
        "the vision tower projects to {}, the text encoder is {context_dim} wide",
        vision.config().projection_dim
    );
    let unet_config = section.diffusers_config(latent_shape.0, latent_shape.1, context_dim);
    let ucfg: UNetConfig = serde_json::from_value(unet_config.clone())?;
    let unet_vars = VarMap::new();
    let unet = UNet2DConditionModel::new(
        super::seeded_var_builder(&unet_vars, seed, DType::F32, device),
        &ucfg,
    )
    .context("[char_ldm] describes an unsupported UNet")?;
    let fuse_vars = VarMap::new();
    let fuse = FuseModule::new(
        super::seeded_var_builder(&fuse_vars, seed ^ 2, DType::F32, device),
        context_dim,
    )?;
    let sched_cfg = section.scheduler_config();
    let train_timesteps = sched_cfg.num_train_timesteps;
    let scheduler = DdpmScheduler::new(sched_cfg.clone())?;
    let portrait_images: Vec<RgbImage> = cast.iter().map(|(_, p)| p.clone()).collect();
    let portraits = processor.preprocess_batch(&portrait_images, device)?;
    let empty_ids = tokenizer.encode("").ids;
    let empty_text = encode_texts(&text_encoder, &[empty_ids.as_slice()], device)?
        .pop()
        .context("no output for the empty caption")?;

    // Fixed validation noise and timesteps (spread over the schedule) for comparable losses.
    let (c, h, w) = latent_shape;
    let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x0076_616c);
    let nval = section.val_frames.min(val_frames.len());
    let val_noise = gaussian(&mut rng, nval * c * h * w);
    let val_timesteps: Vec<usize> = (0..nval)
        .map(|i| (i * train_timesteps) / nval + train_timesteps / (2 * nval))
        .collect();

    let ldm = CharLdm::from_parts(
        tokenizer,
        text_encoder,
        Some(vision),
        processor,
        Some(fuse),
        unet,
        vae,
        sched_cfg,
        device.clone(),
    );
    let source = Arc::new(CharLdmSource {
        frames: train_frames,
        texts,
        empty_text,
        latent_shape,
        frame_size: (fh as usize, fw as usize),
        section: section.clone(),
        train_timesteps,
    });
    let stage = CharLdmStage {
        unet_vars,
        fuse_vars,
        vision_vars,
        ldm,
        scheduler,
        portraits,
        cast,
        val: val_frames,
        val_noise,
        val_timesteps,
        section: section.clone(),
        unet_config,
        latent_shape,
        frame_size: (fh as usize, fw as usize),
        device: device.clone(),
        out: out.to_path_buf(),
        figures: out.join("figures"),
        vision_dir,
    };
    Ok((stage, source, fingerprint))
}

/// Scaled posterior means of `images` (all one size), one `(C * h * w)` vector each.
pub(crate) fn encode_latents(
    vae: &AutoencoderKL,
    images: &[&RgbImage],
    scale: f64,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(32) {
        let (w, h) = chunk[0].dimensions();
        let px = super::pixels_of(chunk);
        let x = Tensor::from_vec(px, (chunk.len(), 3, h as usize, w as usize), device)?;
        let z = (vae.encode(&x)?.mode().detach() * scale)?;
        for i in 0..chunk.len() {
            out.push(z.i(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// Per-frame rows (`n` of equal length) read from `run_dir/NAME-FINGERPRINT.safetensors` when
/// they were written for this data fingerprint, else computed by `compute` and written there
/// (a resumed run skips the work).
fn cached_rows(
    run_dir: &Path,
    name: &str,
    fingerprint: &str,
    n: usize,
    compute: impl FnOnce() -> Result<Vec<Vec<f32>>>,
) -> Result<Vec<Vec<f32>>> {
    let path = run_dir.join(format!("{name}-{fingerprint}.safetensors"));
    if let Ok(t) = candle_core::safetensors::load(&path, &Device::Cpu) {
        if let Some(z) = t.get(name) {
            if z.dim(0).ok() == Some(n) {
                return (0..n)
                    .map(|i| Ok(z.i(i)?.flatten_all()?.to_vec1::<f32>()?))
                    .collect();
            }
        }
    }
    let t0 = std::time::Instant::now();
    let rows = compute()?;
    let len = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    let z = Tensor::from_vec(flat, (rows.len(), len), &Device::Cpu)?;
    std::fs::create_dir_all(run_dir)?;
    let tmp = run_dir.join(format!(".{name}.tmp"));
    candle_core::safetensors::save(&std::collections::HashMap::from([(name, z)]), &tmp)?;
    std::fs::rename(&tmp, &path)?;
    eprintln!(
        "char-ldm: computed the {name} of {} training frames in {:.1} s (cached in {})",
        rows.len(),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    Ok(rows)
}

/// The frozen text encoder's output for each caption of `ids` (77 ids each), one flattened
/// `(tokens * d)` row per caption.
fn encode_texts(
    text_encoder: &ClipTextModel,
    ids: &[&[u32]],
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(64) {
        let len = chunk[0].len();
        let flat: Vec<u32> = chunk.iter().flat_map(|r| r.iter().copied()).collect();
        let t = Tensor::from_vec(flat, (chunk.len(), len), device)?;
        let h = text_encoder.forward(&t, None)?.last_hidden_state.detach();
        for i in 0..chunk.len() {
            out.push(h.i(i)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

impl CharLdmStage {
    /// Portrait embeddings of the cast, `(cast, d)`, through the (partly trainable) tower.
    fn portrait_embeddings(&self) -> Result<Tensor> {
        self.ldm
            .image_encoder
            .as_ref()
            .context("the Char-LDM has no vision tower")?
            .forward(&self.portraits)?
            .image_embeds
            .context("the vision tower has no visual_projection")
    }

    /// The per-sample conditions `(n, 77, d)` of `ids`, with `slots` fused where `fuse[i]`.
    fn conditions(
        &self,
        ids: &[u32],
        n: usize,
        slots: &[Vec<(usize, usize)>],
        fuse: &[bool],
    ) -> Result<Tensor> {
        let len = ids.len() / n;
        let ids = Tensor::from_vec(ids.to_vec(), (n, len), &self.device)?;
        let text = self
            .ldm
            .text_encoder
            .forward(&ids, None)?
            .last_hidden_state
            .detach();
        self.fused_conditions(text, slots, fuse)
    }

    /// `text (n, 77, d)` (the frozen text encoder's output) with `slots` fused where `fuse[i]`.
    fn fused_conditions(
        &self,
        text: Tensor,
        slots: &[Vec<(usize, usize)>],
        fuse: &[bool],
    ) -> Result<Tensor> {
        if !fuse.iter().any(|&f| f) {
            return Ok(text);
        }
        let emb = self.portrait_embeddings()?;
        let lists = slots
            .iter()
            .zip(fuse)
            .map(|(s, &f)| {
                if !f {
                    return Ok(Vec::new());
                }
                s.iter()
                    .map(|&(token_index, k)| {
                        Ok(CharacterSlot {
                            token_index,
                            image_embedding: emb.i(k)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(self
            .ldm
            .fuse
            .as_ref()
            .context("the Char-LDM has no FuseModule")?
            .fuse_into_text(&text, &lists)?)
    }

    fn tensor4(&self, v: Vec<f32>, n: usize) -> Result<Tensor> {
        let (c, h, w) = self.latent_shape;
        Ok(Tensor::from_vec(v, (n, c, h, w), &self.device)?)
    }

    /// Min-SNR-gamma weights `min(SNR, gamma) / SNR` of `ts`, `(n,)`.
    fn snr_weights(&self, ts: &[usize]) -> Result<Tensor> {
        let ac = self.scheduler.alphas_cumprod();
        let w: Vec<f32> = ts
            .iter()
            .map(|&t| {
                let a = ac[t] as f64;
                let snr = a / (1.0 - a).max(1e-12);
                let capped = snr.min(self.section.snr_gamma);
                // Hang et al.'s weights per target: the same x0-space weighting min(SNR, gamma).
                (match self.section.prediction_type {
                    PredictionType::Epsilon => capped / snr.max(1e-12),
                    PredictionType::VPrediction => capped / (snr + 1.0),
                    PredictionType::Sample => capped,
                }) as f32
            })
            .collect();
        Ok(Tensor::from_vec(w, ts.len(), &self.device)?)
    }

    fn timesteps(&self, ts: &[usize]) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            ts.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            ts.len(),
            &self.device,
        )?)
    }

    /// Validation epsilon MSE of `frames` at the fixed noise and timesteps, conditioned as
    /// `mode`.
    fn val_loss(&self, mode: CondMode) -> Result<f64> {
        let (c, h, w) = self.latent_shape;
        let per = c * h * w;
        let n = self.val_timesteps.len();
        let (mut total, mut count) = (0f64, 0usize);
        let idx: Vec<usize> = (0..n).collect();
        let empty = self.ldm.tokenizer.encode("").ids;
        for chunk in idx.chunks(32) {
            let m = chunk.len();
            let mut lat = Vec::with_capacity(m * per);
            let mut ids = Vec::new();
            let mut slots = Vec::new();
            for &i in chunk {
                let f = &self.val[i].frame;
                lat.extend_from_slice(&f.latent);
                ids.extend_from_slice(if mode == CondMode::Empty {
                    &empty
                } else {
                    &f.ids
                });
                slots.push(f.slots.clone());
            }
            let noise: Vec<f32> = chunk
                .iter()
                .flat_map(|&i| self.val_noise[i * per..(i + 1) * per].iter().copied())
                .collect();
            let ts: Vec<usize> = chunk.iter().map(|&i| self.val_timesteps[i]).collect();
            let x0 = self.tensor4(lat, m)?;
            let eps = self.tensor4(noise, m)?;
            let xt = self.scheduler.add_noise_batch(&x0, &eps, &ts)?;
            let target = self.scheduler.training_target(&x0, &eps, &ts)?;
            let fuse = vec![mode == CondMode::Fused; m];
            let cond = self.conditions(&ids, m, &slots, &fuse)?.detach();
            let pred = self
                .ldm
                .unet
                .forward(&xt, &self.timesteps(&ts)?, &cond)?
                .detach();
            total += nn::mse(&pred, &target)?.to_scalar::<f32>()? as f64 * m as f64;
            count += m;
        }
        Ok(total / count as f64)
    }

    /// Ground truth (top row) over samples of the fused condition (bottom row) for the first
    /// `sample_frames` validation frames.
    pub fn sample_grid(&self, seed: u64) -> Result<RgbImage> {
        let n = self.section.sample_frames.min(self.val.len());
        let emb = self.portrait_embeddings()?.detach();
        let negative = self.ldm.negative_condition()?;
        let (fh, fw) = self.frame_size;
        let opts = SampleOptions {
            steps: self.section.sample_steps,
            guidance_scale: 5.0,
            start_merge_step: 0,
            seed,
            height: fh,
            width: fw,
            scheduler: SchedulerKind::Pndm,
        };
        let mut images: Vec<RgbImage> = self.val[..n].iter().map(|v| v.image.clone()).collect();
        for v in &self.val[..n] {
            let chars: Vec<(String, Tensor)> = v
                .names
                .iter()
                .filter_map(|name| {
                    let k = self.cast.iter().position(|(c, _)| c == name)?;
                    Some(emb.i(k).map(|e| (name.clone(), e)))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let refs: Vec<(&str, &Tensor)> = chars.iter().map(|(n, e)| (n.as_str(), e)).collect();
            let text = self.ldm.text_condition(&v.frame.caption)?;
            let fused = self.ldm.fused_condition(&v.frame.caption, &refs)?.detach();
            let img = self.ldm.sample(
                &text,
                Some(&fused),
                &negative,
                &opts,
                &mut |_, _| {},
                &|| false,
            )?;
            images.push(models::char_ldm::to_rgb_image(&img)?);
        }
        Ok(grid(&images, n))
    }

    /// Writes the UNet (diffusers layout), the scheduler and the stage-1 file into the bundle.
    pub fn export(&self) -> Result<()> {
        let unet_dir = self.out.join("sd/unet");
        std::fs::create_dir_all(&unet_dir)?;
        std::fs::write(
            unet_dir.join("config.json"),
            serde_json::to_string_pretty(&self.unet_config)?,
        )?;
        self.unet_vars
            .save(unet_dir.join("diffusion_pytorch_model.safetensors"))
            .context("writing the UNet weights")?;
        let sched_dir = self.out.join("sd/scheduler");
        std::fs::create_dir_all(&sched_dir)?;
        std::fs::write(
            sched_dir.join("scheduler_config.json"),
            serde_json::to_string_pretty(&self.section.scheduler_json())?,
        )?;
        // Stage 1: the FuseModule and the whole tuned vision tower (frozen layers from the
        // clip stage's file, trained ones from this run).
        let mut tensors: std::collections::HashMap<String, Tensor> =
            std::collections::HashMap::new();
        for (name, var) in super::named_vars(&self.fuse_vars) {
            tensors.insert(format!("postfuse_module.{name}"), var.as_tensor().clone());
        }
        let base = nn::Weights::open(self.vision_dir.join("model.safetensors"))?
            .load_all(DType::F32, &Device::Cpu)?;
        for (name, t) in base {
            tensors.insert(format!("image_encoder.{name}"), t);
        }
        for (name, var) in super::named_vars(&self.vision_vars) {
            tensors.insert(
                format!("image_encoder.{name}"),
                var.as_tensor().to_device(&Device::Cpu)?,
            );
        }
        let dir = self.out.join("storygpt-v");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("stage1.safetensors");
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Where the sample grids go.
    pub fn figures(&self) -> &Path {
        &self.figures
    }
}

impl Stage for CharLdmStage {
    type Batch = CharLdmBatch;

    fn name(&self) -> &'static str {
        "char-ldm"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (prefix, map) in [
            ("unet", &self.unet_vars),
            ("postfuse_module", &self.fuse_vars),
            ("image_encoder", &self.vision_vars),
        ] {
            v.extend(
                super::named_vars(map)
                    .into_iter()
                    .map(|(n, var)| (format!("{prefix}.{n}"), var)),
            );
        }
        v
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("norm")
    }

    fn loss(&mut self, b: &CharLdmBatch, _step: u64) -> Result<StepLoss> {
        let x0 = self.tensor4(b.latents.clone(), b.n)?;
        let eps = self.tensor4(b.noise.clone(), b.n)?;
        let xt = self.scheduler.add_noise_batch(&x0, &eps, &b.timesteps)?;
        let target = self.scheduler.training_target(&x0, &eps, &b.timesteps)?;
        let fuse: Vec<bool> = b.modes.iter().map(|&m| m == CondMode::Fused).collect();
        let d = self.ldm.text_encoder.config().hidden_size;
        let text = Tensor::from_vec(
            b.text.clone(),
            (b.n, b.text.len() / (b.n * d), d),
            &self.device,
        )?;
        let cond = self.fused_conditions(text, &b.slots, &fuse)?;
        let capture = if self.section.lreg_weight > 0.0 {
            AttentionCapture::all()
        } else {
            AttentionCapture::none()
        };
        let out = self.ldm.unet.forward_with_capture(
            &xt,
            &self.timesteps(&b.timesteps)?,
            &cond,
            &capture,
        )?;
        let (fh, fw) = self.frame_size;
        let masks = Tensor::from_vec(b.masks.clone(), (b.n, MAX_CHARACTERS, fh, fw), &self.device)?;
        let (mut pred, mut target) = (out.sample, target);
        if b.masked.iter().any(|&m| m) {
            // Union of the characters' masks at latent size, for the samples drawn masked.
            let (_, h, w) = self.latent_shape;
            let union = models::lreg::resize_masks(&masks.max_keepdim(1)?, h, w)?;
            let keep = Tensor::from_vec(
                b.masked
                    .iter()
                    .map(|&m| if m { 0f32 } else { 1.0 })
                    .collect::<Vec<_>>(),
                (b.n, 1, 1, 1),
                &self.device,
            )?;
            let weight = union.broadcast_maximum(&keep)?;
            pred = pred.broadcast_mul(&weight)?;
            target = target.broadcast_mul(&weight)?;
        }
        let mse = nn::mse(&pred, &target)?;
        // Named eps_mse for every parameterisation: the MSE of what the UNet predicts.
        let mut parts = vec![("eps_mse", mse.to_scalar::<f32>()? as f64)];
        let mse = if self.section.snr_gamma > 0.0 {
            let weights = self.snr_weights(&b.timesteps)?;
            let per_sample = (&pred - &target)?.sqr()?.flatten_from(1)?.mean(1)?;
            let weighted = (per_sample * weights)?.mean_all()?;
            parts.push(("weighted_mse", weighted.to_scalar::<f32>()? as f64));
            weighted
        } else {
            mse
        };
        let loss = if self.section.lreg_weight > 0.0 && b.lreg_tokens.iter().any(|s| !s.is_empty())
        {
            let chars = CharacterTokens::from_lists(&b.lreg_tokens);
            let lreg = lreg_loss(&out.attention_probs, &masks, &chars)?;
            parts.push(("lreg", lreg.to_scalar::<f32>()? as f64));
            (&mse + (lreg * self.section.lreg_weight)?)?
        } else {
            mse
        };
        Ok(StepLoss { loss, parts })
    }

    fn validate(&mut self, step: u64) -> Result<BTreeMap<String, f64>> {
        let fused = self.val_loss(CondMode::Fused)?;
        let text = self.val_loss(CondMode::Text)?;
        let empty = self.val_loss(CondMode::Empty)?;
        std::fs::create_dir_all(&self.figures)?;
        let grid = self.sample_grid(0)?;
        grid.save(self.figures.join(format!("char-ldm-step-{step:06}.png")))
            .context("writing the sample grid")?;
        grid.save(self.figures.join("char-ldm-samples.png"))
            .context("writing the sample grid")?;
        Ok(BTreeMap::from([
            ("val_loss_fused".to_owned(), fused),
            ("val_loss_text".to_owned(), text),
            ("val_loss_empty".to_owned(), empty),
            // How much the caption and portraits explain: 1 - fused / empty.
            ("condition_gain".to_owned(), 1.0 - fused / empty.max(1e-12)),
        ]))
    }
}
