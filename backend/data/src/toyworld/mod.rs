//! The toy world: a seeded, deterministic story generator that stands in for FlintstonesSV
//! on a CPU. Seven characters, ten backgrounds, 1-3 characters per frame, five-frame stories
//! with recurring characters and places, grammar captions and their referential versions,
//! exact per-character masks and boxes, portraits, and train/val/test splits, written in the
//! FlintstonesSV layout so [`crate::dataset::DatasetReader`] reads it.

pub mod cast;
pub mod raster;
pub mod scenes;
pub mod sheet;
pub mod story;

use std::path::Path;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::dataset::{mask_bbox, rules_from_characters, CharacterInfo};
use crate::error::Result;
use crate::referential::{make_referential, StoryFrame};
use crate::rules::{Pronoun, RuleSet};
use crate::writer::{FrameAnnotation, LayoutIndex, LayoutWriter, SegmentOut};
use cast::CAST;
use raster::Canvas;
use scenes::{draw_scene, SCENES};
use story::{sample_story, ToyFrame, ToyStory};

/// Generation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ToyConfig {
    /// Number of stories.
    pub stories: usize,
    /// Frame width and height in pixels.
    pub size: usize,
    /// Random seed; the same seed gives the same bytes.
    pub seed: u64,
    /// Frames per story.
    pub story_len: usize,
    /// Worker threads (output does not depend on it).
    pub threads: usize,
}

impl Default for ToyConfig {
    fn default() -> ToyConfig {
        ToyConfig {
            stories: 100,
            size: 64,
            seed: 0,
            story_len: 5,
            threads: 1,
        }
    }
}

/// What `generate` produced.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateReport {
    /// Stories written.
    pub stories: usize,
    /// Frames written.
    pub frames: usize,
    /// Stories per split (train, val, test).
    pub splits: [usize; 3],
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// `characters.json` entries of the cast.
pub fn character_infos() -> Vec<CharacterInfo> {
    CAST.iter()
        .map(|c| CharacterInfo {
            name: c.name.to_string(),
            label: c.name.to_lowercase(),
            pronoun: c.pronoun,
            gender: match c.pronoun {
                Pronoun::He => "male",
                Pronoun::She => "female",
                _ => "neutral",
            }
            .to_string(),
            description: c.description.to_string(),
            portrait: format!("portraits/{}.png", c.name.to_lowercase()),
        })
        .collect()
}

/// The toy world's referential rules.
pub fn rules() -> RuleSet {
    rules_from_characters(&character_infos())
}

/// Story `index` of a seed (each story has its own random stream).
pub fn story(seed: u64, index: usize, len: usize) -> ToyStory {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index as u64);
    sample_story(&mut rng, len)
}

/// The referential captions of a story (its names replaced by he / she / they where the
/// rules allow), as the dataset writes them.
pub fn referential_captions(st: &ToyStory, rules: &RuleSet) -> Vec<String> {
    let inputs: Vec<StoryFrame> = st
        .frames
        .iter()
        .map(|f| StoryFrame {
            caption: f.caption.clone(),
            characters: Some(
                f.placements
                    .iter()
                    .map(|p| CAST[p.character].name.to_string())
                    .collect(),
            ),
        })
        .collect();
    make_referential(rules, &inputs)
}

/// Story `index` of a seed as text only, (captions, referential captions), without drawing a
/// frame: a text corpus of the toy world for its language model.
pub fn story_text(
    seed: u64,
    index: usize,
    len: usize,
    rules: &RuleSet,
) -> (Vec<String>, Vec<String>) {
    let st = story(seed, index, len);
    let referential = referential_captions(&st, rules);
    (
        st.frames.into_iter().map(|f| f.caption).collect(),
        referential,
    )
}

/// Split of story `index`: 80% train, 10% val, 10% test.
pub fn split_of(index: usize) -> usize {
    match index % 10 {
        8 => 1,
        9 => 2,
        _ => 0,
    }
}

/// Frame id in FlintstonesSV style; the authors' code reads season/episode at `_`-fields 1
/// and 3, which here are the story and 0, so their following-cache builder keeps stories whole.
pub fn frame_id(story: usize, k: usize) -> String {
    format!("s_{story:06}_e_0_shot_{k}")
}

/// Pre-rendered backgrounds (plain and mirrored).
pub struct Backgrounds(Vec<[Canvas; 2]>);

impl Backgrounds {
    /// Render all scenes at `size`.
    pub fn new(size: usize) -> Backgrounds {
        Backgrounds(
            (0..SCENES.len())
                .map(|i| {
                    let a = draw_scene(i, size);
                    let mut b = a.clone();
                    b.flip_x();
                    [a, b]
                })
                .collect(),
        )
    }
}

/// Render a frame; the canvas ids are cast index + 1 where a character is visible.
pub fn render_frame(frame: &ToyFrame, bgs: &Backgrounds, size: usize) -> Canvas {
    let mut c = bgs.0[frame.scene][frame.flip_bg as usize].clone();
    let s = size as f32;
    for p in &frame.placements {
        cast::draw(
            &mut c,
            p.character,
            p.cx * s,
            p.feet * s,
            p.height * s,
            p.flip,
            p.character as u8 + 1,
        );
    }
    c
}

