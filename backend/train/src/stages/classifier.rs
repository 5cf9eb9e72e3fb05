//! Stage `classifier`: the evaluation classifier ([`crate::classifier`]) trained on the
//! dataset's ground-truth frames with their character (multi-hot, binary cross-entropy) and
//! background (one class, cross-entropy) labels. Validation reports character exact-match
//! (Char-Acc), character micro F1, background accuracy and background macro F1 on held-out
//! frames. Writes `OUT/classifier/{config.json,model.safetensors}`, which `storygpt-v eval`
//! reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use data::dataset::{DatasetKind, DatasetReader, FrameRecord, Split};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::classifier::{
    bce_with_logits, cross_entropy, resize_to, Classifier, ClassifierConfig, ClassifierNet,
};
use crate::config::StageSection;
use crate::loader::BatchSource;
use crate::metrics;
use crate::trainer::{Stage, StepLoss};

/// `[classifier]`: the network's shape and how much data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierSection {
    /// Input size in pixels (frames are resized to it); 0: the dataset's frame size.
    pub image_size: usize,
    /// Channels of the stem and of each further level (each halves the grid).
    pub channels: Vec<usize>,
    /// Stride-1 convolutions after each level's stride-2 one.
    pub convs_per_level: usize,
    /// GroupNorm groups.
    pub norm_groups: usize,
    /// Training frames held in memory (distinct frames of the train split, in story order).
    pub train_frames: usize,
    /// Validation frames (distinct frames of the val split).
    pub val_frames: usize,
    /// Frames per story when reading the dataset.
    pub story_len: usize,
    /// Mirror half of the training frames left-right (labels do not change; generated
    /// frames put characters anywhere).
    pub flip: bool,
}

impl Default for ClassifierSection {
    fn default() -> Self {
        Self {
            image_size: 0,
            channels: vec![32, 64, 64],
            convs_per_level: 1,
            norm_groups: 8,
            train_frames: 8000,
            val_frames: 512,
            story_len: 4,
            flip: true,
        }
    }
}

impl StageSection for ClassifierSection {
    const NAME: &'static str = "classifier";
}

/// The ground truth of one frame in a classifier's label space.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameLabels {
    /// Multi-hot characters, in the classifier's character order.
    pub characters: Vec<bool>,
    /// The background index, when the frame has a known one.
    pub background: Option<usize>,
}

/// The label space of a dataset: character names in rule-set order (the order of
/// `labels.pkl`) and background names (`backgrounds.json`; else the settings named in the
/// given frames' annotations, sorted; else `bgK` for `labels_bg.pkl` columns).
pub fn label_space(reader: &DatasetReader, frames: &[FrameRecord]) -> (Vec<String>, Vec<String>) {
    let characters = reader
        .rules()
        .characters
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let backgrounds = match reader.backgrounds() {
        Some(names) => names.to_vec(),
        None => {
            let named: BTreeSet<String> =
                frames.iter().filter_map(|f| f.background.clone()).collect();
            if named.is_empty() {
                let k = frames.iter().map(|f| f.bg_labels.len()).max().unwrap_or(0);
                (0..k).map(|i| format!("bg{i}")).collect()
            } else {
                named.into_iter().collect()
            }
        }
    };
    (characters, backgrounds)
}

/// A frame's labels in the space `(characters, backgrounds)`: characters by name (the
/// dataset's canonical names), the background by name, else by its `labels_bg.pkl` column.
pub fn frame_labels(f: &FrameRecord, characters: &[String], backgrounds: &[String]) -> FrameLabels {
    let by_name = characters
        .iter()
        .map(|c| f.characters.iter().any(|x| x == c))
        .collect();
    let background = f
        .background
        .as_ref()
        .and_then(|b| backgrounds.iter().position(|x| x == b))
        .or_else(|| {
            (f.bg_labels.len() == backgrounds.len())
                .then(|| f.bg_labels.iter().position(|&v| v > 0.5))
                .flatten()
        });
    FrameLabels {
        characters: by_name,
        background,
    }
}

/// Distinct frames of a split with their labels, resized to the network's input.
pub struct LabelledFrames {
    /// Frame ids.
    pub ids: Vec<String>,
    /// Images at the network's input size.
    pub images: Vec<RgbImage>,
    /// Their labels.
    pub labels: Vec<FrameLabels>,
}

