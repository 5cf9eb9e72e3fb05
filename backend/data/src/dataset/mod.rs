//! Readers for FlintstonesSV / PororoSV in the layout the StoryGPT-V authors distribute, and
//! the writer the toy world uses for the same layout. See docs/DATA.md for every file:
//!
//! `split.json`, `following_cache{N-1}.pkl`, `cleaned_annotations.json`, `labels.pkl`,
//! `labels_bg.pkl`, `video_frames_sampled_4x/{id}.npy` (T,H,W,3 uint8) and
//! `seg_mask_4x_comb/{id}-frame{k}.npy` (H,W segment-id map), plus the toy world's
//! `characters.json` / `backgrounds.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

mod annotations;

use crate::error::{DataError, Result};
use crate::ndarray::NdArray;
use crate::npy::read_npy;
use crate::pickle::{read_pickle, Value};
use crate::referential::{make_referential, StoryFrame};
use crate::rules::{CharacterDef, Pronoun, RuleMode, RuleSet};
use crate::stats::{compute, StoryStats};
use annotations::{parse_annotation, pickle_map, read_json, Annotation};

/// Which character rules a dataset directory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetKind {
    /// FlintstonesSV (7 characters, labels).
    Flintstones,
    /// PororoSV (9 characters, text rules).
    Pororo,
    /// `characters.json` in the directory if present (toy world), else FlintstonesSV.
    Auto,
}

/// Train / validation / test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// Training stories.
    Train,
    /// Validation stories.
    Val,
    /// Test stories.
    Test,
}

impl Split {
    /// The key in `split.json`.
    pub fn key(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// A character entry of `characters.json` (toy world and other custom datasets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterInfo {
    /// Display name ("Mr Grey").
    pub name: String,
    /// Label key (lowercase).
    pub label: String,
    /// Pronoun family.
    pub pronoun: Pronoun,
    /// "male", "female" or "neutral".
    pub gender: String,
    /// What the character looks like.
    pub description: String,
    /// Canonical portrait, relative to the dataset root.
    pub portrait: String,
}

/// A character's pixels in one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct CharacterMask {
    /// Canonical character name.
    pub name: String,
    /// Row-major H*W, true where the character is visible.
    pub mask: Vec<bool>,
    /// [x1, y1, x2, y2] in frame pixels, end exclusive.
    pub bbox: [u32; 4],
}

/// One frame of a story.
#[derive(Debug, Clone)]
pub struct FrameRecord {
    /// Frame (clip) id, the dataset's globalID.
    pub id: String,
    /// Original caption.
    pub caption: String,
    /// Caption after the referential extension, in this story's context.
    pub referential: String,
    /// Canonical names of the characters in the frame.
    pub characters: Vec<String>,
    /// Multi-hot character labels in rule-set order.
    pub char_labels: Vec<f32>,
    /// Background / setting name, when known.
    pub background: Option<String>,
    /// Multi-hot background labels (`labels_bg.pkl`), empty when absent.
    pub bg_labels: Vec<f32>,
    /// The frame image (frame `k` of the clip), when images were requested.
    pub image: Option<RgbImage>,
    /// Per-character masks and boxes, when images were requested and masks exist.
    pub masks: Vec<CharacterMask>,
}

/// A story: a first frame and its followers.
#[derive(Debug, Clone)]
pub struct Story {
    /// Id of the first frame.
    pub id: String,
    /// The frames in order.
    pub frames: Vec<FrameRecord>,
}

/// A dataset directory opened for reading.
#[derive(Debug)]
pub struct DatasetReader {
    root: PathBuf,
    rules: RuleSet,
    story_len: usize,
    splits: HashMap<String, Vec<String>>,
    followings: HashMap<String, Vec<String>>,
    annotations: HashMap<String, Annotation>,
    labels: HashMap<String, Vec<f64>>,
    bg_labels: HashMap<String, Vec<f64>>,
    backgrounds: Option<Vec<String>>,
}

/// The rule set described by a `characters.json`.
pub fn rules_from_characters(chars: &[CharacterInfo]) -> RuleSet {
    let characters = chars
        .iter()
        .map(|c| CharacterDef {
            name: c.name.clone(),
            label: c.label.clone(),
            aliases: vec![c.name.clone()],
            pronoun: c.pronoun,
        })
        .collect();
    RuleSet {
        name: "toyworld".into(),
        characters,
        mode: RuleMode::Labels,
    }
}

