//! Model bundles: one directory, one manifest (`bundle.toml`), every network StoryGPT-V needs.
//!
//! The manifest names the base models (diffusers / transformers directories, relative to the
//! bundle or absolute), their dtypes and the StoryGPT-V stage weights. The same loader serves
//! Stable Diffusion 1.5 + CLIP ViT-L/14 + OPT-6.7B / Llama-2-7B + the authors' stage weights
//! and the project's tiny configurations; only the manifest differs. See docs/MODELS.md
//! ("Model bundles") for every key.
//!
//! ```toml
//! format = 1
//! name = "storygpt-v-flintstones-opt"
//! trained = true
//!
//! [char_ldm]
//! base = "stable-diffusion-v1-5"        # tokenizer/ text_encoder/ unet/ vae/ scheduler/
//! image_encoder = "clip-vit-large-patch14"
//! stage1 = "stage1/char_ldm.safetensors" # postfuse_module.* (+ unet.*, image_encoder.*)
//! dtype = "f16"
//!
//! [llm]
//! model = "opt-6.7b"
//! stage2 = "stage2/storygpt_v.safetensors"
//! dtype = "f16"
//!
//! [sampling]
//! height = 512
//! width = 512
//! ```

pub mod bpe;
pub mod import;
pub mod random;
pub mod ship;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};

use crate::mappers::MapperLdmConfig;
use crate::schedulers::SchedulerKind;

pub use random::write_random;

/// The manifest's file name inside a bundle directory.
pub const MANIFEST_FILE: &str = "bundle.toml";

/// The manifest format this build reads.
pub const FORMAT_VERSION: u32 = 1;

/// `bundle.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version ([`FORMAT_VERSION`]).
    pub format: u32,
    /// Short name shown by `/readyz` and in generated `story.json` files.
    pub name: String,
    /// Free text (what it was trained on, licence notes).
    #[serde(default)]
    pub description: String,
    /// Whether the weights were trained (random bundles say `false`).
    #[serde(default)]
    pub trained: bool,
    /// Stage 1: the Char-LDM.
    pub char_ldm: CharLdmSection,
    /// Stage 2: the LLM and its mappers.
    pub llm: LlmSection,
    /// Sampling defaults.
    #[serde(default)]
    pub sampling: SamplingSection,
}

impl Manifest {
    /// The manifest of a bundle in the layout the toy bundles use (`sd/` with the diffusers
    /// parts, `clip-vision/`, `llm/`, `storygpt-v/stage{1,2}.safetensors`), f32, with R = 8
    /// `[IMG]` tokens, m = 4 visual tokens, a 160-token prompt and square `size` frames.
    pub fn toy_layout(
        name: String,
        description: String,
        trained: bool,
        mapper_ldm: MapperLdmDims,
        size: usize,
    ) -> Self {
        Self {
            format: FORMAT_VERSION,
            name,
            description,
            trained,
            char_ldm: CharLdmSection {
                base: Some("sd".into()),
                tokenizer: None,
                text_encoder: None,
                unet: None,
                vae: None,
                scheduler: None,
                image_encoder: "clip-vision".into(),
                stage1: Some("storygpt-v/stage1.safetensors".into()),
                stage1_prefixes: Default::default(),
                dtype: "f32".into(),
            },
            llm: LlmSection {
                model: "llm".into(),
                tokenizer: None,
                visual_encoder: None,
                stage2: "storygpt-v/stage2.safetensors".into(),
                stage2_names: Default::default(),
                dtype: "f32".into(),
                num_img_tokens: 8,
                visual_tokens: 4,
                max_prompt_len: 160,
                caption_only: false,
                mapper_ldm,
            },
            sampling: SamplingSection {
                height: size,
                width: size,
                ..Default::default()
            },
        }
    }

    /// Writes the manifest as `dir/bundle.toml` (through a temporary file and a rename).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = format!(
            "# storygpt-v model bundle (see docs/MODELS.md, \"Model bundles\").\n{}",
            toml::to_string_pretty(self)?
        );
        let tmp = dir.join(".bundle.toml.tmp");
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, dir.join(MANIFEST_FILE))
            .with_context(|| format!("writing {}", dir.join(MANIFEST_FILE).display()))?;
        Ok(())
    }
}

