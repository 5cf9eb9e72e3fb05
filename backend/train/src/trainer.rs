//! The one training loop every stage runs through.
//!
//! Per step: next batch from the loader thread, learning rate from the schedule, loss,
//! backward, global-norm clipping, in-place AdamW, EMA update, the stage's own post-step hook
//! (e.g. renormalising the `[IMG]` rows). Around it: validation every N steps (on the EMA
//! weights when EMA is on), metrics as JSON lines, a progress line, checkpoints every N steps,
//! at the end, at the time limit and on SIGINT / SIGTERM, and `--resume` from the latest one.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::ParamsAdamW;
use nn::optim::{clip_grad_norm, AdamW, Ema};
use serde_json::json;

use crate::checkpoint::{self, CheckpointState, CheckpointTensors};
use crate::config::{OptimConfig, RunConfig};
use crate::loader::{BatchSource, Loader};
use crate::progress::Progress;

/// The loss of one step, with named parts for the metrics.
pub struct StepLoss {
    /// The scalar to minimise.
    pub loss: Tensor,
    /// Parts of it (or other per-step scalars) for the metrics, e.g. `("recon", 0.01)`.
    pub parts: Vec<(&'static str, f64)>,
}

/// A trainable stage: the model, its loss and its validation. `Send` (and a `Sync` batch): a
/// step may run on another pool's thread (`nn::on_shared_cores`).
pub trait Stage: Send {
    /// What the loader prepares.
    type Batch: Send + Sync + 'static;
    /// The stage's name (`vae`, `clip`, `lm`, ...).
    fn name(&self) -> &'static str;
    /// The trainable variables, each with a stable name (checkpoints and optimiser state).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// Names of variables that get no weight decay (biases, norms, embeddings...).
    fn no_weight_decay(&self, _name: &str) -> bool {
        false
    }
    /// The loss of one batch at optimiser step `step`.
    fn loss(&mut self, batch: &Self::Batch, step: u64) -> Result<StepLoss>;
    /// Runs after every optimiser step.
    fn after_step(&mut self) -> Result<()> {
        Ok(())
    }
    /// Validation metrics (lower-is-better losses or accuracies; the stage names them).
    fn validate(&mut self, step: u64) -> Result<BTreeMap<String, f64>>;
}

/// Where and how a run happens.
pub struct RunOptions<'a> {
    /// The run directory: `checkpoints/` and `metrics.jsonl` go here.
    pub run_dir: PathBuf,
    /// Continue from the latest checkpoint in `run_dir` (otherwise `run_dir` must hold no run).
    pub resume: bool,
    /// The configuration, recorded in checkpoints; a resume must match it (except the run's
    /// length settings, which may be extended).
    pub config: serde_json::Value,
    /// Fingerprint of the training data; a resume must match it.
    pub data_fingerprint: String,
    /// Set by SIGINT / SIGTERM (or a caller): checkpoint and stop after the current step.
    pub stop: Arc<AtomicBool>,
    /// Optional per-validation callback (sample grids...), called after each validation.
    pub on_validation: Option<&'a mut dyn FnMut(u64) -> Result<()>>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    /// `max_steps` reached.
    Finished,
    /// `max_minutes` reached; resume to continue.
    TimeLimit,
    /// A stop was asked (SIGINT / SIGTERM); resume to continue.
    Stopped,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Optimiser steps completed in total (including earlier processes of a resumed run).
    pub steps: u64,
    /// Steps this process ran.
    pub steps_this_process: u64,
    /// How it ended.
    pub ending: Ending,
    /// The last validation metrics.
    pub validation: BTreeMap<String, f64>,
    /// Mean training loss over the last logged window.
    pub last_loss: f64,
    /// Training wall time over all processes of the run.
    pub elapsed_s: f64,
}

/// The configuration with the run-length settings removed, for comparing a resume.
fn comparable(config: &serde_json::Value) -> serde_json::Value {
    let mut c = config.clone();
    if let Some(run) = c.get_mut("run").and_then(|r| r.as_object_mut()) {
        run.remove("max_steps");
        run.remove("max_minutes");
    }
    c
}