impl LabelledFrames {
    /// Loads up to `max` distinct frames (frame 0 of each clip) of `split`'s stories; `size`
    /// 0 keeps the frames' own size (which must then be the same for all).
    pub fn load(
        reader: &DatasetReader,
        split: Split,
        max: usize,
        size: u32,
        space: (&[String], &[String]),
    ) -> Result<Self> {
        let stories = reader.story_ids(split);
        anyhow::ensure!(
            !stories.is_empty(),
            "the {} split has no stories",
            split.key()
        );
        let mut seen = BTreeSet::new();
        let mut out = Self {
            ids: Vec::new(),
            images: Vec::new(),
            labels: Vec::new(),
        };
        'stories: for id in stories {
            let story = reader
                .load_story(&id, 0)
                .with_context(|| format!("loading story {id}"))?;
            for f in story.frames {
                if out.ids.len() >= max {
                    break 'stories;
                }
                if !seen.insert(f.id.clone()) {
                    continue;
                }
                let img = f
                    .image
                    .as_ref()
                    .with_context(|| format!("frame {} has no image", f.id))?;
                let img = if size == 0 {
                    img.clone()
                } else {
                    resize_to(img, size)
                };
                if let Some(first) = out.images.first() {
                    anyhow::ensure!(
                        first.dimensions() == img.dimensions(),
                        "frame {} is {:?}, others are {:?} (set [classifier] image_size)",
                        f.id,
                        img.dimensions(),
                        first.dimensions()
                    );
                }
                out.labels.push(frame_labels(&f, space.0, space.1));
                out.images.push(img);
                out.ids.push(f.id);
            }
        }
        anyhow::ensure!(
            !out.ids.is_empty(),
            "the {} split has no frames",
            split.key()
        );
        Ok(out)
    }

    /// A fingerprint of ids, pixels and labels.
    pub fn fingerprint(&self) -> u64 {
        let mut h = super::FNV_OFFSET;
        for ((id, img), l) in self.ids.iter().zip(&self.images).zip(&self.labels) {
            h = super::fnv1a(id.bytes(), h);
            h = super::fnv1a(img.as_raw().iter().copied(), h);
            h = super::fnv1a(l.characters.iter().map(|&b| b as u8), h);
            h = super::fnv1a(l.background.map_or(u64::MAX, |b| b as u64).to_le_bytes(), h);
        }
        h
    }
}

/// One batch: pixels, multi-hot targets and the rows that have a background label.
pub struct ClassifierBatch {
    pixels: Vec<f32>,
    chars: Vec<f32>,
    bg_rows: Vec<u32>,
    bg_targets: Vec<u32>,
    n: usize,
}

/// The training frames.
pub struct ClassifierSource {
    frames: LabelledFrames,
    flip: bool,
}

impl BatchSource for ClassifierSource {
    type Batch = ClassifierBatch;
    fn len(&self) -> usize {
        self.frames.ids.len()
    }
    fn batch(&self, indices: &[usize], rng: &mut ChaCha8Rng) -> Result<ClassifierBatch> {
        let images: Vec<RgbImage> = indices
            .iter()
            .map(|&i| {
                let img = &self.frames.images[i];
                if self.flip && rng.gen::<bool>() {
                    image::imageops::flip_horizontal(img)
                } else {
                    img.clone()
                }
            })
            .collect();
        let refs: Vec<&RgbImage> = images.iter().collect();
        let (mut chars, mut bg_rows, mut bg_targets) = (Vec::new(), Vec::new(), Vec::new());
        for (row, &i) in indices.iter().enumerate() {
            let l = &self.frames.labels[i];
            chars.extend(l.characters.iter().map(|&b| b as u8 as f32));
            if let Some(b) = l.background {
                bg_rows.push(row as u32);
                bg_targets.push(b as u32);
            }
        }
        Ok(ClassifierBatch {
            pixels: super::pixels_of(&refs),
            chars,
            bg_rows,
            bg_targets,
            n: indices.len(),
        })
    }
}

/// The trainable network and its validation frames.
pub struct ClassifierStage {
    varmap: VarMap,
    net: ClassifierNet,
    device: Device,
    val: LabelledFrames,
    out: PathBuf,
}

/// Loads the data and builds the stage: `(stage, training source, data fingerprint)`; `out`
/// is the `--out` directory (the network goes to `out/classifier`).
pub fn prepare(
    section: &ClassifierSection,
    data: &Path,
    out: &Path,
    seed: u64,
    device: &Device,
) -> Result<(ClassifierStage, Arc<ClassifierSource>, String)> {
    let reader = DatasetReader::open(data, DatasetKind::Auto, section.story_len)
        .with_context(|| format!("opening dataset {}", data.display()))?;
    // The background names come from the training stories' annotations when the dataset has
    // no backgrounds.json (FlintstonesSV's settings).
    let text: Vec<FrameRecord> = reader
        .story_ids(Split::Train)
        .iter()
        .map(|id| reader.story_text(id).map(|s| s.frames))
        .collect::<data::Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let (characters, backgrounds) = label_space(&reader, &text);
    let size = section.image_size as u32;
    let space = (characters.as_slice(), backgrounds.as_slice());
    let train = LabelledFrames::load(&reader, Split::Train, section.train_frames, size, space)?;
    let val = LabelledFrames::load(&reader, Split::Val, section.val_frames, size, space)?;
    let (w, h) = train.images[0].dimensions();
    anyhow::ensure!(w == h, "frames must be square, got {w}x{h}");
    anyhow::ensure!(
        val.images[0].dimensions() == (w, h),
        "validation frames are {:?}, training frames {:?}",
        val.images[0].dimensions(),
        (w, h)
    );
    let config = ClassifierConfig {
        image_size: w as usize,
        channels: section.channels.clone(),
        convs_per_level: section.convs_per_level,
        norm_groups: section.norm_groups,
        characters,
        backgrounds,
    };
    let varmap = VarMap::new();
    let vb = super::seeded_var_builder(&varmap, seed, DType::F32, device);
    let net = ClassifierNet::new(vb, &config).context("[classifier] describes no network")?;
    let fingerprint = format!("{:016x}-{:016x}", train.fingerprint(), val.fingerprint());
    let source = Arc::new(ClassifierSource {
        frames: train,
        flip: section.flip,
    });
    let stage = ClassifierStage {
        varmap,
        net,
        device: device.clone(),
        val,
        out: out.join("classifier"),
    };
    Ok((stage, source, fingerprint))
}

