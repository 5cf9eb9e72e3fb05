//! Training configuration: one TOML file, every hyper-parameter named, unknown keys refused.
//!
//! ```toml
//! [run]
//! seed = 0
//! batch_size = 32
//! max_steps = 2000
//! val_every = 250
//! checkpoint_every = 250
//!
//! [optim]
//! lr = 1e-3
//! warmup_steps = 100
//! schedule = "cosine"
//!
//! [vae]          # the stage's own section
//! kl_weight = 1e-6
//! ```

use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// How long and how often: shared by every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seeds the data order, the per-step noise and the initial weights.
    pub seed: u64,
    /// Examples per optimiser step.
    pub batch_size: usize,
    /// Optimiser steps of the whole run (a resumed run continues to the same total).
    pub max_steps: u64,
    /// Stop (with a checkpoint) after this many minutes of this process, whatever the step.
    pub max_minutes: Option<f64>,
    /// Validation every N steps (and at the end); 0 turns it off.
    pub val_every: u64,
    /// Checkpoint every N steps (and at the end and on SIGINT / SIGTERM); 0: only those.
    pub checkpoint_every: u64,
    /// A metrics line (and a progress line when not on a terminal) every N steps.
    pub log_every: u64,
    /// Checkpoints kept on disk (the newest ones).
    pub keep_checkpoints: usize,
    /// Validation examples used at each validation.
    pub val_examples: usize,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            batch_size: 32,
            max_steps: 1000,
            max_minutes: None,
            val_every: 250,
            checkpoint_every: 250,
            log_every: 10,
            keep_checkpoints: 2,
            val_examples: 256,
        }
    }
}

/// The learning-rate shape after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Stay at `lr`.
    Constant,
    /// Cosine decay from `lr` to `lr * min_lr_ratio` at `max_steps`.
    Cosine,
    /// Linear decay from `lr` to `lr * min_lr_ratio` at `max_steps`.
    Linear,
}

/// AdamW and what goes with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Adam betas.
    pub betas: [f64; 2],
    /// Adam epsilon.
    pub eps: f64,
    /// Decoupled weight decay (PyTorch AdamW).
    pub weight_decay: f64,
    /// Linear warm-up from 0 over this many steps.
    pub warmup_steps: u64,
    /// Shape after warm-up.
    pub schedule: Schedule,
    /// Final learning rate as a fraction of `lr` (cosine / linear).
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub clip_grad_norm: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (`None`: no EMA).
    /// Validation and the exported weights use the EMA when it is on.
    pub ema_decay: Option<f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            weight_decay: 1e-2,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            min_lr_ratio: 0.0,
            clip_grad_norm: Some(1.0),
            ema_decay: None,
        }
    }
}

impl OptimConfig {
    /// The learning rate for optimiser step `step` (0-based) of a run of `max_steps`.
    pub fn lr_at(&self, step: u64, max_steps: u64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = max_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step.saturating_sub(self.warmup_steps)) as f64 / span).clamp(0.0, 1.0);
        let floor = self.lr * self.min_lr_ratio;
        match self.schedule {
            Schedule::Constant => self.lr,
            Schedule::Linear => floor + (self.lr - floor) * (1.0 - t),
            Schedule::Cosine => {
                floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }

    /// Refuses values that cannot train.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(
            self.lr > 0.0 && self.lr.is_finite(),
            "optim.lr must be positive, got {}",
            self.lr
        );
        anyhow::ensure!(
            self.betas.iter().all(|b| (0.0..1.0).contains(b)),
            "optim.betas must lie in [0, 1), got {:?}",
            self.betas
        );
        anyhow::ensure!(self.eps > 0.0, "optim.eps must be positive");
        anyhow::ensure!(self.weight_decay >= 0.0, "optim.weight_decay must be >= 0");
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.min_lr_ratio),
            "optim.min_lr_ratio must lie in [0, 1]"
        );
        if let Some(c) = self.clip_grad_norm {
            anyhow::ensure!(c > 0.0, "optim.clip_grad_norm must be positive");
        }
        if let Some(d) = self.ema_decay {
            anyhow::ensure!(
                (0.0..1.0).contains(&d),
                "optim.ema_decay must lie in [0, 1)"
            );
        }
        Ok(())
    }
}

