//! The stages `storygpt-v train STAGE` runs, and what they share: frames of a dataset split
//! held in memory, and the data fingerprint a resume is checked against.

pub mod char_ldm;
pub mod classifier;
pub mod clip;
pub mod lm;
pub mod stage2;
pub mod vae;
pub mod vae_decoder;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result};
use data::dataset::{CharacterInfo, DatasetKind, DatasetReader, Split};
use image::RgbImage;

/// Frames of one split of a FlintstonesSV-layout dataset, loaded once.
pub struct FrameSet {
    /// Frame ids, in load order.
    pub ids: Vec<String>,
    /// The images (all the same size).
    pub images: Vec<RgbImage>,
    /// Per frame, row-major `H * W`: true where any character is visible (all false when the
    /// dataset has no masks for the frame).
    pub character_pixels: Vec<Vec<bool>>,
}

/// FNV-1a, for data fingerprints (stable across Rust versions, unlike `DefaultHasher`).
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// FNV-1a's initial value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

impl FrameSet {
    /// Loads up to `max` distinct frames (frame `clip_frame` of each clip) of `split`'s stories,
    /// in story order. Fails with the dataset's own message on missing or corrupt files, and
    /// when the split has no frames.
    pub fn load(
        root: &Path,
        split: Split,
        story_len: usize,
        clip_frame: usize,
        max: usize,
    ) -> Result<Self> {
        let reader = DatasetReader::open(root, DatasetKind::Auto, story_len)
            .with_context(|| format!("opening dataset {}", root.display()))?;
        let stories = reader.story_ids(split);
        anyhow::ensure!(
            !stories.is_empty(),
            "dataset {}: the {} split has no stories",
            root.display(),
            split.key()
        );
        let mut seen = BTreeSet::new();
        let (mut ids, mut images, mut character_pixels) = (Vec::new(), Vec::new(), Vec::new());
        'stories: for id in stories {
            let story = reader
                .load_story(&id, clip_frame)
                .with_context(|| format!("dataset {}: loading story {id}", root.display()))?;
            for f in story.frames {
                if ids.len() >= max {
                    break 'stories;
                }
                if !seen.insert(f.id.clone()) {
                    continue;
                }
                let img = f
                    .image
                    .with_context(|| format!("frame {} has no image", f.id))?;
                if let Some(first) = images.first() {
                    let first: &RgbImage = first;
                    anyhow::ensure!(
                        first.dimensions() == img.dimensions(),
                        "frame {} is {:?}, others are {:?}",
                        f.id,
                        img.dimensions(),
                        first.dimensions()
                    );
                }
                let plane = (img.width() * img.height()) as usize;
                let mut union = vec![false; plane];
                for m in f.masks.iter().filter(|m| m.mask.len() == plane) {
                    for (u, &on) in union.iter_mut().zip(&m.mask) {
                        *u |= on;
                    }
                }
                character_pixels.push(union);
                ids.push(f.id);
                images.push(img);
            }
        }
        anyhow::ensure!(
            !images.is_empty(),
            "the {} split has no frames",
            split.key()
        );
        Ok(Self {
            ids,
            images,
            character_pixels,
        })
    }

    /// Number of frames.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// `(width, height)` of every frame.
    pub fn size(&self) -> (u32, u32) {
        self.images[0].dimensions()
    }

    /// A fingerprint of ids and pixels.
    pub fn fingerprint(&self) -> u64 {
        let mut h = FNV_OFFSET;
        for (id, img) in self.ids.iter().zip(&self.images) {
            h = fnv1a(id.bytes(), h);
            h = fnv1a(img.as_raw().iter().copied(), h);
        }
        h
    }

    /// Per-pixel loss weights of frames `indices`, `(N, 1, H, W)`: `character_weight` where a
    /// character is visible, 1 elsewhere.
    pub fn batch_pixel_weights(&self, indices: &[usize], character_weight: f32) -> Vec<f32> {
        indices
            .iter()
            .flat_map(|&i| {
                self.character_pixels[i]
                    .iter()
                    .map(move |&on| if on { character_weight } else { 1.0 })
            })
            .collect()
    }

    /// Frames `indices` as `(N, 3, H, W)` values in `[-1, 1]`, row-major.
    pub fn batch_pixels(&self, indices: &[usize]) -> Vec<f32> {
        let images: Vec<&RgbImage> = indices.iter().map(|&i| &self.images[i]).collect();
        pixels_of(&images)
    }
}

