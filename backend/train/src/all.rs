//! `storygpt-v train all --config configs/toy.toml --out DIR`: every stage in order (vae,
//! vae-decoder when the plan names it, clip, lm, char-ldm, stage2) into one bundle, each from its
//! own stage file named by the plan.
//!
//! ```toml
//! [data]            # the toy world made into OUT/data when --data is not given
//! stories = 2000
//! size = 64
//! seed = 0
//!
//! [stages]          # stage files, relative to this file
//! vae = "vae.toml"
//! vae_decoder = "vae-decoder.toml"   # optional
//! clip = "clip.toml"
//! lm = "lm.toml"
//! char_ldm = "char-ldm.toml"
//! stage2 = "stage2.toml"
//!
//! [sampling]        # optional: the bundle's sampling defaults (bundle.toml [sampling])
//! guidance_scale = 4.0
//! start_merge_step = 15
//! ```
//!
//! With `--resume`, stages already recorded as finished in `OUT/training.json` are skipped and
//! the first unfinished one continues from its checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config;
use crate::driver::{self, DriverArgs, StageReport};
use crate::stages::char_ldm::CharLdmSection;
use crate::stages::clip::ClipSection;
use crate::stages::lm::LmSection;
use crate::stages::stage2::Stage2Section;
use crate::stages::vae::VaeSection;
use crate::stages::vae_decoder::VaeDecoderSection;
use crate::trainer::Ending;

/// `[data]`: the toy world to generate when no dataset is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataPlan {
    /// Stories.
    pub stories: usize,
    /// Frame size in pixels.
    pub size: usize,
    /// Seed of the toy world.
    pub seed: u64,
    /// Frames per story.
    pub story_len: usize,
}

impl Default for DataPlan {
    fn default() -> Self {
        Self {
            stories: 2000,
            size: 64,
            seed: 0,
            story_len: 5,
        }
    }
}

/// `[stages]`: the stage files, in training order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    /// VAE stage file.
    pub vae: PathBuf,
    /// The VAE decoder's fine-tuning stage file (optional: without it the VAE stays as the
    /// `vae` stage left it).
    #[serde(default)]
    pub vae_decoder: Option<PathBuf>,
    /// CLIP stage file.
    pub clip: PathBuf,
    /// LM stage file.
    pub lm: PathBuf,
    /// Char-LDM stage file.
    pub char_ldm: PathBuf,
    /// Stage-2 stage file.
    pub stage2: PathBuf,
}

/// `[sampling]`: sampling defaults written into the finished bundle's `bundle.toml` (those not
/// given keep the manifest's, i.e. the paper's: guidance 5, delayed conditioning from step 15
/// of 30). They are choices about drawing, not training, made on the validation split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingPlan {
    /// Classifier-free guidance scale.
    pub guidance_scale: Option<f64>,
    /// Delayed conditioning: text-only steps before the fused condition.
    pub start_merge_step: Option<usize>,
    /// Denoising steps.
    pub steps: Option<usize>,
}

/// The whole plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// The data to generate when `--data` is not given.
    #[serde(default)]
    pub data: DataPlan,
    /// The stage files.
    pub stages: StagePlan,
    /// Sampling defaults of the finished bundle.
    #[serde(default)]
    pub sampling: SamplingPlan,
}

/// The stages in order, by their `training.json` names.
pub const ORDER: [&str; 6] = ["vae", "vae-decoder", "clip", "lm", "char-ldm", "stage2"];

