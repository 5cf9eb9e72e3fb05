//! CLIP similarity with the bundle's own CLIP: the text tower the UNet is conditioned with
//! (`sd/text_encoder`) and the vision tower the LLM reads frames with (`clip-vision`). The toy
//! bundle's two towers were trained together (stage `clip`: pooled text against projected
//! image), so their embeddings share one space; a real bundle's towers are CLIP ViT-L/14's,
//! whose text tower needs its `text_projection` for that (without it, or with a width
//! mismatch, text-image similarity is reported as missing, not made up).

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use models::bundle::Bundle;
use models::clip::{ClipImageProcessor, ClipTextModel, ClipTokenizer, ClipVisionModel};

/// The bundle's CLIP towers, loaded for scoring.
pub struct ClipScorer {
    tokenizer: ClipTokenizer,
    text: ClipTextModel,
    vision: ClipVisionModel,
    processor: ClipImageProcessor,
    device: Device,
}

impl ClipScorer {
    /// Loads the text tower, its tokenizer and the LLM's vision tower of the bundle in `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let bundle = Bundle::open(dir)?;
        let tokenizer = ClipTokenizer::from_dir(&bundle.tokenizer_dir()?)?;
        let text = ClipTextModel::load(&bundle.text_encoder_dir()?, DType::F32, device)?;
        let vdir = bundle.visual_encoder_dir();
        let vision = ClipVisionModel::load(&vdir, DType::F32, device)
            .with_context(|| format!("the bundle's CLIP vision tower {}", vdir.display()))?;
        let processor = models::pipeline::processor_for(&vdir, vision.config().image_size);
        Ok(Self {
            tokenizer,
            text,
            vision,
            processor,
            device: device.clone(),
        })
    }

    /// Text embeddings (projected when the tower has `text_projection`, else pooled).
    pub fn texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(64) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let ids = self.tokenizer.encode_batch(&refs, &self.device)?;
            let o = self.text.forward(&ids, None)?;
            let e = o.text_embeds.unwrap_or(o.pooler_output);
            out.extend(rows(&e)?);
        }
        Ok(out)
    }

    /// Image embeddings (projected when the tower has `visual_projection`, else pooled).
    pub fn images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(images.len());
        for chunk in images.chunks(64) {
            let px = self.processor.preprocess_batch(chunk, &self.device)?;
            let o = self.vision.forward(&px)?;
            let e = o.image_embeds.unwrap_or(o.pooler_output);
            out.extend(rows(&e)?);
        }
        Ok(out)
    }
}

fn rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
