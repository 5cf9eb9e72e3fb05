//! `storygpt-v eval`: draws the stories of a dataset split with each system through the one
//! generation pipeline ([`StoryPipeline::generate_with`]), scores the frames with the
//! evaluation classifier, the metrics of [`crate::metrics`] and the bundle's CLIP, and writes
//! `OUT/results.json`, `OUT/results.md` and image grids (docs/EVALUATION.md).
//!
//! Every system draws the same stories with the same seeds (frame `i` of story `k` uses
//! `seed + 1000 k + i`), so the systems differ by their conditioning alone.

pub mod clip_score;
pub mod report;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use data::dataset::{DatasetKind, DatasetReader, Split, Story};
use image::RgbImage;
use models::pipeline::{
    CharacterInput, Conditioning, FrameRequest, PipelineEvent, StoryInput, StoryPipeline,
};
use serde::Serialize;

use crate::classifier::Classifier;
use crate::metrics::{self, Gaussian};
use crate::progress::Progress;
use crate::stages::classifier::{frame_labels, FrameLabels};
use clip_score::ClipScorer;

/// A system of the paper's comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum System {
    /// The Char-LDM's UNet on the plain CLIP text of the referential caption (the paper's LDM).
    LdmText,
    /// Char-LDM on the non-referential (named) captions with portraits fused (upper bound).
    CharLdmNames,
    /// The full pipeline (LLM) on referential captions.
    StoryGptV,
}

impl System {
    /// Every system, in table order.
    pub const ALL: [System; 3] = [System::LdmText, System::CharLdmNames, System::StoryGptV];

    /// The command-line and table name.
    pub fn key(self) -> &'static str {
        match self {
            System::LdmText => "ldm-text",
            System::CharLdmNames => "char-ldm-names",
            System::StoryGptV => "storygpt-v",
        }
    }

    /// Parses a [`System::key`].
    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|x| x.key() == s)
            .with_context(|| {
                format!("unknown system `{s}` (expected ldm-text, char-ldm-names or storygpt-v)")
            })
    }

    fn conditioning(self) -> Conditioning {
        match self {
            System::LdmText => Conditioning::TextOnly,
            System::CharLdmNames => Conditioning::Fused,
            System::StoryGptV => Conditioning::StoryGptV,
        }
    }

    /// The captions it reads: named ones for Char-LDM, referential ones otherwise.
    fn captions(self, story: &Story) -> Vec<String> {
        story
            .frames
            .iter()
            .map(|f| match self {
                System::CharLdmNames => f.caption.clone(),
                _ => f.referential.clone(),
            })
            .collect()
    }
}

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The model bundle.
    pub bundle: PathBuf,
    /// The dataset (FlintstonesSV layout).
    pub data: PathBuf,
    /// The split whose stories are drawn.
    pub split: Split,
    /// The systems, in the order given (duplicates dropped).
    pub systems: Vec<System>,
    /// The classifier directory (`train classifier --out`, or its `classifier/`).
    pub classifier: PathBuf,
    /// Story lengths in frames; each needs stories that long in the dataset.
    pub lengths: Vec<usize>,
    /// At most this many stories per length (`None`: the whole split).
    pub stories: Option<usize>,
    /// Denoising steps (`None`: the bundle's default).
    pub steps: Option<usize>,
    /// The base seed.
    pub seed: u64,
    /// The output directory.
    pub out: PathBuf,
    /// The device.
    pub device: Device,
}

/// The figures of one set of frames; `None` where a figure cannot be computed (no frames, no
/// background labels, CLIP widths that differ, fewer than 2 frames for FID).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    /// Frames scored.
    pub frames: usize,
    /// Character exact match (Char-Acc), in [0, 1].
    pub char_acc: Option<f64>,
    /// Character micro F1 (Char-F1), in [0, 1].
    pub char_f1: Option<f64>,
    /// Background accuracy (BG-Acc), in [0, 1].
    pub bg_acc: Option<f64>,
    /// Background macro F1 (BG-F1), in [0, 1].
    pub bg_f1: Option<f64>,
    /// Frechet distance of classifier features to the ground-truth frames' (not Inception FID).
    pub fid_classifier: Option<f64>,
    /// Mean CLIP cosine of frame and named caption.
    pub clip_text_image: Option<f64>,
    /// Mean CLIP cosine of frame and ground-truth frame.
    pub clip_image_image: Option<f64>,
}