impl Plan {
    /// Reads a plan; stage paths become relative to its directory, and each must exist and parse.
    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut plan: Plan =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            Some(&mut plan.stages.vae),
            plan.stages.vae_decoder.as_mut(),
            Some(&mut plan.stages.clip),
            Some(&mut plan.stages.lm),
            Some(&mut plan.stages.char_ldm),
            Some(&mut plan.stages.stage2),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
            anyhow::ensure!(
                p.exists(),
                "{}: stage file {} does not exist",
                path.display(),
                p.display()
            );
        }
        anyhow::ensure!(
            plan.data.stories >= 10 && plan.data.size >= 16 && plan.data.story_len >= 2,
            "{}: [data] needs at least 10 stories of 2 frames of 16 pixels",
            path.display()
        );
        plan.check_stage_files()
            .with_context(|| format!("plan {}", path.display()))?;
        let s = &plan.sampling;
        anyhow::ensure!(
            s.guidance_scale.is_none_or(|g| g.is_finite() && g >= 1.0)
                && s.steps.is_none_or(|n| n >= 1)
                && s.start_merge_step
                    .is_none_or(|m| m <= s.steps.unwrap_or(usize::MAX)),
            "{}: [sampling] needs guidance_scale >= 1, steps >= 1 and start_merge_step <= steps",
            path.display()
        );
        Ok(plan)
    }

    /// Parses every stage file with its own section, so that a typo in the last stage's file
    /// stops the run before the first stage trains rather than hours later.
    fn check_stage_files(&self) -> Result<()> {
        let s = &self.stages;
        config::load::<VaeSection>(&s.vae)?;
        if let Some(p) = &s.vae_decoder {
            config::load::<VaeDecoderSection>(p)?;
        }
        config::load::<ClipSection>(&s.clip)?;
        config::load::<LmSection>(&s.lm)?;
        config::load::<CharLdmSection>(&s.char_ldm)?;
        config::load::<Stage2Section>(&s.stage2)?;
        Ok(())
    }

    /// The stage file of `stage`, `None` for an optional stage the plan leaves out.
    fn stage_file(&self, stage: &str) -> Option<&Path> {
        Some(match stage {
            "vae" => &self.stages.vae,
            "vae-decoder" => return self.stages.vae_decoder.as_deref(),
            "clip" => &self.stages.clip,
            "lm" => &self.stages.lm,
            "char-ldm" => &self.stages.char_ldm,
            _ => &self.stages.stage2,
        })
    }
}

/// Stages `OUT/training.json` records as finished.
fn finished_stages(out: &Path) -> Vec<String> {
    recorded_stages(out)
        .and_then(|v| v.as_object().map(|m| m.keys().cloned().collect()))
        .unwrap_or_default()
}

