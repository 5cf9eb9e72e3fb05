//! `storygpt-v bundle import`: a bundle from the base models and the StoryGPT-V authors'
//! released checkpoints.
//!
//! Inputs: a diffusers Stable Diffusion 1.5 directory, a transformers CLIP ViT-L/14 directory,
//! a transformers OPT / Llama directory, the authors' stage-1 `pytorch_model.bin` (the full
//! state dict of their Char-LDM: `text_encoder.*`, `image_encoder.*`, `vae.*`, `unet.*`,
//! `postfuse_module.*`) and their stage-2 zip (or its unpacked directory: `args.json`,
//! `model_args.json`, `pretrained_ckpt.pth.tar` = `{'state_dict': ...}`). Torch pickles are read
//! without Python (zip and legacy formats, f32 / f16 / bf16; see `nn::Weights`).
//!
//! Everything is checked before anything is written: every network is built from its config
//! on a [`nn::Weights::probe`] view of its checkpoint, so each tensor the loader will ask for
//! is checked for presence and shape (errors name the tensor, the file and the expected
//! shape) without reading any data. Then exactly those tensors are written as safetensors
//! into a staging directory next to `--out`, with `bundle.toml`; the staging directory is
//! loaded once with [`crate::pipeline::StoryPipeline::load`] and only then renamed to `--out`.
//! A failed import removes its staging directory, so no half-written bundle is left behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use super::{
    parse_dtype, CharLdmSection, LlmSection, Manifest, MapperLdmDims, SamplingSection,
    Stage1Prefixes, Stage2Names, FORMAT_VERSION,
};
use crate::clip::{ClipConfigs, ClipTextModel, ClipTokenizer, ClipVisionModel};
use crate::fuse::FuseModule;
use crate::llm::tokenizer::LlmTokenizer;
use crate::llm::CausalLm;
use crate::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// Safetensors files larger than this are split into shards with an index.
const SHARD_BYTES: u64 = 4 << 30;

/// What `bundle import` reads and writes.
#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// diffusers Stable Diffusion directory (`tokenizer/`, `text_encoder/`, `unet/`, `vae/`,
    /// `scheduler/`).
    pub sd: PathBuf,
    /// transformers CLIP vision directory (ViT-L/14; a full `CLIPModel` directory is fine).
    pub clip: PathBuf,
    /// transformers causal LM directory (`model_type` `opt` or `llama`, with `tokenizer.json`).
    pub llm: PathBuf,
    /// The authors' stage-1 checkpoint (`pytorch_model.bin`).
    pub stage1: PathBuf,
    /// The authors' stage-2 zip, or the directory it unpacks to.
    pub stage2: PathBuf,
    /// The bundle directory to write (absent or empty).
    pub out: PathBuf,
    /// Store the weights as f16 (default f32; bf16 inputs are widened exactly to f32).
    pub f16: bool,
    /// The manifest's compute dtype (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// The manifest's name.
    pub name: String,
    /// Mapper_LDM attention heads (not recoverable from the tensors; GILL uses 4).
    pub mapper_heads: usize,
    /// Load the written bundle once before renaming it into place.
    pub verify: bool,
}

/// What [`import`] wrote.
#[derive(Debug, Clone)]
pub struct ImportReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of safetensors written.
    pub bytes: u64,
    /// Things worth telling the user (defaults taken, tensors of the checkpoints not needed).
    pub notes: Vec<String>,
}

/// One safetensors destination: the tensors a network needs, where they come from and under
/// which names they are written.
struct Part {
    /// What it is, for messages.
    what: String,
    /// File name stem inside `dir` (`model`, `diffusion_pytorch_model`, `stage1`).
    stem: String,
    /// Directory, relative to the bundle.
    dir: PathBuf,
    /// (source view, name in the view, name written).
    tensors: Vec<(nn::Weights, String, String)>,
}

/// The stage-2 settings read from `args.json` / `model_args.json`.
#[derive(Debug, Default)]
struct Stage2Args {
    sources: Vec<(String, serde_json::Map<String, Value>)>,
}