/// `[char_ldm]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CharLdmSection {
    /// A diffusers pipeline directory; components default to its `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/` and `scheduler/` sub-directories.
    #[serde(default)]
    pub base: Option<String>,
    /// CLIP tokenizer directory (overrides `base/tokenizer`).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// CLIP text encoder directory.
    #[serde(default)]
    pub text_encoder: Option<String>,
    /// UNet directory.
    #[serde(default)]
    pub unet: Option<String>,
    /// VAE directory.
    #[serde(default)]
    pub vae: Option<String>,
    /// Scheduler directory or `scheduler_config.json`.
    #[serde(default)]
    pub scheduler: Option<String>,
    /// CLIP vision tower with projection (portrait embeddings), e.g. CLIP ViT-L/14.
    pub image_encoder: String,
    /// Stage-1 weights file: `FuseModule` tensors, and optionally a whole fine-tuned UNet and
    /// vision tower that replace the base ones.
    #[serde(default)]
    pub stage1: Option<String>,
    /// Tensor-name prefixes inside `stage1`.
    #[serde(default)]
    pub stage1_prefixes: Stage1Prefixes,
    /// `f32`, `f16` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
}

/// Prefixes of the stage-1 tensors (the authors' names by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage1Prefixes {
    /// FuseModule (`postfuse_module`).
    pub fuse: String,
    /// Fine-tuned UNet (`unet`); used when any tensor has this prefix.
    pub unet: String,
    /// Fine-tuned vision tower (`image_encoder`); used when any tensor has this prefix.
    pub image_encoder: String,
}

impl Default for Stage1Prefixes {
    fn default() -> Self {
        Self {
            fuse: "postfuse_module".into(),
            unet: "unet".into(),
            image_encoder: "image_encoder".into(),
        }
    }
}

/// `[llm]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSection {
    /// transformers directory of the causal LM (Llama or OPT).
    pub model: String,
    /// Directory holding `tokenizer.json` (default: `model`).
    #[serde(default)]
    pub tokenizer: Option<String>,
    /// Frozen CLIP vision tower whose pooled output feeds Mapper_LLM (default: the Char-LDM's
    /// `image_encoder` as given in the manifest, before any stage-1 fine-tuning).
    #[serde(default)]
    pub visual_encoder: Option<String>,
    /// Stage-2 weights file: `[IMG]` rows, Mapper_LLM, Mapper_LDM.
    pub stage2: String,
    /// Tensor names inside `stage2`.
    #[serde(default)]
    pub stage2_names: Stage2Names,
    /// `f32`, `f16` or `bf16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `[IMG]` tokens R (8).
    #[serde(default = "default_img_tokens")]
    pub num_img_tokens: usize,
    /// Visual tokens per past frame m (4).
    #[serde(default = "default_visual_tokens")]
    pub visual_tokens: usize,
    /// Prompt budget in tokens (160).
    #[serde(default = "default_max_prompt")]
    pub max_prompt_len: usize,
    /// Leave the images of past frames out of the prompt (paper's ablation).
    #[serde(default)]
    pub caption_only: bool,
    /// Mapper_LDM transformer sizes (GILL's by default).
    #[serde(default)]
    pub mapper_ldm: MapperLdmDims,
}

/// Names of the stage-2 tensors (the authors' by default).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Stage2Names {
    /// `[IMG]` input-embedding rows: `(R, d)`, or a whole extended table whose last R rows
    /// are taken.
    pub img_rows: String,
    /// Mapper_LLM prefix.
    pub mapper_llm: String,
    /// Mapper_LDM prefix.
    pub mapper_ldm: String,
}

impl Default for Stage2Names {
    fn default() -> Self {
        Self {
            img_rows: crate::llm::img_tokens::IMG_ROWS_NAME.into(),
            mapper_llm: "model.visual_embeddings".into(),
            mapper_ldm: "model.gen_text_hidden_fcs.0".into(),
        }
    }
}

/// Mapper_LDM sizes that are not implied by the other networks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MapperLdmDims {
    /// Transformer width (512).
    pub d_model: usize,
    /// Attention heads (4).
    pub heads: usize,
    /// Encoder layers (4).
    pub encoder_layers: usize,
    /// Decoder layers (4).
    pub decoder_layers: usize,
    /// Feed-forward width (2048).
    pub ff_dim: usize,
}

impl Default for MapperLdmDims {
    fn default() -> Self {
        let d = MapperLdmConfig::default();
        Self {
            d_model: d.d_model,
            heads: d.heads,
            encoder_layers: d.encoder_layers,
            decoder_layers: d.decoder_layers,
            ff_dim: d.ff_dim,
        }
    }
}

