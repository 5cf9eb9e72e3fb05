//! `StoryPipeline`: the autoregressive StoryGPT-V generator, the only door from the service and
//! the CLI to the networks.
//!
//! Frame 1 comes from the Char-LDM alone (fused condition of its caption and the characters'
//! portraits). For frame n >= 2 the LLM reads the interleaved history of the frames drawn so
//! far (CLIP vision pooled output -> Mapper_LLM -> m visual tokens each) and their captions,
//! then the current caption and the `[IMG]` tokens; Mapper_LDM turns the `[IMG]` hidden states
//! into the UNet condition, and the Char-LDM samples with delayed conditioning (the plain
//! caption for the first `start_merge_step` steps, 0 when the caption uses a pronoun).
//!
//! The LLM's KV cache is kept between frames: each new prompt shares everything up to the end
//! of the previous frame's history with the last one, so only the newest frame's visual
//! tokens, its caption and the new caption are fed (see [`Prompt::common_prefix_len`]). Once a
//! story outgrows the prompt budget the oldest frames are dropped and the shifted prompt is
//! run again from the start; memory therefore stays bounded by the budget, and grows by m
//! tokens plus a caption per frame until then, never by pixels (past frames are kept only as
//! their m visual tokens).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor, D};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::bundle::{parse_dtype, Bundle, BundleInfo};
use crate::char_ldm::{Cancelled, CharLdm, SampleEvent, SampleOptions};
use crate::clip::{ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel};
use crate::fuse::FuseModule;
use crate::llm::{CausalLm, ImgTokens, KvCache, LlmTokenizer, LogitsFor};
use crate::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
use crate::prompt::{build_prompt, Prompt, PromptConfig};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::AutoencoderKL;

/// A character of the story.
#[derive(Debug, Clone)]
pub struct CharacterInput {
    /// Name as written in captions.
    pub name: String,
    /// `he`, `she`, `they` or `it`.
    pub pronoun: String,
    /// Portrait (fused into the caption's condition when the bundle has a FuseModule).
    pub portrait: Option<RgbImage>,
}

/// A story to illustrate.
#[derive(Debug, Clone)]
pub struct StoryInput {
    /// The cast.
    pub characters: Vec<CharacterInput>,
    /// One caption per frame.
    pub captions: Vec<String>,
}

/// One frame to draw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRequest {
    /// 0-based caption index.
    pub index: usize,
    /// Seed of the frame's noise.
    pub seed: u64,
}

/// Sampling options of one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    pub guidance_scale: f64,
    /// Delayed conditioning of frames without a pronoun (0 for frames with one).
    pub start_merge_step: usize,
    /// Sampler.
    pub scheduler: SchedulerKind,
    /// Frame height in pixels.
    pub height: usize,
    /// Frame width in pixels.
    pub width: usize,
    /// Also return the cross-attention heatmap of each character mention
    /// ([`FrameOutput::attention`]); costs a little time per step.
    pub capture_attention: bool,
    /// What classifier-free guidance steers away from ("" = the empty prompt, as trained).
    pub negative_prompt: String,
    /// Report what each frame looks like every this many steps ([`PipelineEvent::Preview`];
    /// 0: never). Each preview costs one VAE decode.
    pub preview_every: usize,
}

impl GenerateOptions {
    /// The options with `steps` changed and the delayed-conditioning step scaled with it (the
    /// paper merges after half of the steps: 15 of 30).
    pub fn with_steps(&self, steps: usize) -> Self {
        let merge = (self.start_merge_step * steps + self.steps / 2)
            .checked_div(self.steps)
            .unwrap_or(0);
        Self {
            steps,
            start_merge_step: merge,
            ..self.clone()
        }
    }
}

/// How a frame was conditioned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConditionKind {
    /// Plain CLIP text (frame 1 without portraits).
    Text,
    /// CLIP text fused with portrait embeddings (frame 1).
    Fused,
    /// Mapper_LDM output of the LLM (frames 2..N).
    Llm,
}

/// A drawn frame.
#[derive(Debug, Clone)]
pub struct FrameOutput {
    /// 0-based caption index.
    pub index: usize,
    /// Seed used.
    pub seed: u64,
    /// The frame.
    pub image: RgbImage,
    /// Wall time of the frame (LLM, sampling and decoding).
    pub duration: Duration,
    /// Delayed-conditioning step used (0 for pronoun frames).
    pub start_merge_step: usize,
    /// The condition used after `start_merge_step`.
    pub condition: ConditionKind,
    /// LLM prompt length in tokens (0 for frame 1).
    pub prompt_tokens: usize,
    /// LLM positions actually computed for this frame (the rest came from the KV cache).
    pub llm_positions_computed: usize,
    /// Cross-attention heatmaps of the caption's character mentions (when requested).
    pub attention: Vec<AttentionMap>,
}

/// Where the UNet looked for one word of the caption.
#[derive(Debug, Clone)]
pub struct AttentionMap {
    /// The word as written ("Mia", "He").
    pub text: String,
    /// The characters it refers to: the name itself, or for a pronoun the matching
    /// characters of the latest earlier caption that names any.
    pub characters: Vec<String>,
    /// Frame-sized heatmap, 255 where the token's attention peaks.
    pub heatmap: image::GrayImage,
}

