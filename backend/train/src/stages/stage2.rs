//! Stage `stage2` (StoryGPT-V stage 2): aligning the frozen LLM's output with the Char-LDM's
//! input space, so that a caption with pronouns, read after the story so far, yields the
//! condition of the caption with the names.
//!
//! Trainable: Mapper_LLM, the R `[IMG]` rows (renormalised to the frozen rows' mean norm after
//! every step) and Mapper_LDM; frozen: the LLM, the CLIP vision tower that feeds Mapper_LLM and
//! the whole Char-LDM. For frame i of a story the prompt interleaves the ground-truth history
//! (m visual tokens of each earlier frame, then its caption) with the current referential
//! caption and the `[IMG]` tokens, as inference does (`models::prompt::build_prompt`). Losses:
//! L_gen (cross-entropy of the `[IMG]` tokens) and L_align, the MSE between Mapper_LDM's output
//! and the stage-1 FUSED embedding of the frame's non-referential caption with the
//! characters' portraits, computed once before training. Optionally the frozen UNet's diffusion
//! loss conditioned on Mapper_LDM's output, and on that same forward pass stage 1's L_reg at the
//! target caption's character-name slots against the frame's character masks.
//!
//! Writes `OUT/storygpt-v/stage2.safetensors` and `OUT/bundle.toml` (the bundle is complete
//! once this stage has run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::VarMap;
use data::dataset::{DatasetKind, DatasetReader, Split};
use models::char_ldm::CharLdm;
use models::clip::{ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel};
use models::fuse::FuseModule;
use models::llm::{CausalLm, ImgTokens, LlmTokenizer, LogitsFor};
use models::lreg::{lreg_loss, CharacterTokens};
use models::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
use models::prompt::{build_prompt, Prompt, PromptConfig};
use models::stage2_losses::{
    attention_match_loss, diffusion_align_capture_loss, diffusion_align_loss, lalign_loss,
    lgen_loss, target_mask, weighted_lalign_loss, LgenTargets,
};
use models::unet::AttentionCapture;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::{fnv1a, FNV_OFFSET};
use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// What Mapper_LDM's output is aligned to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignTarget {
    /// The stage-1 fused embedding (caption with names + portraits): the paper's choice.
    Fused,
    /// The plain CLIP text embedding of the caption with names (Table 4's ablation).
    Text,
}

/// How Mapper_LDM's output is pulled towards stage 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlignLoss {
    /// L_align: MSE to the precomputed target embedding (the paper).
    Mse,
    /// The epsilon-prediction loss of the frozen Char-LDM UNet on the frame's latent,
    /// conditioned on the mapper output (the authors' later trainer).
    Diffusion,
}

/// Which positions L_gen scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LgenChoice {
    /// Every `[IMG]` token (the paper).
    AllImg,
    /// The caption tokens and `[IMG0]` (the authors' code).
    CaptionAndFirstImg,
}

/// `[stage2]`: the mappers' shape, the prompt, the losses and how much data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage2Section {
    /// `[IMG]` tokens R (the paper compares 4, 8, 16).
    pub num_img_tokens: usize,
    /// Visual tokens per past frame m.
    pub visual_tokens: usize,
    /// Prompt budget in LLM tokens.
    pub max_prompt_len: usize,
    /// Leave the past frames' images out of the prompt (the caption-only ablation).
    pub caption_only: bool,
    /// Mapper_LDM width.
    pub d_model: usize,
    /// Mapper_LDM heads.
    pub heads: usize,
    /// Mapper_LDM encoder layers.
    pub encoder_layers: usize,
    /// Mapper_LDM decoder layers.
    pub decoder_layers: usize,
    /// Mapper_LDM feed-forward width.
    pub ff_dim: usize,
    /// L_align target.
    pub align_to: AlignTarget,
    /// MSE to the target (the paper) or the diffusion loss through the frozen UNet.
    pub align_loss: AlignLoss,
    /// Weight of L_align.
    pub align_weight: f64,
    /// With `align_loss = "mse"`: weight of the diffusion loss through the frozen UNet, added
    /// beside `align_weight` x L_align (0 = off). MSE spreads its error over every token; a UNet trained with a
    /// strong L_reg reads a few character tokens closely, and this term scores the
    /// conditions by what the UNet does with them.
    pub diffusion_weight: f64,
    /// Weight of L_gen.
    pub lgen_weight: f64,
    /// Positions L_gen scores.
    pub lgen_targets: LgenChoice,
    /// Training stories (of the train split).
    pub train_stories: usize,
    /// Validation stories.
    pub val_stories: usize,
    /// Frames per story.
    pub story_len: usize,
    /// Write the names of a group that a "they" stands for in alphabetical order in the
    /// alignment target (`data::referential::canonical_group_order`). The referential caption
    /// does not say in which order the original listed them, so with the order as written the
    /// MSE optimum puts the mean of the names in each name slot.
    pub sort_groups: bool,
    /// Weight of the character-name tokens in L_align against 1 for every other token (1 = the
    /// plain mean over the 77, the paper). Validation L_align stays the plain mean.
    pub align_char_weight: f64,
    /// With the diffusion term on (`diffusion_weight > 0` or `align_loss = "diffusion"`): weight
    /// of stage 1's L_reg (`models::lreg`) on the frozen UNet's cross-attention maps of that same
    /// forward pass, at the character-name slots of the target caption (where the fused target
    /// holds each portrait, so with `sort_groups` in the sorted order), against the frame's
    /// character masks (0 = off). Scores each name slot by where the UNet's attention puts it.
    /// Not written into the run's config at 0, so runs without it resume as before.
    #[serde(skip_serializing_if = "is_zero")]
    pub lreg_weight: f64,
    /// With the diffusion term on: weight of the attention match
    /// (`models::stage2_losses::attention_match_loss`) at the target caption's name slots, the
    /// frozen UNet's cross-attention maps under Mapper_LDM's output against its maps under the
    /// alignment target on the same noisy latents (one more UNet forward pass a step; 0 = off).
    /// Asks each slot to draw the UNet's attention where stage 1's condition draws it. Not
    /// written into the run's config at 0, so runs without it resume as before.
    #[serde(skip_serializing_if = "is_zero")]
    pub attention_match_weight: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

impl Default for Stage2Section {
    fn default() -> Self {
        Self {
            num_img_tokens: 8,
            visual_tokens: 4,
            max_prompt_len: 160,
            caption_only: false,
            d_model: 128,
            heads: 4,
            encoder_layers: 2,
            decoder_layers: 2,
            ff_dim: 512,
            align_to: AlignTarget::Fused,
            align_loss: AlignLoss::Mse,
            align_weight: 1.0,
            diffusion_weight: 0.0,
            lgen_weight: 1.0,
            lgen_targets: LgenChoice::AllImg,
            train_stories: 100_000,
            val_stories: 100,
            story_len: 4,
            sort_groups: false,
            align_char_weight: 1.0,
            lreg_weight: 0.0,
            attention_match_weight: 0.0,
        }
    }
}

impl StageSection for Stage2Section {
    const NAME: &'static str = "stage2";
}

/// One training example: frame `frame` of story `story`.
struct Example {
    prompt: Prompt,
    /// Global frame indices (into the pooled table) of the history frames, in order.
    history: Vec<usize>,
    /// Index of the alignment target.
    target: usize,
    /// Global index of the current frame (its latent, for the diffusion variant).
    frame: usize,
}