fn write_story(
    w: &LayoutWriter,
    bgs: &Backgrounds,
    cfg: &ToyConfig,
    index: usize,
    rules: &RuleSet,
) -> Result<Vec<FrameAnnotation>> {
    let st = story(cfg.seed, index, cfg.story_len);
    let referential = referential_captions(&st, rules);
    let mut out = Vec::with_capacity(st.frames.len());
    for (k, (frame, r)) in st.frames.iter().zip(referential).enumerate() {
        let id = frame_id(index, k);
        let canvas = render_frame(frame, bgs, cfg.size);
        w.write_clip(&id, &[&canvas.to_image()])?;
        let mut chars: Vec<usize> = frame.placements.iter().map(|p| p.character).collect();
        chars.sort_unstable();
        let scale = 128.0 / cfg.size as f64;
        let segments = chars
            .iter()
            .filter_map(|&c| {
                let mask: Vec<bool> = canvas.ids.iter().map(|&v| v == c as u8 + 1).collect();
                let b = mask_bbox(&mask, cfg.size)?;
                Some(SegmentOut {
                    id: c as u32 + 1,
                    name: CAST[c].name.to_string(),
                    word: CAST[c].name.to_lowercase(),
                    bbox: b.map(|v| (v as f64 * scale).round() as u32),
                })
            })
            .collect();
        w.write_mask(&id, 0, cfg.size as u32, cfg.size as u32, canvas.ids.clone())?;
        out.push(FrameAnnotation {
            id,
            caption: frame.caption.clone(),
            referential: Some(r),
            characters: chars.iter().map(|&c| CAST[c].name.to_string()).collect(),
            setting: SCENES[frame.scene].name.to_string(),
            segments,
        });
    }
    Ok(out)
}

/// Generate a toy dataset into `out` in the FlintstonesSV layout.
pub fn generate(out: &Path, cfg: &ToyConfig) -> Result<GenerateReport> {
    let start = Instant::now();
    let w = LayoutWriter::create(out)?;
    let bgs = Backgrounds::new(cfg.size);
    let rules = rules();
    for (i, info) in character_infos().iter().enumerate() {
        w.write_png(
            &info.portrait,
            &cast::portrait(i, cfg.size.max(64)).to_image(),
        )?;
    }
    let threads = cfg.threads.clamp(1, 64);
    let chunk = cfg.stories.div_ceil(threads).max(1);
    let results: Vec<Result<Vec<Vec<FrameAnnotation>>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..cfg.stories)
            .step_by(chunk)
            .map(|lo| {
                let (w, bgs, rules) = (&w, &bgs, &rules);
                scope.spawn(move || {
                    (lo..(lo + chunk).min(cfg.stories))
                        .map(|i| write_story(w, bgs, cfg, i, rules))
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(crate::DataError::Invalid("worker panicked".into())))
            })
            .collect()
    });
    let mut index = LayoutIndex {
        label_names: CAST.iter().map(|c| c.name.to_lowercase()).collect(),
        background_names: SCENES.iter().map(|s| s.name.to_string()).collect(),
        characters: character_infos(),
        ..LayoutIndex::default()
    };
    let mut splits = [0usize; 3];
    let mut story_index = 0;
    for part in results {
        for frames in part? {
            let ids: Vec<String> = frames.iter().map(|f| f.id.clone()).collect();
            let split = split_of(story_index);
            splits[split] += 1;
            match split {
                0 => index.train.extend(ids.iter().cloned()),
                1 => index.val.extend(ids.iter().cloned()),
                _ => index.test.extend(ids.iter().cloned()),
            }
            index.stories.push(ids);
            index.annotations.extend(frames);
            story_index += 1;
        }
    }
    w.write_index(&index)?;
    Ok(GenerateReport {
        stories: cfg.stories,
        frames: cfg.stories * cfg.story_len,
        splits,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// A contact sheet of `n` stories of a seed (frames upscaled by `scale`), with captions and
/// referential captions.
pub fn sample_sheet(
    seed: u64,
    n: usize,
    size: usize,
    story_len: usize,
    scale: u32,
) -> image::RgbImage {
    let bgs = Backgrounds::new(size);
    let rules = rules();
    let rows: Vec<Vec<(image::RgbImage, String, String)>> = (0..n)
        .map(|i| {
            let st = story(seed, i, story_len);
            let refs = referential_captions(&st, &rules);
            st.frames
                .iter()
                .zip(refs)
                .map(|(f, r)| (render_frame(f, &bgs, size).to_image(), f.caption.clone(), r))
                .collect()
        })
        .collect();
    sheet::story_sheet(&rows, scale)
}

/// Write the docs images: `toyworld-stories.png`, `toyworld-portraits.png` and
/// `toyworld-backgrounds.png` into `dir`.
pub fn write_doc_images(dir: &Path, seed: u64, stories: usize, size: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| crate::DataError::io(dir, e))?;
    let save = |name: &str, img: image::RgbImage| -> Result<()> {
        let p = dir.join(name);
        img.save(&p)
            .map_err(|e| crate::DataError::Invalid(format!("{}: {e}", p.display())))
    };
    save(
        "toyworld-stories.png",
        sample_sheet(seed, stories, size, 5, 3),
    )?;
    save(
        "toyworld-portraits.png",
        sheet::portrait_sheet(size.max(96)),
    )?;
    save(
        "toyworld-backgrounds.png",
        sheet::background_sheet(size.max(96)),
    )
}