/// Progress of [`StoryPipeline::generate`].
#[derive(Debug)]
pub enum PipelineEvent<'a> {
    /// A frame is about to be drawn.
    FrameStarted {
        /// Caption index.
        index: usize,
        /// Its seed.
        seed: u64,
        /// 1-based position within this call.
        ordinal: usize,
        /// Frames in this call.
        count: usize,
    },
    /// One denoising step finished.
    Step {
        /// Caption index.
        index: usize,
        /// 1-based position within this call.
        ordinal: usize,
        /// Frames in this call.
        count: usize,
        /// Step done (1-based).
        step: usize,
        /// Steps of this frame.
        steps: usize,
    },
    /// What the frame being drawn looks like so far (every `preview_every` steps).
    Preview {
        /// Caption index.
        index: usize,
        /// 1-based position within this call.
        ordinal: usize,
        /// Steps done.
        step: usize,
        /// Steps of this frame.
        steps: usize,
        /// The image so far, at the frame's size.
        image: &'a image::RgbImage,
    },
    /// A frame is done.
    FrameFinished {
        /// 1-based position within this call.
        ordinal: usize,
        /// Frames in this call.
        count: usize,
        /// The frame.
        frame: &'a FrameOutput,
    },
}

/// Which condition each frame is drawn with. The service always draws [`Conditioning::StoryGptV`];
/// the other two are the paper's baselines, drawn by the same pipeline so that the evaluation
/// compares conditions and nothing else (same UNet, sampler, seeds and decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Conditioning {
    /// StoryGPT-V: frame 1 fused (caption + portraits), later frames from the LLM.
    #[default]
    StoryGptV,
    /// The Char-LDM's UNet on the plain CLIP text of every caption: no portraits, no LLM (the
    /// paper's LDM baseline).
    TextOnly,
    /// Every frame fused from its own caption and the portraits of the characters it names, no
    /// LLM (Char-LDM; with named captions the paper's upper bound).
    Fused,
}

/// How [`StoryPipeline::next_caption`] picks tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decoding {
    /// Most likely token.
    Greedy,
    /// Nucleus sampling.
    TopP {
        /// Cumulative probability kept (0, 1].
        p: f64,
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Sampling seed.
        seed: u64,
    },
}

/// The loaded networks of a bundle.
pub struct StoryPipeline {
    char_ldm: CharLdm,
    lm: CausalLm,
    tokenizer: LlmTokenizer,
    img: ImgTokens,
    mapper_llm: MapperLlm,
    mapper_ldm: MapperLdm,
    visual_encoder: ClipVisionModel,
    visual_processor: ClipImageProcessor,
    prompt_config: PromptConfig,
    defaults: GenerateOptions,
    info: BundleInfo,
    device: Device,
}

/// The image preprocessing of the CLIP vision tower in `dir`: the bundle's
/// `preprocessor_config.json` when readable, else CLIP's defaults at the tower's input size.
pub fn processor_for(dir: &Path, image_size: usize) -> ClipImageProcessor {
    let p = dir.join("preprocessor_config.json");
    std::fs::read_to_string(&p)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .map(|v| {
            let mut proc = ClipImageProcessor::for_image_size(image_size as u32);
            let arr3 = |k: &str| -> Option<[f32; 3]> {
                let a = v.get(k)?.as_array()?;
                Some([
                    a.first()?.as_f64()? as f32,
                    a.get(1)?.as_f64()? as f32,
                    a.get(2)?.as_f64()? as f32,
                ])
            };
            if let Some(m) = arr3("image_mean") {
                proc.mean = m;
            }
            if let Some(s) = arr3("image_std") {
                proc.std = s;
            }
            proc
        })
        .unwrap_or_else(|| ClipImageProcessor::for_image_size(image_size as u32))
}