/// A batch: example indices (the examples live in the source, shared with the stage), and for
/// the diffusion variant its noise and timesteps.
pub struct Stage2Batch {
    examples: Vec<usize>,
    noise: Vec<f32>,
    timesteps: Vec<usize>,
}

/// The examples (prompts, history, targets).
pub struct Stage2Source {
    count: usize,
    /// Elements of one latent (0 unless the diffusion variant is on).
    latent_elems: usize,
}

impl BatchSource for Stage2Source {
    type Batch = Stage2Batch;
    fn len(&self) -> usize {
        self.count
    }
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<Stage2Batch> {
        let (noise, timesteps) = if self.latent_elems == 0 {
            (Vec::new(), Vec::new())
        } else {
            use rand::Rng;
            let noise = super::vae::gaussian(rng, indices.len() * self.latent_elems);
            (
                noise,
                indices.iter().map(|_| rng.gen_range(0..1000)).collect(),
            )
        };
        Ok(Stage2Batch {
            examples: indices.to_vec(),
            noise,
            timesteps,
        })
    }
}

/// A validation pronoun frame: its example and the candidate conditions (the right one first,
/// then the same caption with the characters swapped for other cast members).
struct PronounCheck {
    example: Example,
    candidates: Tensor,
}

/// A validation frame whose target caption names two or more characters, checked slot by slot:
/// for its first two name slots in token order, the token and the candidate rows at it (the
/// right character's fused token first, then the token of the same caption with that character
/// swapped for each cast member the caption does not name). A pronoun gate on whole embeddings
/// cannot see a second slot that lost its character; this can (docs/TRAINING.md, "Heatmaps of
/// the LLM path").
struct SlotCheck {
    /// Index into the validation examples.
    val_index: usize,
    slots: Vec<(usize, Tensor)>,
}

/// Validation frames checked slot by slot (the first ones naming two or more characters).
const VAL_SLOT_FRAMES: usize = 200;

/// A character's mask in a frame, one bit per pixel (row-major, the frame's size).
#[derive(Debug, Clone)]
struct PackedMask(Vec<u64>);

impl PackedMask {
    fn new(mask: &[bool]) -> Self {
        let mut bits = vec![0u64; mask.len().div_ceil(64)];
        for (i, _) in mask.iter().enumerate().filter(|(_, &on)| on) {
            bits[i / 64] |= 1 << (i % 64);
        }
        Self(bits)
    }

    /// Writes 1.0 at the pixels of the mask into `out` (`len` pixels).
    fn fill(&self, out: &mut [f32]) {
        for (i, v) in out.iter_mut().enumerate() {
            if self.0.get(i / 64).is_some_and(|w| (w >> (i % 64)) & 1 == 1) {
                *v = 1.0;
            }
        }
    }
}

/// L_reg targets of an example: `(token slot of the target caption, that character's mask)` for
/// each named character with pixels in the frame.
type LregSlots = Vec<(usize, PackedMask)>;

/// Validation frames L_reg is measured on (the first ones of the validation examples).
const VAL_LREG_FRAMES: usize = 128;

/// L_reg measured at validation: `(value, frames)` over every name slot, and over the first
/// and the second name slot of the frames naming two or more characters.
struct ValLreg {
    all: (f64, usize),
    by_slot: [(f64, usize); 2],
}

impl ValLreg {
    /// Adds `other`'s frames to these sums (values weighted by frames).
    fn add(sums: &mut [(f64, usize); 3], v: &ValLreg) {
        let parts = [v.all, v.by_slot[0], v.by_slot[1]];
        for (sum, (x, n)) in sums.iter_mut().zip(parts) {
            sum.0 += x * n as f64;
            sum.1 += n;
        }
    }
}

/// What `lreg_weight` needs: every example's slots and masks, and fixed validation noise.
struct LregTargets {
    /// `(height, width)` of the frames (and their masks).
    frame_size: (usize, usize),
    /// Per training example.
    train: Vec<LregSlots>,
    /// Per validation example, the first [`VAL_LREG_FRAMES`].
    val: Vec<LregSlots>,
    /// Noise of the validation frames, `val.len()` latents.
    val_noise: Vec<f32>,
    /// Timesteps of the validation frames, spread over the schedule.
    val_timesteps: Vec<usize>,
}

impl LregTargets {
    /// The token slots of the samples `slots` alone (what the attention match needs).
    fn tokens(&self, slots: &[&LregSlots]) -> CharacterTokens {
        let lists: Vec<Vec<usize>> = slots
            .iter()
            .map(|s| s.iter().map(|(t, _)| *t).collect())
            .collect();
        CharacterTokens::from_lists(&lists)
    }

    /// Masks `(n, kmax, H, W)` (kmax: the most characters of a sample, at least 1) and the
    /// token slots of the samples `slots`, in the order L_reg pairs them.
    fn batch(&self, slots: &[&LregSlots], device: &Device) -> Result<(Tensor, CharacterTokens)> {
        let (h, w) = self.frame_size;
        let plane = h * w;
        let kmax = slots.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut masks = vec![0f32; slots.len() * kmax * plane];
        for (i, s) in slots.iter().enumerate() {
            for (k, (_, m)) in s.iter().enumerate() {
                let base = (i * kmax + k) * plane;
                m.fill(&mut masks[base..base + plane]);
            }
        }
        Ok((
            Tensor::from_vec(masks, (slots.len(), kmax, h, w), device)?,
            self.tokens(slots),
        ))
    }
}

/// The frozen pieces of the diffusion variant: every frame's latent, the UNet, the schedule.
struct Diffusion {
    latents: Tensor,
    unet: models::unet::UNet2DConditionModel,
    scheduler: models::schedulers::DdpmScheduler,
}

/// The frozen LLM, the trainable mappers and rows, the data.
pub struct Stage2Stage {
    diffusion: Option<Diffusion>,
    /// With the diffusion term on: the name slots and masks of L_reg, the attention match and
    /// the validation slot checks.
    lreg: Option<LregTargets>,
    vars: VarMap,
    lm: CausalLm,
    img: ImgTokens,
    mapper_llm: MapperLlm,
    mapper_ldm: MapperLdm,
    /// Frozen CLIP pooled outputs of every frame, `(frames, vision_hidden)`.
    pooled: Tensor,
    train: Vec<Example>,
    targets: Tensor,
    /// `(targets, 77)` token weights of L_align when `align_char_weight` is not 1.
    target_weights: Option<Tensor>,
    val: Vec<Example>,
    val_targets: Tensor,
    pronoun: Vec<PronounCheck>,
    slot_checks: Vec<SlotCheck>,
    section: Stage2Section,
    device: Device,
    out: PathBuf,
}

/// The frozen stage-1 pieces that make the alignment targets.
struct Stage1 {
    ldm: CharLdm,
    portraits: Vec<(String, Tensor)>,
}

