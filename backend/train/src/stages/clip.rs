//! Stage `clip`: the toy CLIP text and vision towers trained contrastively (caption <-> frame
//! and name <-> portrait, symmetric InfoNCE with a learned temperature), so that text features
//! and portrait embeddings carry meaning for the FuseModule and Mapper_LLM. A real bundle keeps
//! CLIP ViT-L/14 and skips this stage.
//!
//! Writes `OUT/sd/tokenizer` (a CLIP BPE vocabulary learned from the training captions),
//! `OUT/sd/text_encoder` and `OUT/clip-vision` in the transformers layout the bundle reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarMap;
use data::dataset::{DatasetKind, DatasetReader, Split};
use image::RgbImage;
use models::clip::{
    ClipConfigs, ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel,
};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::trainer::{Stage, StepLoss};

/// `[clip]`: tower shapes, vocabulary and data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClipSection {
    /// Text tower width (also the shared embedding width and the UNet's context width).
    pub text_hidden: usize,
    /// Text tower layers.
    pub text_layers: usize,
    /// Vision tower width.
    pub vision_hidden: usize,
    /// Vision tower layers.
    pub vision_layers: usize,
    /// Vision patch size (the image size is the dataset's frame size).
    pub patch_size: usize,
    /// Attention heads of both towers.
    pub heads: usize,
    /// BPE merges learned from the training captions.
    pub bpe_merges: usize,
    /// Training frames (distinct frames of the train split, with their captions).
    pub train_frames: usize,
    /// Validation frames for caption -> frame retrieval.
    pub val_frames: usize,
    /// Weight of the name <-> portrait loss (all cast portraits, every step).
    pub portrait_weight: f64,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
}

impl Default for ClipSection {
    fn default() -> Self {
        Self {
            text_hidden: 128,
            text_layers: 4,
            vision_hidden: 128,
            vision_layers: 4,
            patch_size: 8,
            heads: 4,
            bpe_merges: 600,
            train_frames: 8000,
            val_frames: 256,
            portrait_weight: 1.0,
            story_len: 4,
        }
    }
}

impl StageSection for ClipSection {
    const NAME: &'static str = "clip";
}

/// Frames and their captions.
struct Captioned {
    captions: Vec<String>,
    images: Vec<RgbImage>,
}

fn load_captioned(reader: &DatasetReader, split: Split, max: usize) -> Result<Captioned> {
    let ids = reader.story_ids(split);
    anyhow::ensure!(!ids.is_empty(), "the {} split has no stories", split.key());
    let mut seen = BTreeSet::new();
    let (mut captions, mut images) = (Vec::new(), Vec::new());
    'outer: for id in ids {
        let story = reader
            .load_story(&id, 0)
            .with_context(|| format!("loading story {id}"))?;
        for f in story.frames {
            if captions.len() >= max {
                break 'outer;
            }
            if seen.insert(f.id.clone()) {
                images.push(
                    f.image
                        .with_context(|| format!("frame {} has no image", f.id))?,
                );
                captions.push(f.caption);
            }
        }
    }
    Ok(Captioned { captions, images })
}

/// One batch: CLIP-normalised frames and their caption ids (CPU tensors).
pub struct ClipBatch {
    pixels: Tensor,
    ids: Tensor,
}

/// Training frames, captions and the preprocessing.
pub struct ClipSource {
    data: Captioned,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
}

impl BatchSource for ClipSource {
    type Batch = ClipBatch;
    fn len(&self) -> usize {
        self.data.images.len()
    }
    fn batch(&self, indices: &[usize], _rng: &mut ChaCha8Rng) -> Result<ClipBatch> {
        let imgs: Vec<RgbImage> = indices
            .iter()
            .map(|&i| self.data.images[i].clone())
            .collect();
        let texts: Vec<&str> = indices
            .iter()
            .map(|&i| self.data.captions[i].as_str())
            .collect();
        Ok(ClipBatch {
            pixels: self.processor.preprocess_batch(&imgs, &Device::Cpu)?,
            ids: self.tokenizer.encode_batch(&texts, &Device::Cpu)?,
        })
    }
}

/// The two towers, the temperature and the validation data.
pub struct ClipStage {
    text_vars: VarMap,
    vision_vars: VarMap,
    scale_vars: VarMap,
    text: ClipTextModel,
    vision: ClipVisionModel,
    logit_scale: Tensor,
    device: Device,
    section: ClipSection,
    val: Captioned,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    portraits: Tensor,
    names: Tensor,
    cast: Vec<String>,
    text_cfg: serde_json::Value,
    vision_cfg: serde_json::Value,
    out: PathBuf,
}