impl Stage2Args {
    fn get(&self, key: &str) -> Result<Option<(&str, &Value)>> {
        let mut found: Option<(&str, &Value)> = None;
        for (file, map) in &self.sources {
            if let Some(v) = map.get(key).filter(|v| !v.is_null()) {
                if let Some((f0, v0)) = found {
                    if v0 != v {
                        bail!("{f0} gives `{key}` = {v0} but {file} gives {v}; they must agree")
                    }
                } else {
                    found = Some((file, v));
                }
            }
        }
        Ok(found)
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)?
            .map(|(f, v)| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| anyhow!("{f}: `{key}` = {v} is not a non-negative integer"))
            })
            .transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)?
            .map(|(f, v)| {
                v.as_bool()
                    .ok_or_else(|| anyhow!("{f}: `{key}` = {v} is not true or false"))
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)?
            .map(|(f, v)| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{f}: `{key}` = {v} is not a string"))
            })
            .transpose()
    }

    fn names(&self) -> String {
        if self.sources.is_empty() {
            "no args.json / model_args.json".into()
        } else {
            self.sources
                .iter()
                .map(|(f, _)| f.as_str())
                .collect::<Vec<_>>()
                .join(" / ")
        }
    }
}

/// The stage-2 inputs: the settings and the path of `pretrained_ckpt.pth.tar` (extracted into
/// `scratch` when the input is a zip).
fn open_stage2(stage2: &Path, scratch: &Path) -> Result<(Stage2Args, PathBuf)> {
    const CKPT: &str = "pretrained_ckpt.pth.tar";
    const JSONS: [&str; 2] = ["args.json", "model_args.json"];
    let mut args = Stage2Args::default();
    let parse = |label: String, text: &str| -> Result<(String, serde_json::Map<String, Value>)> {
        match serde_json::from_str::<Value>(text).with_context(|| format!("parsing {label}"))? {
            Value::Object(m) => Ok((label, m)),
            _ => bail!("{label} is not a JSON object"),
        }
    };
    if stage2.is_dir() {
        for j in JSONS {
            let p = stage2.join(j);
            if p.is_file() {
                let text = std::fs::read_to_string(&p)
                    .with_context(|| format!("reading {}", p.display()))?;
                args.sources.push(parse(p.display().to_string(), &text)?);
            }
        }
        let ckpt = stage2.join(CKPT);
        if !ckpt.is_file() {
            bail!("stage-2 directory {} holds no {CKPT}", stage2.display())
        }
        return Ok((args, ckpt));
    }
    let file = std::fs::File::open(stage2)
        .with_context(|| format!("opening the stage-2 zip {}", stage2.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).with_context(|| {
        format!(
            "{} is neither a directory nor a zip archive (the authors' stage-2 zip)",
            stage2.display()
        )
    })?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("{}: reading the zip directory", stage2.display()))?;
    let find = |base: &str| -> Result<Option<String>> {
        let hits: Vec<&String> = names
            .iter()
            .filter(|n| !n.ends_with('/') && n.rsplit('/').next() == Some(base))
            .filter(|n| !n.starts_with("__MACOSX/"))
            .collect();
        match hits.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some((*one).clone())),
            many => bail!(
                "{}: {} entries named {base} ({}); keep one",
                stage2.display(),
                many.len(),
                many.iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    };
    for j in JSONS {
        if let Some(entry) = find(j)? {
            let mut text = String::new();
            zip.by_name(&entry)
                .with_context(|| format!("{}: reading {entry}", stage2.display()))?
                .read_to_string(&mut text)
                .with_context(|| format!("{}: reading {entry}", stage2.display()))?;
            args.sources
                .push(parse(format!("{}:{entry}", stage2.display()), &text)?);
        }
    }
    let entry = find(CKPT)?.ok_or_else(|| {
        anyhow!(
            "{}: no {CKPT} in the zip (entries: {})",
            stage2.display(),
            names.join(", ")
        )
    })?;
    std::fs::create_dir_all(scratch)?;
    let out = scratch.join(CKPT);
    let mut src = zip
        .by_name(&entry)
        .with_context(|| format!("{}: reading {entry}", stage2.display()))?;
    let mut dst =
        std::fs::File::create(&out).with_context(|| format!("creating {}", out.display()))?;
    std::io::copy(&mut src, &mut dst)
        .with_context(|| format!("{}: extracting {entry}", stage2.display()))?;
    Ok((args, out))
}

/// `w` without a DDP `module.` prefix when every name has one.
fn strip_module(w: nn::Weights) -> nn::Weights {
    let keys = w.keys();
    if !keys.is_empty() && keys.iter().all(|k| k.starts_with("module.")) {
        w.subset("module")
    } else {
        w
    }
}

