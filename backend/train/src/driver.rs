//! `storygpt-v train STAGE`: configuration, data, the loop, export into the bundle layout, the
//! stage's quality gate and `training.json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;

use crate::config::{self, StageFile};
use crate::stages::clip::{self, ClipSection};
use crate::stages::lm::{self, LmSection};
use crate::stages::vae::{self, VaeSection};
use crate::trainer::{self, Ending, RunOptions};

/// What the command line gives every stage.
#[derive(Debug, Clone)]
pub struct DriverArgs {
    /// The TOML configuration.
    pub config: PathBuf,
    /// The dataset (FlintstonesSV layout).
    pub data: PathBuf,
    /// The bundle directory the stage writes its part into (runs go under `runs/STAGE`).
    pub out: PathBuf,
    /// Continue the stage's run from its latest checkpoint.
    pub resume: bool,
    /// Overrides `run.max_steps`.
    pub max_steps: Option<u64>,
    /// Overrides `run.max_minutes`.
    pub max_minutes: Option<f64>,
    /// The device.
    pub device: Device,
    /// Set by SIGINT / SIGTERM.
    pub stop: Arc<AtomicBool>,
}

/// A stage's quality gate: the measured value, the target and whether it was met.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Gate {
    /// What is measured.
    pub metric: String,
    /// Measured value.
    pub value: f64,
    /// The target (`value >= target` passes).
    pub target: f64,
    /// Whether the target was met.
    pub passed: bool,
}

/// What one stage produced.
#[derive(Debug, Clone)]
pub struct StageReport {
    /// How the run ended.
    pub ending: Ending,
    /// Steps in total.
    pub steps: u64,
    /// The gates (only for a finished run).
    pub gates: Vec<Gate>,
}

fn apply_overrides<S>(file: &mut StageFile<S>, args: &DriverArgs) -> Result<()> {
    if let Some(n) = args.max_steps {
        file.run.max_steps = n;
    }
    if let Some(m) = args.max_minutes {
        file.run.max_minutes = Some(m);
    }
    file.run.validate()
}