impl StoryPipeline {
    /// Loads the bundle in `bundle_dir` onto `device`.
    pub fn load(bundle_dir: &Path, device: &Device) -> Result<Self> {
        let bundle = Bundle::open(bundle_dir)?;
        let m = &bundle.manifest;
        let ldm_dtype = parse_dtype(&m.char_ldm.dtype)?;
        let llm_dtype = parse_dtype(&m.llm.dtype)?;

        // Stage 1.
        let tokenizer = ClipTokenizer::from_dir(&bundle.tokenizer_dir()?)?;
        let text_encoder = ClipTextModel::load(&bundle.text_encoder_dir()?, ldm_dtype, device)?;
        let stage1 = m
            .char_ldm
            .stage1
            .as_ref()
            .map(|p| {
                let p = bundle.path(p);
                nn::Weights::open(&p).with_context(|| format!("stage-1 weights {}", p.display()))
            })
            .transpose()?;
        let prefixes = &m.char_ldm.stage1_prefixes;
        let has = |prefix: &str| {
            stage1
                .as_ref()
                .is_some_and(|w| !w.keys_with_prefix(&format!("{prefix}.")).is_empty())
        };
        let unet_dir = bundle.unet_dir()?;
        let unet_config = UNetConfig::from_file(&unet_dir.join("config.json"))?;
        let unet_weights = match &stage1 {
            Some(w) if has(&prefixes.unet) => w.subset(&prefixes.unet),
            _ => nn::Weights::open(&unet_dir)
                .with_context(|| format!("UNet weights in {}", unet_dir.display()))?,
        };
        let unet =
            UNet2DConditionModel::new(unet_weights.var_builder(ldm_dtype, device), &unet_config)
                .with_context(|| format!("building the UNet of {}", unet_dir.display()))?;
        let vae = AutoencoderKL::load(&bundle.vae_dir()?, ldm_dtype, device)?;
        let scheduler_config = SchedulerConfig::from_file(&bundle.scheduler_path()?)?;
        let image_dir = bundle.path(&m.char_ldm.image_encoder);
        let image_encoder = match &stage1 {
            Some(w) if has(&prefixes.image_encoder) => {
                let configs = crate::clip::ClipConfigs::from_dir(&image_dir)?;
                let cfg = configs
                    .vision
                    .with_context(|| format!("{}: no CLIP vision config", image_dir.display()))?;
                ClipVisionModel::new(
                    w.subset(&prefixes.image_encoder)
                        .var_builder(ldm_dtype, device),
                    &cfg,
                )?
            }
            _ => ClipVisionModel::load(&image_dir, ldm_dtype, device)?,
        };
        let image_processor = processor_for(&image_dir, image_encoder.config().image_size);
        let text_dim = text_encoder.config().hidden_size;
        let fuse = match &stage1 {
            Some(w) if has(&prefixes.fuse) => Some(
                FuseModule::new(
                    w.subset(&prefixes.fuse).var_builder(ldm_dtype, device),
                    text_dim,
                )
                .context("building the FuseModule from the stage-1 weights")?,
            ),
            _ => None,
        };
        let char_ldm = CharLdm::from_parts(
            tokenizer,
            text_encoder,
            Some(image_encoder),
            image_processor,
            fuse,
            unet,
            vae,
            scheduler_config,
            device.clone(),
        );

        // Stage 2.
        let llm_dir = bundle.path(&m.llm.model);
        let lm = CausalLm::load(&llm_dir, llm_dtype, device)?;
        let r = m.llm.num_img_tokens;
        let llm_tokenizer = LlmTokenizer::from_dir(bundle.llm_tokenizer_dir(), r)?;
        let stage2_path = bundle.path(&m.llm.stage2);
        let stage2 = nn::Weights::open(&stage2_path)
            .with_context(|| format!("stage-2 weights {}", stage2_path.display()))?;
        let names = &m.llm.stage2_names;
        let rows = stage2
            .get(&names.img_rows, DType::F32, device)
            .with_context(|| format!("{}: [IMG] rows", stage2_path.display()))?;
        let n_rows = rows.dim(0)?;
        if n_rows < r {
            bail!(
                "{}: `{}` has {n_rows} rows, the manifest asks for {r} [IMG] tokens",
                stage2_path.display(),
                names.img_rows
            )
        }
        let rows = rows.narrow(0, n_rows - r, r)?.to_dtype(llm_dtype)?;
        let img = ImgTokens::from_rows(&lm, &rows, llm_tokenizer.first_img_id())?;
        let visual_dir = bundle.visual_encoder_dir();
        let visual_encoder = ClipVisionModel::load(&visual_dir, llm_dtype, device)?;
        let visual_processor = processor_for(&visual_dir, visual_encoder.config().image_size);
        let d = lm.embed_dim();
        let mapper_llm = MapperLlm::new(
            MapperLlmConfig {
                vision_dim: visual_encoder.config().hidden_size,
                num_tokens: m.llm.visual_tokens,
                llm_dim: d,
            },
            stage2
                .subset(&names.mapper_llm)
                .var_builder(llm_dtype, device),
        )
        .context("building Mapper_LLM from the stage-2 weights")?;
        let dims = m.llm.mapper_ldm;
        let mapper_ldm = MapperLdm::new(
            MapperLdmConfig {
                in_dim: d,
                d_model: dims.d_model,
                heads: dims.heads,
                encoder_layers: dims.encoder_layers,
                decoder_layers: dims.decoder_layers,
                ff_dim: dims.ff_dim,
                num_queries: char_ldm.tokenizer.max_length(),
                out_dim: unet_config
                    .cross_attention_dim
                    .expand(1, "cross_attention_dim")?[0],
                eps: 1e-5,
            },
            stage2
                .subset(&names.mapper_ldm)
                .var_builder(llm_dtype, device),
        )
        .context("building Mapper_LDM from the stage-2 weights")?;
        let mut prompt_config = PromptConfig::new(
            llm_tokenizer.img_token_ids().to_vec(),
            llm_tokenizer.bos_id(),
        );
        prompt_config.max_len = m.llm.max_prompt_len;
        prompt_config.visual_tokens_per_frame = m.llm.visual_tokens;
        prompt_config.caption_only = m.llm.caption_only;
        // A caption longer than the budget is cut rather than refused: the service validates
        // caption length in characters, the budget is in tokens.
        prompt_config.truncate_current_caption = true;

        let llm_desc = match &lm {
            CausalLm::Llama(_) => "llama",
            CausalLm::Opt(_) => "opt",
        };
        let (info, defaults) = Self::bundle_info(
            &bundle,
            bundle_dir,
            format!("{llm_desc} ({} layers, d={d})", lm.num_layers()),
        )?;
        Ok(Self {
            char_ldm,
            lm,
            tokenizer: llm_tokenizer,
            img,
            mapper_llm,
            mapper_ldm,
            visual_encoder,
            visual_processor,
            prompt_config,
            defaults,
            info,
            device: device.clone(),
        })
    }