/// The `stages` object of `OUT/training.json`, if it can be read.
fn recorded_stages(out: &Path) -> Option<serde_json::Value> {
    std::fs::read_to_string(out.join("training.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|mut v| v.get_mut("stages").map(serde_json::Value::take))
}

/// The report of `stage` as another process left it in `out`: finished with its recorded steps
/// and gates when `training.json` holds its record, otherwise `unfinished` at its latest
/// checkpoint's step (a second lane reads its child's outcome back with this).
pub fn report_from_files(out: &Path, stage: &str, unfinished: Ending) -> Result<StageReport> {
    let record = recorded_stages(out)
        .and_then(|mut stages| stages.get_mut(stage).map(serde_json::Value::take))
        .unwrap_or_default();
    if record.is_null() {
        let steps = match crate::checkpoint::latest(&out.join("runs").join(stage))? {
            Some(dir) => crate::checkpoint::read_state(&dir)?.step,
            None => 0,
        };
        return Ok(StageReport {
            ending: unfinished,
            steps,
            gates: vec![],
        });
    }
    Ok(StageReport {
        ending: Ending::Finished,
        steps: record["steps"].as_u64().unwrap_or_default(),
        gates: serde_json::from_value(record["gates"].clone()).unwrap_or_default(),
    })
}

/// What `train all` did: each stage's report (skipped stages are absent) and how it ended.
#[derive(Debug, Clone)]
pub struct AllReport {
    /// `(stage, report)` in order.
    pub stages: Vec<(String, StageReport)>,
    /// `Finished` when every stage is trained.
    pub ending: Ending,
}

/// Trains one stage in another process and returns its report once that process has ended:
/// `train all`'s second lane on the CPU (two processes overlap on two cores better than two
/// lanes of one process, docs/TRAINING.md). It must stop the stage with a checkpoint when
/// the arguments' stop flag is set. The `usize` is the CPU threads the process should use.
pub type SecondLane<'a> = &'a (dyn Fn(&str, &DriverArgs, usize) -> Result<StageReport> + Sync);

/// How `train all`'s two lanes split this process's CPU threads: `(first lane, second lane)`.
/// Each lane gets its own cores rather than both sharing all of them (`nn::share_cpu_cores`).
pub fn lane_threads(threads: usize) -> (usize, usize) {
    let second = (threads / 2).max(1);
    ((threads - threads / 2).max(1), second)
}

/// Runs the plan at `args.config` into `args.out`; `data: None` generates the plan's toy world
/// into `OUT/data` (kept, so a resume uses the same bytes). With `second_lane`, clip and lm
/// train in it beside vae and vae-decoder (the same weights: each stage is deterministic).
pub fn train_all(
    args: &DriverArgs,
    data: Option<&Path>,
    second_lane: Option<SecondLane<'_>>,
) -> Result<AllReport> {
    let plan = Plan::load(&args.config)?;
    let done = finished_stages(&args.out);
    if !args.resume {
        if let Some(first) = done.first() {
            anyhow::bail!(
                "{} already holds trained stages ({first}, ...); pass --resume to continue, or choose another --out",
                args.out.display()
            )
        }
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let data_dir = match data {
        Some(d) => d.to_path_buf(),
        None => {
            let dir = args.out.join("data");
            if !dir.join("split.json").exists() {
                let cfg = data::toyworld::ToyConfig {
                    stories: plan.data.stories,
                    size: plan.data.size,
                    seed: plan.data.seed,
                    story_len: plan.data.story_len,
                    threads: std::thread::available_parallelism()
                        .map(|n| n.get())
                        .unwrap_or(1),
                };
                let r = data::toyworld::generate(&dir, &cfg)?;
                eprintln!(
                    "train all: generated the toy world ({} stories, {} frames) into {} in {:.1} s",
                    r.stories,
                    r.frames,
                    dir.display(),
                    r.seconds
                );
            }
            dir
        }
    };
    let pending: Vec<&'static str> = ORDER
        .into_iter()
        .filter(|stage| plan.stage_file(stage).is_some())
        .filter(|stage| {
            let finished = done.iter().any(|d| d == stage);
            if finished {
                eprintln!("train all: {stage} is already trained; skipping it");
            }
            !finished
        })
        .collect();
    let stage_args = |stage: &str| -> Result<DriverArgs> {
        let stage_file = plan
            .stage_file(stage)
            .with_context(|| format!("the plan has no stage {stage}"))?;
        Ok(DriverArgs {
            config: stage_file.to_path_buf(),
            data: data_dir.clone(),
            // A stage with a checkpoint continues it; one without starts fresh.
            resume: args.resume
                && crate::checkpoint::latest(&args.out.join("runs").join(stage))?.is_some(),
            ..args.clone()
        })
    };
    let in_process = |stage: &str| -> Result<StageReport> {
        let stage_args = stage_args(stage)?;
        eprintln!(
            "train all: stage {stage} from {}",
            stage_args.config.display()
        );
        match stage {
            "vae" => driver::train_vae(&stage_args),
            "vae-decoder" => driver::train_vae_decoder(&stage_args),
            "clip" => driver::train_clip(&stage_args),
            "lm" => driver::train_lm(&stage_args),
            "char-ldm" => driver::train_char_ldm(&stage_args),
            _ => driver::train_stage2(&stage_args),
        }
        .with_context(|| format!("stage {stage}"))
    };
    // The text models need only the data, so with a second lane they train beside the VAE,
    // which needs only the data too; the StoryGPT-V stages need both and come after.
    let (beside, after): (Vec<&str>, Vec<&str>) = pending
        .iter()
        .partition(|stage| matches!(**stage, "vae" | "vae-decoder" | "clip" | "lm"));
    let (text, image): (Vec<&str>, Vec<&str>) = beside
        .iter()
        .partition(|stage| matches!(**stage, "clip" | "lm"));
    let mut reports = Vec::new();
    let mut sequential = pending.clone();
    if let Some(second_lane) = second_lane.filter(|_| !text.is_empty() && !image.is_empty()) {
        eprintln!(
            "train all: {} in a second process beside {}",
            text.join(", "),
            image.join(", ")
        );
        let (first_threads, second_threads) = lane_threads(rayon::current_num_threads());
        nn::share_cpu_cores(Some(first_threads)).map_err(anyhow::Error::msg)?;
        let (first, second) = std::thread::scope(|scope| {
            let second = scope.spawn(|| {
                let lane = run_lane(&text, |stage| {
                    second_lane(stage, &stage_args(stage)?, second_threads)
                        .with_context(|| format!("stage {stage} (second process)"))
                });
                // The first lane's next steps get every core again.
                let whole_pool = nn::share_cpu_cores(None);
                lane_ended(&lane, &args.stop);
                whole_pool.map_err(anyhow::Error::msg)?;
                lane
            });
            let first = run_lane(&image, in_process);
            lane_ended(&first, &args.stop);
            let second = second
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("the second lane's thread panicked")));
            (first, second)
        });
        nn::share_cpu_cores(None).map_err(anyhow::Error::msg)?;
        let mut lanes = first?;
        lanes.extend(second?);
        lanes.sort_by_key(|(stage, _)| ORDER.iter().position(|s| s == stage));
        // The lane that ended first stopped the other: its ending (a time limit) is the cause.
        let unfinished = lanes
            .iter()
            .map(|(_, r)| r.ending.clone())
            .filter(|e| *e != Ending::Finished)
            .max_by_key(|e| *e != Ending::Stopped);
        reports.extend(lanes);
        if let Some(ending) = unfinished {
            return Ok(AllReport {
                stages: reports,
                ending,
            });
        }
        sequential = after;
    }
    for stage in sequential {
        let report = in_process(stage)?;
        let ending = report.ending.clone();
        reports.push((stage.to_owned(), report));
        if ending != Ending::Finished {
            return Ok(AllReport {
                stages: reports,
                ending,
            });
        }
    }
    apply_sampling(&args.out, &plan.sampling)?;
    Ok(AllReport {
        stages: reports,
        ending: Ending::Finished,
    })
}

/// Trains `stages` in order with `train` until one does not finish.
fn run_lane(
    stages: &[&str],
    train: impl Fn(&str) -> Result<StageReport>,
) -> Result<Vec<(String, StageReport)>> {
    let mut reports = Vec::new();
    for stage in stages {
        let report = train(stage)?;
        let finished = report.ending == Ending::Finished;
        reports.push((stage.to_string(), report));
        if !finished {
            break;
        }
    }
    Ok(reports)
}

/// A lane that failed or stopped early stops the other one too (with a checkpoint, so a
/// `--resume` continues both), rather than leave it training stages the run cannot use yet.
fn lane_ended(lane: &Result<Vec<(String, StageReport)>>, stop: &std::sync::atomic::AtomicBool) {
    let whole = lane
        .as_ref()
        .is_ok_and(|r| r.iter().all(|(_, r)| r.ending == Ending::Finished));
    if !whole && !stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
        eprintln!("train all: a lane ended early; stopping the other with a checkpoint");
    }
}