/// Merges this stage's record into `OUT/training.json` (other stages' records are kept).
pub fn record_stage(out: &Path, stage: &str, record: serde_json::Value) -> Result<()> {
    let path = out.join("training.json");
    let mut all = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("parsing {}", path.display()))?,
        Err(_) => json!({"stages": {}}),
    };
    all["stages"][stage] = record;
    let tmp = out.join(".training.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&all)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Runs a prepared stage to the end (or a stop) and, when it finished, lets `finish` export it
/// and name its gates and extra record fields; then draws its curves (`curve`: validation key
/// and label), merges its record into `training.json` and prints the gates.
#[allow(clippy::too_many_arguments)]
fn run_stage<S, D, C>(
    args: &DriverArgs,
    name: &'static str,
    file: &StageFile<C>,
    stage: &mut S,
    source: Arc<D>,
    fingerprint: String,
    curve: (&str, &str),
    finish: impl FnOnce(&mut S, &trainer::RunSummary) -> Result<(Vec<Gate>, serde_json::Value)>,
) -> Result<StageReport>
where
    S: trainer::Stage,
    D: crate::loader::BatchSource<Batch = S::Batch>,
    C: serde::Serialize,
{
    let run_dir = args.out.join("runs").join(name);
    let mut config_json = json!({"stage": name, "run": file.run, "optim": file.optim});
    config_json[name] = serde_json::to_value(&file.stage)?;
    let summary = trainer::run(
        stage,
        source,
        &file.run,
        &file.optim,
        RunOptions {
            run_dir: run_dir.clone(),
            resume: args.resume,
            config: config_json.clone(),
            data_fingerprint: fingerprint.clone(),
            stop: args.stop.clone(),
            on_validation: None,
        },
    )?;
    if summary.ending != Ending::Finished {
        return Ok(StageReport {
            ending: summary.ending,
            steps: summary.steps,
            gates: vec![],
        });
    }
    let (gates, extra) = finish(stage, &summary)?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    crate::plot::training_curves(
        &run_dir.join("metrics.jsonl"),
        &figures.join(format!("{name}-curves.svg")),
        name,
        curve.0,
        curve.1,
    )?;
    let mut record = json!({
        "config": config_json,
        "data_fingerprint": fingerprint,
        "steps": summary.steps,
        "wall_time_s": summary.elapsed_s,
        "final_train_loss": summary.last_loss,
        "validation": summary.validation,
        "gates": gates,
    });
    if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    record_stage(&args.out, name, record)?;
    print_gates(name, &gates);
    Ok(StageReport {
        ending: Ending::Finished,
        steps: summary.steps,
        gates,
    })
}

/// A `value >= target` gate on validation metric `key`.
fn gate_on(summary: &trainer::RunSummary, key: &str, metric: String, target: f64) -> Gate {
    let value = summary.validation.get(key).copied().unwrap_or(f64::NAN);
    Gate {
        metric,
        value,
        target,
        passed: value >= target,
    }
}

/// Trains the VAE stage and writes `OUT/sd/vae`, `OUT/figures/vae-*` and its record.
pub fn train_vae(args: &DriverArgs) -> Result<StageReport> {
    let mut file: StageFile<VaeSection> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    let run_dir = args.out.join("runs").join("vae");
    refuse_existing_run(&run_dir, args.resume)?;
    let (mut stage, source, fingerprint) =
        vae::prepare(&file.stage, &args.data, file.run.seed, &args.device)?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    if !args.resume {
        stage
            .reconstruction_grid(8)?
            .save(figures.join("vae-before.png"))
            .context("writing vae-before.png")?;
    }
    let out = args.out.clone();
    let frames = source.clone();
    run_stage(
        args,
        "vae",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("psnr_db", "validation PSNR (dB)"),
        |stage, summary| {
            let scale = stage.measure_scaling_factor(&frames)?;
            stage.export(&out.join("sd").join("vae"), scale)?;
            stage
                .reconstruction_grid(8)?
                .save(figures.join("vae-after.png"))
                .context("writing vae-after.png")?;
            let gates = vec![gate_on(
                summary,
                "psnr_db",
                "validation PSNR (dB)".into(),
                30.0,
            )];
            let extra = json!({"latent_size": stage.latent_size(), "scaling_factor": scale});
            Ok((gates, extra))
        },
    )
}

/// Trains the LM stage and writes `OUT/llm`, `OUT/figures/lm-curves.svg` and its record.
pub fn train_lm(args: &DriverArgs) -> Result<StageReport> {
    let mut file: StageFile<LmSection> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    refuse_existing_run(&args.out.join("runs").join("lm"), args.resume)?;
    let (mut stage, source, fingerprint) = lm::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "lm",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("pronoun_cloze", "validation pronoun cloze"),
        |stage, summary| {
            stage.export()?;
            let metric = format!(
                "validation pronoun cloze accuracy ({} questions)",
                stage.cloze_count()
            );
            Ok((
                vec![gate_on(summary, "pronoun_cloze", metric, 0.95)],
                json!({}),
            ))
        },
    )
}

/// Refuses an `--out` whose stage run exists unless `--resume` (checked before loading data).
fn refuse_existing_run(run_dir: &Path, resume: bool) -> Result<()> {
    if !resume {
        if let Some(dir) = crate::checkpoint::latest(run_dir)? {
            let st = crate::checkpoint::read_state(&dir)?;
            anyhow::bail!(
                "{} already holds a {} run at step {}; pass --resume to continue it, or choose another --out",
                run_dir.display(),
                st.stage,
                st.step
            )
        }
    }
    Ok(())
}

/// Trains the CLIP stage and writes `OUT/sd/tokenizer`, `OUT/sd/text_encoder`,
/// `OUT/clip-vision`, `OUT/figures/clip-curves.svg` and its record.
pub fn train_clip(args: &DriverArgs) -> Result<StageReport> {
    let mut file: StageFile<ClipSection> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    refuse_existing_run(&args.out.join("runs").join("clip"), args.resume)?;
    let (mut stage, source, fingerprint) = clip::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "clip",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("caption_to_frame_r5", "validation caption->frame R@5"),
        |stage, summary| {
            stage.export()?;
            let gates = vec![
                gate_on(
                    summary,
                    "portrait_to_name",
                    format!(
                        "validation portrait->name accuracy ({} characters)",
                        stage.cast().len()
                    ),
                    1.0,
                ),
                gate_on(
                    summary,
                    "caption_to_frame_r5",
                    "validation caption->frame recall@5".into(),
                    0.5,
                ),
            ];
            Ok((gates, json!({})))
        },
    )
}

fn print_gates(stage: &str, gates: &[Gate]) {
    for g in gates {
        eprintln!(
            "{stage} gate: {} = {:.3} (target >= {}) {}",
            g.metric,
            g.value,
            g.target,
            if g.passed { "PASS" } else { "MISS" }
        );
    }
}