    /// What the bundle in `bundle_dir` is and its sampling defaults, read from its manifest
    /// and its LLM's `config.json` without loading any weights (for a server that only
    /// queues the jobs other processes draw).
    pub fn describe(bundle_dir: &Path) -> Result<(BundleInfo, GenerateOptions)> {
        let bundle = Bundle::open(bundle_dir)?;
        let cfg_path = bundle.path(&bundle.manifest.llm.model).join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let field = |key: &str| raw.get(key).and_then(|v| v.as_u64());
        let kind = match raw.get("model_type").and_then(|v| v.as_str()) {
            Some("llama" | "mistral") => "llama",
            Some("opt") => "opt",
            other => bail!(
                "{}: model_type `{}` is not a supported causal LM (expected `llama` or `opt`)",
                cfg_path.display(),
                other.unwrap_or("")
            ),
        };
        let layers = field("num_hidden_layers").unwrap_or(0);
        // OPT's input embeddings may be narrower than its layers (`word_embed_proj_dim`).
        let d = field("word_embed_proj_dim")
            .or_else(|| field("hidden_size"))
            .unwrap_or(0);
        Self::bundle_info(
            &bundle,
            bundle_dir,
            format!("{kind} ({layers} layers, d={d})"),
        )
    }

    fn bundle_info(
        bundle: &Bundle,
        bundle_dir: &Path,
        llm: String,
    ) -> Result<(BundleInfo, GenerateOptions)> {
        let m = &bundle.manifest;
        let s = &m.sampling;
        let defaults = GenerateOptions {
            steps: s.steps,
            guidance_scale: s.guidance_scale,
            start_merge_step: s.start_merge_step,
            scheduler: bundle.scheduler_kind()?,
            height: s.height,
            width: s.width,
            capture_attention: false,
            negative_prompt: String::new(),
            preview_every: 0,
        };
        let mut sizes = vec![(s.width, s.height)];
        for &[width, height] in &s.sizes {
            if width == 0 || height == 0 || width % 64 != 0 || height % 64 != 0 {
                bail!(
                    "[sampling] sizes lists {width}x{height}; each size must be a positive \
                     multiple of 64 pixels"
                )
            }
            if !sizes.contains(&(width, height)) {
                sizes.push((width, height));
            }
        }
        let info = BundleInfo {
            name: m.name.clone(),
            description: m.description.clone(),
            trained: m.trained,
            height: s.height,
            width: s.width,
            sizes,
            llm,
            dir: bundle_dir.to_path_buf(),
        };
        Ok((info, defaults))
    }

    /// What this bundle is.
    pub fn info(&self) -> &BundleInfo {
        &self.info
    }

    /// The bundle's sampling defaults.
    pub fn default_options(&self) -> GenerateOptions {
        self.defaults.clone()
    }

    /// The Char-LDM (stage 1).
    pub fn char_ldm(&self) -> &CharLdm {
        &self.char_ldm
    }

    /// The device the networks live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether `caption` refers to a character by pronoun (then the LLM's condition is used
    /// from the first step: `start_merge_step` 0).
    pub fn uses_pronoun(caption: &str, characters: &[CharacterInput]) -> bool {
        let cast: BTreeMap<String, String> = characters
            .iter()
            .filter(|c| data::rules::Pronoun::parse(&c.pronoun).is_ok())
            .map(|c| (c.name.clone(), c.pronoun.clone()))
            .collect();
        match data::rules::RuleSet::custom(&cast) {
            Ok(rules) => data::mentions::count_references(caption, &rules) > 0,
            Err(_) => false,
        }
    }

    fn check_request(
        &self,
        story: &StoryInput,
        frames: &[FrameRequest],
        existing: &[Option<RgbImage>],
        opts: &GenerateOptions,
    ) -> Result<()> {
        if story.captions.is_empty() {
            bail!("the story has no captions")
        }
        if frames.is_empty() {
            bail!("no frames requested")
        }
        self.char_ldm
            .check_options(opts.height, opts.width, opts.steps)?;
        for c in &story.characters {
            data::rules::Pronoun::parse(&c.pronoun)
                .map_err(|e| anyhow::anyhow!("character {}: {e}", c.name))?;
        }
        let mut seen = vec![false; story.captions.len()];
        for r in frames {
            if r.index >= story.captions.len() {
                bail!(
                    "frame {} requested but the story has {} captions",
                    r.index + 1,
                    story.captions.len()
                )
            }
            if std::mem::replace(&mut seen[r.index], true) {
                bail!("frame {} requested twice", r.index + 1)
            }
        }
        let last = frames.iter().map(|r| r.index).max().unwrap_or(0);
        for (j, requested) in seen.iter().enumerate().take(last) {
            if !requested && existing.get(j).is_none_or(|e| e.is_none()) {
                bail!(
                    "frame {} is needed as context for frame {} but has no image; generate it too",
                    j + 1,
                    last + 1
                )
            }
        }
        Ok(())
    }

    /// The portrait embeddings of the cast members that have portraits, by name.
    fn portrait_embeddings(&self, story: &StoryInput) -> Result<Vec<(String, Tensor)>> {
        if self.char_ldm.fuse.is_none() {
            return Ok(Vec::new());
        }
        story
            .characters
            .iter()
            .filter_map(|c| c.portrait.as_ref().map(|p| (c, p)))
            .map(|(c, p)| Ok((c.name.clone(), self.char_ldm.portrait_embedding(p)?)))
            .collect()
    }