/// Writes the plan's sampling defaults into the finished bundle's `bundle.toml`.
fn apply_sampling(out: &Path, sampling: &SamplingPlan) -> Result<()> {
    if *sampling == SamplingPlan::default() {
        return Ok(());
    }
    let mut manifest = models::bundle::Bundle::open(out)?.manifest;
    let m = &mut manifest.sampling;
    if let Some(g) = sampling.guidance_scale {
        m.guidance_scale = g;
    }
    if let Some(n) = sampling.steps {
        m.steps = n;
    }
    if let Some(k) = sampling.start_merge_step {
        m.start_merge_step = k;
    }
    anyhow::ensure!(
        m.start_merge_step <= m.steps,
        "[sampling] start_merge_step {} is past the bundle's {} steps",
        m.start_merge_step,
        m.steps
    );
    manifest.write(out)
}

#[cfg(test)]
mod tests {
    use super::lane_threads;

    #[test]
    fn two_lanes_split_the_threads_and_each_keeps_at_least_one() {
        assert_eq!(lane_threads(2), (1, 1));
        assert_eq!(lane_threads(3), (2, 1));
        assert_eq!(lane_threads(16), (8, 8));
        assert_eq!(lane_threads(1), (1, 1));
        assert_eq!(lane_threads(0), (1, 1));
    }
}
