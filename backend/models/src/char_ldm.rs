//! Stage 1 sampling: the Char-LDM (character-aware latent diffusion) pipeline.
//!
//! [`CharLdm`] holds the Stable Diffusion 1.5 parts plus the StoryGPT-V `FuseModule` and CLIP
//! vision tower. It builds the conditions ([`CharLdm::text_condition`],
//! [`CharLdm::fused_condition`], [`CharLdm::portrait_embedding`]) and samples an image with
//! classifier-free guidance and "delayed conditioning" ([`CharLdm::sample`]): the first
//! `start_merge_step` steps use the plain CLIP text condition, later steps the fused (or LLM)
//! condition.
//!
//! Determinism: the initial latents and every per-step scheduler noise are unit normals drawn
//! on the CPU from a ChaCha20 generator seeded with [`SampleOptions::seed`] (Box-Muller), then
//! moved to the condition's device, so a seed gives the same noise on every device.
//!
//! Cancellation: [`CharLdm::sample`] returns an `anyhow::Error` wrapping [`Cancelled`] when the
//! `cancel` callback answers `true`; test with `err.downcast_ref::<Cancelled>().is_some()`
//! (or [`is_cancelled`]).

use crate::clip::{ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel};
use crate::fuse::{CharacterSlot, FuseModule, MAX_CHARACTERS};
use crate::schedulers::{self, SchedulerConfig, SchedulerKind};
use crate::unet::{AttentionCapture, CapturedAttention, UNet2DConditionModel};
use crate::vae::AutoencoderKL;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// The error (inside `anyhow::Error`) returned by [`CharLdm::sample`] when it was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("sampling was cancelled")
    }
}

impl std::error::Error for Cancelled {}

/// Whether `err` is (or wraps) [`Cancelled`].
pub fn is_cancelled(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.downcast_ref::<Cancelled>().is_some())
}

/// What [`CharLdm::sample_observed`] reports while it samples.
pub enum SampleEvent<'a> {
    /// Step `step` (1-based) of `steps` is done.
    Step {
        /// Steps done.
        step: usize,
        /// Steps asked for.
        steps: usize,
    },
    /// What the latents decode to after step `step`: `(3, H, W)` in `[0, 1]`.
    Preview {
        /// Steps done.
        step: usize,
        /// The image so far.
        image: &'a Tensor,
    },
}

/// Options of [`CharLdm::sample`].
#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// Inference steps passed to the scheduler (30).
    pub steps: usize,
    /// Classifier-free guidance scale (5.0); 1.0 skips the unconditional pass.
    pub guidance_scale: f64,
    /// The first `start_merge_step` steps use the plain text condition (15).
    pub start_merge_step: usize,
    /// Seed of the initial latents and of the stochastic schedulers' noise.
    pub seed: u64,
    /// Image height in pixels (a multiple of the VAE downscale factor; 512).
    pub height: usize,
    /// Image width in pixels (a multiple of the VAE downscale factor; 512).
    pub width: usize,
    /// Sampler (PNDM, the SD 1.5 default the authors used).
    pub scheduler: SchedulerKind,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            steps: 30,
            guidance_scale: 5.0,
            start_merge_step: 15,
            seed: 0,
            height: 512,
            width: 512,
            scheduler: SchedulerKind::Pndm,
        }
    }
}

/// The Char-LDM parts. All networks must live on [`CharLdm::device`].
pub struct CharLdm {
    /// CLIP BPE tokenizer (77 tokens).
    pub tokenizer: ClipTokenizer,
    /// Frozen CLIP text encoder.
    pub text_encoder: ClipTextModel,
    /// CLIP vision tower with `visual_projection` (portrait embeddings); optional.
    pub image_encoder: Option<ClipVisionModel>,
    /// Portrait preprocessing for `image_encoder`.
    pub image_processor: ClipImageProcessor,
    /// The fuse module; needed by [`CharLdm::fused_condition`].
    pub fuse: Option<FuseModule>,
    /// Denoising UNet.
    pub unet: UNet2DConditionModel,
    /// VAE (decoder used).
    pub vae: AutoencoderKL,
    /// Scheduler configuration (`scheduler_config.json`).
    pub scheduler_config: SchedulerConfig,
    /// Device of the networks.
    pub device: Device,
}