impl DatasetReader {
    /// Open a dataset directory for stories of `story_len` frames (4 in the paper).
    pub fn open(root: &Path, kind: DatasetKind, story_len: usize) -> Result<DatasetReader> {
        let chars_file = root.join("characters.json");
        let rules = match kind {
            DatasetKind::Flintstones => RuleSet::flintstones(),
            DatasetKind::Pororo => RuleSet::pororo(),
            DatasetKind::Auto if chars_file.exists() => {
                let chars: Vec<CharacterInfo> = serde_json::from_value(read_json(&chars_file)?)?;
                rules_from_characters(&chars)
            }
            DatasetKind::Auto => RuleSet::flintstones(),
        };
        let split_path = ["split.json", "train-val-test_split.json"]
            .iter()
            .map(|f| root.join(f))
            .find(|p| p.exists())
            .ok_or_else(|| DataError::Invalid(format!("{}: no split.json", root.display())))?;
        let splits: HashMap<String, Vec<String>> = serde_json::from_value(read_json(&split_path)?)?;
        let followings = Self::read_followings(root, story_len)?;
        let mut annotations = HashMap::new();
        for file in [
            "flintstones_annotations_v1-0.json",
            "cleaned_annotations.json",
        ] {
            let path = root.join(file);
            if !path.exists() {
                continue;
            }
            let insert = |id: &str, v: &Json, annotations: &mut HashMap<String, Annotation>| {
                let new = parse_annotation(v);
                let entry = annotations.entry(id.to_string()).or_default();
                if !new.caption.is_empty() {
                    entry.caption = new.caption;
                }
                entry.characters = new.characters.or(entry.characters.take());
                entry.setting = new.setting.or(entry.setting.take());
                if !new.segments.is_empty() {
                    entry.segments = new.segments;
                }
            };
            match read_json(&path)? {
                Json::Array(records) => {
                    for r in &records {
                        if let Some(id) = r.get("globalID").and_then(Json::as_str) {
                            insert(id, r, &mut annotations);
                        }
                    }
                }
                Json::Object(map) => {
                    for (id, r) in &map {
                        insert(id, r, &mut annotations);
                    }
                }
                _ => {
                    return Err(DataError::Invalid(format!(
                        "{}: expected a list or an object",
                        path.display()
                    )))
                }
            }
        }
        let labels = match root.join("labels.pkl") {
            p if p.exists() => pickle_map(read_pickle(&p)?, Value::to_f64_vec)?,
            _ => HashMap::new(),
        };
        let bg_labels = match root.join("labels_bg.pkl") {
            p if p.exists() => pickle_map(read_pickle(&p)?, Value::to_f64_vec)?,
            _ => HashMap::new(),
        };
        let backgrounds = match root.join("backgrounds.json") {
            p if p.exists() => Some(serde_json::from_value(read_json(&p)?)?),
            _ => None,
        };
        Ok(DatasetReader {
            root: root.to_path_buf(),
            rules,
            story_len,
            splits,
            followings,
            annotations,
            labels,
            bg_labels,
            backgrounds,
        })
    }

