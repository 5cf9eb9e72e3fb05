//! Randomly initialised bundles (`storygpt-v bundle random --config toy --out DIR`).
//!
//! A random bundle has exactly the layout of a real one (diffusers / transformers directories
//! with `config.json` and safetensors, a CLIP `vocab.json` + `merges.txt`, an LLM
//! `tokenizer.json`, stage-1 and stage-2 weight files and `bundle.toml`), so it exercises the
//! same loader and pipeline as real weights. It is UNTRAINED: frames are noise-like patterns.
//!
//! Initial values are drawn per tensor from a ChaCha20 stream seeded with the bundle seed and
//! the tensor's name, following each layer's init hint (PyTorch-like Kaiming-uniform linears,
//! unit norms, ...), so a seed always gives the same bundle.
//!
//! The `toy` configuration is the one the project will train from scratch on a 2-core CPU
//! (64x64 frames; each network at most a few million parameters, sized from the calibration
//! UNet of docs/BENCHMARKS.md: ~3M parameters and 8x8 latents).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde_json::{json, Value};

use super::{bpe, Manifest};
use crate::clip::{ClipConfigs, ClipTextModel, ClipVisionModel};
use crate::fuse::FuseModule;
use crate::llm::{CausalLm, LlmTokenizer};
use crate::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};

/// Configurations `write_random` knows.
pub const CONFIGS: &[&str] = &["toy", "toy-llama"];

/// A VarBuilder backend that creates every requested tensor from a seeded stream and keeps it
/// for saving.
struct SeededInit {
    seed: u64,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
    /// Optional tensors (probed with `contains_tensor`) that this network should have.
    optional: &'static [&'static str],
}