    /// The character mentions of the last caption of `captions` as (CLIP token index of the
    /// mention's last token, text, characters referred to). Pronouns resolve to the
    /// characters of the latest earlier caption naming any, filtered by pronoun family.
    ///
    /// With `resolved` (frames conditioned through the LLM) the tokens are those of the caption
    /// with each pronoun written as the names it stands for, one entry per name ("They (Bob)",
    /// "They (Mia)"): stage 2 trains Mapper_LDM's output to match the FUSED embedding of that
    /// non-referential caption, so a character's identity sits in its name's slot, not at the
    /// pronoun's position.
    fn mention_tokens(
        &self,
        captions: &[String],
        characters: &[CharacterInput],
        resolved: bool,
    ) -> Vec<(usize, String, Vec<String>)> {
        use data::mentions::{find_mentions, mentioned_characters, MentionKind};
        let cast: BTreeMap<String, String> = characters
            .iter()
            .map(|c| (c.name.clone(), c.pronoun.clone()))
            .collect();
        let Ok(rules) = data::rules::RuleSet::custom(&cast) else {
            return Vec::new();
        };
        let Some((caption, earlier)) = captions.split_last() else {
            return Vec::new();
        };
        let previous: Vec<usize> = earlier
            .iter()
            .rev()
            .map(|c| mentioned_characters(c, &rules))
            .find(|m| !m.is_empty())
            .unwrap_or_default();
        // Each slot: (byte end of the phrase in `text`, the phrase, label, characters).
        let mut text = String::with_capacity(caption.len());
        let mut slots: Vec<(usize, String, String, Vec<String>)> = Vec::new();
        let mut pos = 0;
        for m in find_mentions(caption, &rules) {
            text.push_str(&caption[pos..m.byte_start]);
            pos = m.byte_end;
            match &m.kind {
                MentionKind::Character { name, .. } => {
                    text.push_str(&m.text);
                    let phrase = m.text.trim_end_matches("'s").to_owned();
                    slots.push((
                        text.len() - (m.text.len() - phrase.len()),
                        phrase,
                        m.text.clone(),
                        vec![name.clone()],
                    ));
                }
                MentionKind::Pronoun { pronoun, case } => {
                    let refers: Vec<String> = previous
                        .iter()
                        .map(|&k| &rules.characters[k])
                        .filter(|c| *pronoun == data::Pronoun::They || c.pronoun == *pronoun)
                        .map(|c| c.name.clone())
                        .collect();
                    if !resolved || refers.is_empty() {
                        text.push_str(&m.text);
                        slots.push((text.len(), m.text.clone(), m.text.clone(), refers));
                        continue;
                    }
                    for (k, name) in refers.iter().enumerate() {
                        if k > 0 {
                            text.push_str(if k + 1 == refers.len() { " and " } else { ", " });
                        }
                        text.push_str(name);
                        let label = if refers.len() == 1 {
                            m.text.clone()
                        } else {
                            format!("{} ({name})", m.text)
                        };
                        slots.push((text.len(), name.clone(), label, vec![name.clone()]));
                    }
                    if *case == data::rules::Case::Possessive {
                        text.push_str("'s");
                    }
                }
            }
        }
        text.push_str(&caption[pos..]);
        let mut out: Vec<(usize, String, Vec<String>)> = Vec::new();
        for (end, phrase, label, refers) in slots {
            // The token index of this occurrence: tokenize the text up to its end.
            let Some(token) = self
                .char_ldm
                .tokenizer
                .find_phrase(&text[..end], &phrase)
                .last()
                .map(|r| r.end - 1)
            else {
                continue;
            };
            if !out.iter().any(|(t, _, _)| *t == token) {
                out.push((token, label, refers));
            }
        }
        out
    }