/// `[sampling]`: defaults of every generation (each can be overridden per request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSection {
    /// Frame height in pixels (512).
    pub height: usize,
    /// Frame width in pixels (512).
    pub width: usize,
    /// Denoising steps (30).
    pub steps: usize,
    /// Classifier-free guidance scale (5).
    pub guidance_scale: f64,
    /// Delayed conditioning for frames without a pronoun (15 of 30 steps).
    pub start_merge_step: usize,
    /// `pndm`, `ddim`, `ddpm` or `euler-a`.
    pub scheduler: String,
    /// Other frame sizes `[width, height]` the model draws well, which a request may ask for
    /// instead of the default (none: the default size only, as for a model trained at one
    /// size). Each a multiple of 64 pixels.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sizes: Vec<[usize; 2]>,
}

impl Default for SamplingSection {
    fn default() -> Self {
        Self {
            height: 512,
            width: 512,
            steps: 30,
            guidance_scale: 5.0,
            start_merge_step: 15,
            scheduler: "pndm".into(),
            sizes: Vec::new(),
        }
    }
}

fn default_dtype() -> String {
    "f32".into()
}
fn default_img_tokens() -> usize {
    8
}
fn default_visual_tokens() -> usize {
    4
}
fn default_max_prompt() -> usize {
    160
}

/// Parses `f32` / `f16` / `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "f16" | "float16" | "half" => DType::F16,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown dtype `{other}`: use f32, f16 or bf16"),
    })
}

/// What a loaded bundle is, for status pages and generated files.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BundleInfo {
    /// Manifest name.
    pub name: String,
    /// Manifest description.
    pub description: String,
    /// Whether the weights were trained.
    pub trained: bool,
    /// Default frame height.
    pub height: usize,
    /// Default frame width.
    pub width: usize,
    /// Every frame size `(width, height)` it draws, the default first.
    pub sizes: Vec<(usize, usize)>,
    /// The LLM, e.g. `opt (4 layers, d=128)`.
    pub llm: String,
    /// The bundle directory.
    pub dir: PathBuf,
}

/// A manifest with its directory, paths resolved.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The bundle directory.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Manifest,
}