impl CharLdm {
    /// Assembles a pipeline from already built parts on `device`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        image_encoder: Option<ClipVisionModel>,
        image_processor: ClipImageProcessor,
        fuse: Option<FuseModule>,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: SchedulerConfig,
        device: Device,
    ) -> Self {
        Self {
            tokenizer,
            text_encoder,
            image_encoder,
            image_processor,
            fuse,
            unet,
            vae,
            scheduler_config,
            device,
        }
    }

    /// The VAE's spatial downscale factor (8 for SD 1.5).
    pub fn downscale(&self) -> usize {
        self.vae.config().downscale()
    }

    /// Checks a frame size (a positive multiple of the VAE downscale factor) and a step count
    /// (at least 1) before any work is done.
    pub fn check_options(&self, height: usize, width: usize, steps: usize) -> Result<()> {
        let f = self.downscale();
        if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
            bail!(
                "image size {height}x{width} (height x width) is not a positive multiple of the VAE downscale factor {f}"
            )
        }
        if steps == 0 {
            bail!("sampling needs at least one step")
        }
        Ok(())
    }

    /// The plain CLIP text condition of `caption`, `(1, 77, d)`.
    pub fn text_condition(&self, caption: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode_batch(&[caption], &self.device)?;
        Ok(self.text_encoder.forward(&ids, None)?.last_hidden_state)
    }

    /// The empty-prompt condition used as the negative of classifier-free guidance.
    pub fn negative_condition(&self) -> Result<Tensor> {
        self.text_condition("")
    }

    /// The token positions (last BPE token of each name found in `caption`, in the order
    /// given, duplicates and names absent from the caption skipped, at most
    /// [`MAX_CHARACTERS`]) paired with the index of the character in `names`.
    pub fn character_tokens<S: AsRef<str>>(
        &self,
        caption: &str,
        names: &[S],
    ) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        for (k, name) in names.iter().enumerate() {
            if out.len() == MAX_CHARACTERS {
                break;
            }
            if let Some(i) = self.tokenizer.last_token_index(caption, name.as_ref()) {
                if !out.iter().any(|(j, _)| *j == i) {
                    out.push((i, k));
                }
            }
        }
        out
    }

    /// The fused condition `(1, 77, d)`: the text condition with, for each character named in
    /// `caption`, the output at the LAST token of its name replaced by the `FuseModule` of that
    /// token's text vector and the character's image embedding (`(d,)` or `(1, d)`). Names not
    /// in the caption are skipped; at most [`MAX_CHARACTERS`] are fused.
    pub fn fused_condition<S: AsRef<str>>(
        &self,
        caption: &str,
        characters: &[(S, &Tensor)],
    ) -> Result<Tensor> {
        let fuse = self
            .fuse
            .as_ref()
            .context("this Char-LDM has no FuseModule; cannot build a fused condition")?;
        let text = self.text_condition(caption)?;
        let names: Vec<&str> = characters.iter().map(|(n, _)| n.as_ref()).collect();
        let slots = self
            .character_tokens(caption, &names)
            .into_iter()
            .map(|(token_index, k)| {
                let e = characters[k].1;
                let e = e
                    .flatten_all()?
                    .to_device(text.device())?
                    .to_dtype(text.dtype())?;
                Ok(CharacterSlot {
                    token_index,
                    image_embedding: e,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(fuse.fuse_into_text(&text, &[slots])?)
    }

    /// The CLIP image embedding (`visual_projection` output, `(d,)`) of a portrait.
    pub fn portrait_embedding(&self, image: &RgbImage) -> Result<Tensor> {
        let enc = self
            .image_encoder
            .as_ref()
            .context("this Char-LDM has no CLIP vision tower")?;
        let px = self.image_processor.preprocess(image, &self.device)?;
        let out = enc.forward(&px)?;
        let emb = out
            .image_embeds
            .context("the CLIP vision tower has no visual_projection")?;
        Ok(emb.squeeze(0)?)
    }

    /// Samples one image `(3, H, W)` in `[0, 1]` (f32).
    ///
    /// `text_cond` is the plain text condition (used for the first `start_merge_step` steps),
    /// `cond` the fused or LLM condition used afterwards (`None`: text only throughout),
    /// `negative` the empty-prompt condition (all `(1, 77, d)`). `progress(i, n)` is called after
    /// each step `i` (1-based) of the `n = opts.steps` steps asked for: PNDM's PLMS warm-up
    /// visits `steps + 1` timesteps, and its first two count as step 1, so a user who asked for
    /// 30 sees 30. `cancel()` is checked before every timestep; when it answers `true` the
    /// error wraps [`Cancelled`].
    pub fn sample(
        &self,
        text_cond: &Tensor,
        cond: Option<&Tensor>,
        negative: &Tensor,
        opts: &SampleOptions,
        progress: &mut dyn FnMut(usize, usize),
        cancel: &dyn Fn() -> bool,
    ) -> Result<Tensor> {
        Ok(self
            .sample_with_attention(text_cond, cond, negative, opts, &[], progress, cancel)?
            .0)
    }

    /// As [`CharLdm::sample`], and also the cross-attention heatmaps of the condition tokens
    /// `tokens` (indices into the 77): `(k, H/f, W/f)` f32, the `attn2` probabilities of the
    /// conditional pass averaged over heads, every cross-attention layer (each upsampled to
    /// the latent size) and the steps conditioned on `cond` (every step when there is none, or
    /// when it starts after the last step), each map scaled to a maximum of 1. Only `cond`
    /// carries the characters, so the plain-text steps before `start_merge_step` would blur
    /// the map of where each character is drawn. `None` when `tokens` is empty.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_with_attention(
        &self,
        text_cond: &Tensor,
        cond: Option<&Tensor>,
        negative: &Tensor,
        opts: &SampleOptions,
        tokens: &[usize],
        progress: &mut dyn FnMut(usize, usize),
        cancel: &dyn Fn() -> bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.sample_observed(
            text_cond,
            cond,
            negative,
            opts,
            tokens,
            0,
            &mut |event| {
                if let SampleEvent::Step { step, steps } = event {
                    progress(step, steps)
                }
            },
            cancel,
        )
    }

    /// The image `(3, H, W)` in `[0, 1]` (f32) that latents `(1, C, h, w)` decode to.
    fn decode_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let vcfg = self.vae.config();
        let mut z = (latents / vcfg.scaling_factor)?;
        if let Some(s) = vcfg.shift_factor {
            z = (z + s)?;
        }
        let img = self.vae.decode(&z)?.squeeze(0)?.to_dtype(DType::F32)?;
        Ok(((img + 1.0)? / 2.0)?.clamp(0f32, 1f32)?)
    }

    /// As [`CharLdm::sample_with_attention`], reporting each step to `observe`, and every
    /// `preview_every` steps (0: never; never after the last) the image the latents decode to
    /// so far, for live previews: one VAE decode each.
    #[allow(clippy::too_many_arguments)]
    pub fn sample_observed(
        &self,
        text_cond: &Tensor,
        cond: Option<&Tensor>,
        negative: &Tensor,
        opts: &SampleOptions,
        tokens: &[usize],
        preview_every: usize,
        observe: &mut dyn FnMut(SampleEvent<'_>),
        cancel: &dyn Fn() -> bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(&t) = tokens.iter().find(|&&t| t >= text_cond.dim(1).unwrap_or(0)) {
            bail!("attention token {t} is outside the condition")
        }
        self.check_options(opts.height, opts.width, opts.steps)?;
        let f = self.downscale();
        let device = text_cond.device().clone();
        let dtype = text_cond.dtype();
        let late_cond = cond.unwrap_or(text_cond);
        let mut scheduler = schedulers::build(opts.scheduler, self.scheduler_config.clone())?;
        scheduler.set_timesteps(opts.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        // Timesteps beyond the steps asked for (PLMS's warm-up) are folded into step 1.
        let extra_timesteps = total.saturating_sub(opts.steps);

        let channels = self.unet.config().in_channels;
        let shape = (1, channels, opts.height / f, opts.width / f);
        let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
        let noise0 = seeded_normal(&mut rng, shape, &device, dtype)?;
        let mut latents = (noise0 * scheduler.init_noise_sigma())?;
        let use_cfg = opts.guidance_scale != 1.0;
        let mut heat: Option<Tensor> = None;
        let heat_from = if cond.is_some() && opts.start_merge_step < total {
            opts.start_merge_step
        } else {
            0
        };
        let uncond_cond = |c: &Tensor| -> Result<Tensor> {
            Ok(if use_cfg {
                Tensor::cat(&[negative, c], 0)?
            } else {
                c.clone()
            })
        };

        for (i, &t) in timesteps.iter().enumerate() {
            if cancel() {
                return Err(anyhow::Error::new(Cancelled));
            }
            let c = if i < opts.start_merge_step {
                text_cond
            } else {
                late_cond
            };
            let ctx = uncond_cond(c)?;
            let input = scheduler.scale_model_input(&latents, t)?;
            let input = if use_cfg {
                Tensor::cat(&[&input, &input], 0)?
            } else {
                input
            };
            let ts = Tensor::new(t as f32, &device)?;
            let out = if tokens.is_empty() || i < heat_from {
                self.unet.forward(&input, &ts, &ctx)?
            } else {
                let o =
                    self.unet
                        .forward_with_capture(&input, &ts, &ctx, &AttentionCapture::all())?;
                let cond_row = if use_cfg { 1 } else { 0 };
                let step_map = attention_maps(&o.attention_probs, cond_row, tokens, shape)?;
                heat = Some(match heat {
                    Some(h) => (h + step_map)?,
                    None => step_map,
                });
                o.sample
            };
            let eps = if use_cfg {
                let u = out.narrow(0, 0, 1)?;
                let c = out.narrow(0, 1, 1)?;
                (&u + ((c - &u)? * opts.guidance_scale)?)?
            } else {
                out
            };
            let noise = seeded_normal(&mut rng, shape, &device, dtype)?;
            // Detached so that sampling with trainable (Var) weights, e.g. during training,
            // does not keep every step's autograd graph alive.
            latents = scheduler.step(&eps, t, &latents, Some(&noise))?.detach();
            let step = (i + 1).saturating_sub(extra_timesteps);
            if step > 0 {
                observe(SampleEvent::Step {
                    step,
                    steps: opts.steps,
                });
                if preview_every > 0 && step % preview_every == 0 && step < opts.steps {
                    let image = self.decode_latents(&latents)?;
                    observe(SampleEvent::Preview {
                        step,
                        image: &image,
                    });
                }
            }
        }

        let img = self.decode_latents(&latents)?;
        let heat = heat
            .map(|h| -> Result<Tensor> {
                let h = h.to_dtype(DType::F32)?;
                let max = h.max_keepdim(2)?.max_keepdim(1)?;
                Ok(h.broadcast_div(&(max + 1e-12)?)?)
            })
            .transpose()?;
        Ok((img, heat))
    }
}

/// Mean over heads and layers of the `attn2` probabilities of batch row `row` at `tokens`,
/// each layer's map upsampled (nearest) to the latent size: `(k, h, w)`.
fn attention_maps(
    maps: &[CapturedAttention],
    row: usize,
    tokens: &[usize],
    latent: (usize, usize, usize, usize),
) -> Result<Tensor> {
    let (_, _, h, w) = latent;
    let mut sum: Option<Tensor> = None;
    for m in maps {
        let (_, _, hw, _) = m.probs.dims4()?;
        // Square-ish maps: the layer's resolution keeps the latent's aspect ratio.
        let scale = ((h * w) as f64 / hw as f64).sqrt().round() as usize;
        if scale == 0 || (h / scale) * (w / scale) != hw {
            bail!(
                "attention map {} has {hw} positions, not a downscale of {h}x{w}",
                m.layer
            )
        }
        let (lh, lw) = (h / scale, w / scale);
        let p = m.probs.detach().i(row)?.mean(0)?; // (hw, 77)
        let idx = Tensor::from_vec(
            tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            tokens.len(),
            p.device(),
        )?;
        let sel = p
            .index_select(&idx, 1)?
            .t()?
            .reshape((1, tokens.len(), lh, lw))?;
        let up = sel.upsample_nearest2d(h, w)?.squeeze(0)?;
        sum = Some(match sum {
            Some(s) => (s + up)?,
            None => up,
        });
    }
    let n = maps.len().max(1) as f64;
    Ok((sum.context("the UNet has no cross-attention layer")? / n)?)
}

/// Unit normals of `shape` from `rng` (Box-Muller, f64 on the CPU), moved to `device` / `dtype`.
pub fn seeded_normal(
    rng: &mut ChaCha20Rng,
    shape: (usize, usize, usize, usize),
    device: &Device,
    dtype: DType,
) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        v.push((r * a.cos()) as f32);
        v.push((r * a.sin()) as f32);
    }
    v.truncate(n);
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// A `(3, H, W)` image in `[0, 1]` (any float dtype, any device) as 8-bit RGB.
pub fn to_rgb_image(image: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = image.dims3()?;
    if c != 3 {
        bail!("to_rgb_image expects (3, H, W), got {:?}", image.dims())
    }
    let data = image
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes: Vec<u8> = data.iter().map(|x| (x * 255.0).round() as u8).collect();
    RgbImage::from_raw(w as u32, h as u32, bytes).context("image buffer has the wrong size")
}
