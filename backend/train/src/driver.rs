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

/// Trains the VAE stage and writes `OUT/sd/vae`, `OUT/figures/vae-*.png` and its record.
pub fn train_vae(args: &DriverArgs) -> Result<StageReport> {
    let mut file: StageFile<VaeSection> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    let (mut stage, source, fingerprint) =
        vae::prepare(&file.stage, &args.data, file.run.seed, &args.device)?;
    let run_dir = args.out.join("runs").join("vae");
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    if !args.resume && crate::checkpoint::latest(&run_dir)?.is_none() {
        stage
            .reconstruction_grid(8)?
            .save(figures.join("vae-before.png"))
            .context("writing vae-before.png")?;
    }
    let config_json =
        json!({"stage": "vae", "run": file.run, "optim": file.optim, "vae": file.stage});
    let summary = trainer::run(
        &mut stage,
        source.clone(),
        &file.run,
        &file.optim,
        RunOptions {
            run_dir,
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
    let scale = stage.measure_scaling_factor(&source)?;
    stage.export(&args.out.join("sd").join("vae"), scale)?;
    stage
        .reconstruction_grid(8)?
        .save(figures.join("vae-after.png"))
        .context("writing vae-after.png")?;
    crate::plot::training_curves(
        &args.out.join("runs/vae/metrics.jsonl"),
        &figures.join("vae-curves.svg"),
        "vae",
        "psnr_db",
        "validation PSNR (dB)",
    )?;
    let psnr = summary
        .validation
        .get("psnr_db")
        .copied()
        .unwrap_or(f64::NAN);
    let gates = vec![Gate {
        metric: "validation PSNR (dB)".into(),
        value: psnr,
        target: 30.0,
        passed: psnr >= 30.0,
    }];
    record_stage(
        &args.out,
        "vae",
        json!({
            "config": config_json,
            "data_fingerprint": fingerprint,
            "steps": summary.steps,
            "wall_time_s": summary.elapsed_s,
            "final_train_loss": summary.last_loss,
            "validation": summary.validation,
            "latent_size": stage.latent_size(),
            "scaling_factor": scale,
            "gates": gates,
        }),
    )?;
    print_gates("vae", &gates);
    Ok(StageReport {
        ending: Ending::Finished,
        steps: summary.steps,
        gates,
    })
}

/// Trains the LM stage and writes `OUT/llm`, `OUT/figures/lm-curves.svg` and its record.
pub fn train_lm(args: &DriverArgs) -> Result<StageReport> {
    let mut file: StageFile<LmSection> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    let run_dir = args.out.join("runs").join("lm");
    refuse_existing_run(&run_dir, args.resume)?;
    let (mut stage, source, fingerprint) = lm::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    let config_json =
        json!({"stage": "lm", "run": file.run, "optim": file.optim, "lm": file.stage});
    let summary = trainer::run(
        &mut stage,
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
    stage.export()?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    crate::plot::training_curves(
        &run_dir.join("metrics.jsonl"),
        &figures.join("lm-curves.svg"),
        "lm",
        "pronoun_cloze",
        "validation pronoun cloze",
    )?;
    let cloze = summary
        .validation
        .get("pronoun_cloze")
        .copied()
        .unwrap_or(f64::NAN);
    let gates = vec![Gate {
        metric: format!(
            "validation pronoun cloze accuracy ({} questions)",
            stage.cloze_count()
        ),
        value: cloze,
        target: 0.95,
        passed: cloze >= 0.95,
    }];
    record_stage(
        &args.out,
        "lm",
        json!({
            "config": config_json,
            "data_fingerprint": fingerprint,
            "steps": summary.steps,
            "wall_time_s": summary.elapsed_s,
            "final_train_loss": summary.last_loss,
            "validation": summary.validation,
            "gates": gates,
        }),
    )?;
    print_gates("lm", &gates);
    Ok(StageReport {
        ending: Ending::Finished,
        steps: summary.steps,
        gates,
    })
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
    let run_dir = args.out.join("runs").join("clip");
    refuse_existing_run(&run_dir, args.resume)?;
    let (mut stage, source, fingerprint) = clip::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    let config_json =
        json!({"stage": "clip", "run": file.run, "optim": file.optim, "clip": file.stage});
    let summary = trainer::run(
        &mut stage,
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
    stage.export()?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    crate::plot::training_curves(
        &run_dir.join("metrics.jsonl"),
        &figures.join("clip-curves.svg"),
        "clip",
        "caption_to_frame_r5",
        "validation caption->frame R@5",
    )?;
    let get = |k: &str| summary.validation.get(k).copied().unwrap_or(f64::NAN);
    let gates = vec![
        Gate {
            metric: format!(
                "validation portrait->name accuracy ({} characters)",
                stage.cast().len()
            ),
            value: get("portrait_to_name"),
            target: 1.0,
            passed: get("portrait_to_name") >= 1.0,
        },
        Gate {
            metric: "validation caption->frame recall@5".into(),
            value: get("caption_to_frame_r5"),
            target: 0.5,
            passed: get("caption_to_frame_r5") >= 0.5,
        },
    ];
    record_stage(
        &args.out,
        "clip",
        json!({
            "config": config_json,
            "data_fingerprint": fingerprint,
            "steps": summary.steps,
            "wall_time_s": summary.elapsed_s,
            "final_train_loss": summary.last_loss,
            "validation": summary.validation,
            "gates": gates,
        }),
    )?;
    print_gates("clip", &gates);
    Ok(StageReport {
        ending: Ending::Finished,
        steps: summary.steps,
        gates,
    })
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