/// One system at one story length.
#[derive(Debug, Clone, Serialize)]
pub struct SystemResult {
    /// The system's name (`ground-truth` for the dataset's own frames).
    pub system: String,
    /// Every frame.
    pub all: Scores,
    /// Frames whose referential caption refers to a character by pronoun.
    pub pronoun: Scores,
    /// Generation wall time per frame (0 for the ground truth).
    pub seconds_per_frame: f64,
    /// Char-Acc of the frames at each range of positions in their story (where a long story
    /// loses its characters).
    pub by_position: Vec<PositionScore>,
}

/// Char-Acc over the frames at positions `first..=last` (1-based) of their stories.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PositionScore {
    /// First position (1-based).
    pub first: usize,
    /// Last position (1-based, inclusive).
    pub last: usize,
    /// Frames scored.
    pub frames: usize,
    /// Character exact match, in [0, 1].
    pub char_acc: f64,
}

/// Position ranges of a `len`-frame story: 1, 2-4, 5-8, 9-16, 17-32, 33-64, ..., cut at `len`.
pub fn position_ranges(len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let (mut first, mut last) = (1, 1);
    while first <= len {
        out.push((first, last.min(len)));
        first = last + 1;
        last = if last == 1 { 4 } else { last * 2 };
    }
    out
}

/// Char-Acc per [`position_ranges`]: `positions[k]` is frame `k`'s 1-based place in its story.
fn scores_by_position(
    pred: &[Vec<bool>],
    truth: &[Vec<bool>],
    positions: &[usize],
    len: usize,
) -> Vec<PositionScore> {
    position_ranges(len)
        .into_iter()
        .filter_map(|(first, last)| {
            let keep: Vec<usize> = (0..positions.len())
                .filter(|&k| (first..=last).contains(&positions[k]))
                .collect();
            if keep.is_empty() {
                return None;
            }
            let p: Vec<Vec<bool>> = keep.iter().map(|&k| pred[k].clone()).collect();
            let t: Vec<Vec<bool>> = keep.iter().map(|&k| truth[k].clone()).collect();
            Some(PositionScore {
                first,
                last,
                frames: keep.len(),
                char_acc: metrics::exact_match(&p, &t),
            })
        })
        .collect()
}

/// Every system at one story length.
#[derive(Debug, Clone, Serialize)]
pub struct LengthResult {
    /// Frames per story.
    pub frames: usize,
    /// Stories drawn.
    pub stories: usize,
    /// The ground truth first (the classifier's own accuracy on real frames), then the systems.
    pub systems: Vec<SystemResult>,
    /// Peak resident memory of the process while this length ran (MiB).
    pub peak_rss_mib: Option<f64>,
    /// Whether the peak was reset before this length (else it is the peak since start).
    pub peak_rss_reset: bool,
    /// Wall time of this length, all systems and scoring.
    pub wall_time_s: f64,
}

/// The whole evaluation, as written to `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct EvalResults {
    /// The bundle evaluated.
    pub bundle: String,
    /// The dataset.
    pub data: String,
    /// The split.
    pub split: Split,
    /// The classifier.
    pub classifier: String,
    /// Denoising steps used.
    pub steps: usize,
    /// The base seed.
    pub seed: u64,
    /// The command line's story limit.
    pub max_stories: Option<usize>,
    /// Per story length.
    pub lengths: Vec<LengthResult>,
    /// Wall time of the whole evaluation.
    pub wall_time_s: f64,
}