/// Learns the vocabulary into `OUT/sd/tokenizer`, loads the data and builds both towers.
pub fn prepare(
    section: &ClipSection,
    data: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<(ClipStage, Arc<ClipSource>, String)> {
    let reader = DatasetReader::open(data, DatasetKind::Auto, section.story_len)
        .with_context(|| format!("opening dataset {}", data.display()))?;
    let train = load_captioned(&reader, Split::Train, section.train_frames)?;
    let val = load_captioned(&reader, Split::Val, section.val_frames)?;
    let cast = super::load_cast(data, "clip")?;
    anyhow::ensure!(
        cast.len() >= 2,
        "the clip stage needs at least two characters with portraits"
    );
    let size = train.images[0].width() as usize;
    anyhow::ensure!(
        size.is_multiple_of(section.patch_size),
        "{size}-pixel frames do not divide into {}-pixel patches",
        section.patch_size
    );

    let mut corpus: Vec<String> = train.captions.clone();
    corpus.extend(cast.iter().map(|(c, _)| c.name.clone()));
    let tok_dir = out.join("sd/tokenizer");
    let vocab = models::bundle::bpe::write_clip_tokenizer(&tok_dir, &corpus, section.bpe_merges)?;
    let tokenizer = ClipTokenizer::from_dir(&tok_dir)?;

    let text_cfg = json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": section.text_hidden,
        "intermediate_size": 4 * section.text_hidden,
        "projection_dim": section.text_hidden,
        "num_hidden_layers": section.text_layers,
        "num_attention_heads": section.heads,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": tokenizer.bos_id(),
        "eos_token_id": tokenizer.eos_id(),
        "pad_token_id": tokenizer.pad_id(),
    });
    let vision_cfg = json!({
        "architectures": ["CLIPVisionModelWithProjection"],
        "model_type": "clip_vision_model",
        "hidden_size": section.vision_hidden,
        "intermediate_size": 4 * section.vision_hidden,
        "projection_dim": section.text_hidden,
        "num_hidden_layers": section.vision_layers,
        "num_attention_heads": section.heads,
        "num_channels": 3,
        "image_size": size,
        "patch_size": section.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    });
    let text_c = ClipConfigs::from_json(&text_cfg)?
        .text
        .context("text config")?;
    let vision_c = ClipConfigs::from_json(&vision_cfg)?
        .vision
        .context("vision config")?;
    let (text_vars, vision_vars, scale_vars) = (VarMap::new(), VarMap::new(), VarMap::new());
    let text = ClipTextModel::new(
        super::seeded_var_builder(&text_vars, seed, DType::F32, device),
        &text_c,
    )?;
    let vision = ClipVisionModel::new(
        super::seeded_var_builder_with(
            &vision_vars,
            seed ^ 1,
            DType::F32,
            device,
            &["visual_projection.weight"],
        ),
        &vision_c,
    )?;
    // CLIP's initial temperature: logits scaled by 1 / 0.07.
    let logit_scale = scale_vars.get(
        (),
        "logit_scale",
        candle_nn::Init::Const((1.0f64 / 0.07).ln()),
        DType::F32,
        device,
    )?;
    let processor = ClipImageProcessor::for_image_size(size as u32);
    let portraits: Vec<RgbImage> = cast.iter().map(|(_, p)| p.clone()).collect();
    let names: Vec<String> = cast.iter().map(|(c, _)| c.name.clone()).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut fp = super::FNV_OFFSET;
    for (c, img) in train.captions.iter().zip(&train.images) {
        fp = super::fnv1a(c.bytes(), fp);
        fp = super::fnv1a(img.as_raw().iter().copied(), fp);
    }
    let stage = ClipStage {
        portraits: processor.preprocess_batch(&portraits, device)?,
        names: tokenizer.encode_batch(&name_refs, device)?,
        text_vars,
        vision_vars,
        scale_vars,
        text,
        vision,
        logit_scale,
        device: device.clone(),
        section: section.clone(),
        val,
        tokenizer: ClipTokenizer::from_dir(&tok_dir)?,
        processor: processor.clone(),
        cast: names,
        text_cfg,
        vision_cfg,
        out: out.to_path_buf(),
    };
    let source = Arc::new(ClipSource {
        data: train,
        tokenizer,
        processor,
    });
    Ok((stage, source, format!("{fp:016x}")))
}

fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Symmetric InfoNCE of matching rows.
fn info_nce(a: &Tensor, b: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let n = a.dim(0)?;
    let logits = a
        .matmul(&b.t()?)?
        .broadcast_mul(&scale.exp()?.clamp(1f32, 100f32)?)?;
    let labels = Tensor::arange(0u32, n as u32, a.device())?.unsqueeze(1)?;
    let ce = |l: &Tensor| -> Result<Tensor> {
        let lp = nn::log_softmax_last_dim(l)?;
        Ok(lp.gather(&labels, D::Minus1)?.mean_all()?.neg()?)
    };
    Ok(((ce(&logits)? + ce(&logits.t()?.contiguous()?)?)? * 0.5)?)
}