    /// The shortest `following_cache{n}.pkl` with `n >= story_len - 1` (longer stories are
    /// cut to `story_len`), so one toy world of 50-frame stories serves every shorter length.
    fn read_followings(root: &Path, story_len: usize) -> Result<HashMap<String, Vec<String>>> {
        let need = story_len.saturating_sub(1);
        let mut caches: Vec<usize> = std::fs::read_dir(root)
            .map_err(|e| DataError::io(root, e))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                name.strip_prefix("following_cache")?
                    .strip_suffix(".pkl")?
                    .parse()
                    .ok()
            })
            .filter(|&n| n >= need)
            .collect();
        caches.sort_unstable();
        let Some(&n) = caches.first() else {
            return Err(DataError::Invalid(format!(
                "{}: no following_cache{need}.pkl (or longer): the dataset has no stories of {story_len} frames",
                root.display()
            )));
        };
        let path = root.join(format!("following_cache{n}.pkl"));
        let Value::Dict(items) = read_pickle(&path)? else {
            return Err(DataError::Invalid(format!(
                "{}: expected a dict",
                path.display()
            )));
        };
        let mut out = HashMap::with_capacity(items.len());
        for (k, v) in items {
            let key = k
                .as_str()
                .ok_or_else(|| DataError::Invalid("non-str frame id".into()))?
                .to_string();
            let mut ids = v.to_string_vec()?;
            if ids.len() >= need {
                ids.truncate(need);
                out.insert(key, ids);
            }
        }
        Ok(out)
    }

    /// The character rules of this dataset.
    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Background label names, when the dataset lists them (`backgrounds.json`).
    pub fn backgrounds(&self) -> Option<&[String]> {
        self.backgrounds.as_deref()
    }

    /// Ids of the first frames of the stories in a split (frames with enough followers).
    pub fn story_ids(&self, split: Split) -> Vec<String> {
        self.splits
            .get(split.key())
            .map(|ids| {
                ids.iter()
                    .filter(|id| self.followings.contains_key(*id))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn frame_characters(&self, id: &str, ann: &Annotation) -> Vec<String> {
        if let Some(chars) = &ann.characters {
            return chars.iter().map(|c| self.canonical(c)).collect();
        }
        if let Some(l) = self.labels.get(id) {
            return l
                .iter()
                .zip(&self.rules.characters)
                .filter(|(v, _)| **v > 0.5)
                .map(|(_, c)| c.name.clone())
                .collect();
        }
        ann.segments.iter().map(|s| self.canonical(&s.1)).collect()
    }

    fn canonical(&self, name: &str) -> String {
        self.rules
            .index_of(name)
            .map(|i| self.rules.characters[i].name.clone())
            .unwrap_or_else(|| name.trim().to_string())
    }

    /// Text, labels and referential captions of a story (no pixels).
    pub fn story_text(&self, id: &str) -> Result<Story> {
        let follow = self
            .followings
            .get(id)
            .ok_or_else(|| DataError::Invalid(format!("{id} starts no story")))?;
        let mut ids = vec![id.to_string()];
        ids.extend(follow.iter().cloned());
        let mut frames = Vec::with_capacity(ids.len());
        for fid in &ids {
            let ann = self.annotations.get(fid).cloned().unwrap_or_default();
            let characters = self.frame_characters(fid, &ann);
            let char_labels = match self.labels.get(fid) {
                Some(l) => l.iter().map(|&v| v as f32).collect(),
                None => self
                    .rules
                    .characters
                    .iter()
                    .map(|c| characters.contains(&c.name) as u8 as f32)
                    .collect(),
            };
            let bg_labels: Vec<f32> = self
                .bg_labels
                .get(fid)
                .map(|l| l.iter().map(|&v| v as f32).collect())
                .unwrap_or_default();
            let background = ann.setting.clone().or_else(|| {
                let names = self.backgrounds.as_ref()?;
                bg_labels
                    .iter()
                    .position(|&v| v > 0.5)
                    .and_then(|i| names.get(i).cloned())
            });
            frames.push(FrameRecord {
                id: fid.clone(),
                caption: ann.caption.clone(),
                referential: String::new(),
                characters,
                char_labels,
                background,
                bg_labels,
                image: None,
                masks: Vec::new(),
            });
        }
        let inputs: Vec<StoryFrame> = frames
            .iter()
            .map(|f| StoryFrame {
                caption: f.caption.clone(),
                characters: Some(f.characters.clone()),
            })
            .collect();
        for (f, r) in frames
            .iter_mut()
            .zip(make_referential(&self.rules, &inputs))
        {
            f.referential = r;
        }
        Ok(Story {
            id: id.to_string(),
            frames,
        })
    }

    /// A story with images (frame `k` of each clip, clamped) and character masks.
    pub fn load_story(&self, id: &str, k: usize) -> Result<Story> {
        let mut story = self.story_text(id)?;
        for f in &mut story.frames {
            let clip = read_npy(
                &self
                    .root
                    .join("video_frames_sampled_4x")
                    .join(format!("{}.npy", f.id)),
            )?;
            let (image, k) = clip_frame(&clip, k)?;
            let mask_path = self
                .root
                .join("seg_mask_4x_comb")
                .join(format!("{}-frame{k}.npy", f.id));
            if mask_path.exists() {
                let ann = self.annotations.get(&f.id).cloned().unwrap_or_default();
                f.masks = self.masks(
                    &read_npy(&mask_path)?,
                    &ann,
                    &f.characters,
                    image.width(),
                    image.height(),
                )?;
            }
            f.image = Some(image);
        }
        Ok(story)
    }

    fn masks(
        &self,
        arr: &NdArray,
        ann: &Annotation,
        chars: &[String],
        w: u32,
        h: u32,
    ) -> Result<Vec<CharacterMask>> {
        let values = arr.to_f64()?;
        let (wu, hu) = (w as usize, h as usize);
        let planes: Vec<(String, Vec<bool>, Option<[f64; 4]>)> = match arr.shape.as_slice() {
            [hh, ww] | [hh, ww, 1] if *hh == hu && *ww == wu => {
                let segs: Vec<(u32, String, Option<[f64; 4]>)> = if ann.segments.is_empty() {
                    chars
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (i as u32 + 1, c.clone(), None))
                        .collect()
                } else {
                    ann.segments.clone()
                };
                segs.into_iter()
                    .map(|(sid, name, bb)| {
                        (
                            self.canonical(&name),
                            values.iter().map(|&v| v.round() as u32 == sid).collect(),
                            bb,
                        )
                    })
                    .collect()
            }
            [n, hh, ww] if *hh == hu && *ww == wu => (0..*n)
                .map(|i| {
                    let seg = ann.segments.get(i);
                    let name = seg
                        .map(|s| s.1.clone())
                        .or_else(|| chars.get(i).cloned())
                        .unwrap_or_default();
                    let plane = values[i * hu * wu..(i + 1) * hu * wu]
                        .iter()
                        .map(|&v| v > 0.5)
                        .collect();
                    (self.canonical(&name), plane, seg.and_then(|s| s.2))
                })
                .collect(),
            s => {
                return Err(DataError::Invalid(format!(
                    "mask shape {s:?} does not fit a {h}x{w} frame"
                )))
            }
        };
        Ok(planes
            .into_iter()
            .map(|(name, mask, bb)| {
                let bbox = mask_bbox(&mask, wu).unwrap_or_else(|| match bb {
                    Some(b) => {
                        let (sx, sy) = (w as f64 / 128.0, h as f64 / 128.0);
                        [
                            (b[0] * sx) as u32,
                            (b[1] * sy) as u32,
                            (b[2] * sx) as u32,
                            (b[3] * sy) as u32,
                        ]
                    }
                    None => [0, 0, 0, 0],
                });
                CharacterMask { name, mask, bbox }
            })
            .collect())
    }

    /// Table-11 statistics of a split (all splits when `None`).
    pub fn stats(&self, name: &str, split: Option<Split>) -> Result<StoryStats> {
        let splits: Vec<Split> = split
            .map(|s| vec![s])
            .unwrap_or_else(|| vec![Split::Train, Split::Val, Split::Test]);
        let mut stories = Vec::new();
        for s in splits {
            for id in self.story_ids(s) {
                let st = self.story_text(&id)?;
                stories.push(
                    st.frames
                        .iter()
                        .map(|f| StoryFrame {
                            caption: f.caption.clone(),
                            characters: Some(f.characters.clone()),
                        })
                        .collect(),
                );
            }
        }
        let n_bg = self.backgrounds.as_ref().map(Vec::len).or_else(|| {
            let set: std::collections::HashSet<&String> = self
                .annotations
                .values()
                .filter_map(|a| a.setting.as_ref())
                .collect();
            (!set.is_empty()).then_some(set.len())
        });
        Ok(compute(name, &self.rules, &stories, n_bg))
    }

    /// Story length in frames.
    pub fn story_len(&self) -> usize {
        self.story_len
    }
}

/// Frame `k` (clamped) of a (T,H,W,3) or (H,W,3) uint8 clip.
fn clip_frame(clip: &NdArray, k: usize) -> Result<(RgbImage, usize)> {
    let (t, h, w) = match clip.shape.as_slice() {
        [t, h, w, 3] => (*t, *h, *w),
        [h, w, 3] => (1, *h, *w),
        s => {
            return Err(DataError::Invalid(format!(
                "clip shape {s:?} is not (T,H,W,3)"
            )))
        }
    };
    let k = k.min(t.saturating_sub(1));
    let n = h * w * 3;
    let px: Vec<u8> = match clip.as_u8() {
        Some(raw) => raw[k * n..(k + 1) * n].to_vec(),
        None => clip.to_f64()?[k * n..(k + 1) * n]
            .iter()
            .map(|&v| v.clamp(0.0, 255.0) as u8)
            .collect(),
    };
    let img = RgbImage::from_raw(w as u32, h as u32, px)
        .ok_or_else(|| DataError::Invalid("bad clip size".into()))?;
    Ok((img, k))
}

/// Tight [x1, y1, x2, y2] (end exclusive) of a row-major mask; `None` when empty.
pub fn mask_bbox(mask: &[bool], width: usize) -> Option<[u32; 4]> {
    let (mut x1, mut y1, mut x2, mut y2) = (usize::MAX, usize::MAX, 0, 0);
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = (i % width, i / width);
        x1 = x1.min(x);
        y1 = y1.min(y);
        x2 = x2.max(x + 1);
        y2 = y2.max(y + 1);
    }
    (x1 != usize::MAX).then_some([x1 as u32, y1 as u32, x2 as u32, y2 as u32])
}