/// One frame to score: its image, truth and caption.
#[derive(Clone, Copy)]
struct Scored<'a> {
    image: &'a RgbImage,
    truth: &'a FrameLabels,
    caption: &'a str,
    reference: &'a RgbImage,
}

/// The cast with portraits: the dataset's `characters.json`, else the bundle's `cast/`.
pub fn eval_cast(data: &Path, bundle: &Path) -> Result<Vec<CharacterInput>> {
    if data.join("characters.json").is_file() {
        return crate::stages::load_cast(data, "eval")?
            .into_iter()
            .map(|(c, img)| {
                Ok(CharacterInput {
                    name: c.name,
                    pronoun: c.pronoun.word(data::Case::Subject).to_owned(),
                    portrait: Some(img),
                })
            })
            .collect();
    }
    let path = bundle.join("cast/cast.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} has no characters.json and the bundle no {}: the evaluation needs the cast's \
             names, pronouns and portraits",
            data.display(),
            path.display()
        )
    })?;
    let entries: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    entries
        .iter()
        .map(|e| {
            let field = |k: &str| {
                e[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{}: an entry lacks `{k}`", path.display()))
            };
            let portrait = bundle.join("cast").join(field("portrait")?);
            Ok(CharacterInput {
                name: field("name")?,
                pronoun: field("pronoun")?,
                portrait: Some(
                    image::open(&portrait)
                        .with_context(|| format!("reading {}", portrait.display()))?
                        .to_rgb8(),
                ),
            })
        })
        .collect()
}

/// Peak resident set size of this process in MiB (`VmHWM`), Linux only.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Resets the peak RSS to the current RSS (Linux >= 4.0), so each length reports its own.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn score(
    frames: &[Scored],
    preds: &[crate::classifier::FramePrediction],
    real_features: &[Vec<f32>],
    clip: &ClipScorer,
    n_backgrounds: usize,
    compare_to_reference: bool,
) -> Result<Scores> {
    if frames.is_empty() {
        return Ok(Scores::default());
    }
    let pred_chars: Vec<Vec<bool>> = preds.iter().map(|p| p.characters()).collect();
    let truth_chars: Vec<Vec<bool>> = frames.iter().map(|f| f.truth.characters.clone()).collect();
    let (bp, bt): (Vec<Option<usize>>, Vec<usize>) = preds
        .iter()
        .zip(frames)
        .filter_map(|(p, f)| Some((p.background(), f.truth.background?)))
        .unzip();
    let has_bg = n_backgrounds > 0 && !bt.is_empty();
    let bg_acc = has_bg.then(|| {
        bp.iter().zip(&bt).filter(|(p, t)| **p == Some(**t)).count() as f64 / bt.len() as f64
    });
    let fake: Vec<Vec<f32>> = preds.iter().map(|p| p.features.clone()).collect();
    let fid = match (Gaussian::fit(&fake), Gaussian::fit(real_features)) {
        (Some(a), Some(b)) if compare_to_reference && a.count >= 2 && b.count >= 2 => {
            Some(metrics::frechet_distance(&a, &b))
        }
        _ => None,
    };
    let images: Vec<RgbImage> = frames.iter().map(|f| f.image.clone()).collect();
    let captions: Vec<String> = frames.iter().map(|f| f.caption.to_owned()).collect();
    let img_emb = clip.images(&images)?;
    let txt_emb = clip.texts(&captions)?;
    let clip_ii = if compare_to_reference {
        let refs: Vec<RgbImage> = frames.iter().map(|f| f.reference.clone()).collect();
        metrics::mean_cosine(&img_emb, &clip.images(&refs)?)
    } else {
        None
    };
    Ok(Scores {
        frames: frames.len(),
        char_acc: Some(metrics::exact_match(&pred_chars, &truth_chars)),
        char_f1: Some(metrics::micro_f1(&pred_chars, &truth_chars)),
        bg_acc,
        bg_f1: has_bg.then(|| metrics::macro_f1(&bp, &bt, n_backgrounds)),
        fid_classifier: fid,
        clip_text_image: metrics::mean_cosine(&img_emb, &txt_emb),
        clip_image_image: clip_ii,
    })
}