fn has_prefix(w: &nn::Weights, prefix: &str) -> bool {
    !w.keys_with_prefix(&format!("{prefix}.")).is_empty()
}

/// Names the probe recorded, relative to `view` (whose prefix is stripped).
fn probed_relative(probe: &nn::Weights, view: &nn::Weights) -> Vec<String> {
    let p = view.prefix();
    probe
        .probed()
        .into_iter()
        .filter_map(|n| n.strip_prefix(p).map(str::to_string))
        .collect()
}

fn is_weight_file(name: &str) -> bool {
    [
        ".bin",
        ".safetensors",
        ".pth",
        ".pt",
        ".ckpt",
        ".tar",
        ".h5",
        ".msgpack",
        ".ot",
        ".onnx",
        ".index.json",
    ]
    .iter()
    .any(|e| name.ends_with(e))
}

/// Copies the plain files of `from` (configs, tokenizer files; no weights, no sub-directories).
fn copy_plain_files(from: &Path, to: &Path) -> Result<usize> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut n = 0;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name().to_string_lossy().to_string();
        if !e.file_type()?.is_file() || name.starts_with('.') || is_weight_file(&name) {
            continue;
        }
        std::fs::copy(e.path(), to.join(&name))
            .with_context(|| format!("copying {}", e.path().display()))?;
        n += 1;
    }
    Ok(n)
}

/// Refuses an `--out` that exists and is not an empty directory.
fn check_out(out: &Path) -> Result<()> {
    if out.exists() {
        if !out.is_dir() {
            bail!("--out {} exists and is not a directory", out.display())
        }
        if std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
        {
            bail!(
                "--out {} exists and is not empty; choose a new directory (nothing was written)",
                out.display()
            )
        }
    }
    Ok(())
}