impl RunConfig {
    /// Refuses values that cannot run.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.batch_size > 0, "run.batch_size must be at least 1");
        anyhow::ensure!(self.max_steps > 0, "run.max_steps must be at least 1");
        anyhow::ensure!(
            self.keep_checkpoints > 0,
            "run.keep_checkpoints must be at least 1"
        );
        anyhow::ensure!(self.log_every > 0, "run.log_every must be at least 1");
        if let Some(m) = self.max_minutes {
            anyhow::ensure!(m > 0.0, "run.max_minutes must be positive");
        }
        Ok(())
    }
}

/// A stage's own settings: a TOML section named after the stage (`[vae]`, `[clip]`, `[lm]`).
pub trait StageSection: for<'de> Deserialize<'de> + Serialize + Default {
    /// The section name.
    const NAME: &'static str;
}

/// A stage's configuration file: `[run]`, `[optim]` and the stage's own section `S`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageFile<S> {
    /// Loop settings.
    pub run: RunConfig,
    /// Optimiser settings.
    pub optim: OptimConfig,
    /// The stage's own settings.
    pub stage: S,
}

/// Reads and checks a TOML configuration; errors name the file, the key and the line.
pub fn load<S: StageSection>(path: &Path) -> Result<StageFile<S>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config {}", path.display()))?;
    parse(&text).with_context(|| format!("config {}", path.display()))
}

/// Parses and checks a configuration from TOML text.
pub fn parse<S: StageSection>(text: &str) -> Result<StageFile<S>> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut section = |name: &str| -> toml::Value {
        table
            .remove(name)
            .unwrap_or_else(|| toml::Value::Table(Default::default()))
    };
    let run: RunConfig = section("run")
        .try_into()
        .map_err(|e| anyhow::anyhow!("[run]: {e}"))?;
    let optim: OptimConfig = section("optim")
        .try_into()
        .map_err(|e| anyhow::anyhow!("[optim]: {e}"))?;
    let stage: S = section(S::NAME)
        .try_into()
        .map_err(|e| anyhow::anyhow!("[{}]: {e}", S::NAME))?;
    if let Some(extra) = table.keys().next() {
        anyhow::bail!(
            "unknown section or key `{extra}` (expected [run], [optim] and [{}])",
            S::NAME
        )
    }
    run.validate()?;
    optim.validate()?;
    Ok(StageFile { run, optim, stage })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Demo {
        width: usize,
    }
    impl StageSection for Demo {
        const NAME: &'static str = "demo";
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_by_name() {
        let err = parse::<Demo>("[run]\nbatch_sise = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("batch_sise"), "{err}");
        let err = parse::<Demo>("[demo]\nwidht = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("widht"), "{err}");
        let err = parse::<Demo>("[optim]\nlr = \"fast\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("lr") || err.contains("invalid type"), "{err}");
        let err = parse::<Demo>("[optim]\nlr = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim.lr"), "{err}");
        let err = parse::<Demo>("[demoo]\nwidth = 4\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("demoo"), "{err}");
        let ok = parse::<Demo>("[run]\nmax_steps = 7\n[demo]\nwidth = 3\n").unwrap();
        assert_eq!((ok.run.max_steps, ok.stage.width), (7, 3));
    }

    #[test]
    fn learning_rate_warms_up_then_decays_to_the_floor() {
        let o = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((o.lr_at(0, 110) - 0.1).abs() < 1e-12);
        assert!((o.lr_at(9, 110) - 1.0).abs() < 1e-12);
        assert!((o.lr_at(10, 110) - 1.0).abs() < 1e-12);
        assert!((o.lr_at(60, 110) - 0.55).abs() < 1e-12);
        assert!((o.lr_at(110, 110) - 0.1).abs() < 1e-12);
        let lin = OptimConfig {
            schedule: Schedule::Linear,
            ..o.clone()
        };
        assert!((lin.lr_at(60, 110) - 0.55).abs() < 1e-12);
        let c = OptimConfig {
            schedule: Schedule::Constant,
            ..o
        };
        assert_eq!(c.lr_at(100, 110), 1.0);
    }
}