/// What one length needs from the dataset.
struct LengthData {
    stories: Vec<Story>,
    truth: Vec<Vec<FrameLabels>>,
    pronoun: Vec<Vec<bool>>,
    real: Vec<Vec<RgbImage>>,
}

fn load_length(
    opts: &EvalOptions,
    len: usize,
    classifier: &Classifier,
    cast: &[CharacterInput],
) -> Result<LengthData> {
    let reader = DatasetReader::open(&opts.data, DatasetKind::Auto, len).with_context(|| {
        format!(
            "opening dataset {} for {len}-frame stories",
            opts.data.display()
        )
    })?;
    let mut ids = reader.story_ids(opts.split);
    anyhow::ensure!(
        !ids.is_empty(),
        "dataset {}: the {} split has no {len}-frame stories",
        opts.data.display(),
        opts.split.key()
    );
    if let Some(n) = opts.stories {
        ids.truncate(n);
    }
    let cfg = classifier.config();
    // Truth is looked up by name: a classifier of another cast would score every frame wrong.
    let names = reader.rules().character_names();
    let mut known: Vec<&str> = cfg.characters.iter().map(String::as_str).collect();
    let mut here = names.clone();
    known.sort_unstable();
    here.sort_unstable();
    anyhow::ensure!(
        known == here,
        "the classifier in {} knows the characters {:?}, the dataset {} has {:?}: train a \
         classifier on this dataset (`storygpt-v train classifier`)",
        classifier.dir().display(),
        cfg.characters,
        opts.data.display(),
        names
    );
    let mut d = LengthData {
        stories: Vec::new(),
        truth: Vec::new(),
        pronoun: Vec::new(),
        real: Vec::new(),
    };
    for id in ids {
        let mut story = reader
            .load_story(&id, 0)
            .with_context(|| format!("loading story {id}"))?;
        d.truth.push(
            story
                .frames
                .iter()
                .map(|f| frame_labels(f, &cfg.characters, &cfg.backgrounds))
                .collect(),
        );
        d.pronoun.push(
            story
                .frames
                .iter()
                .enumerate()
                .map(|(i, f)| i > 0 && StoryPipeline::uses_pronoun(&f.referential, cast))
                .collect(),
        );
        d.real.push(
            story
                .frames
                .iter_mut()
                .map(|f| f.image.take().context("frame without image"))
                .collect::<Result<_>>()?,
        );
        d.stories.push(story);
    }
    Ok(d)
}