/// Character exact-match, character micro F1, background accuracy and background macro F1 of
/// a classifier on labelled frames.
pub fn score(classifier: &Classifier, frames: &LabelledFrames) -> Result<BTreeMap<String, f64>> {
    let preds = classifier.classify(&frames.images)?;
    let pred_chars: Vec<Vec<bool>> = preds.iter().map(|p| p.characters()).collect();
    let truth_chars: Vec<Vec<bool>> = frames.labels.iter().map(|l| l.characters.clone()).collect();
    let mut m = BTreeMap::from([
        (
            "char_exact".to_owned(),
            metrics::exact_match(&pred_chars, &truth_chars),
        ),
        (
            "char_f1".to_owned(),
            metrics::micro_f1(&pred_chars, &truth_chars),
        ),
    ]);
    let k = classifier.config().backgrounds.len();
    let (bp, bt): (Vec<Option<usize>>, Vec<usize>) = preds
        .iter()
        .zip(&frames.labels)
        .filter_map(|(p, l)| Some((p.background(), l.background?)))
        .unzip();
    if k > 0 && !bt.is_empty() {
        let hits = bp.iter().zip(&bt).filter(|(p, t)| **p == Some(**t)).count();
        m.insert("bg_acc".into(), hits as f64 / bt.len() as f64);
        m.insert("bg_f1".into(), metrics::macro_f1(&bp, &bt, k));
    }
    Ok(m)
}

impl ClassifierStage {
    /// Writes `config.json` and `model.safetensors` into `OUT/classifier`.
    pub fn export(&self) -> Result<PathBuf> {
        let dir = &self.out;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(self.net.config())?,
        )?;
        self.varmap
            .save(dir.join("model.safetensors"))
            .with_context(|| format!("writing the classifier weights into {}", dir.display()))?;
        Ok(dir.clone())
    }

    /// Validation frames.
    pub fn val_count(&self) -> usize {
        self.val.ids.len()
    }

    fn loss_of(&self, b: &ClassifierBatch) -> Result<(Tensor, f64, f64)> {
        let s = self.net.config().image_size;
        let x = Tensor::from_vec(b.pixels.clone(), (b.n, 3, s, s), &Device::Cpu)?
            .to_device(&self.device)?;
        let k = self.net.config().characters.len();
        let y =
            Tensor::from_vec(b.chars.clone(), (b.n, k), &Device::Cpu)?.to_device(&self.device)?;
        let o = self.net.forward(&x)?;
        let char_loss = bce_with_logits(&o.char_logits, &y)?;
        let c = char_loss.to_scalar::<f32>()? as f64;
        match (&o.bg_logits, b.bg_rows.is_empty()) {
            (Some(logits), false) => {
                let rows = Tensor::new(b.bg_rows.as_slice(), &self.device)?;
                let t = Tensor::new(b.bg_targets.as_slice(), &self.device)?;
                let bg_loss = cross_entropy(&logits.index_select(&rows, 0)?, &t)?;
                let g = bg_loss.to_scalar::<f32>()? as f64;
                Ok(((char_loss + bg_loss)?, c, g))
            }
            _ => Ok((char_loss, c, 0.0)),
        }
    }
}

impl Stage for ClassifierStage {
    type Batch = ClassifierBatch;

    fn name(&self) -> &'static str {
        "classifier"
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        super::named_vars(&self.varmap)
    }

    fn no_weight_decay(&self, name: &str) -> bool {
        name.ends_with(".bias") || name.contains("norm")
    }

    fn loss(&mut self, b: &ClassifierBatch, _step: u64) -> Result<StepLoss> {
        let (loss, c, g) = self.loss_of(b)?;
        Ok(StepLoss {
            loss,
            parts: vec![("char_bce", c), ("bg_ce", g)],
        })
    }

    fn validate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        let c = Classifier::from_net(self.net.clone(), &self.device);
        score(&c, &self.val)
    }
}