impl Stage1 {
    fn load(out: &Path, data: &Path, device: &Device) -> Result<Self> {
        let stage1 = out.join("storygpt-v/stage1.safetensors");
        anyhow::ensure!(
            stage1.exists(),
            "{} is missing: stage2 needs stage 1 (run `storygpt-v train char-ldm --out {}` first)",
            stage1.display(),
            out.display()
        );
        let w = nn::Weights::open(&stage1)?;
        let tokenizer = ClipTokenizer::from_dir(&out.join("sd/tokenizer"))?;
        let text_encoder = ClipTextModel::load(&out.join("sd/text_encoder"), DType::F32, device)?;
        let configs = models::clip::ClipConfigs::from_dir(&out.join("clip-vision"))?;
        let vcfg = configs.vision.context("clip-vision has no vision config")?;
        let vision = ClipVisionModel::new(
            w.subset("image_encoder").var_builder(DType::F32, device),
            &vcfg,
        )?;
        let processor = ClipImageProcessor::for_image_size(vcfg.image_size as u32);
        let fuse = FuseModule::new(
            w.subset("postfuse_module").var_builder(DType::F32, device),
            text_encoder.config().hidden_size,
        )?;
        let unet_dir = out.join("sd/unet");
        let unet = models::unet::UNet2DConditionModel::load(&unet_dir, DType::F32, device)?;
        let vae = models::vae::AutoencoderKL::load(&out.join("sd/vae"), DType::F32, device)?;
        let ldm = CharLdm::from_parts(
            tokenizer,
            text_encoder,
            Some(vision),
            processor,
            Some(fuse),
            unet,
            vae,
            models::schedulers::SchedulerConfig::from_file(&out.join("sd/scheduler"))?,
            device.clone(),
        );
        let portraits = super::load_cast(data, "stage2")?
            .into_iter()
            .map(|(c, img)| Ok((c.name, ldm.portrait_embedding(&img)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { ldm, portraits })
    }

    /// `(captions, 77)` L_align token weights: `weight` at each cast member's name token (as
    /// the fused condition finds it), 1 elsewhere.
    fn token_weights(&self, captions: &[String], weight: f64, device: &Device) -> Result<Tensor> {
        let names: Vec<&str> = self.portraits.iter().map(|(n, _)| n.as_str()).collect();
        let tokens = self.ldm.tokenizer.max_length();
        let mut w = vec![1f32; captions.len() * tokens];
        for (i, caption) in captions.iter().enumerate() {
            for (t, _) in self.ldm.character_tokens(caption, &names) {
                if t < tokens {
                    w[i * tokens + t] = weight as f32;
                }
            }
        }
        Ok(Tensor::from_vec(w, (captions.len(), tokens), device)?)
    }

    /// L_reg's slots of an example: each cast member the fused condition of `caption` (the
    /// target caption) puts at a token, paired with that character's mask in the frame
    /// (`frame_masks`, by name; a character without pixels there has no target, as in stage 1).
    fn lreg_slots(&self, caption: &str, frame_masks: &[(String, PackedMask)]) -> LregSlots {
        let names: Vec<&str> = self.portraits.iter().map(|(n, _)| n.as_str()).collect();
        pair_slots(
            &self.ldm.character_tokens(caption, &names),
            &names,
            frame_masks,
            self.ldm.tokenizer.max_length(),
        )
    }

    /// The alignment target `(77, d)` of a caption with names.
    fn target(&self, caption: &str, align: AlignTarget) -> Result<Tensor> {
        let c = match align {
            AlignTarget::Text => self.ldm.text_condition(caption)?,
            AlignTarget::Fused => {
                let chars: Vec<(&str, &Tensor)> = self
                    .portraits
                    .iter()
                    .map(|(n, e)| (n.as_str(), e))
                    .collect();
                self.ldm.fused_condition(caption, &chars)?
            }
        };
        Ok(c.squeeze(0)?.detach())
    }
}

/// Pairs the name slots `(token, cast index)` of a target caption with the frame's masks by
/// character name (the dataset lists a frame's masks in its own order, which need not be the
/// target's: with `sort_groups` the target names a "they" group alphabetically). Slots at or
/// past `tokens` and characters without a mask are left out.
fn pair_slots(
    slots: &[(usize, usize)],
    names: &[&str],
    frame_masks: &[(String, PackedMask)],
    tokens: usize,
) -> LregSlots {
    slots
        .iter()
        .filter(|&&(t, k)| t < tokens && k < names.len())
        .filter_map(|&(t, k)| {
            frame_masks
                .iter()
                .find(|(n, _)| n == names[k])
                .map(|(_, m)| (t, m.clone()))
        })
        .collect()
}

/// Replaces whole-word occurrences of `from` in `text` by `to`.
fn replace_name(text: &str, from: &str, to: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(from) {
        let before_ok = rest[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_alphanumeric());
        let after = &rest[i + from.len()..];
        let after_ok = after.chars().next().is_none_or(|c| !c.is_alphanumeric());
        out.push_str(&rest[..i]);
        out.push_str(if before_ok && after_ok { to } else { from });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Reads stories into examples, keeping one table of every frame's frozen CLIP pooled output
/// (and, for the diffusion variant, VAE latent) across the splits it reads.
struct ExampleReader<'a> {
    device: &'a Device,
    reader: &'a DatasetReader,
    tokenizer: &'a LlmTokenizer,
    cfg: &'a PromptConfig,
    vision: &'a ClipVisionModel,
    processor: &'a ClipImageProcessor,
    vae: Option<&'a models::vae::AutoencoderKL>,
    pooled: Vec<Tensor>,
    count: usize,
    fp: u64,
    latents: Vec<Vec<f32>>,
    sort_groups: bool,
    /// With L_reg: each frame's character masks with pixels (by name), per global frame.
    masks: Option<Vec<Vec<(String, PackedMask)>>>,
    /// `(height, width)` of the frames, once one was read.
    frame_size: Option<(usize, usize)>,
}

impl ExampleReader<'_> {
    /// Loads up to `max_stories` stories of `split`: their examples, the target captions and
    /// the stories.
    fn split(
        &mut self,
        split: Split,
        max_stories: usize,
    ) -> Result<(Vec<Example>, Vec<String>, Vec<data::dataset::Story>)> {
        let ids = self.reader.story_ids(split);
        anyhow::ensure!(!ids.is_empty(), "the {} split has no stories", split.key());
        let mut out = Vec::new();
        let mut captions = Vec::new();
        let mut stories = Vec::new();
        for id in ids.into_iter().take(max_stories) {
            let story = self
                .reader
                .load_story(&id, 0)
                .with_context(|| format!("loading story {id}"))?;
            let images: Vec<image::RgbImage> = story
                .frames
                .iter()
                .map(|f| {
                    f.image
                        .clone()
                        .with_context(|| format!("frame {} has no image", f.id))
                })
                .collect::<Result<_>>()?;
            if let Some(table) = self.masks.as_mut() {
                for (f, img) in story.frames.iter().zip(&images) {
                    let size = (img.height() as usize, img.width() as usize);
                    let first = *self.frame_size.get_or_insert(size);
                    anyhow::ensure!(
                        size == first,
                        "stage2: frame {} is {}x{}, others {}x{} (L_reg needs one frame size)",
                        f.id,
                        size.1,
                        size.0,
                        first.1,
                        first.0
                    );
                    let mut row = Vec::new();
                    for m in &f.masks {
                        anyhow::ensure!(
                            m.mask.len() == size.0 * size.1,
                            "stage2: the mask of {} in frame {} has {} pixels, the frame {}",
                            m.name,
                            f.id,
                            m.mask.len(),
                            size.0 * size.1
                        );
                        if m.mask.iter().any(|&on| on) {
                            row.push((m.name.clone(), PackedMask::new(&m.mask)));
                        }
                    }
                    table.push(row);
                }
            }
            let px = self.processor.preprocess_batch(&images, self.device)?;
            let p = self.vision.forward(&px)?.pooler_output.detach();
            let base = self.count;
            self.count += images.len();
            self.pooled.push(p);
            if let Some(vae) = self.vae {
                let refs: Vec<&image::RgbImage> = images.iter().collect();
                let scale = vae.config().scaling_factor;
                self.latents.extend(super::char_ldm::encode_latents(
                    vae,
                    &refs,
                    scale,
                    self.device,
                )?);
            }
            let referential: Vec<&str> = story
                .frames
                .iter()
                .map(|f| f.referential.as_str())
                .collect();
            for (i, f) in story.frames.iter().enumerate() {
                self.fp = fnv1a(f.id.bytes(), self.fp);
                self.fp = fnv1a(f.referential.bytes(), self.fp);
                let prompt =
                    build_prompt(self.tokenizer, &referential[..i], referential[i], self.cfg)
                        .with_context(|| format!("story {id} frame {}", i + 1))?;
                let kept = prompt.first_kept_frame;
                out.push(Example {
                    prompt,
                    history: (kept..i).map(|k| base + k).collect(),
                    target: captions.len(),
                    frame: base + i,
                });
                captions.push(target_caption(f, self.reader.rules(), self.sort_groups));
            }
            stories.push(story);
        }
        Ok((out, captions, stories))
    }
}

/// One alignment target per caption, stacked. Each distinct caption is encoded once (the toy
/// world repeats about a third of its captions) and, on the CPU, distinct captions are encoded
/// in parallel: each target is computed on its own, so every row is the same bits as when
/// they were made one by one.
fn stack_targets(
    stage1: &Stage1,
    captions: &[String],
    align: AlignTarget,
    device: &Device,
) -> Result<Tensor> {
    let mut row_of: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut distinct: Vec<&str> = Vec::new();
    let index: Vec<u32> = captions
        .iter()
        .map(|c| {
            *row_of.entry(c.as_str()).or_insert_with(|| {
                distinct.push(c.as_str());
                distinct.len() as u32 - 1
            })
        })
        .collect();
    let encode = |c: &&str| stage1.target(c, align);
    let rows = if device.is_cpu() {
        use rayon::prelude::*;
        distinct
            .par_iter()
            .map(encode)
            .collect::<Result<Vec<_>>>()?
    } else {
        distinct.iter().map(encode).collect::<Result<Vec<_>>>()?
    };
    if rows.is_empty() {
        anyhow::bail!("stage2: no captions to make alignment targets of")
    }
    let table = Tensor::stack(&rows, 0)?;
    let n = index.len();
    Ok(table.index_select(&Tensor::from_vec(index, n, device)?, 0)?)
}

/// The caption a frame's alignment target is made of: its own, or with `sort_groups` its
/// "they" group in alphabetical order (`Stage2Section::sort_groups`).
fn target_caption(
    f: &data::dataset::FrameRecord,
    rules: &data::rules::RuleSet,
    sort_groups: bool,
) -> String {
    if !sort_groups || f.referential == f.caption || f.characters.len() < 2 {
        return f.caption.clone();
    }
    let set: std::collections::BTreeSet<usize> = f
        .characters
        .iter()
        .filter_map(|c| rules.index_of(c))
        .collect();
    data::referential::canonical_group_order(&f.caption, &set, rules)
}

/// Loads everything and builds the trainable parts: `(stage, source, fingerprint)`.
pub fn prepare(
    section: &Stage2Section,
    data: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<(Stage2Stage, Arc<Stage2Source>, String)> {
    anyhow::ensure!(
        section.num_img_tokens > 0 && section.visual_tokens > 0,
        "[stage2] num_img_tokens and visual_tokens must be positive"
    );
    anyhow::ensure!(
        section.diffusion_weight >= 0.0 && section.diffusion_weight.is_finite(),
        "[stage2] diffusion_weight must be a finite number >= 0, not {}",
        section.diffusion_weight
    );
    anyhow::ensure!(
        section.align_char_weight > 0.0 && section.align_char_weight.is_finite(),
        "[stage2] align_char_weight must be a finite number > 0, not {}",
        section.align_char_weight
    );
    anyhow::ensure!(
        section.diffusion_weight == 0.0 || section.align_loss == AlignLoss::Mse,
        "[stage2] diffusion_weight adds the diffusion loss to the MSE L_align; with \
         align_loss = \"diffusion\" the diffusion loss is already L_align (use align_weight)"
    );
    anyhow::ensure!(
        section.lreg_weight >= 0.0 && section.lreg_weight.is_finite(),
        "[stage2] lreg_weight must be a finite number >= 0, not {}",
        section.lreg_weight
    );
    anyhow::ensure!(
        section.lreg_weight == 0.0
            || section.diffusion_weight > 0.0
            || section.align_loss == AlignLoss::Diffusion,
        "[stage2] lreg_weight = {} needs the diffusion term: L_reg is computed on the frozen \
         UNet's cross-attention maps of its forward pass; set diffusion_weight > 0 (or \
         align_loss = \"diffusion\"), or lreg_weight = 0",
        section.lreg_weight
    );
    anyhow::ensure!(
        section.attention_match_weight >= 0.0 && section.attention_match_weight.is_finite(),
        "[stage2] attention_match_weight must be a finite number >= 0, not {}",
        section.attention_match_weight
    );
    anyhow::ensure!(
        section.attention_match_weight == 0.0 || section.diffusion_weight > 0.0,
        "[stage2] attention_match_weight = {} needs the diffusion term beside the MSE: it \
         compares the frozen UNet's cross-attention maps under Mapper_LDM's output with those \
         under the MSE's target; set diffusion_weight > 0, or attention_match_weight = 0",
        section.attention_match_weight
    );
    let llm_dir = out.join("llm");
    anyhow::ensure!(
        llm_dir.join("config.json").exists(),
        "{} is missing: stage2 needs the LLM (run `storygpt-v train lm --out {}` first)",
        llm_dir.display(),
        out.display()
    );
    let stage1 = Stage1::load(out, data, device)?;
    let lm = CausalLm::load(&llm_dir, DType::F32, device)?;
    let tokenizer = LlmTokenizer::from_dir(&llm_dir, section.num_img_tokens)?;
    let mut cfg = PromptConfig::new(tokenizer.img_token_ids().to_vec(), tokenizer.bos_id());
    cfg.max_len = section.max_prompt_len;
    cfg.visual_tokens_per_frame = section.visual_tokens;
    cfg.caption_only = section.caption_only;
    // The frozen tower Mapper_LLM reads (the pipeline's `visual_encoder`: the clip stage's).
    let vision_dir = out.join("clip-vision");
    let vision = ClipVisionModel::load(&vision_dir, DType::F32, device)?;
    let processor = ClipImageProcessor::for_image_size(vision.config().image_size as u32);

    let reader = DatasetReader::open(data, DatasetKind::Auto, section.story_len)
        .with_context(|| format!("opening dataset {}", data.display()))?;
    let diffusion = section.align_loss == AlignLoss::Diffusion || section.diffusion_weight > 0.0;
    let mut frames = ExampleReader {
        device,
        reader: &reader,
        tokenizer: &tokenizer,
        cfg: &cfg,
        vision: &vision,
        processor: &processor,
        vae: diffusion.then_some(&stage1.ldm.vae),
        pooled: Vec::new(),
        count: 0,
        fp: FNV_OFFSET,
        latents: Vec::new(),
        sort_groups: section.sort_groups,
        // With the diffusion term, the masks also let validation measure each name slot's
        // cross-attention on its character (the heatmaps), whether or not L_reg trains it.
        masks: diffusion.then(Vec::new),
        frame_size: None,
    };
    let (train, train_captions, _) = frames.split(Split::Train, section.train_stories)?;
    let (val, val_captions, val_stories) = frames.split(Split::Val, section.val_stories)?;
    let ExampleReader {
        pooled,
        mut fp,
        latents: latent_table,
        masks: mask_table,
        frame_size,
        ..
    } = frames;
    let pooled = Tensor::cat(&pooled, 0)?;
    for file in [
        out.join("storygpt-v/stage1.safetensors"),
        llm_dir.join("model.safetensors"),
    ] {
        if let Ok(bytes) = std::fs::read(&file) {
            fp = fnv1a(bytes, fp);
        }
    }
    let t0 = std::time::Instant::now();
    let targets = stack_targets(&stage1, &train_captions, section.align_to, device)?;
    let target_weights = if section.align_char_weight == 1.0 {
        None
    } else {
        Some(stage1.token_weights(&train_captions, section.align_char_weight, device)?)
    };
    let val_targets = stack_targets(&stage1, &val_captions, section.align_to, device)?;

    // Pronoun frames of the validation stories, each with its swapped-cast candidates.
    let cast: Vec<String> = stage1.portraits.iter().map(|(n, _)| n.clone()).collect();
    let mut pronoun = Vec::new();
    let mut k = 0;
    for story in &val_stories {
        let referential: Vec<&str> = story
            .frames
            .iter()
            .map(|f| f.referential.as_str())
            .collect();
        for (i, f) in story.frames.iter().enumerate() {
            let ex_index = k;
            k += 1;
            if f.referential == f.caption || f.characters.is_empty() {
                continue;
            }
            let caption = &val_captions[val[ex_index].target];
            let mut cands = vec![stage1.target(caption, section.align_to)?];
            for other in cast.iter().filter(|c| !f.characters.contains(c)) {
                let swapped = replace_name(caption, &f.characters[0], other);
                if swapped != *caption {
                    cands.push(stage1.target(&swapped, section.align_to)?);
                }
            }
            if cands.len() < 2 {
                continue;
            }
            let example = Example {
                prompt: build_prompt(&tokenizer, &referential[..i], referential[i], &cfg)?,
                history: val[ex_index].history.clone(),
                target: val[ex_index].target,
                frame: val[ex_index].frame,
            };
            pronoun.push(PronounCheck {
                example,
                candidates: Tensor::stack(&cands, 0)?,
            });
        }
    }
    let slot_checks = slot_checks(&stage1, &val, &val_captions, &val_targets, section.align_to)?;
    eprintln!(
        "stage2: {} training and {} validation examples ({} pronoun frames, {} checked slot by \
         slot), targets in {:.1} s",
        train.len(),
        val.len(),
        pronoun.len(),
        slot_checks.len(),
        t0.elapsed().as_secs_f64()
    );

    let vars = VarMap::new();
    let vb = super::seeded_var_builder(&vars, seed, DType::F32, device);
    let d = lm.embed_dim();
    let mapper_llm = MapperLlm::new(
        MapperLlmConfig {
            vision_dim: vision.config().hidden_size,
            num_tokens: section.visual_tokens,
            llm_dim: d,
        },
        vb.pp("model.visual_embeddings"),
    )?;
    let text_dim = stage1.ldm.text_encoder.config().hidden_size;
    let mapper_ldm = MapperLdm::new(
        MapperLdmConfig {
            in_dim: d,
            d_model: section.d_model,
            heads: section.heads,
            encoder_layers: section.encoder_layers,
            decoder_layers: section.decoder_layers,
            ff_dim: section.ff_dim,
            num_queries: stage1.ldm.tokenizer.max_length(),
            out_dim: text_dim,
            eps: 1e-5,
        },
        vb.pp("model.gen_text_hidden_fcs.0"),
    )?;
    let img = ImgTokens::init(&lm, section.num_img_tokens, tokenizer.first_img_id(), seed)?;
    img.register(&vars);
    let latent_elems = latent_table.first().map_or(0, Vec::len);
    let latents = if diffusion {
        let flat: Vec<f32> = latent_table.iter().flatten().copied().collect();
        let c = stage1.ldm.vae.config().latent_channels;
        let hw = latent_elems / c;
        let h = (hw as f64).sqrt().round() as usize;
        anyhow::ensure!(
            h * h == hw,
            "stage2: frames are not square ({hw} latent positions)"
        );
        // Stage 1's own schedule and parameterisation (epsilon or v).
        let scheduler =
            models::schedulers::DdpmScheduler::new(stage1.ldm.scheduler_config.clone())?;
        Some(Diffusion {
            latents: Tensor::from_vec(flat, (latent_table.len(), c, h, h), device)?,
            unet: stage1.ldm.unet.clone(),
            scheduler,
        })
    } else {
        None
    };
    let lreg = match (mask_table, frame_size) {
        (Some(table), Some(frame_size)) => {
            let slots_of = |examples: &[Example], captions: &[String], n: usize| {
                examples
                    .iter()
                    .take(n)
                    .map(|e| {
                        let masks = table.get(e.frame).map_or(&[][..], Vec::as_slice);
                        stage1.lreg_slots(&captions[e.target], masks)
                    })
                    .collect::<Vec<_>>()
            };
            let needs_slots = section.lreg_weight > 0.0 || section.attention_match_weight > 0.0;
            let train_slots = if needs_slots {
                slots_of(&train, &train_captions, train.len())
            } else {
                Vec::new()
            };
            anyhow::ensure!(
                !needs_slots || train_slots.iter().any(|s| !s.is_empty()),
                "[stage2] lreg_weight and attention_match_weight need character masks: no \
                 training frame of {} has a mask for a character its caption names",
                data.display()
            );
            let val_slots = slots_of(&val, &val_captions, VAL_LREG_FRAMES);
            // Fixed validation noise and timesteps (spread over the schedule), as stage 1's.
            let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed ^ 0x6c72_6567);
            let n = val_slots.len();
            let val_noise = super::vae::gaussian(&mut rng, n * latent_elems);
            let val_timesteps = (0..n).map(|i| (i * 1000) / n + 1000 / (2 * n)).collect();
            Some(LregTargets {
                frame_size,
                train: train_slots,
                val: val_slots,
                val_noise,
                val_timesteps,
            })
        }
        _ => {
            anyhow::ensure!(
                section.lreg_weight == 0.0 && section.attention_match_weight == 0.0,
                "[stage2] lreg_weight and attention_match_weight: no frame was read to take \
                 character masks from"
            );
            None
        }
    };
    let source = Arc::new(Stage2Source {
        count: train.len(),
        latent_elems,
    });
    let stage = Stage2Stage {
        diffusion: latents,
        lreg,
        vars,
        lm,
        img,
        mapper_llm,
        mapper_ldm,
        pooled,
        train,
        targets,
        target_weights,
        val,
        val_targets,
        pronoun,
        slot_checks,
        section: section.clone(),
        device: device.clone(),
        out: out.to_path_buf(),
    };
    Ok((stage, source, format!("{fp:016x}")))
}

/// The slot-by-slot checks of the first [`VAL_SLOT_FRAMES`] validation examples whose target
/// caption names two or more characters.
fn slot_checks(
    stage1: &Stage1,
    val: &[Example],
    val_captions: &[String],
    val_targets: &Tensor,
    align: AlignTarget,
) -> Result<Vec<SlotCheck>> {
    let names: Vec<&str> = stage1.portraits.iter().map(|(n, _)| n.as_str()).collect();
    let tokens = stage1.ldm.tokenizer.max_length();
    let mut checks = Vec::new();
    for (val_index, e) in val.iter().enumerate() {
        if checks.len() == VAL_SLOT_FRAMES {
            break;
        }
        let caption = &val_captions[e.target];
        let mut named = stage1.ldm.character_tokens(caption, &names);
        named.retain(|&(t, _)| t < tokens);
        if named.len() < 2 {
            continue;
        }
        named.sort_unstable();
        let right = val_targets.get(e.target)?;
        let mut slots = Vec::new();
        for &(token, k) in named.iter().take(2) {
            let mut rows = vec![right.get(token)?];
            for (o, other) in names.iter().enumerate() {
                if named.iter().any(|&(_, j)| j == o) {
                    continue;
                }
                let swapped = replace_name(caption, names[k], other);
                // The other name may tokenize to another length: take its own slot.
                let Some(&(t, _)) = stage1
                    .ldm
                    .character_tokens(&swapped, &names)
                    .iter()
                    .find(|&&(t, j)| j == o && t < tokens)
                else {
                    continue;
                };
                rows.push(stage1.target(&swapped, align)?.get(t)?);
            }
            if rows.len() > 1 {
                slots.push((token, Tensor::stack(&rows, 0)?));
            }
        }
        if slots.len() == 2 {
            checks.push(SlotCheck { val_index, slots });
        }
    }
    Ok(checks)
}

/// Index of the row of `candidates` `(n, ...)` nearest `x` (same trailing shape) in squared
/// distance.
fn nearest_row(candidates: &Tensor, x: &Tensor) -> Result<Option<usize>> {
    let dist = candidates
        .broadcast_sub(&x.unsqueeze(0)?)?
        .sqr()?
        .flatten_from(1)?
        .sum(D::Minus1)?
        .to_vec1::<f32>()?;
    Ok(dist
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i))
}

/// What one forward pass over examples gives: Mapper_LDM outputs and L_gen.
struct Forward {
    conds: Tensor,
    lgen: Tensor,
}

impl Stage2Stage {
    /// Runs the LLM over `examples` (right-padded into one batch: causal attention keeps the
    /// padding out of every real position) and Mapper_LDM over their `[IMG]` states.
    fn forward(&self, examples: &[&Example]) -> Result<Forward> {
        let d = self.lm.embed_dim();
        let max_len = examples.iter().map(|e| e.prompt.len).max().unwrap_or(0);
        let mut embeds = Vec::with_capacity(examples.len());
        let mut ids = Vec::with_capacity(examples.len());
        let mut masks = Vec::with_capacity(examples.len());
        let lgen_which = match self.section.lgen_targets {
            LgenChoice::AllImg => LgenTargets::AllImg,
            LgenChoice::CaptionAndFirstImg => LgenTargets::CaptionAndFirstImg,
        };
        for e in examples {
            let visual: Vec<Tensor> = if e.history.is_empty() || self.section.caption_only {
                Vec::new()
            } else {
                let idx = Tensor::from_vec(
                    e.history.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    e.history.len(),
                    &self.device,
                )?;
                let v = self
                    .mapper_llm
                    .forward(&self.pooled.index_select(&idx, 0)?)?;
                (0..e.history.len())
                    .map(|k| v.i(k))
                    .collect::<candle_core::Result<_>>()?
            };
            // The prompt's Visual{frame} indices count from the first kept frame.
            let first = e.prompt.first_kept_frame;
            let mut padded_visual = vec![Tensor::zeros((0, d), DType::F32, &self.device)?; first];
            padded_visual.extend(visual);
            let emb = e.prompt.embed(&self.lm, &self.img, &padded_visual)?;
            let pad = max_len - e.prompt.len;
            let emb = if pad > 0 {
                let zeros = Tensor::zeros((1, pad, d), emb.dtype(), &self.device)?;
                Tensor::cat(&[emb, zeros], 1)?
            } else {
                emb
            };
            embeds.push(emb);
            let mut row = e.prompt.ids_with_visual_fill(0);
            row.resize(max_len, 0);
            ids.push(Tensor::from_vec(row, (1, max_len), &self.device)?);
            let m = target_mask(
                e.prompt.len,
                &e.prompt.img_positions,
                e.prompt.current_caption.clone(),
                lgen_which,
                &self.device,
            )?;
            masks.push(if pad > 0 {
                Tensor::cat(&[m, Tensor::zeros((1, pad), DType::F32, &self.device)?], 1)?
            } else {
                m
            });
        }
        let embeds = Tensor::cat(&embeds, 0)?;
        let ids = Tensor::cat(&ids, 0)?.to_dtype(DType::I64)?;
        let masks = Tensor::cat(&masks, 0)?;
        let mut cache = self.lm.new_cache();
        let out = self
            .lm
            .forward_embeds_with(&embeds, &mut cache, None, LogitsFor::All)?;
        let logits = self
            .img
            .extend_logits(&out.logits, &out.last_hidden_state)?;
        let lgen = lgen_loss(&logits, &ids, &masks)?;
        let r = self.section.num_img_tokens;
        let hidden = examples
            .iter()
            .enumerate()
            .map(|(b, e)| {
                let range = e.prompt.img_range();
                out.last_hidden_state.i(b)?.narrow(0, range.start, r)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let hidden = Tensor::stack(&hidden, 0)?;
        let embs = self
            .img
            .embeddings(hidden.dtype())?
            .unsqueeze(0)?
            .broadcast_as(hidden.shape())?
            .contiguous()?;
        let conds = self.mapper_ldm.forward(&hidden, &embs)?;
        Ok(Forward { conds, lgen })
    }

    /// L_reg of validation examples `start..` (the first of `chunk` that have L_reg slots)
    /// under the conditions `conds`, at fixed noise: over every name slot, and over the first
    /// and the second name slot (in token order) of the frames with two or more.
    fn val_lreg(
        &self,
        start: usize,
        chunk: &[&Example],
        conds: &Tensor,
    ) -> Result<Option<ValLreg>> {
        let (Some(r), Some(d)) = (&self.lreg, &self.diffusion) else {
            return Ok(None);
        };
        let m = r.val.len().saturating_sub(start).min(chunk.len());
        if m == 0 {
            return Ok(None);
        }
        let idx = Tensor::from_vec(
            chunk[..m]
                .iter()
                .map(|e| e.frame as u32)
                .collect::<Vec<_>>(),
            m,
            &self.device,
        )?;
        let x0 = d.latents.index_select(&idx, 0)?;
        let per = x0.elem_count() / m;
        let eps = Tensor::from_vec(
            r.val_noise[start * per..(start + m) * per].to_vec(),
            x0.shape(),
            &self.device,
        )?;
        let steps = &r.val_timesteps[start..start + m];
        let xt = d.scheduler.add_noise_batch(&x0, &eps, steps)?;
        let ts = Tensor::from_vec(
            steps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            m,
            &self.device,
        )?;
        let out = d.unet.forward_with_capture(
            &xt,
            &ts,
            &conds.narrow(0, 0, m)?,
            &AttentionCapture::all(),
        )?;
        let slots: Vec<&LregSlots> = r.val[start..start + m].iter().collect();
        let (masks, chars) = r.batch(&slots, &self.device)?;
        let all = lreg_loss(&out.attention_probs, &masks, &chars)?;
        let mut result = ValLreg {
            all: (all.to_scalar::<f32>()? as f64, m),
            by_slot: [(0.0, 0); 2],
        };
        // Frames naming two or more characters, each slot on its own.
        let pairs: Vec<(u32, Vec<(usize, PackedMask)>)> = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len() >= 2)
            .map(|(i, s)| {
                let mut sorted = s.to_vec();
                sorted.sort_by_key(|(t, _)| *t);
                (i as u32, sorted)
            })
            .collect();
        if pairs.is_empty() {
            return Ok(Some(result));
        }
        let rows = Tensor::from_vec(
            pairs.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            pairs.len(),
            &self.device,
        )?;
        let maps = out
            .attention_probs
            .iter()
            .map(|a| {
                Ok(models::unet::CapturedAttention {
                    layer: a.layer.clone(),
                    probs: a.probs.index_select(&rows, 0)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        for (k, slot) in result.by_slot.iter_mut().enumerate() {
            let one: Vec<LregSlots> = pairs.iter().map(|(_, s)| vec![s[k].clone()]).collect();
            let refs: Vec<&LregSlots> = one.iter().collect();
            let (masks, chars) = r.batch(&refs, &self.device)?;
            let l = lreg_loss(&maps, &masks, &chars)?;
            *slot = (l.to_scalar::<f32>()? as f64, pairs.len());
        }
        Ok(Some(result))
    }

    fn targets_of(&self, table: &Tensor, examples: &[&Example]) -> Result<Tensor> {
        let idx = Tensor::from_vec(
            examples.iter().map(|e| e.target as u32).collect::<Vec<_>>(),
            examples.len(),
            &self.device,
        )?;
        Ok(table.index_select(&idx, 0)?)
    }

    /// Writes `OUT/storygpt-v/stage2.safetensors` (the names the bundle loader reads).
    pub fn export(&self) -> Result<PathBuf> {
        let dir = self.out.join("storygpt-v");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("stage2.safetensors");
        let tensors: std::collections::HashMap<String, Tensor> = super::named_vars(&self.vars)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&tensors, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// The section (for the bundle manifest).
    pub fn section(&self) -> &Stage2Section {
        &self.section
    }

    /// Loads trained weights (a `stage2.safetensors` this stage exported, f32 or f16) into the
    /// trainable variables, so a shipped stage 2 can be validated with the checks of this code.
    pub fn load_trained(&mut self, path: &Path) -> Result<()> {
        nn::Weights::open(path)?.load_into_varmap(&self.vars)?;
        Ok(())
    }

    /// Pronoun frames checked at validation.
    pub fn pronoun_count(&self) -> usize {
        self.pronoun.len()
    }
}

impl Stage for Stage2Stage {
    type Batch = Stage2Batch;

    fn name(&self) -> &'static str {
        "stage2"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        super::named_vars(&self.vars)
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("norm") || name.contains("input_embeddings")
    }

    fn loss(&mut self, b: &Stage2Batch, _step: u64) -> Result<StepLoss> {
        let examples: Vec<&Example> = b.examples.iter().map(|&i| &self.train[i]).collect();
        let align_target = self.targets_of(&self.targets, &examples)?;
        // The diffusion pass's noised latents, timesteps and target.
        let noised = match &self.diffusion {
            None => None,
            Some(d) => {
                let idx = Tensor::from_vec(
                    examples.iter().map(|e| e.frame as u32).collect::<Vec<_>>(),
                    examples.len(),
                    &self.device,
                )?;
                let x0 = d.latents.index_select(&idx, 0)?;
                let eps = Tensor::from_vec(b.noise.clone(), x0.shape(), &self.device)?;
                let xt = d.scheduler.add_noise_batch(&x0, &eps, &b.timesteps)?;
                let ts = Tensor::from_vec(
                    b.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
                    b.timesteps.len(),
                    &self.device,
                )?;
                let target = d.scheduler.training_target(&x0, &eps, &b.timesteps)?;
                Some((d, xt, ts, target))
            }
        };
        let wants_maps =
            self.section.lreg_weight > 0.0 || self.section.attention_match_weight > 0.0;
        let capture = self.lreg.as_ref().filter(|_| wants_maps);
        // The frozen UNet's attention under the alignment target (for the attention match)
        // depends on nothing the LLM computes: on the CPU the two run side by side, so that one
        // fills the cores the other's serial stretches leave idle. Each computes what it would
        // alone.
        let goal_pass = |this: &Self| -> Result<Option<Vec<models::unet::CapturedAttention>>> {
            match (&noised, capture) {
                (Some((d, xt, ts, _)), Some(_)) if this.section.attention_match_weight > 0.0 => {
                    Ok(Some(
                        d.unet
                            .forward_with_capture(
                                xt,
                                ts,
                                &align_target.detach(),
                                &AttentionCapture::all(),
                            )?
                            .attention_probs,
                    ))
                }
                _ => Ok(None),
            }
        };
        let this = &*self;
        let (f, goal) = if this.device.is_cpu() {
            rayon::join(|| this.forward(&examples), || goal_pass(this))
        } else {
            (this.forward(&examples), goal_pass(this))
        };
        let (f, goal) = (f?, goal?);
        let mse = match &self.target_weights {
            Some(table) => {
                weighted_lalign_loss(&f.conds, &align_target, &self.targets_of(table, &examples)?)?
            }
            None => lalign_loss(&f.conds, &align_target)?,
        };
        let mut parts = vec![
            ("l_align", mse.to_scalar::<f32>()? as f64),
            ("l_gen", f.lgen.to_scalar::<f32>()? as f64),
        ];
        let mut lreg = None;
        let mut matched = None;
        let diffusion = match noised {
            None => None,
            Some((d, xt, ts, target)) => {
                let l = match capture {
                    None => {
                        diffusion_align_loss(&f.conds, |c| d.unet.forward(&xt, &ts, c), &target)?
                    }
                    Some(r) => {
                        // The same forward pass, its cross-attention maps kept for L_reg and the
                        // attention match at the target caption's name slots.
                        let slots: Vec<&LregSlots> =
                            b.examples.iter().map(|&i| &r.train[i]).collect();
                        let (l, maps) = diffusion_align_capture_loss(
                            &f.conds,
                            |c| {
                                d.unet
                                    .forward_with_capture(&xt, &ts, c, &AttentionCapture::all())
                            },
                            &target,
                        )?;
                        if self.section.lreg_weight > 0.0 {
                            let (masks, chars) = r.batch(&slots, &self.device)?;
                            lreg = Some(lreg_loss(&maps, &masks, &chars)?);
                        }
                        if let Some(goal) = &goal {
                            matched = Some(attention_match_loss(&maps, goal, &r.tokens(&slots))?);
                        }
                        l
                    }
                };
                parts.push(("l_diffusion", l.to_scalar::<f32>()? as f64));
                if let Some(reg) = &lreg {
                    parts.push(("l_reg", reg.to_scalar::<f32>()? as f64));
                }
                if let Some(m) = &matched {
                    parts.push(("l_attention_match", m.to_scalar::<f32>()? as f64));
                }
                Some(l)
            }
        };
        // align_weight x L_align (MSE or, for the ablation, the diffusion loss), plus
        // diffusion_weight x the diffusion loss beside the MSE.
        let align = match (self.section.align_loss, diffusion) {
            (AlignLoss::Diffusion, Some(l)) => (l * self.section.align_weight)?,
            (AlignLoss::Mse, Some(l)) => {
                ((mse * self.section.align_weight)? + (l * self.section.diffusion_weight)?)?
            }
            (_, None) => (mse * self.section.align_weight)?,
        };
        let mut loss = (align + (&f.lgen * self.section.lgen_weight)?)?;
        if let Some(reg) = lreg {
            loss = (loss + (reg * self.section.lreg_weight)?)?;
        }
        if let Some(m) = matched {
            loss = (loss + (m * self.section.attention_match_weight)?)?;
        }
        Ok(StepLoss { loss, parts })
    }

    fn after_step(&mut self) -> Result<()> {
        self.img.renormalise()?;
        Ok(())
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        let (mut align, mut lgen, mut n) = (0f64, 0f64, 0usize);
        // L_reg sums (all slots, first slot, second slot) under Mapper_LDM's output and, for
        // the ceiling, under the alignment targets (stage 1's fused condition).
        let mut reg = [(0f64, 0usize); 3];
        let mut reg_target = [(0f64, 0usize); 3];
        let all: Vec<&Example> = self.val.iter().collect();
        let mut slot_right = [0usize; 2];
        let mut checks = self.slot_checks.iter().peekable();
        for (c, chunk) in all.chunks(32).enumerate() {
            let f = self.forward(chunk)?;
            while let Some(check) = checks.next_if(|k| k.val_index < (c + 1) * 32) {
                let out = f.conds.i(check.val_index - c * 32)?;
                for (s, (token, rows)) in check.slots.iter().enumerate() {
                    slot_right[s] += (nearest_row(rows, &out.get(*token)?)? == Some(0)) as usize;
                }
            }
            let t = self.targets_of(&self.val_targets, chunk)?;
            align +=
                lalign_loss(&f.conds.detach(), &t)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            lgen += f.lgen.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            if let Some(l) = self.val_lreg(n, chunk, &f.conds.detach())? {
                ValLreg::add(&mut reg, &l);
            }
            if let Some(l) = self.val_lreg(n, chunk, &t)? {
                ValLreg::add(&mut reg_target, &l);
            }
            n += chunk.len();
        }
        let mut right = 0usize;
        for chunk in self.pronoun.chunks(32) {
            let examples: Vec<&Example> = chunk.iter().map(|p| &p.example).collect();
            let conds = self.forward(&examples)?.conds.detach();
            for (b, p) in chunk.iter().enumerate() {
                right += (nearest_row(&p.candidates, &conds.i(b)?)? == Some(0)) as usize;
            }
        }
        let mut m = BTreeMap::from([
            ("val_l_align".to_owned(), align / n.max(1) as f64),
            ("val_l_gen".to_owned(), lgen / n.max(1) as f64),
        ]);
        for (sums, suffix) in [(reg, ""), (reg_target, "_target")] {
            for ((sum, n), key) in
                sums.into_iter()
                    .zip(["val_l_reg", "val_l_reg_slot1", "val_l_reg_slot2"])
            {
                if n > 0 {
                    m.insert(format!("{key}{suffix}"), sum / n as f64);
                }
            }
        }
        if !self.slot_checks.is_empty() {
            for (s, key) in ["slot1_right_character", "slot2_right_character"]
                .into_iter()
                .enumerate()
            {
                m.insert(
                    key.to_owned(),
                    slot_right[s] as f64 / self.slot_checks.len() as f64,
                );
            }
        }
        if !self.pronoun.is_empty() {
            m.insert(
                "pronoun_right_character".to_owned(),
                right as f64 / self.pronoun.len() as f64,
            );
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::{pair_slots, replace_name, target_caption, PackedMask};

    fn frame(caption: &str, referential: &str, characters: &[&str]) -> data::dataset::FrameRecord {
        data::dataset::FrameRecord {
            id: "f".into(),
            caption: caption.into(),
            referential: referential.into(),
            characters: characters.iter().map(|c| c.to_string()).collect(),
            char_labels: Vec::new(),
            background: None,
            bg_labels: Vec::new(),
            image: None,
            masks: Vec::new(),
        }
    }

    #[test]
    fn sorted_groups_make_one_target_for_both_orders_of_a_they() {
        let rules = data::rules::RuleSet::flintstones();
        let a = frame("Wilma and Fred laugh.", "They laugh.", &["Wilma", "Fred"]);
        let b = frame("Fred and Wilma laugh.", "They laugh.", &["Fred", "Wilma"]);
        assert_eq!(target_caption(&a, &rules, true), "Fred and Wilma laugh.");
        assert_eq!(target_caption(&b, &rules, true), "Fred and Wilma laugh.");
        // Off (the paper's targets), and frames whose caption names its cast, keep their order.
        assert_eq!(target_caption(&a, &rules, false), "Wilma and Fred laugh.");
        let named = frame(
            "Wilma and Fred laugh.",
            "Wilma and Fred laugh.",
            &["Wilma", "Fred"],
        );
        assert_eq!(
            target_caption(&named, &rules, true),
            "Wilma and Fred laugh."
        );
    }

    #[test]
    fn lreg_slots_pair_each_target_token_with_its_own_characters_mask() {
        // 70 pixels: more than one word of bits.
        let mask = |on: &[usize]| {
            let mut m = vec![false; 70];
            for &i in on {
                m[i] = true;
            }
            PackedMask::new(&m)
        };
        let values = |m: &PackedMask| {
            let mut v = vec![0f32; 70];
            m.fill(&mut v);
            (0..70).filter(|&i| v[i] == 1.0).collect::<Vec<_>>()
        };
        assert_eq!(values(&mask(&[0, 63, 64, 69])), [0, 63, 64, 69]);
        // The frame lists Mia's mask first (its caption said "Mia and Bob"); the sorted target
        // "Bob and Mia" has Bob at token 1 and Mia at token 3 (cast: Mia 0, Bob 1, Rex 2). Rex is
        // named at token 5 but not visible; a slot past the 77 tokens is dropped.
        let names = ["Mia", "Bob", "Rex"];
        let frame = vec![
            ("Mia".to_owned(), mask(&[2, 3])),
            ("Bob".to_owned(), mask(&[65])),
        ];
        let slots = pair_slots(&[(3, 0), (1, 1), (5, 2), (80, 0)], &names, &frame, 77);
        let got: Vec<(usize, Vec<usize>)> = slots.iter().map(|(t, m)| (*t, values(m))).collect();
        assert_eq!(got, [(3, vec![2, 3]), (1, vec![65])]);
    }

    #[test]
    fn replaces_whole_names_only() {
        assert_eq!(
            replace_name("Bob hugs Bobby.", "Bob", "Mia"),
            "Mia hugs Bobby."
        );
        assert_eq!(
            replace_name("Mr Grey waves.", "Mr Grey", "Tom"),
            "Tom waves."
        );
        assert_eq!(
            replace_name("Lily and Lily", "Lily", "Kiki"),
            "Kiki and Kiki"
        );
    }
}