/// Imports the authors' checkpoints into a bundle at `o.out` (see the module docs).
pub fn import(o: &ImportOptions) -> Result<ImportReport> {
    check_out(&o.out)?;
    parse_dtype(&o.dtype).context("--dtype")?;
    if o.mapper_heads == 0 {
        bail!("--mapper-heads must be positive")
    }
    let out_name = o
        .out
        .file_name()
        .ok_or_else(|| anyhow!("--out {} has no directory name", o.out.display()))?
        .to_string_lossy()
        .to_string();
    let parent = match o.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = parent.join(format!(".{out_name}.import-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging)
            .with_context(|| format!("removing the stale {}", staging.display()))?;
    }
    std::fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
    let result = import_into(o, &staging).and_then(|report| {
        // An empty --out directory is replaced by the rename.
        check_out(&o.out)?;
        if o.out.exists() {
            std::fs::remove_dir(&o.out)
                .with_context(|| format!("replacing the empty {}", o.out.display()))?;
        }
        std::fs::rename(&staging, &o.out)
            .with_context(|| format!("moving {} to {}", staging.display(), o.out.display()))?;
        Ok(report)
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

fn import_into(o: &ImportOptions, staging: &Path) -> Result<ImportReport> {
    let cpu = Device::Cpu;
    let mut notes: Vec<String> = vec![];
    let scratch = staging.join(".scratch");

    // ------------------------------------------------------------------ configs
    for (flag, p) in [("--sd", &o.sd), ("--clip", &o.clip), ("--llm", &o.llm)] {
        if !p.is_dir() {
            bail!("{flag} {} is not a directory", p.display())
        }
    }
    if !o.stage1.is_file() {
        bail!("--stage1 {} is not a file", o.stage1.display())
    }
    let sd_dir = |sub: &str| -> Result<PathBuf> {
        let p = o.sd.join(sub);
        if !p.exists() {
            bail!(
                "--sd {}: no `{sub}` (expected a diffusers Stable Diffusion directory with \
                 tokenizer/, text_encoder/, unet/, vae/, scheduler/)",
                o.sd.display()
            )
        }
        Ok(p)
    };
    let tokenizer_dir = sd_dir("tokenizer")?;
    let text_dir = sd_dir("text_encoder")?;
    let unet_dir = sd_dir("unet")?;
    let vae_dir = sd_dir("vae")?;
    let scheduler_dir = sd_dir("scheduler")?;
    let clip_tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)
        .with_context(|| format!("the CLIP tokenizer in {}", tokenizer_dir.display()))?;
    let text_cfg = ClipConfigs::from_dir(&text_dir)?.text.ok_or_else(|| {
        anyhow!(
            "{}: config.json describes no CLIP text tower",
            text_dir.display()
        )
    })?;
    let unet_cfg = UNetConfig::from_file(&unet_dir.join("config.json"))?;
    let vae_cfg = VaeConfig::from_file(&vae_dir.join("config.json"))?;
    let scheduler_cfg = SchedulerConfig::from_file(&scheduler_dir)?;
    let vision_cfg = ClipConfigs::from_dir(&o.clip)?.vision.ok_or_else(|| {
        anyhow!(
            "--clip {}: config.json describes no CLIP vision tower",
            o.clip.display()
        )
    })?;
    let cross_dim = unet_cfg
        .cross_attention_dim
        .expand(1, "cross_attention_dim")?[0];
    if text_cfg.hidden_size != cross_dim {
        bail!(
            "{}: hidden_size {} differs from the UNet's cross_attention_dim {cross_dim} ({})",
            text_dir.join("config.json").display(),
            text_cfg.hidden_size,
            unet_dir.join("config.json").display()
        )
    }
    if vision_cfg.projection_dim != text_cfg.hidden_size {
        bail!(
            "--clip {}: projection_dim {} differs from the CLIP text width {} (FuseModule fuses \
             the two)",
            o.clip.display(),
            vision_cfg.projection_dim,
            text_cfg.hidden_size
        )
    }

    // ------------------------------------------------------------------ stage 2 settings
    let (s2args, ckpt) = open_stage2(&o.stage2, &scratch)?;
    if s2args.sources.is_empty() {
        bail!(
            "--stage2 {}: no args.json or model_args.json (the authors' zip has both)",
            o.stage2.display()
        )
    }
    let r = s2args.usize("num_tokens")?.ok_or_else(|| {
        anyhow!(
            "missing config field: neither {} gives `num_tokens` (the number of [IMG] tokens)",
            s2args.names()
        )
    })?;
    if r == 0 {
        bail!("{}: `num_tokens` must be positive", s2args.names())
    }
    let m = match s2args.usize("n_visual_tokens")? {
        Some(0) => bail!("{}: `n_visual_tokens` must be positive", s2args.names()),
        Some(m) => m,
        None => {
            notes.push(format!("{}: no `n_visual_tokens`; using 4", s2args.names()));
            4
        }
    };
    let max_len = match s2args.usize("max_len")? {
        Some(n) => n,
        None => {
            notes.push(format!("{}: no `max_len`; using 160", s2args.names()));
            160
        }
    };
    let interleave = s2args.bool("interleave")?.unwrap_or_else(|| {
        notes.push(format!(
            "{}: no `interleave`; past frames are in the prompt (the paper's layout)",
            s2args.names()
        ));
        true
    });
    if let Some(mode) = s2args.string("text_fc_mode")? {
        if mode != "gill_mapper" {
            bail!(
                "{}: `text_fc_mode` = \"{mode}\"; only GILL's \"gill_mapper\" Mapper_LDM is supported",
                s2args.names()
            )
        }
    }
    if let Some(n) = s2args.usize("num_clip_tokens")? {
        if n != clip_tokenizer.max_length() {
            bail!(
                "{}: `num_clip_tokens` = {n}, but the CLIP tokenizer in {} has {} positions",
                s2args.names(),
                tokenizer_dir.display(),
                clip_tokenizer.max_length()
            )
        }
    }
    if let Some(n) = s2args.usize("gen_emb_dim")? {
        if n != cross_dim {
            bail!(
                "{}: `gen_emb_dim` = {n}, but the UNet's cross_attention_dim is {cross_dim}",
                s2args.names()
            )
        }
    }
    if let Some((f, v)) = s2args.get("text_emb_layers")? {
        if v != &serde_json::json!([-1]) {
            bail!("{f}: `text_emb_layers` = {v}; only [-1] (the last layer) is supported")
        }
    }

    // ------------------------------------------------------------------ open checkpoints
    let stage1 = strip_module(
        nn::Weights::open(&o.stage1)
            .with_context(|| format!("opening the stage-1 checkpoint {}", o.stage1.display()))?,
    );
    let stage2 = strip_module(
        nn::Weights::open(&ckpt)
            .with_context(|| format!("opening the stage-2 checkpoint {}", o.stage2.display()))?,
    );
    let pre = Stage1Prefixes::default();
    if !has_prefix(&stage1, &pre.fuse) {
        bail!(
            "--stage1 {}: no `{}.*` tensors (the FuseModule); is this the authors' stage-1 \
             pytorch_model.bin? It holds {} tensors, e.g. {}",
            o.stage1.display(),
            pre.fuse,
            stage1.len(),
            stage1
                .keys()
                .into_iter()
                .take(3)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
    let base_or_stage1 = |prefix: &str, dir: &Path, what: &str| -> Result<(nn::Weights, String)> {
        if has_prefix(&stage1, prefix) {
            Ok((
                stage1.subset(prefix),
                format!("{what} (stage-1 `{prefix}.*` of {})", o.stage1.display()),
            ))
        } else {
            let w = nn::Weights::open(dir)
                .with_context(|| format!("opening the {what} weights in {}", dir.display()))?;
            Ok((w, format!("{what} ({})", dir.display())))
        }
    };

    let mut parts: Vec<Part> = vec![];
    let part = |what: String, dir: &str, stem: &str, view: &nn::Weights, probe: &nn::Weights| {
        let tensors = probed_relative(probe, view)
            .into_iter()
            .map(|n| (view.clone(), n.clone(), n))
            .collect();
        Part {
            what,
            stem: stem.into(),
            dir: PathBuf::from(dir),
            tensors,
        }
    };

    // ------------------------------------------------------------------ stage 1 networks
    let (text_w, what) = base_or_stage1("text_encoder", &text_dir, "CLIP text encoder")?;
    let probe = text_w.probe();
    ClipTextModel::new(probe.var_builder(DType::F32, &cpu), &text_cfg).map_err(|e| {
        anyhow!(
            "checking the {what} against {}: {e}",
            text_dir.join("config.json").display()
        )
    })?;
    parts.push(part(what, "sd/text_encoder", "model", &text_w, &probe));

    let (unet_w, what) = base_or_stage1("unet", &unet_dir, "UNet")?;
    let probe = unet_w.probe();
    UNet2DConditionModel::new(probe.var_builder(DType::F32, &cpu), &unet_cfg).map_err(|e| {
        anyhow!(
            "checking the {what} against {}: {e:#}",
            unet_dir.join("config.json").display()
        )
    })?;
    parts.push(part(
        what,
        "sd/unet",
        "diffusion_pytorch_model",
        &unet_w,
        &probe,
    ));

    let (vae_w, what) = base_or_stage1("vae", &vae_dir, "VAE")?;
    let probe = vae_w.probe();
    AutoencoderKL::new(probe.var_builder(DType::F32, &cpu), &vae_cfg).map_err(|e| {
        anyhow!(
            "checking the {what} against {}: {e:#}",
            vae_dir.join("config.json").display()
        )
    })?;
    parts.push(part(
        what,
        "sd/vae",
        "diffusion_pytorch_model",
        &vae_w,
        &probe,
    ));

    // The base vision tower: Mapper_LLM's frozen encoder (and the Char-LDM's when stage 1 did
    // not fine-tune it).
    let clip_w = nn::Weights::open(&o.clip)
        .with_context(|| format!("opening the CLIP vision weights in {}", o.clip.display()))?;
    let probe = clip_w.probe();
    let what = format!("CLIP vision tower ({})", o.clip.display());
    ClipVisionModel::new(probe.var_builder(DType::F32, &cpu), &vision_cfg).map_err(|e| {
        anyhow!(
            "checking the {what} against {}: {e}",
            o.clip.join("config.json").display()
        )
    })?;
    parts.push(part(what, "clip-vision", "model", &clip_w, &probe));

    // stage1.safetensors: FuseModule (+ the fine-tuned vision tower), under the authors' names.
    let fuse_w = stage1.subset(&pre.fuse);
    let probe = fuse_w.probe();
    FuseModule::new(probe.var_builder(DType::F32, &cpu), text_cfg.hidden_size).map_err(|e| {
        anyhow!(
            "checking the FuseModule (`{}.*` of {}): {e}",
            pre.fuse,
            o.stage1.display()
        )
    })?;
    let mut stage1_tensors: Vec<(nn::Weights, String, String)> = probed_relative(&probe, &fuse_w)
        .into_iter()
        .map(|n| (fuse_w.clone(), n.clone(), format!("{}.{n}", pre.fuse)))
        .collect();
    if has_prefix(&stage1, &pre.image_encoder) {
        let ie = stage1.subset(&pre.image_encoder);
        let probe = ie.probe();
        ClipVisionModel::new(probe.var_builder(DType::F32, &cpu), &vision_cfg).map_err(|e| {
            anyhow!(
                "checking the fine-tuned vision tower (`{}.*` of {}) against {}: {e}",
                pre.image_encoder,
                o.stage1.display(),
                o.clip.join("config.json").display()
            )
        })?;
        stage1_tensors.extend(
            probed_relative(&probe, &ie)
                .into_iter()
                .map(|n| (ie.clone(), n.clone(), format!("{}.{n}", pre.image_encoder))),
        );
    } else {
        notes.push(format!(
            "{}: no `{}.*`; the Char-LDM uses the base vision tower",
            o.stage1.display(),
            pre.image_encoder
        ));
    }
    parts.push(Part {
        what: format!("stage 1 ({})", o.stage1.display()),
        stem: "stage1".into(),
        dir: PathBuf::from("storygpt-v"),
        tensors: stage1_tensors,
    });

    // ------------------------------------------------------------------ LLM
    LlmTokenizer::from_dir(&o.llm, r).with_context(|| {
        format!(
            "--llm {}: the tokenizer (a `tokenizer.json` is needed; transformers writes one with \
             AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR))",
            o.llm.display()
        )
    })?;
    let llm_w = nn::Weights::open(&o.llm)
        .with_context(|| format!("opening the LLM weights in {}", o.llm.display()))?;
    let probe = llm_w.probe();
    let lm = CausalLm::from_weights(&o.llm, &probe, DType::F32, &cpu)
        .map_err(|e| anyhow!("checking the LLM in {}: {e:#}", o.llm.display()))?;
    let d = lm.embed_dim();
    drop(lm);
    parts.push(part(
        format!("LLM ({})", o.llm.display()),
        "llm",
        "model",
        &llm_w,
        &probe,
    ));

    // ------------------------------------------------------------------ stage 2 tensors
    let names = Stage2Names::default();
    let ckpt_label = format!(
        "{} ({})",
        o.stage2.display(),
        ckpt.file_name().unwrap_or_default().to_string_lossy()
    );
    let shape_err = |name: &str, got: Vec<usize>, expected: String| {
        anyhow!("tensor `{name}` has shape {got:?} in {ckpt_label}, expected {expected}")
    };
    let rows_shape = stage2
        .shape(&names.img_rows)
        .with_context(|| format!("the [IMG] input embeddings in {ckpt_label}"))?;
    match rows_shape.as_slice() {
        [n, dd] if *n >= r && *dd == d => {}
        _ => {
            return Err(shape_err(
                &names.img_rows,
                rows_shape,
                format!("[{r}, {d}] (R = {r} [IMG] rows of the LLM width {d})"),
            ))
        }
    }
    let mut stage2_tensors: Vec<(nn::Weights, String, String)> = vec![];
    let mllm = stage2.subset(&names.mapper_llm);
    let probe = mllm.probe();
    MapperLlm::new(
        MapperLlmConfig {
            vision_dim: vision_cfg.hidden_size,
            num_tokens: m,
            llm_dim: d,
        },
        probe.var_builder(DType::F32, &cpu),
    )
    .map_err(|e| {
        anyhow!(
            "checking Mapper_LLM (`{}.*`, m = {m}): {e}",
            names.mapper_llm
        )
    })?;
    stage2_tensors.extend(
        probed_relative(&probe, &mllm)
            .into_iter()
            .map(|n| (mllm.clone(), n.clone(), format!("{}.{n}", names.mapper_llm))),
    );

    // Mapper_LDM sizes from its tensors (heads are not recoverable: --mapper-heads).
    let mldm = stage2.subset(&names.mapper_ldm);
    let fc = mldm
        .shape("fc.weight")
        .with_context(|| format!("Mapper_LDM in {ckpt_label}"))?;
    let d_model = fc[0];
    let count_layers = |side: &str| -> usize {
        mldm.keys_with_prefix(&format!("tfm.{side}.layers."))
            .iter()
            .filter_map(|k| k.split('.').nth(3).and_then(|i| i.parse::<usize>().ok()))
            .collect::<BTreeSet<_>>()
            .len()
    };
    let (enc, dec) = (count_layers("encoder"), count_layers("decoder"));
    let ff = mldm
        .shape("tfm.encoder.layers.0.linear1.weight")
        .with_context(|| format!("Mapper_LDM in {ckpt_label}"))?[0];
    if d_model % o.mapper_heads != 0 {
        bail!(
            "Mapper_LDM width {d_model} (`{}.fc.weight`) is not divisible by --mapper-heads {}",
            names.mapper_ldm,
            o.mapper_heads
        )
    }
    let dims = MapperLdmDims {
        d_model,
        heads: o.mapper_heads,
        encoder_layers: enc,
        decoder_layers: dec,
        ff_dim: ff,
    };
    let probe = mldm.probe();
    MapperLdm::new(
        MapperLdmConfig {
            in_dim: d,
            d_model,
            heads: o.mapper_heads,
            encoder_layers: enc,
            decoder_layers: dec,
            ff_dim: ff,
            num_queries: clip_tokenizer.max_length(),
            out_dim: cross_dim,
            eps: 1e-5,
        },
        probe.var_builder(DType::F32, &cpu),
    )
    .map_err(|e| anyhow!("checking Mapper_LDM (`{}.*`): {e}", names.mapper_ldm))?;
    stage2_tensors.extend(
        probed_relative(&probe, &mldm)
            .into_iter()
            .map(|n| (mldm.clone(), n.clone(), format!("{}.{n}", names.mapper_ldm))),
    );
    let used: BTreeSet<String> = stage2_tensors
        .iter()
        .map(|(_, _, n)| n.clone())
        .chain([names.img_rows.clone()])
        .collect();
    let unused: Vec<String> = stage2
        .keys()
        .into_iter()
        .filter(|k| !used.contains(k))
        .collect();
    if !unused.is_empty() {
        notes.push(format!(
            "{ckpt_label}: {} tensors not used by StoryGPT-V inference left out (e.g. {})",
            unused.len(),
            unused
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let unused1: Vec<String> = stage1
        .keys()
        .into_iter()
        .filter(|k| {
            ![
                &pre.fuse,
                &pre.image_encoder,
                &pre.unet,
                &"text_encoder".to_string(),
                &"vae".to_string(),
            ]
            .iter()
            .any(|p| k.starts_with(&format!("{p}.")))
        })
        .collect();
    if !unused1.is_empty() {
        notes.push(format!(
            "{}: {} tensors outside the known networks left out (e.g. {})",
            o.stage1.display(),
            unused1.len(),
            unused1
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }

    // ------------------------------------------------------------------ write
    let store = if o.f16 { DType::F16 } else { DType::F32 };
    let mut tensors = 0;
    let mut bytes = 0;
    for p in &parts {
        let (n, b) = write_part(staging, p, store, &cpu)?;
        tensors += n;
        bytes += b;
    }
    // stage2.safetensors: the R [IMG] rows (the last R rows of a whole extended table).
    {
        let rows = stage2.get(&names.img_rows, DType::F32, &cpu)?;
        let n = rows.dim(0)?;
        let rows = rows.narrow(0, n - r, r)?.to_dtype(store)?;
        let mut map: HashMap<String, candle_core::Tensor> = HashMap::new();
        map.insert(names.img_rows.clone(), rows);
        for (w, name, out) in &stage2_tensors {
            map.insert(out.clone(), w.get(name, DType::F32, &cpu)?.to_dtype(store)?);
        }
        let path = staging.join("storygpt-v/stage2.safetensors");
        std::fs::create_dir_all(path.parent().unwrap_or(staging))?;
        candle_core::safetensors::save(&map, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        tensors += map.len();
        bytes += std::fs::metadata(&path)?.len();
    }
    // Configs and tokenizers.
    for (from, to) in [
        (&tokenizer_dir, "sd/tokenizer"),
        (&scheduler_dir, "sd/scheduler"),
        (&text_dir, "sd/text_encoder"),
        (&unet_dir, "sd/unet"),
        (&vae_dir, "sd/vae"),
        (&o.clip, "clip-vision"),
        (&o.llm, "llm"),
    ] {
        copy_plain_files(from, &staging.join(to))?;
    }
    let model_index = o.sd.join("model_index.json");
    if model_index.is_file() {
        std::fs::copy(&model_index, staging.join("sd/model_index.json"))?;
    }
    // Provenance: the stage-2 settings files as given.
    for (label, map) in &s2args.sources {
        let base = label.rsplit(['/', ':']).next().unwrap_or("args.json");
        let path = staging.join("storygpt-v").join(base);
        std::fs::write(&path, serde_json::to_string_pretty(map)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch)?;
    }

    // ------------------------------------------------------------------ manifest
    let downscale = 1usize << vae_cfg.block_out_channels.len().saturating_sub(1);
    let size = unet_cfg.sample_size.map_or(512, |s| s * downscale);
    let scheduler = match scheduler_cfg.class_kind() {
        Some(SchedulerKind::Ddim) => "ddim",
        Some(SchedulerKind::Ddpm) => "ddpm",
        Some(SchedulerKind::EulerAncestral) => "euler-a",
        _ => "pndm",
    };
    let description = format!(
        "StoryGPT-V imported by `storygpt-v bundle import` from {} (stage 1), {} (stage 2), \
         {} (Stable Diffusion), {} (CLIP vision), {} (LLM)",
        o.stage1.display(),
        o.stage2.display(),
        o.sd.display(),
        o.clip.display(),
        o.llm.display()
    );
    let manifest = Manifest {
        format: FORMAT_VERSION,
        name: o.name.clone(),
        description,
        trained: true,
        char_ldm: CharLdmSection {
            base: Some("sd".into()),
            tokenizer: None,
            text_encoder: None,
            unet: None,
            vae: None,
            scheduler: None,
            image_encoder: "clip-vision".into(),
            stage1: Some("storygpt-v/stage1.safetensors".into()),
            stage1_prefixes: Stage1Prefixes::default(),
            dtype: o.dtype.clone(),
        },
        llm: LlmSection {
            model: "llm".into(),
            tokenizer: None,
            visual_encoder: None,
            stage2: "storygpt-v/stage2.safetensors".into(),
            stage2_names: Stage2Names::default(),
            dtype: o.dtype.clone(),
            num_img_tokens: r,
            visual_tokens: m,
            max_prompt_len: max_len,
            caption_only: !interleave,
            mapper_ldm: dims,
        },
        sampling: SamplingSection {
            height: size,
            width: size,
            scheduler: scheduler.into(),
            // SD 1.5 also draws well at 3:2 and 2:3 around its 512-pixel training size.
            sizes: if size == 512 {
                vec![[768, 512], [512, 768]]
            } else {
                Vec::new()
            },
            ..Default::default()
        },
    };
    manifest.write(staging)?;
    if o.verify {
        crate::pipeline::StoryPipeline::load(staging, &cpu)
            .context("loading the imported bundle once to check it")?;
    }
    Ok(ImportReport {
        manifest,
        tensors,
        bytes,
        notes,
    })
}

/// Writes one part as `dir/stem.safetensors`, or as shards with `stem.safetensors.index.json`
/// when larger than [`SHARD_BYTES`]. Returns (tensors, bytes).
fn write_part(staging: &Path, p: &Part, store: DType, cpu: &Device) -> Result<(usize, u64)> {
    let dir = staging.join(&p.dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // Plan shards from the stored shapes.
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0u64;
    for (i, (w, name, _)) in p.tensors.iter().enumerate() {
        let n: usize = w.shape(name)?.iter().product();
        let b = (n * store.size_in_bytes()) as u64;
        if size > 0 && size + b > SHARD_BYTES {
            shards.push(vec![]);
            size = 0;
        }
        size += b;
        shards.last_mut().expect("one shard").push(i);
    }
    let count = shards.len();
    let mut weight_map: BTreeMap<String, String> = BTreeMap::new();
    let mut bytes = 0;
    for (s, idx) in shards.iter().enumerate() {
        let file = if count == 1 {
            format!("{}.safetensors", p.stem)
        } else {
            format!("{}-{:05}-of-{count:05}.safetensors", p.stem, s + 1)
        };
        let mut map = HashMap::with_capacity(idx.len());
        for &i in idx {
            let (w, name, out) = &p.tensors[i];
            let t = w
                .get(name, DType::F32, cpu)
                .with_context(|| format!("reading the {}", p.what))?
                .to_dtype(store)?;
            weight_map.insert(out.clone(), file.clone());
            map.insert(out.clone(), t);
        }
        let path = dir.join(&file);
        candle_core::safetensors::save(&map, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        bytes += std::fs::metadata(&path)?.len();
    }
    if count > 1 {
        let index = serde_json::json!({
            "metadata": {"total_size": bytes},
            "weight_map": weight_map,
        });
        let path = dir.join(format!("{}.safetensors.index.json", p.stem));
        std::fs::write(&path, serde_json::to_string_pretty(&index)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok((p.tensors.len(), bytes))
}