fn name_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a over the name, mixed with the seed: stable across Rust versions (unlike
    // `DefaultHasher`, whose algorithm is unspecified).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The initial values of tensor `name` for `seed`, drawn from a ChaCha20 stream seeded by both
/// and shaped by the layer's init hint (also used to seed training runs).
pub fn seeded_values(seed: u64, name: &str, shape: &Shape, init: Init) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = ChaCha20Rng::seed_from_u64(name_seed(seed, name));
    let uniform = |rng: &mut ChaCha20Rng, lo: f64, hi: f64| -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(lo..hi) as f32).collect()
    };
    let normal = |rng: &mut ChaCha20Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..n)
            .map(|_| {
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen::<f64>();
                (mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Uniform => {
                    let b = 3f64.sqrt() * std;
                    uniform(&mut rng, -b, b)
                }
                candle_nn::init::NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededInit {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut made = self.made.lock().expect("init map poisoned");
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!("{name} requested with shapes {:?} and {s:?}", t.shape())
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let t = Tensor::from_vec(seeded_values(self.seed, name, &s, h), s, &Device::Cpu)?;
        made.insert(name.to_owned(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random init cannot create `{name}` without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.optional.contains(&name)
    }
}

/// Builds a network through a seeded VarBuilder and writes every tensor it asked for.
fn build_and_save<T>(
    seed: u64,
    optional: &'static [&'static str],
    file: &Path,
    build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
) -> Result<usize> {
    build_and_save_with(seed, optional, file, Vec::new(), build)
}

/// As [`build_and_save`], also writing `extra` tensors made elsewhere.
fn build_and_save_with<T>(
    seed: u64,
    optional: &'static [&'static str],
    file: &Path,
    extra: Vec<(String, Tensor)>,
    build: impl FnOnce(VarBuilder<'static>) -> Result<T>,
) -> Result<usize> {
    let made = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = SeededInit {
        seed,
        made: made.clone(),
        optional,
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu);
    build(vb)?;
    let mut tensors = std::mem::take(&mut *made.lock().expect("init map poisoned"));
    tensors.extend(extra);
    let params = tensors.values().map(Tensor::elem_count).sum();
    if let Some(parent) = file.parent() {
        std::fs::create_dir_all(parent)?;
    }
    candle_core::safetensors::save(&tensors.into_iter().collect(), file)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(params)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)?)
        .with_context(|| format!("writing {}", path.display()))
}

/// Captions of the toy world (original and referential forms) for learning the vocabularies.
fn toy_corpus() -> Vec<String> {
    let rules = data::toyworld::rules();
    let mut out = Vec::new();
    for i in 0..400 {
        let story = data::toyworld::story(7, i, 5);
        let frames: Vec<data::StoryFrame> = story
            .frames
            .iter()
            .map(|f| data::StoryFrame {
                caption: f.caption.clone(),
                characters: None,
            })
            .collect();
        // Also as prompt text, so that the frame markers become single tokens.
        for r in data::make_referential(&rules, &frames) {
            out.push(format!(" Image: <img></img> Caption: {r} Caption:"));
            out.push(r);
        }
        out.extend(frames.into_iter().map(|f| f.caption));
    }
    out
}

/// Stable Diffusion 1.5's `scheduler_config.json` (PNDM; the DDPM training schedule is the same
/// scaled-linear betas), as the toy bundles ship it.
pub fn sd15_scheduler_json() -> Value {
    json!({
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
        "steps_offset": 1, "prediction_type": "epsilon", "clip_sample": false,
    })
}

/// Sizes of one random configuration.
struct Sizes {
    frame: usize,
    text_hidden: usize,
    text_layers: usize,
    vision_hidden: usize,
    vision_layers: usize,
    vision_image: usize,
    vision_patch: usize,
    unet_channels: [usize; 2],
    vae_channels: [usize; 4],
    llm_hidden: usize,
    llm_layers: usize,
    llm_ffn: usize,
    mapper: MapperLdmConfig,
    clip_merges: usize,
    llm_merges: usize,
    /// The LLM family: OPT (the paper's main LLM) or Llama (its Table 6 / 9 variant).
    llama: bool,
}

fn sizes(config: &str) -> Result<Sizes> {
    Ok(match config {
        "toy" | "toy-llama" => Sizes {
            frame: 64,
            text_hidden: 128,
            text_layers: 4,
            vision_hidden: 128,
            vision_layers: 4,
            vision_image: 64,
            vision_patch: 8,
            unet_channels: [64, 128],
            vae_channels: [32, 32, 64, 64],
            llm_hidden: 128,
            llm_layers: 4,
            llm_ffn: 512,
            mapper: MapperLdmConfig {
                in_dim: 128,
                d_model: 128,
                heads: 4,
                encoder_layers: 2,
                decoder_layers: 2,
                ff_dim: 512,
                num_queries: 77,
                out_dim: 128,
                eps: 1e-5,
            },
            clip_merges: 600,
            llm_merges: 600,
            llama: config == "toy-llama",
        },
        other => bail!(
            "unknown bundle configuration `{other}`; known: {}",
            CONFIGS.join(", ")
        ),
    })
}

/// What [`write_random`] wrote.
#[derive(Debug, Clone)]
pub struct RandomReport {
    /// Parameters per network, in writing order.
    pub params: Vec<(&'static str, usize)>,
}

impl RandomReport {
    /// All parameters.
    pub fn total(&self) -> usize {
        self.params.iter().map(|(_, n)| n).sum()
    }
}

/// Writes a randomly initialised bundle of configuration `config` (see [`CONFIGS`]) into `out`
/// (created; it must be empty or absent). The bundle is UNTRAINED.
pub fn write_random(config: &str, out: &Path, seed: u64) -> Result<RandomReport> {
    let z = sizes(config)?;
    if out.exists()
        && std::fs::read_dir(out)
            .with_context(|| format!("reading {}", out.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty; choose a new directory",
            out.display()
        )
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut params = Vec::new();
    let corpus = toy_corpus();

    // CLIP tokenizer and text encoder.
    let clip_vocab = bpe::write_clip_tokenizer(&out.join("sd/tokenizer"), &corpus, z.clip_merges)?;
    let text_cfg = json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": clip_vocab,
        "hidden_size": z.text_hidden,
        "intermediate_size": 4 * z.text_hidden,
        "projection_dim": z.text_hidden,
        "num_hidden_layers": z.text_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": clip_vocab - 2,
        "eos_token_id": clip_vocab - 1,
        "pad_token_id": clip_vocab - 1,
    });
    let dir = out.join("sd/text_encoder");
    write_json(&dir.join("config.json"), &text_cfg)?;
    let text = ClipConfigs::from_json(&text_cfg)?
        .text
        .context("text config")?;
    params.push((
        "clip text encoder",
        build_and_save(seed, &[], &dir.join("model.safetensors"), |vb| {
            Ok(ClipTextModel::new(vb, &text)?)
        })?,
    ));

    // CLIP vision tower with projection (portraits, and frames for Mapper_LLM).
    let vision_cfg = json!({
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": z.vision_hidden,
        "intermediate_size": 4 * z.vision_hidden,
        "projection_dim": z.text_hidden,
        "num_hidden_layers": z.vision_layers,
        "num_attention_heads": 4,
        "num_channels": 3,
        "image_size": z.vision_image,
        "patch_size": z.vision_patch,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    });
    let dir = out.join("clip-vision");
    write_json(&dir.join("config.json"), &vision_cfg)?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "crop_size": z.vision_image, "do_center_crop": true, "do_normalize": true,
            "do_resize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
            "size": {"shortest_edge": z.vision_image},
        }),
    )?;
    let vision = ClipConfigs::from_json(&vision_cfg)?
        .vision
        .context("vision config")?;
    params.push((
        "clip vision tower",
        build_and_save(
            seed,
            &["visual_projection.weight"],
            &dir.join("model.safetensors"),
            |vb| Ok(ClipVisionModel::new(vb, &vision)?),
        )?,
    ));

    // UNet: the calibration config of docs/BENCHMARKS.md at the toy text width.
    let unet_cfg = json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": z.frame / 8,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": z.unet_channels,
        "layers_per_block": 1,
        "attention_head_dim": 8,
        "cross_attention_dim": z.text_hidden,
        "norm_num_groups": 32,
        "act_fn": "silu",
    });
    let dir = out.join("sd/unet");
    write_json(&dir.join("config.json"), &unet_cfg)?;
    let unet = UNetConfig::from_file(&dir.join("config.json"))?;
    params.push((
        "unet",
        build_and_save(
            seed,
            &[],
            &dir.join("diffusion_pytorch_model.safetensors"),
            |vb| UNet2DConditionModel::new(vb, &unet),
        )?,
    ));

    // VAE with an 8x downscale: 64x64 frames <-> 4x8x8 latents.
    let vae_cfg = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "block_out_channels": z.vae_channels,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": z.frame,
        "scaling_factor": 0.18215,
        "act_fn": "silu",
    });
    let dir = out.join("sd/vae");
    write_json(&dir.join("config.json"), &vae_cfg)?;
    let vae = VaeConfig::from_file(&dir.join("config.json"))?;
    params.push((
        "vae",
        build_and_save(
            seed,
            &[],
            &dir.join("diffusion_pytorch_model.safetensors"),
            |vb| AutoencoderKL::new(vb, &vae),
        )?,
    ));

    // Stable Diffusion 1.5's scheduler.
    write_json(
        &out.join("sd/scheduler/scheduler_config.json"),
        &sd15_scheduler_json(),
    )?;

    // Stage 1: the FuseModule.
    params.push((
        "fuse module",
        build_and_save(
            seed,
            &[],
            &out.join("storygpt-v/stage1.safetensors"),
            |vb| Ok(FuseModule::new(vb.pp("postfuse_module"), z.text_hidden)?),
        )?,
    ));

    // The LLM, with its own tokenizer: a tiny OPT (the paper's main LLM family), or a tiny
    // Llama with grouped-query attention.
    let llm_dir = out.join("llm");
    let llm_vocab = bpe::write_llm_tokenizer(&llm_dir, &corpus, z.llm_merges)?;
    let llm_cfg = if z.llama {
        // Llama convention: `<s>` starts a sequence.
        write_json(
            &llm_dir.join("tokenizer_config.json"),
            &json!({"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>",
                    "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}),
        )?;
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": llm_vocab,
            "hidden_size": z.llm_hidden,
            "intermediate_size": z.llm_ffn,
            "num_hidden_layers": z.llm_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "torch_dtype": "float32",
        })
    } else {
        json!({
            "architectures": ["OPTForCausalLM"],
            "model_type": "opt",
            "vocab_size": llm_vocab,
            "hidden_size": z.llm_hidden,
            "word_embed_proj_dim": z.llm_hidden,
            "ffn_dim": z.llm_ffn,
            "num_hidden_layers": z.llm_layers,
            "num_attention_heads": 4,
            "max_position_embeddings": 256,
            "do_layer_norm_before": true,
            "activation_function": "relu",
            "enable_bias": true,
            "layer_norm_elementwise_affine": true,
            "pad_token_id": 1,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "tie_word_embeddings": true,
            "torch_dtype": "float32",
        })
    };
    write_json(&llm_dir.join("config.json"), &llm_cfg)?;
    params.push((
        "llm",
        build_and_save(seed, &[], &llm_dir.join("model.safetensors"), |vb| {
            if z.llama {
                let cfg: crate::llm::LlamaConfig = serde_json::from_value(llm_cfg.clone())?;
                crate::llm::Llama::new(&cfg, vb)?;
            } else {
                let cfg: crate::llm::OptConfig = serde_json::from_value(llm_cfg.clone())?;
                crate::llm::Opt::new(&cfg, vb.pp("model"))?;
            }
            Ok(())
        })?,
    ));

    // Stage 2: [IMG] rows, Mapper_LLM, Mapper_LDM.
    let tok = LlmTokenizer::from_dir(&llm_dir, 8)?;
    let lm = CausalLm::load(&llm_dir, DType::F32, &Device::Cpu)?;
    let rows = crate::llm::ImgTokens::init(&lm, 8, tok.first_img_id(), seed)?;
    let stage2 = out.join("storygpt-v/stage2.safetensors");
    let mapper_llm = MapperLlmConfig {
        vision_dim: z.vision_hidden,
        num_tokens: 4,
        llm_dim: z.llm_hidden,
    };
    // The [IMG] rows come from `ImgTokens::init`: scaled to the frozen rows' mean norm, as
    // training keeps them.
    let img_rows = vec![(
        crate::llm::img_tokens::IMG_ROWS_NAME.to_owned(),
        rows.embeddings(DType::F32)?,
    )];
    params.push((
        "stage-2 mappers and [IMG] rows",
        build_and_save_with(seed, &[], &stage2, img_rows, |vb| {
            MapperLlm::new(mapper_llm, vb.pp("model.visual_embeddings"))?;
            MapperLdm::new(z.mapper, vb.pp("model.gen_text_hidden_fcs.0"))?;
            Ok(())
        })?,
    ));

    let manifest = Manifest::toy_layout(
        format!("{config}-random"),
        format!(
            "Randomly initialised `{config}` configuration (seed {seed}), UNTRAINED: it runs \
             the real pipeline end to end but draws noise-like frames. Written by \
             `storygpt-v bundle random --config {config}`."
        ),
        false,
        super::MapperLdmDims {
            d_model: z.mapper.d_model,
            heads: z.mapper.heads,
            encoder_layers: z.mapper.encoder_layers,
            decoder_layers: z.mapper.decoder_layers,
            ff_dim: z.mapper.ff_dim,
        },
        z.frame,
    );
    manifest.write(out)?;
    Ok(RandomReport { params })
}