impl ClipStage {
    fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        normalize(&self.text.pooled(ids)?)
    }

    fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let out = self.vision.forward(pixels)?;
        normalize(
            out.image_embeds
                .as_ref()
                .context("the vision tower has no projection")?,
        )
    }

    /// Caption -> frame recall@1 and @5 over the validation frames, and portrait -> name
    /// accuracy over the cast.
    pub fn evaluate(&self) -> Result<(f64, f64, f64)> {
        let (mut t, mut v) = (Vec::new(), Vec::new());
        for chunk in (0..self.val.images.len()).collect::<Vec<_>>().chunks(64) {
            let texts: Vec<&str> = chunk
                .iter()
                .map(|&i| self.val.captions[i].as_str())
                .collect();
            let imgs: Vec<RgbImage> = chunk.iter().map(|&i| self.val.images[i].clone()).collect();
            t.push(
                self.text_features(&self.tokenizer.encode_batch(&texts, &self.device)?)?
                    .detach(),
            );
            v.push(
                self.image_features(&self.processor.preprocess_batch(&imgs, &self.device)?)?
                    .detach(),
            );
        }
        let sims = Tensor::cat(&t, 0)?
            .matmul(&Tensor::cat(&v, 0)?.t()?)?
            .to_vec2::<f32>()?;
        let (mut r1, mut r5) = (0usize, 0usize);
        for (i, row) in sims.iter().enumerate() {
            let better = row.iter().filter(|&&s| s > row[i]).count();
            r1 += usize::from(better == 0);
            r5 += usize::from(better < 5);
        }
        let n = sims.len().max(1) as f64;
        let p = self
            .image_features(&self.portraits)?
            .matmul(&self.text_features(&self.names)?.t()?)?
            .to_vec2::<f32>()?;
        let right = p
            .iter()
            .enumerate()
            .filter(|(i, row)| row.iter().enumerate().all(|(j, &s)| j == *i || s < row[*i]))
            .count();
        Ok((r1 as f64 / n, r5 as f64 / n, right as f64 / p.len() as f64))
    }

    /// The cast's names, in portrait order.
    pub fn cast(&self) -> &[String] {
        &self.cast
    }

    /// Writes both towers (and the preprocessor config) into the bundle layout.
    pub fn export(&self) -> Result<()> {
        let text_dir = self.out.join("sd/text_encoder");
        std::fs::create_dir_all(&text_dir)?;
        std::fs::write(
            text_dir.join("config.json"),
            serde_json::to_string_pretty(&self.text_cfg)?,
        )?;
        self.text_vars.save(text_dir.join("model.safetensors"))?;
        let vision_dir = self.out.join("clip-vision");
        std::fs::create_dir_all(&vision_dir)?;
        std::fs::write(
            vision_dir.join("config.json"),
            serde_json::to_string_pretty(&self.vision_cfg)?,
        )?;
        let size = self.vision_cfg["image_size"].clone();
        std::fs::write(
            vision_dir.join("preprocessor_config.json"),
            serde_json::to_string_pretty(&json!({
                "crop_size": size, "do_center_crop": true, "do_normalize": true,
                "do_resize": true, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
                "size": {"shortest_edge": size},
            }))?,
        )?;
        self.vision_vars
            .save(vision_dir.join("model.safetensors"))?;
        Ok(())
    }
}

impl Stage for ClipStage {
    type Batch = ClipBatch;

    fn name(&self) -> &'static str {
        "clip"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = super::named_vars(&self.text_vars)
            .into_iter()
            .map(|(k, x)| (format!("text.{k}"), x))
            .collect();
        v.extend(
            super::named_vars(&self.vision_vars)
                .into_iter()
                .map(|(k, x)| (format!("vision.{k}"), x)),
        );
        v.extend(super::named_vars(&self.scale_vars));
        v
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias")
            || name.contains("layer_norm")
            || name.contains("layrnorm")
            || name.contains("embedding")
            || name == "logit_scale"
    }

    fn loss(&mut self, b: &ClipBatch, _step: u64) -> Result<StepLoss> {
        let t = self.text_features(&b.ids.to_device(&self.device)?)?;
        let v = self.image_features(&b.pixels.to_device(&self.device)?)?;
        let frames = info_nce(&v, &t, &self.logit_scale)?;
        let portraits = info_nce(
            &self.image_features(&self.portraits)?,
            &self.text_features(&self.names)?,
            &self.logit_scale,
        )?;
        let loss = (&frames + (&portraits * self.section.portrait_weight)?)?;
        Ok(StepLoss {
            parts: vec![
                ("caption_frame", frames.to_scalar::<f32>()? as f64),
                ("name_portrait", portraits.to_scalar::<f32>()? as f64),
            ],
            loss,
        })
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        let (r1, r5, p) = self.evaluate()?;
        Ok(BTreeMap::from([
            ("caption_to_frame_r1".to_owned(), r1),
            ("caption_to_frame_r5".to_owned(), r5),
            ("portrait_to_name".to_owned(), p),
        ]))
    }
}