/// Runs the evaluation and writes `results.json`, `results.md` and `grids/`.
pub fn run(opts: &EvalOptions) -> Result<EvalResults> {
    let started = Instant::now();
    anyhow::ensure!(!opts.systems.is_empty(), "name at least one --system");
    let lengths = if opts.lengths.is_empty() {
        vec![4]
    } else {
        opts.lengths.clone()
    };
    anyhow::ensure!(
        lengths.iter().all(|&l| l >= 1),
        "--frames: story lengths must be at least 1"
    );
    let classifier = Classifier::load(&opts.classifier, &opts.device)?;
    let pipeline = StoryPipeline::load(&opts.bundle, &opts.device)
        .with_context(|| format!("loading the bundle {}", opts.bundle.display()))?;
    let clip = ClipScorer::load(&opts.bundle, &opts.device)?;
    let cast = eval_cast(&opts.data, &opts.bundle)?;
    let mut gen = pipeline.default_options();
    if let Some(s) = opts.steps {
        gen = gen.with_steps(s);
    }
    // Load every length first: a missing length fails before any frame is drawn.
    let data: Vec<LengthData> = lengths
        .iter()
        .map(|&l| load_length(opts, l, &classifier, &cast))
        .collect::<Result<_>>()?;
    std::fs::create_dir_all(opts.out.join("grids"))
        .with_context(|| format!("creating {}", opts.out.display()))?;
    let total: usize = data
        .iter()
        .map(|d| d.stories.iter().map(|s| s.frames.len()).sum::<usize>() * opts.systems.len())
        .sum();
    let progress = Progress::new("eval frame", total as u64);
    let mut done = 0u64;
    let drawing = Instant::now();
    let mut out = EvalResults {
        bundle: opts.bundle.display().to_string(),
        data: opts.data.display().to_string(),
        split: opts.split,
        classifier: classifier.dir().display().to_string(),
        steps: gen.steps,
        seed: opts.seed,
        max_stories: opts.stories,
        lengths: Vec::new(),
        wall_time_s: 0.0,
    };
    let n_bg = classifier.config().backgrounds.len();
    for (len, d) in lengths.iter().zip(&data) {
        let len_started = Instant::now();
        let reset = reset_peak_rss();
        let flat =
            |v: &Vec<Vec<RgbImage>>| -> Vec<RgbImage> { v.iter().flatten().cloned().collect() };
        let real_images = flat(&d.real);
        let truth: Vec<&FrameLabels> = d.truth.iter().flatten().collect();
        let pronoun: Vec<bool> = d.pronoun.iter().flatten().copied().collect();
        let positions: Vec<usize> = d.stories.iter().flat_map(|s| 1..=s.frames.len()).collect();
        let truth_chars: Vec<Vec<bool>> = truth.iter().map(|t| t.characters.clone()).collect();
        let by_position = |preds: &[crate::classifier::FramePrediction]| {
            let p: Vec<Vec<bool>> = preds.iter().map(|p| p.characters()).collect();
            scores_by_position(&p, &truth_chars, &positions, *len)
        };
        let named: Vec<&str> = d
            .stories
            .iter()
            .flat_map(|s| s.frames.iter().map(|f| f.caption.as_str()))
            .collect();
        let real_preds = classifier.classify(&real_images)?;
        let real_features: Vec<Vec<f32>> = real_preds.iter().map(|p| p.features.clone()).collect();
        let pronoun_features: Vec<Vec<f32>> = real_features
            .iter()
            .zip(&pronoun)
            .filter(|(_, &p)| p)
            .map(|(f, _)| f.clone())
            .collect();
        let score_set = |images: &[RgbImage],
                         preds: &[crate::classifier::FramePrediction],
                         versus_real: bool|
         -> Result<(Scores, Scores)> {
            let frames: Vec<Scored> = (0..images.len())
                .map(|k| Scored {
                    image: &images[k],
                    truth: truth[k],
                    caption: named[k],
                    reference: &real_images[k],
                })
                .collect();
            let all = score(&frames, preds, &real_features, &clip, n_bg, versus_real)?;
            let keep: Vec<usize> = (0..frames.len()).filter(|&k| pronoun[k]).collect();
            let sub: Vec<Scored> = keep.iter().map(|&k| frames[k]).collect();
            let sub_preds: Vec<_> = keep.iter().map(|&k| preds[k].clone()).collect();
            let pro = score(
                &sub,
                &sub_preds,
                &pronoun_features,
                &clip,
                n_bg,
                versus_real,
            )?;
            Ok((all, pro))
        };
        let (all, pro) = score_set(&real_images, &real_preds, false)?;
        let mut systems = vec![SystemResult {
            system: "ground-truth".into(),
            all,
            pronoun: pro,
            seconds_per_frame: 0.0,
            by_position: by_position(&real_preds),
        }];
        let mut grid_rows: Vec<Vec<RgbImage>> = vec![d.real[0].clone()];
        for &system in &opts.systems {
            let mut images = Vec::with_capacity(real_images.len());
            let mut seconds = 0.0;
            for (k, story) in d.stories.iter().enumerate() {
                let input = StoryInput {
                    characters: cast.to_vec(),
                    captions: system.captions(story),
                };
                let frames: Vec<FrameRequest> = (0..input.captions.len())
                    .map(|i| FrameRequest {
                        index: i,
                        seed: opts.seed + 1000 * k as u64 + i as u64,
                    })
                    .collect();
                let drawn = pipeline.generate_with(
                    &input,
                    &frames,
                    &[],
                    &gen,
                    system.conditioning(),
                    &mut |e| {
                        if let PipelineEvent::FrameFinished { .. } = e {
                            done += 1;
                            // Off a terminal (logs, CI) every 10th frame and the last.
                            if progress.is_tty() || done.is_multiple_of(10) || done == total as u64
                            {
                                let rate = done as f64 / drawing.elapsed().as_secs_f64().max(1e-9);
                                let detail = format!("{} {len}-frame stories", system.key());
                                progress.show(done, &detail, rate, "frame", !progress.is_tty());
                            }
                        }
                    },
                    &|| false,
                )?;
                for f in drawn {
                    seconds += f.duration.as_secs_f64();
                    images.push(f.image);
                }
                if k == 0 {
                    grid_rows.push(images.clone());
                }
            }
            let preds = classifier.classify(&images)?;
            let (all, pro) = score_set(&images, &preds, true)?;
            systems.push(SystemResult {
                system: system.key().into(),
                all,
                pronoun: pro,
                seconds_per_frame: seconds / images.len().max(1) as f64,
                by_position: by_position(&preds),
            });
        }
        let grid_path = opts.out.join("grids").join(format!("{len}-frames.png"));
        let cols = grid_rows[0].len();
        crate::stages::grid(&grid_rows.concat(), cols)
            .save(&grid_path)
            .with_context(|| format!("writing {}", grid_path.display()))?;
        out.lengths.push(LengthResult {
            frames: *len,
            stories: d.stories.len(),
            systems,
            peak_rss_mib: peak_rss_mib(),
            peak_rss_reset: reset,
            wall_time_s: len_started.elapsed().as_secs_f64(),
        });
    }
    out.wall_time_s = started.elapsed().as_secs_f64();
    std::fs::write(
        opts.out.join("results.json"),
        serde_json::to_string_pretty(&out)?,
    )?;
    std::fs::write(
        opts.out.join("results.md"),
        report::markdown(&out, &opts.systems),
    )?;
    progress.line(&format!(
        "eval done in {:.1} s: {} and {}",
        out.wall_time_s,
        opts.out.join("results.json").display(),
        opts.out.join("results.md").display()
    ));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_ranges_double_after_the_first_frames() {
        assert_eq!(position_ranges(1), vec![(1, 1)]);
        assert_eq!(position_ranges(4), vec![(1, 1), (2, 4)]);
        assert_eq!(
            position_ranges(50),
            vec![(1, 1), (2, 4), (5, 8), (9, 16), (17, 32), (33, 50)]
        );
    }

    #[test]
    fn char_acc_by_position_scores_each_range_on_its_own_frames() {
        let yes = vec![true, false];
        let no = vec![false, true];
        // Two 5-frame stories: right at position 1 always, wrong at 5 always, half at 2-4.
        let positions = [1, 2, 3, 4, 5, 1, 2, 3, 4, 5];
        let truth = vec![yes.clone(); 10];
        let pred = vec![
            yes.clone(),
            yes.clone(),
            yes.clone(),
            yes.clone(),
            no.clone(),
            yes.clone(),
            no.clone(),
            no.clone(),
            no.clone(),
            no.clone(),
        ];
        let got = scores_by_position(&pred, &truth, &positions, 5);
        let acc: Vec<(usize, usize, usize, f64)> = got
            .iter()
            .map(|p| (p.first, p.last, p.frames, p.char_acc))
            .collect();
        assert_eq!(acc, vec![(1, 1, 2, 1.0), (2, 4, 6, 0.5), (5, 5, 2, 0.0)]);
    }
}