/// Appends JSON lines to `metrics.jsonl`; on resume, lines past the resumed step are dropped so
/// the file reads as one uninterrupted run.
struct MetricsLog {
    file: std::fs::File,
}

impl MetricsLog {
    fn open(run_dir: &Path, resumed_step: Option<u64>) -> Result<Self> {
        let path = run_dir.join("metrics.jsonl");
        if let Some(step) = resumed_step {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let kept: String = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<serde_json::Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                std::fs::write(&path, kept)?;
            }
        } else {
            std::fs::write(&path, "")?;
        }
        let file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(Self { file })
    }

    fn write(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{v}")?;
        Ok(())
    }
}

/// Runs (or resumes) a stage's training to `run.max_steps`.
pub fn run<S, D>(
    stage: &mut S,
    source: Arc<D>,
    run_cfg: &RunConfig,
    optim_cfg: &OptimConfig,
    mut opts: RunOptions,
) -> Result<RunSummary>
where
    S: Stage,
    D: BatchSource<Batch = S::Batch>,
{
    let started = Instant::now();
    std::fs::create_dir_all(&opts.run_dir)
        .with_context(|| format!("creating {}", opts.run_dir.display()))?;
    let vars = stage.trainable();
    anyhow::ensure!(
        !vars.is_empty(),
        "stage {} has nothing to train",
        stage.name()
    );
    let var_list: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
    let mut optimizer = AdamW::new(
        vars.clone(),
        ParamsAdamW {
            lr: optim_cfg.lr,
            beta1: optim_cfg.betas[0],
            beta2: optim_cfg.betas[1],
            eps: optim_cfg.eps,
            weight_decay: optim_cfg.weight_decay,
        },
    )?;
    optimizer.exclude_from_weight_decay(|n| stage.no_weight_decay(n));
    let mut ema = match optim_cfg.ema_decay {
        Some(d) => Some(Ema::new(vars.clone(), d)?.with_warmup()),
        None => None,
    };

    // Resume, or refuse to overwrite another run.
    let existing = checkpoint::latest(&opts.run_dir)?;
    let (mut step, mut elapsed_before) = (0u64, 0f64);
    match (&existing, opts.resume) {
        (Some(dir), false) => {
            let st = checkpoint::read_state(dir)?;
            anyhow::bail!(
                "{} already holds a {} run at step {}; pass --resume to continue it, or choose another --out",
                opts.run_dir.display(),
                st.stage,
                st.step
            )
        }
        (Some(dir), true) => {
            let st = checkpoint::read_state(dir)?;
            anyhow::ensure!(
                st.stage == stage.name(),
                "cannot resume: {} holds a {} run, not {}",
                opts.run_dir.display(),
                st.stage,
                stage.name()
            );
            anyhow::ensure!(
                comparable(&st.config) == comparable(&opts.config),
                "cannot resume: the configuration differs from the one the run started with \
                 (only run.max_steps and run.max_minutes may change)"
            );
            anyhow::ensure!(
                st.data_fingerprint == opts.data_fingerprint,
                "cannot resume: the training data differs from the run's (fingerprint {} vs {})",
                st.data_fingerprint,
                opts.data_fingerprint
            );
            let device = var_list[0].device().clone();
            let t = checkpoint::read_tensors(dir, &device)?;
            for (name, var) in &vars {
                let saved = t
                    .model
                    .get(name)
                    .with_context(|| format!("checkpoint {} lacks `{name}`", dir.display()))?;
                var.set(&saved.to_dtype(var.dtype())?)
                    .with_context(|| format!("restoring `{name}`"))?;
            }
            optimizer.load_tensors(&t.optimizer)?;
            if let Some(e) = ema.as_mut() {
                e.load_tensors(&t.ema)?;
            }
            step = st.step;
            elapsed_before = st.elapsed_s;
        }
        (None, _) => {}
    }
    if opts.resume && existing.is_none() {
        anyhow::bail!(
            "--resume: {} has no checkpoint to resume from",
            opts.run_dir.display()
        )
    }

    let mut metrics = MetricsLog::open(&opts.run_dir, existing.as_ref().map(|_| step))?;
    let progress = Progress::new(format!("{} step", stage.name()), run_cfg.max_steps);
    let mut loader = Loader::new(source, run_cfg.batch_size, run_cfg.seed, step, 3)?;
    let first_step = step;
    let stage_name = stage.name();
    let mut validation = BTreeMap::new();
    let mut window = (0f64, 0u64, Instant::now());
    let mut phases = [0f64; Phase::ALL.len()];
    let mut last_loss = f64::NAN;

    let save = |step: u64, optimizer: &AdamW, ema: &Option<Ema>, elapsed: f64| -> Result<PathBuf> {
        let mut t = CheckpointTensors::default();
        for (name, var) in &vars {
            t.model.insert(name.clone(), var.as_tensor().clone());
        }
        t.optimizer = optimizer.to_tensors()?;
        if let Some(e) = ema {
            t.ema = e.to_tensors()?;
        }
        let st = CheckpointState {
            stage: stage_name.to_owned(),
            step,
            config: opts.config.clone(),
            data_fingerprint: opts.data_fingerprint.clone(),
            elapsed_s: elapsed,
        };
        checkpoint::save(&opts.run_dir, &st, &t, run_cfg.keep_checkpoints)
    };

    let mut validate = |stage: &mut S,
                        ema: &mut Option<Ema>,
                        step: u64,
                        metrics: &mut MetricsLog|
     -> Result<BTreeMap<String, f64>> {
        if let Some(e) = ema.as_mut() {
            e.swap()?;
        }
        let v = stage.validate(step);
        if let Some(e) = ema.as_mut() {
            e.swap()?;
        }
        let v = v?;
        let mut line = json!({"step": step, "split": "val"});
        for (k, x) in &v {
            line[k] = json!(x);
        }
        metrics.write(line)?;
        if let Some(cb) = opts.on_validation.as_mut() {
            cb(step)?;
        }
        Ok(v)
    };

    let ending = loop {
        if step >= run_cfg.max_steps {
            break Ending::Finished;
        }
        if opts.stop.load(Ordering::SeqCst) {
            break Ending::Stopped;
        }
        if let Some(m) = run_cfg.max_minutes {
            if started.elapsed().as_secs_f64() >= m * 60.0 {
                break Ending::TimeLimit;
            }
        }
        let mut clock = PhaseClock::start();
        let batch = loader.next_batch()?;
        clock.lap(&mut phases, Phase::Batch);
        let lr = optim_cfg.lr_at(step, run_cfg.max_steps);
        optimizer.set_learning_rate(lr);
        // On the narrower pool while another process shares the cores (`train all`'s lanes).
        let (out, loss, grad_norm) = nn::on_shared_cores(|| -> Result<_> {
            let out = stage.loss(&batch, step)?;
            let loss = out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            anyhow::ensure!(
                loss.is_finite(),
                "{} loss became {loss} at step {step}",
                stage.name()
            );
            clock.lap(&mut phases, Phase::Forward);
            let mut grads = out.loss.backward()?;
            clock.lap(&mut phases, Phase::Backward);
            let grad_norm = match optim_cfg.clip_grad_norm {
                Some(max) => clip_grad_norm(&mut grads, &var_list, max)? as f64,
                None => f64::NAN,
            };
            clock.lap(&mut phases, Phase::Clip);
            optimizer.step(&grads)?;
            drop(grads);
            clock.lap(&mut phases, Phase::Optimizer);
            if let Some(e) = ema.as_mut() {
                e.update()?;
            }
            stage.after_step()?;
            clock.lap(&mut phases, Phase::After);
            Ok((out, loss, grad_norm))
        })?;
        step += 1;
        last_loss = loss;
        window.0 += loss;
        window.1 += 1;

        if step % run_cfg.log_every == 0 || step == run_cfg.max_steps {
            let secs = window.2.elapsed().as_secs_f64().max(1e-9);
            let it_s = window.1 as f64 / secs;
            let mean = window.0 / window.1 as f64;
            let mut line = json!({
                "step": step, "split": "train", "loss": mean, "lr": lr, "it_s": it_s,
                "elapsed_s": elapsed_before + started.elapsed().as_secs_f64(),
            });
            if grad_norm.is_finite() {
                line["grad_norm"] = json!(grad_norm);
            }
            for (k, v) in &out.parts {
                line[*k] = json!(v);
            }
            for phase in Phase::ALL {
                line[phase.key()] = json!(1e3 * phases[phase as usize] / window.1 as f64);
            }
            phases = [0.0; Phase::ALL.len()];
            metrics.write(line)?;
            progress.show(
                step,
                &format!("loss {mean:.5}"),
                it_s,
                "it",
                !progress.is_tty(),
            );
            window = (0.0, 0, Instant::now());
        }
        if run_cfg.val_every > 0 && step % run_cfg.val_every == 0 && step < run_cfg.max_steps {
            validation = validate(stage, &mut ema, step, &mut metrics)?;
            progress.line(&format!(
                "{} step {step} validation {}",
                stage.name(),
                fmt_metrics(&validation)
            ));
        }
        if run_cfg.checkpoint_every > 0
            && step % run_cfg.checkpoint_every == 0
            && step < run_cfg.max_steps
        {
            save(
                step,
                &optimizer,
                &ema,
                elapsed_before + started.elapsed().as_secs_f64(),
            )?;
        }
    };
    drop(loader);
    let elapsed = elapsed_before + started.elapsed().as_secs_f64();
    if step > first_step || existing.is_none() || ending == Ending::Finished {
        save(step, &optimizer, &ema, elapsed)?;
    }
    if ending == Ending::Finished {
        validation = validate(stage, &mut ema, step, &mut metrics)?;
    }
    let how = match ending {
        Ending::Finished => "finished",
        Ending::TimeLimit => "stopped at the time limit (resume with --resume)",
        Ending::Stopped => "stopped on request (resume with --resume)",
    };
    progress.line(&format!(
        "{} {how} at step {step} after {:.1} s; validation {}",
        stage.name(),
        elapsed,
        fmt_metrics(&validation)
    ));
    // What the caller exports: the EMA weights when EMA is on.
    if let Some(e) = ema.as_ref() {
        e.copy_to()?;
    }
    Ok(RunSummary {
        steps: step,
        steps_this_process: step - first_step,
        ending,
        validation,
        last_loss,
        elapsed_s: elapsed,
    })
}

