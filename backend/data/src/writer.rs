//! Writes a dataset in the StoryGPT-V authors' FlintstonesSV layout (the toy world uses it,
//! so one reader serves both). File formats are described in docs/DATA.md.

use std::path::{Path, PathBuf};

use image::RgbImage;
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

use crate::dataset::CharacterInfo;
use crate::error::{DataError, Result};
use crate::ndarray::NdArray;
use crate::npy::write_npy;
use crate::pickle::{write_pickle, Value};

/// One character segment of a frame, as stored in `cleaned_annotations.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SegmentOut {
    /// Value of the character's pixels in the segment-id mask.
    pub id: u32,
    /// Canonical character name.
    pub name: String,
    /// Lowercase name (the authors' `word` field).
    pub word: String,
    /// [x1, y1, x2, y2], end exclusive, in 128x128 reference pixels (FlintstonesSV's size).
    pub bbox: [u32; 4],
}

/// One frame's annotation.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameAnnotation {
    /// Frame id (globalID).
    pub id: String,
    /// Original caption.
    pub caption: String,
    /// Referential caption within its story (informational; readers recompute it).
    pub referential: Option<String>,
    /// Canonical names of the characters shown.
    pub characters: Vec<String>,
    /// Background name.
    pub setting: String,
    /// Character segments.
    pub segments: Vec<SegmentOut>,
}

/// Everything besides pixels: splits, stories, annotations and label vocabularies.
#[derive(Debug, Clone, Default)]
pub struct LayoutIndex {
    /// All frame ids of the training stories.
    pub train: Vec<String>,
    /// All frame ids of the validation stories.
    pub val: Vec<String>,
    /// All frame ids of the test stories.
    pub test: Vec<String>,
    /// Each story as its frame ids in order.
    pub stories: Vec<Vec<String>>,
    /// Frame annotations.
    pub annotations: Vec<FrameAnnotation>,
    /// Character label keys in `labels.pkl` order.
    pub label_names: Vec<String>,
    /// Background names in `labels_bg.pkl` order.
    pub background_names: Vec<String>,
    /// Character descriptions for `characters.json`.
    pub characters: Vec<CharacterInfo>,
}

/// Writer for a dataset directory.
#[derive(Debug, Clone)]
pub struct LayoutWriter {
    root: PathBuf,
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| DataError::io(p, e))
}

impl LayoutWriter {
    /// Create the directory tree.
    pub fn create(root: &Path) -> Result<LayoutWriter> {
        for sub in [
            "",
            "video_frames_sampled_4x",
            "seg_mask_4x_comb",
            "portraits",
        ] {
            mkdir(&root.join(sub))?;
        }
        Ok(LayoutWriter {
            root: root.to_path_buf(),
        })
    }

    /// The dataset root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Write `video_frames_sampled_4x/{id}.npy`: uint8 (T, H, W, 3).
    pub fn write_clip(&self, id: &str, frames: &[&RgbImage]) -> Result<()> {
        let (w, h) = frames.first().map(|f| f.dimensions()).unwrap_or((0, 0));
        let mut data = Vec::with_capacity(frames.len() * (w * h * 3) as usize);
        for f in frames {
            if f.dimensions() != (w, h) {
                return Err(DataError::Invalid("clip frames differ in size".into()));
            }
            data.extend_from_slice(f.as_raw());
        }
        let arr = NdArray::from_u8(vec![frames.len(), h as usize, w as usize, 3], data);
        write_npy(
            &self
                .root
                .join("video_frames_sampled_4x")
                .join(format!("{id}.npy")),
            &arr,
        )
    }

    /// Write `seg_mask_4x_comb/{id}-frame{k}.npy`: uint8 (H, W) segment-id map, 0 = none.
    pub fn write_mask(
        &self,
        id: &str,
        k: usize,
        width: u32,
        height: u32,
        seg: Vec<u8>,
    ) -> Result<()> {
        let arr = NdArray::from_u8(vec![height as usize, width as usize], seg);
        write_npy(
            &self
                .root
                .join("seg_mask_4x_comb")
                .join(format!("{id}-frame{k}.npy")),
            &arr,
        )
    }

    /// Write a PNG relative to the root.
    pub fn write_png(&self, rel: &str, img: &RgbImage) -> Result<()> {
        let path = self.root.join(rel);
        img.save(&path)
            .map_err(|e| DataError::Invalid(format!("{}: {e}", path.display())))
    }

    fn json(&self, name: &str, v: &Json) -> Result<()> {
        let path = self.root.join(name);
        std::fs::write(&path, serde_json::to_vec(v)?).map_err(|e| DataError::io(&path, e))
    }

    /// Write split.json, following_cache*.pkl, cleaned_annotations.json, labels.pkl,
    /// labels_bg.pkl, characters.json and backgrounds.json.
    pub fn write_index(&self, index: &LayoutIndex) -> Result<()> {
        self.json(
            "split.json",
            &json!({"train": index.train, "val": index.val, "test": index.test}),
        )?;
        let longest = index.stories.iter().map(Vec::len).max().unwrap_or(1);
        let mut lens: Vec<usize> = vec![3, longest.saturating_sub(1)];
        lens.dedup();
        for n in lens.into_iter().filter(|&n| n >= 1 && n < longest) {
            let dict = index
                .stories
                .iter()
                .filter(|s| s.len() > n)
                .map(|s| {
                    (
                        Value::Str(s[0].clone()),
                        Value::Array(NdArray::from_strings(&s[1..=n])),
                    )
                })
                .collect();
            write_pickle(
                &self.root.join(format!("following_cache{n}.pkl")),
                &Value::Dict(dict),
            )?;
        }
        let mut ann = Map::new();
        let mut labels = Vec::with_capacity(index.annotations.len());
        let mut bg_labels = Vec::with_capacity(index.annotations.len());
        for a in &index.annotations {
            let mut rec = json!({
                "caption": a.caption,
                "characters": a.characters,
                "setting": a.setting,
                "segments": a.segments,
            });
            if let Some(r) = &a.referential {
                rec["referential"] = Json::String(r.clone());
            }
            ann.insert(a.id.clone(), rec);
            let hot: Vec<f64> = index
                .label_names
                .iter()
                .map(|l| a.characters.iter().any(|c| c.to_lowercase() == *l) as u8 as f64)
                .collect();
            labels.push((
                Value::Str(a.id.clone()),
                Value::Array(NdArray::from_f64(vec![hot.len()], &hot)),
            ));
            let bg: Vec<f64> = index
                .background_names
                .iter()
                .map(|b| (*b == a.setting) as u8 as f64)
                .collect();
            bg_labels.push((
                Value::Str(a.id.clone()),
                Value::Array(NdArray::from_f64(vec![bg.len()], &bg)),
            ));
        }
        self.json("cleaned_annotations.json", &Json::Object(ann))?;
        write_pickle(&self.root.join("labels.pkl"), &Value::Dict(labels))?;
        write_pickle(&self.root.join("labels_bg.pkl"), &Value::Dict(bg_labels))?;
        self.json("backgrounds.json", &json!(index.background_names))?;
        self.json("characters.json", &serde_json::to_value(&index.characters)?)?;
        Ok(())
    }
}