    /// The LLM's `[IMG]` condition for a text-only prompt: `ids` (base-vocabulary token ids,
    /// BOS included when wanted) followed by the R `[IMG]` tokens go through the LLM; the last
    /// hidden states at the `[IMG]` positions plus their input embeddings go through
    /// Mapper_LDM. Returns `(1, 77, d_text)`, the condition the UNet receives (what
    /// `bundle import`'s parity test checks against PyTorch).
    pub fn img_condition_for_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let mut all = ids.to_vec();
        all.extend(self.img.ids());
        let ids = Tensor::from_vec(all, (1, ids.len() + self.img.num_tokens()), &self.device)?;
        let embeds = self.img.embed(&self.lm, &ids)?.detach();
        let mut cache = self.lm.new_cache();
        let out = self
            .lm
            .forward_embeds_with(&embeds, &mut cache, None, LogitsFor::None)?;
        let r = self.img.num_tokens();
        let s = out.last_hidden_state.dim(1)?;
        let hidden = out.last_hidden_state.narrow(1, s - r, r)?;
        let embs = self.img.embeddings(hidden.dtype())?.unsqueeze(0)?;
        Ok(self.mapper_ldm.forward(&hidden, &embs)?.detach())
    }

    /// Mapper_LLM visual tokens `(m, d)` of a frame.
    pub fn visual_tokens(&self, frame: &RgbImage) -> Result<Tensor> {
        let px = self.visual_processor.preprocess(frame, &self.device)?;
        let pooled = self
            .visual_encoder
            .forward(&px.to_dtype(self.lm.dtype())?)?
            .pooler_output;
        Ok(self.mapper_llm.forward(&pooled)?.squeeze(0)?)
    }

    /// Runs the LLM over `prompt`, reusing the cached prefix shared with `state`'s last
    /// prompt; returns the `[IMG]` condition `(1, 77, d_text)` and positions computed.
    fn llm_condition(
        &self,
        state: &mut LlmState,
        prompt: Prompt,
        visual: &[Tensor],
    ) -> Result<(Tensor, usize)> {
        let keep = state
            .last
            .as_ref()
            .map_or(0, |p| p.common_prefix_len(&prompt))
            .min(state.cache.len());
        state.cache.truncate(keep)?;
        let embeds = prompt.embed(&self.lm, &self.img, visual)?.detach();
        let fresh = prompt.len - keep;
        // Only the hidden states of the [IMG] positions are used: skip the lm_head.
        let out = self.lm.forward_embeds_with(
            &embeds.narrow(1, keep, fresh)?,
            &mut state.cache,
            None,
            LogitsFor::None,
        )?;
        let r = prompt.img_positions.len();
        let hidden = out.last_hidden_state.narrow(1, fresh - r, r)?;
        let embs = self.img.embeddings(hidden.dtype())?.unsqueeze(0)?;
        // The [IMG] rows are a Var (trainable); inference must not carry their graph into
        // the 30-step sampling loop.
        let cond = self.mapper_ldm.forward(&hidden, &embs)?.detach();
        state.last = Some(prompt);
        Ok((cond, fresh))
    }

    /// Draws the requested frames in index order (see the module docs). For each requested
    /// frame i, every earlier frame must be requested too or given in `existing` (its image is
    /// the LLM's context); otherwise nothing is drawn and an error names the missing frame.
    /// `cancel()` is polled before every denoising step; a cancelled run's error wraps
    /// [`Cancelled`] (frames finished before it were reported through `on_event`).
    pub fn generate(
        &self,
        story: &StoryInput,
        frames: &[FrameRequest],
        existing: &[Option<RgbImage>],
        opts: &GenerateOptions,
        on_event: &mut dyn FnMut(PipelineEvent<'_>),
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<FrameOutput>> {
        self.generate_with(
            story,
            frames,
            existing,
            opts,
            Conditioning::StoryGptV,
            on_event,
            cancel,
        )
    }

    /// [`StoryPipeline::generate`] with every frame conditioned as `conditioning` says (the
    /// baselines skip the LLM and its visual tokens entirely).
    #[allow(clippy::too_many_arguments)]
    pub fn generate_with(
        &self,
        story: &StoryInput,
        frames: &[FrameRequest],
        existing: &[Option<RgbImage>],
        opts: &GenerateOptions,
        conditioning: Conditioning,
        on_event: &mut dyn FnMut(PipelineEvent<'_>),
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<FrameOutput>> {
        self.check_request(story, frames, existing, opts)?;
        let llm = conditioning == Conditioning::StoryGptV;
        let mut order: Vec<FrameRequest> = frames.to_vec();
        order.sort_by_key(|r| r.index);
        let count = order.len();
        let portraits = match conditioning {
            Conditioning::TextOnly => Vec::new(),
            _ => self.portrait_embeddings(story)?,
        };
        // The empty prompt unless the request names what to steer away from.
        let negative = self.char_ldm.text_condition(&opts.negative_prompt)?;
        let mut visual: Vec<Tensor> = Vec::new();
        let mut state = LlmState {
            cache: self.lm.new_cache(),
            last: None,
        };
        let mut outputs: Vec<FrameOutput> = Vec::with_capacity(count);
        for (k, req) in order.iter().enumerate() {
            let ordinal = k + 1;
            let i = req.index;
            if cancel() {
                return Err(anyhow::Error::new(Cancelled));
            }
            // Context frames not drawn in this call: their stored images.
            while llm && visual.len() < i {
                let j = visual.len();
                let image = match outputs.iter().find(|o| o.index == j) {
                    Some(o) => &o.image,
                    None => existing[j].as_ref().context("context frame vanished")?,
                };
                visual.push(self.visual_tokens(image)?);
            }
            on_event(PipelineEvent::FrameStarted {
                index: i,
                seed: req.seed,
                ordinal,
                count,
            });
            let started = Instant::now();
            let caption = &story.captions[i];
            let text_cond = self.char_ldm.text_condition(caption)?;
            let (cond, kind, prompt_tokens, computed) = if conditioning == Conditioning::TextOnly {
                (None, ConditionKind::Text, 0, 0)
            } else if i == 0 || !llm {
                if portraits.is_empty() {
                    (None, ConditionKind::Text, 0, 0)
                } else {
                    let chars: Vec<(&str, &Tensor)> =
                        portraits.iter().map(|(n, e)| (n.as_str(), e)).collect();
                    let c = self.char_ldm.fused_condition(caption, &chars)?;
                    (Some(c), ConditionKind::Fused, 0, 0)
                }
            } else {
                let history: Vec<&str> = story.captions[..i].iter().map(String::as_str).collect();
                let prompt = build_prompt(&self.tokenizer, &history, caption, &self.prompt_config)?;
                let len = prompt.len;
                let (c, computed) = self.llm_condition(&mut state, prompt, &visual[..i])?;
                let c = c.to_dtype(text_cond.dtype())?;
                (Some(c), ConditionKind::Llm, len, computed)
            };
            let start_merge_step =
                if kind == ConditionKind::Llm && Self::uses_pronoun(caption, &story.characters) {
                    0
                } else {
                    opts.start_merge_step
                };
            let sample_opts = SampleOptions {
                steps: opts.steps,
                guidance_scale: opts.guidance_scale,
                start_merge_step,
                seed: req.seed,
                height: opts.height,
                width: opts.width,
                scheduler: opts.scheduler,
            };
            let mentions = if opts.capture_attention {
                self.mention_tokens(
                    &story.captions[..=i],
                    &story.characters,
                    kind == ConditionKind::Llm,
                )
            } else {
                Vec::new()
            };
            let tokens: Vec<usize> = mentions.iter().map(|m| m.0).collect();
            let mut preview_error = None;
            let (image, heat) = self.char_ldm.sample_observed(
                &text_cond,
                cond.as_ref(),
                &negative,
                &sample_opts,
                &tokens,
                opts.preview_every,
                &mut |event| match event {
                    SampleEvent::Step { step, steps } => on_event(PipelineEvent::Step {
                        index: i,
                        ordinal,
                        count,
                        step,
                        steps,
                    }),
                    SampleEvent::Preview { step, image } => {
                        match crate::char_ldm::to_rgb_image(image) {
                            Ok(image) => on_event(PipelineEvent::Preview {
                                index: i,
                                ordinal,
                                step,
                                steps: sample_opts.steps,
                                image: &image,
                            }),
                            Err(e) => preview_error = Some(e),
                        }
                    }
                },
                cancel,
            )?;
            if let Some(e) = preview_error {
                return Err(e.context("cannot make a preview image"));
            }
            let image = crate::char_ldm::to_rgb_image(&image)?;
            let attention = match heat {
                Some(h) => mentions
                    .into_iter()
                    .enumerate()
                    .map(|(k, (_, text, characters))| {
                        Ok(AttentionMap {
                            text,
                            characters,
                            heatmap: heatmap_image(&h.i(k)?, opts.width, opts.height)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
                None => Vec::new(),
            };
            if !llm {
                // No later frame reads this one.
            } else if visual.len() == i {
                visual.push(self.visual_tokens(&image)?);
            } else {
                // A regenerated frame replaces its context entry for later frames.
                visual[i] = self.visual_tokens(&image)?;
            }
            let out = FrameOutput {
                index: i,
                seed: req.seed,
                image,
                duration: started.elapsed(),
                start_merge_step,
                condition: kind,
                prompt_tokens,
                llm_positions_computed: computed,
                attention,
            };
            on_event(PipelineEvent::FrameFinished {
                ordinal,
                count,
                frame: &out,
            });
            outputs.push(out);
        }
        Ok(outputs)
    }

    /// Story continuation (paper, Appendix A): the LLM writes the caption of the next frame
    /// after `story.captions` (whose frames are `frames`, same length), stopping at the next
    /// frame marker (" Image:" / " Caption:"), a newline, the end-of-text token or
    /// `max_tokens`. The caption can then be drawn with [`StoryPipeline::generate`].
    pub fn next_caption(
        &self,
        story: &StoryInput,
        frames: &[RgbImage],
        decoding: Decoding,
        max_tokens: usize,
    ) -> Result<String> {
        if frames.len() != story.captions.len() {
            bail!(
                "{} captions but {} frames: every caption needs its frame as context",
                story.captions.len(),
                frames.len()
            )
        }
        if let Decoding::TopP { p, temperature, .. } = decoding {
            if !(p > 0.0 && p <= 1.0) || temperature <= 0.0 {
                bail!("top-p needs 0 < p <= 1 and a positive temperature")
            }
        }
        let visual: Vec<Tensor> = frames
            .iter()
            .map(|f| self.visual_tokens(f))
            .collect::<Result<_>>()?;
        let history: Vec<&str> = story.captions.iter().map(String::as_str).collect();
        // Reserve room for the new caption inside the budget.
        let mut cfg = self.prompt_config.clone();
        cfg.img_token_ids.clear();
        cfg.max_len = cfg.max_len.saturating_sub(max_tokens).max(8);
        let prompt = build_prompt(&self.tokenizer, &history, "", &cfg)?;
        // `build_prompt` ends with " Caption: <empty> Image:"; generation starts right after
        // " Caption:", so drop the trailing " Image:" tokens.
        let suffix = self.tokenizer.encode(" Image:")?.len() + self.tokenizer.encode(" ")?.len();
        let embeds = prompt.embed(&self.lm, &self.img, &visual)?.detach();
        let keep = prompt.len - suffix.min(prompt.len);
        let embeds = embeds.narrow(1, 0, keep)?;
        // Room for the whole caption up front; only the last position's logits are sampled.
        let mut cache = self.lm.new_cache_with_capacity(keep + max_tokens);
        let mut out = self
            .lm
            .forward_embeds_with(&embeds, &mut cache, None, LogitsFor::Last)?;
        let mut rng = match decoding {
            Decoding::TopP { seed, .. } => ChaCha20Rng::seed_from_u64(seed),
            Decoding::Greedy => ChaCha20Rng::seed_from_u64(0),
        };
        let eos = self.tokenizer.token_to_id("</s>");
        let base_vocab = self.img.first_id() as usize;
        let mut ids: Vec<u32> = Vec::new();
        for _ in 0..max_tokens {
            let logits = out
                .logits
                .i((0, out.logits.dim(1)? - 1))?
                .narrow(0, 0, base_vocab.min(out.logits.dim(D::Minus1)?))?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            let next = pick_token(&logits, decoding, &mut rng);
            if Some(next) == eos {
                break;
            }
            ids.push(next);
            let text = self.tokenizer.decode(&ids)?;
            if let Some(cut) = caption_end(&text) {
                return Ok(text[..cut].trim().to_owned());
            }
            let t = Tensor::new(&[[next]], &self.device)?;
            out = self
                .lm
                .forward_ids_with(&t, &mut cache, None, LogitsFor::Last)?;
        }
        Ok(self.tokenizer.decode(&ids)?.trim().to_owned())
    }
}

/// A `(h, w)` map in [0, 1] as a `width` x `height` grey image (bilinear).
fn heatmap_image(map: &Tensor, width: usize, height: usize) -> Result<image::GrayImage> {
    let (h, w) = map.dims2()?;
    let v = map.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let small = image::GrayImage::from_raw(
        w as u32,
        h as u32,
        v.iter()
            .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect(),
    )
    .context("heatmap buffer")?;
    Ok(image::imageops::resize(
        &small,
        width as u32,
        height as u32,
        image::imageops::FilterType::Triangle,
    ))
}

/// LLM state kept between the frames of one generation.
struct LlmState {
    cache: KvCache,
    last: Option<Prompt>,
}

/// Byte offset where a generated caption ends: at a frame marker or a newline.
pub fn caption_end(text: &str) -> Option<usize> {
    ["Image:", "Caption:", "<img>", "\n"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
}

/// Picks the next token from `logits` (greedy, or top-p with temperature).
pub fn pick_token(logits: &[f32], decoding: Decoding, rng: &mut ChaCha20Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    match decoding {
        Decoding::Greedy => argmax(),
        Decoding::TopP { p, temperature, .. } => {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut probs: Vec<(usize, f64)> = logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i, (((l - max) as f64) / temperature).exp()))
                .collect();
            let z: f64 = probs.iter().map(|(_, q)| q).sum();
            probs.iter_mut().for_each(|(_, q)| *q /= z);
            probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let mut kept = Vec::new();
            let mut mass = 0.0;
            for (i, q) in probs {
                kept.push((i, q));
                mass += q;
                if mass >= p {
                    break;
                }
            }
            let mut u = rng.gen::<f64>() * mass;
            for (i, q) in &kept {
                if u < *q {
                    return *i as u32;
                }
                u -= q;
            }
            kept.last().map_or_else(argmax, |(i, _)| *i as u32)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_scale_the_merge_step() {
        let o = GenerateOptions {
            steps: 30,
            guidance_scale: 5.0,
            start_merge_step: 15,
            scheduler: SchedulerKind::Pndm,
            height: 64,
            width: 64,
            capture_attention: false,
            negative_prompt: String::new(),
            preview_every: 0,
        };
        assert_eq!(o.with_steps(10).start_merge_step, 5);
        assert_eq!(o.with_steps(4).start_merge_step, 2);
        assert_eq!(o.with_steps(1).start_merge_step, 1);
        assert_eq!(o.with_steps(60).start_merge_step, 30);
    }

    #[test]
    fn captions_end_at_the_next_marker() {
        assert_eq!(caption_end("Tom waves. Image: x"), Some(11));
        assert_eq!(caption_end("Tom waves.\nMore"), Some(10));
        assert_eq!(caption_end("Tom waves. Caption: Mia"), Some(11));
        assert_eq!(caption_end("Tom waves."), None);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [0.0f32, 10.0, 9.0, -5.0];
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(pick_token(&logits, Decoding::Greedy, &mut rng), 1);
        let d = Decoding::TopP {
            p: 0.5,
            temperature: 1.0,
            seed: 0,
        };
        // Token 1 alone holds > 50% of the mass.
        for _ in 0..50 {
            assert_eq!(pick_token(&logits, d, &mut rng), 1);
        }
        let d = Decoding::TopP {
            p: 0.99,
            temperature: 1.0,
            seed: 0,
        };
        let picks: Vec<u32> = (0..200).map(|_| pick_token(&logits, d, &mut rng)).collect();
        assert!(picks.contains(&1) && picks.contains(&2));
        assert!(!picks.contains(&3));
    }

    #[test]
    fn pronoun_frames_are_detected_with_the_cast() {
        let cast = vec![
            CharacterInput {
                name: "Fred".into(),
                pronoun: "he".into(),
                portrait: None,
            },
            CharacterInput {
                name: "Wilma".into(),
                pronoun: "she".into(),
                portrait: None,
            },
        ];
        assert!(StoryPipeline::uses_pronoun("He waves at Wilma.", &cast));
        assert!(StoryPipeline::uses_pronoun("They laugh.", &cast));
        assert!(!StoryPipeline::uses_pronoun("Fred waves at Wilma.", &cast));
    }
}