/// The parts of a training step whose host wall time each logged window reports, as
/// milliseconds per step under `ms_<phase>`. On the CPU that is where the step's time goes. On
/// CUDA kernels run asynchronously, so a phase also holds the GPU time of earlier phases it
/// waits for: reading the loss (`forward`) and the gradient norm (`clip`) wait for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Batch,
    Forward,
    Backward,
    Clip,
    Optimizer,
    After,
}

impl Phase {
    const ALL: [Phase; 6] = [
        Phase::Batch,
        Phase::Forward,
        Phase::Backward,
        Phase::Clip,
        Phase::Optimizer,
        Phase::After,
    ];

    fn key(self) -> &'static str {
        match self {
            Phase::Batch => "ms_batch",
            Phase::Forward => "ms_forward",
            Phase::Backward => "ms_backward",
            Phase::Clip => "ms_clip",
            Phase::Optimizer => "ms_optimizer",
            Phase::After => "ms_after",
        }
    }
}

/// Adds the time since the previous lap to a phase's total.
struct PhaseClock(Instant);

impl PhaseClock {
    fn start() -> Self {
        Self(Instant::now())
    }

    fn lap(&mut self, totals: &mut [f64; Phase::ALL.len()], phase: Phase) {
        let now = Instant::now();
        totals[phase as usize] += (now - self.0).as_secs_f64();
        self.0 = now;
    }
}

fn fmt_metrics(m: &BTreeMap<String, f64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}={v:.4}"))
        .collect::<Vec<_>>()
        .join(" ")
}