impl Bundle {
    /// Reads and checks `dir/bundle.toml` (every named path must exist).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        if !dir.is_dir() {
            bail!("model bundle {} is not a directory", dir.display())
        }
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "{} has no readable {MANIFEST_FILE}; is it a storygpt-v model bundle? \
                 (`storygpt-v bundle random --config toy --out DIR` writes one)",
                dir.display()
            )
        })?;
        let manifest: Manifest = toml::from_str(&text)
            .with_context(|| format!("invalid manifest {}", path.display()))?;
        let b = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        b.check()?;
        Ok(b)
    }

    fn check(&self) -> Result<()> {
        let m = &self.manifest;
        if m.format != FORMAT_VERSION {
            bail!(
                "{}: manifest format {} is not supported by this build (expected {FORMAT_VERSION})",
                self.dir.display(),
                m.format
            )
        }
        parse_dtype(&m.char_ldm.dtype).context("[char_ldm] dtype")?;
        parse_dtype(&m.llm.dtype).context("[llm] dtype")?;
        self.scheduler_kind()?;
        for (what, p) in self.named_paths()? {
            if !p.exists() {
                bail!(
                    "{}: {what} `{}` does not exist",
                    self.dir.join(MANIFEST_FILE).display(),
                    p.display()
                )
            }
        }
        let s = &m.sampling;
        if s.steps == 0 || s.height == 0 || s.width == 0 {
            bail!("[sampling] steps, height and width must be positive")
        }
        if m.llm.num_img_tokens == 0 || m.llm.visual_tokens == 0 {
            bail!("[llm] num_img_tokens and visual_tokens must be positive")
        }
        Ok(())
    }

    /// A path of the manifest, relative to the bundle directory unless absolute.
    pub fn path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir.join(p)
        }
    }

    fn component(&self, explicit: &Option<String>, sub: &str) -> Result<PathBuf> {
        match (explicit, &self.manifest.char_ldm.base) {
            (Some(p), _) => Ok(self.path(p)),
            (None, Some(base)) => Ok(self.path(base).join(sub)),
            (None, None) => bail!(
                "{}: [char_ldm] needs `base` (a diffusers pipeline directory) or an explicit `{sub}`",
                self.dir.join(MANIFEST_FILE).display()
            ),
        }
    }

    /// Every path the manifest names, with what it is.
    pub fn named_paths(&self) -> Result<Vec<(&'static str, PathBuf)>> {
        let c = &self.manifest.char_ldm;
        let l = &self.manifest.llm;
        let mut v = vec![
            ("[char_ldm] tokenizer", self.tokenizer_dir()?),
            ("[char_ldm] text_encoder", self.text_encoder_dir()?),
            ("[char_ldm] unet", self.unet_dir()?),
            ("[char_ldm] vae", self.vae_dir()?),
            ("[char_ldm] scheduler", self.scheduler_path()?),
            ("[char_ldm] image_encoder", self.path(&c.image_encoder)),
            ("[llm] model", self.path(&l.model)),
            ("[llm] tokenizer", self.llm_tokenizer_dir()),
            ("[llm] visual_encoder", self.visual_encoder_dir()),
            ("[llm] stage2", self.path(&l.stage2)),
        ];
        if let Some(s) = &c.stage1 {
            v.push(("[char_ldm] stage1", self.path(s)));
        }
        Ok(v)
    }

    /// CLIP tokenizer directory.
    pub fn tokenizer_dir(&self) -> Result<PathBuf> {
        self.component(&self.manifest.char_ldm.tokenizer, "tokenizer")
    }
    /// CLIP text encoder directory.
    pub fn text_encoder_dir(&self) -> Result<PathBuf> {
        self.component(&self.manifest.char_ldm.text_encoder, "text_encoder")
    }
    /// UNet directory.
    pub fn unet_dir(&self) -> Result<PathBuf> {
        self.component(&self.manifest.char_ldm.unet, "unet")
    }
    /// VAE directory.
    pub fn vae_dir(&self) -> Result<PathBuf> {
        self.component(&self.manifest.char_ldm.vae, "vae")
    }
    /// Scheduler directory (or file).
    pub fn scheduler_path(&self) -> Result<PathBuf> {
        self.component(&self.manifest.char_ldm.scheduler, "scheduler")
    }
    /// LLM tokenizer directory.
    pub fn llm_tokenizer_dir(&self) -> PathBuf {
        let l = &self.manifest.llm;
        self.path(l.tokenizer.as_deref().unwrap_or(&l.model))
    }
    /// The frozen vision tower of Mapper_LLM.
    pub fn visual_encoder_dir(&self) -> PathBuf {
        let l = &self.manifest.llm;
        self.path(
            l.visual_encoder
                .as_deref()
                .unwrap_or(&self.manifest.char_ldm.image_encoder),
        )
    }
    /// The default sampler.
    pub fn scheduler_kind(&self) -> Result<SchedulerKind> {
        self.manifest
            .sampling
            .scheduler
            .parse()
            .map_err(|e: String| anyhow::anyhow!("[sampling] scheduler: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("bundle.toml"), "{err:#}");

        let write = |s: &str| std::fs::write(dir.path().join(MANIFEST_FILE), s).unwrap();
        write("format = 1\nname = \"x\"\n");
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("char_ldm"), "{err:#}");

        write(
            "format = 1\nname = \"x\"\nsurprise = 3\n[char_ldm]\nimage_encoder = \"v\"\n\
             [llm]\nmodel = \"m\"\nstage2 = \"s\"\n",
        );
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("surprise"), "{err:#}");

        write(
            "format = 1\nname = \"x\"\n[char_ldm]\nbase = \"sd\"\nimage_encoder = \"v\"\n\
             [llm]\nmodel = \"m\"\nstage2 = \"s\"\n",
        );
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");

        write(
            "format = 2\nname = \"x\"\n[char_ldm]\nbase = \"sd\"\nimage_encoder = \"v\"\n\
             [llm]\nmodel = \"m\"\nstage2 = \"s\"\n",
        );
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("format 2"), "{err:#}");

        write(
            "format = 1\nname = \"x\"\n[char_ldm]\nbase = \"sd\"\nimage_encoder = \"v\"\n\
             dtype = \"f64\"\n[llm]\nmodel = \"m\"\nstage2 = \"s\"\n",
        );
        let err = Bundle::open(dir.path()).unwrap_err();
        assert!(format!("{err:#}").contains("f64"), "{err:#}");
    }

    #[test]
    fn paths_resolve_from_base_and_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let m: Manifest = toml::from_str(
            "format = 1\nname = \"x\"\n[char_ldm]\nbase = \"sd\"\nunet = \"/abs/unet\"\n\
             image_encoder = \"clip\"\n[llm]\nmodel = \"llm\"\nstage2 = \"s2.safetensors\"\n",
        )
        .unwrap();
        let b = Bundle {
            dir: dir.path().to_path_buf(),
            manifest: m,
        };
        assert_eq!(b.vae_dir().unwrap(), dir.path().join("sd/vae"));
        assert_eq!(b.unet_dir().unwrap(), PathBuf::from("/abs/unet"));
        assert_eq!(b.llm_tokenizer_dir(), dir.path().join("llm"));
        assert_eq!(b.visual_encoder_dir(), dir.path().join("clip"));
        assert_eq!(b.manifest.sampling.steps, 30);
        assert_eq!(b.manifest.llm.max_prompt_len, 160);
    }
}