/// Images of one size as `(N, 3, H, W)` values in `[-1, 1]`, row-major.
pub fn pixels_of(images: &[&RgbImage]) -> Vec<f32> {
    let Some(first) = images.first() else {
        return Vec::new();
    };
    let plane = (first.width() * first.height()) as usize;
    let mut out = vec![0f32; images.len() * 3 * plane];
    for (bi, img) in images.iter().enumerate() {
        let base = bi * 3 * plane;
        for (p, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[base + c * plane + p] = px.0[c] as f32 / 127.5 - 1.0;
            }
        }
    }
    out
}

/// `(N, 3, H, W)` values in `[-1, 1]` back to images.
pub fn pixels_to_images(values: &[f32], n: usize, w: u32, h: u32) -> Vec<RgbImage> {
    let plane = (w * h) as usize;
    (0..n)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w, h, |x, y| {
                let p = (y * w + x) as usize;
                let v = |c: usize| {
                    ((values[base + c * plane + p].clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                };
                image::Rgb([v(0), v(1), v(2)])
            })
        })
        .collect()
}

/// Tiles images into a grid, `cols` per row, with a 2-pixel gap.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let (w, h) = images.first().map(|i| i.dimensions()).unwrap_or((1, 1));
    let cols = cols.max(1);
    let rows = images.len().div_ceil(cols).max(1);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (w + gap) + gap,
        rows as u32 * (h + gap) + gap,
        image::Rgb([255, 255, 255]),
    );
    for (i, img) in images.iter().enumerate() {
        let (x, y) = (
            (i % cols) as u32 * (w + gap) + gap,
            (i / cols) as u32 * (h + gap) + gap,
        );
        image::imageops::replace(&mut out, img, x as i64, y as i64);
    }
    out
}

/// A VarBuilder backend that creates trainable variables in a `VarMap` with seeded initial
/// values (each layer's PyTorch-like init hint, a ChaCha20 stream per tensor name), so two runs
/// with the same seed start from the same weights.
struct SeededVars {
    varmap: VarMap,
    seed: u64,
    /// Optional tensors (probed with `contains_tensor`) this network should have.
    optional: Vec<String>,
}

impl SimpleBackend for SeededVars {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self.varmap.data().lock().expect("varmap poisoned");
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("`{name}` requested with shapes {:?} and {s:?}", v.shape())
            }
            return Ok(v.as_tensor().clone());
        }
        let values = models::bundle::random::seeded_values(self.seed, name, &s, h);
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_owned(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}` requested without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.optional.iter().any(|o| o == name)
            || self
                .varmap
                .data()
                .lock()
                .map(|d| d.contains_key(name))
                .unwrap_or(false)
    }
}

/// A VarBuilder whose variables land in `varmap`, seeded by `seed`.
pub fn seeded_var_builder(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    seeded_var_builder_with(varmap, seed, dtype, device, &[])
}

/// [`seeded_var_builder`] that also creates the optional tensors `optional` (e.g. CLIP's
/// `visual_projection.weight`, which the model reads only when present).
pub fn seeded_var_builder_with(
    varmap: &VarMap,
    seed: u64,
    dtype: DType,
    device: &Device,
    optional: &[&str],
) -> VarBuilder<'static> {
    let backend = SeededVars {
        varmap: varmap.clone(),
        seed,
        optional: optional.iter().map(|s| s.to_string()).collect(),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// The variables of a VarMap sorted by name.
pub fn named_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().expect("varmap poisoned");
    let mut vars: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Reads the dataset's `characters.json` and the portraits it names (`stage` names who needs
/// them in the error).
pub fn load_cast(root: &Path, stage: &str) -> Result<Vec<(CharacterInfo, RgbImage)>> {
    let path = root.join("characters.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (the {stage} stage needs the cast's portraits)",
            path.display()
        )
    })?;
    let chars: Vec<CharacterInfo> =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    chars
        .into_iter()
        .map(|c| {
            let p = root.join(&c.portrait);
            let img = image::open(&p)
                .with_context(|| format!("reading portrait {}", p.display()))?
                .to_rgb8();
            Ok((c, img))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixel_weights_follow_the_character_masks() {
        let frames = FrameSet {
            ids: vec!["a".into(), "b".into()],
            images: vec![RgbImage::new(2, 1), RgbImage::new(2, 1)],
            character_pixels: vec![vec![true, false], vec![false, false]],
        };
        assert_eq!(
            frames.batch_pixel_weights(&[1, 0], 5.0),
            vec![1.0, 1.0, 5.0, 1.0]
        );
    }
}
