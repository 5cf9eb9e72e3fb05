//! `scheduler_config.json` as diffusers writes it, and the noise-schedule maths every scheduler
//! shares (betas, cumulative alphas, timestep spacing).
//!
//! Keys a scheduler does not use are ignored. Keys whose diffusers default depends on the
//! scheduler class (`clip_sample`, `set_alpha_to_one`, `timestep_spacing`, ...) are `Option`s
//! resolved by each scheduler with diffusers' default for that class.

use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How betas grow over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `linspace(beta_start, beta_end, N)`.
    #[default]
    Linear,
    /// `linspace(sqrt(beta_start), sqrt(beta_end), N)^2` (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal (`betas_for_alpha_bar`, max beta 0.999).
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the denoising network predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (Stable Diffusion 1.5, StoryGPT-V).
    #[default]
    Epsilon,
    /// The velocity `sqrt(a) * noise - sqrt(1 - a) * x0`.
    VPrediction,
    /// The clean sample `x0`.
    Sample,
}

/// How inference timesteps are spread over the training range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `arange(n) * (N // n) + steps_offset`, descending.
    Leading,
    /// `round(arange(N, 0, -N/n)) - 1`.
    Trailing,
    /// `round(linspace(0, N - 1, n))`, descending (fractional for Euler-type schedulers).
    Linspace,
}

/// DDPM's posterior variance choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// `beta~_t = (1 - a_prev) / (1 - a_t) * beta_t`.
    #[default]
    FixedSmall,
    /// `exp(0.5 * log(beta~_t))`, used as a standard deviation directly (diffusers quirk).
    FixedSmallLog,
    /// `beta_t`.
    FixedLarge,
}

/// The scheduler classes this crate implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// `DDPMScheduler`.
    Ddpm,
    /// `DDIMScheduler`.
    Ddim,
    /// `PNDMScheduler`.
    Pndm,
    /// `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
}

impl SchedulerKind {
    /// Every kind, in the order a menu lists them.
    pub const ALL: [SchedulerKind; 4] = [Self::Pndm, Self::Ddim, Self::EulerAncestral, Self::Ddpm];

    /// The short name that [`SchedulerKind::from_str`](std::str::FromStr) reads back.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::EulerAncestral => "euler-a",
        }
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "ddpm" | "ddpmscheduler" => Self::Ddpm,
            "ddim" | "ddimscheduler" => Self::Ddim,
            "pndm" | "plms" | "pndmscheduler" => Self::Pndm,
            "euler_a"
            | "euler-a"
            | "euler_ancestral"
            | "euler-ancestral"
            | "eulerancestraldiscretescheduler" => Self::EulerAncestral,
            other => {
                return Err(format!(
                    "unknown scheduler `{other}`: use ddpm, ddim, pndm or euler-a"
                ))
            }
        })
    }
}

fn d_num_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_clip_range() -> f64 {
    1.0
}

/// The contents of a diffusers `scheduler_config.json`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name`, e.g. `PNDMScheduler` (informative; used by [`super::from_file`]).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training timesteps `N` (1000).
    #[serde(default = "d_num_train")]
    pub num_train_timesteps: usize,
    /// First beta (1e-4).
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    /// Last beta (0.02).
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    /// Beta schedule (linear).
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    /// Explicit betas overriding the schedule.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// Network parameterisation (epsilon).
    #[serde(default)]
    pub prediction_type: PredictionType,
    /// Timestep spacing (default: leading; linspace for Euler ancestral).
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Added to leading-spaced timesteps (0; Stable Diffusion configs say 1).
    #[serde(default)]
    pub steps_offset: usize,
    /// Use alpha_cumprod = 1 after the last step (DDIM default true, PNDM default false).
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// Clamp the predicted `x0` (DDPM / DDIM default true).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// Clamp range for `clip_sample` (1.0).
    #[serde(default = "d_clip_range")]
    pub clip_sample_range: f64,
    /// PNDM: PLMS only, no Runge-Kutta warm-up (default false; Stable Diffusion: true).
    #[serde(default)]
    pub skip_prk_steps: bool,
    /// DDPM variance (fixed_small).
    #[serde(default)]
    pub variance_type: Option<VarianceType>,
    /// Dynamic thresholding (not implemented; `true` is refused).
    #[serde(default)]
    pub thresholding: bool,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty config parses")
    }
}

impl SchedulerConfig {
    /// Stable Diffusion 1.5's `scheduler/scheduler_config.json` (PNDM, PLMS only).
    pub fn stable_diffusion_v1_5() -> Self {
        Self {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            skip_prk_steps: true,
            ..Self::default()
        }
    }

    /// Reads `path` (a `scheduler_config.json` or a directory holding one).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let file = if path.is_dir() {
            path.join("scheduler_config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read scheduler config {}", file.display()))?;
        serde_json::from_str(&text)
            .with_context(|| format!("invalid scheduler config {}", file.display()))
    }

    /// The scheduler class named by `_class_name`, if this crate implements it.
    pub fn class_kind(&self) -> Option<SchedulerKind> {
        self.class_name.as_deref()?.parse().ok()
    }

    /// Training betas in f32, as diffusers computes them.
    pub fn betas(&self) -> candle_core::Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        if n < 2 {
            candle_core::bail!("num_train_timesteps must be at least 2, got {n}")
        }
        let betas: Vec<f32> = if let Some(b) = &self.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => linspace_f32(self.beta_start, self.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    linspace_f32(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                        .into_iter()
                        .map(|x| x * x)
                        .collect()
                }
                BetaSchedule::SquaredcosCapV2 => {
                    let ab = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let t1 = i as f64 / n as f64;
                            let t2 = (i + 1) as f64 / n as f64;
                            (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                        })
                        .collect()
                }
            }
        };
        if self.rescale_betas_zero_snr {
            Ok(rescale_zero_terminal_snr(&betas))
        } else {
            Ok(betas)
        }
    }

    /// `cumprod(1 - betas)` in f32 (accumulated in f64, as torch does on the CPU). With
    /// `rescale_betas_zero_snr` the last value is exactly 0 (Euler ancestral replaces it).
    pub fn alphas_cumprod(&self) -> candle_core::Result<Vec<f32>> {
        let betas = self.betas()?;
        let mut acc = 1f64;
        let mut out = Vec::with_capacity(betas.len());
        for b in betas {
            acc *= (1f32 - b) as f64;
            out.push(acc as f32);
        }
        Ok(out)
    }

    /// Spaced integer timesteps, descending, for DDPM / DDIM (and, reversed, PNDM).
    pub(crate) fn int_timesteps(
        &self,
        n: usize,
        spacing: TimestepSpacing,
    ) -> candle_core::Result<Vec<i64>> {
        let big = self.num_train_timesteps;
        if n == 0 || n > big {
            candle_core::bail!("num_inference_steps must be in 1..={big}, got {n}")
        }
        Ok(match spacing {
            TimestepSpacing::Linspace => linspace_f64(0.0, (big - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|x| round_half_even(x) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = big / n;
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.steps_offset) as i64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing_f64(big, n)
                .into_iter()
                .map(|x| round_half_even(x) as i64 - 1)
                .collect(),
        })
    }
}

/// `np.arange(N, 0, -N/n)` (float step), descending.
pub(crate) fn trailing_f64(big: usize, n: usize) -> Vec<f64> {
    let step = big as f64 / n as f64;
    // numpy: length = ceil((stop - start) / step), values start + i * step.
    let len = ((0.0 - big as f64) / -step).ceil() as usize;
    (0..len).map(|i| big as f64 - i as f64 * step).collect()
}

/// numpy's `round` (half to even).
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `np.linspace(a, b, n)` in f64 (numpy's formula: `a + i * step`, last value exactly `b`).
pub(crate) fn linspace_f64(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    let mut v: Vec<f64> = (0..n).map(|i| a + i as f64 * step).collect();
    v[n - 1] = b;
    v
}

/// `torch.linspace(a, b, n, dtype=float32)`: the step is computed in f32 and the second half is
/// counted back from `b`, as torch's CPU kernel does.
fn linspace_f32(a: f64, b: f64, n: usize) -> Vec<f32> {
    let (a, b) = (a as f32, b as f32);
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                a + step * i as f32
            } else {
                b - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

/// diffusers' `rescale_zero_terminal_snr`.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let mut sqrt_bar: Vec<f32> = betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            (acc as f32).sqrt()
        })
        .collect();
    let a0 = sqrt_bar[0];
    let at = *sqrt_bar.last().expect("non-empty");
    for s in sqrt_bar.iter_mut() {
        *s -= at;
        *s *= a0 / (a0 - at);
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    for i in 1..bar.len() {
        out.push(1.0 - bar[i] / bar[i - 1]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stable_diffusion_config_and_defaults() {
        let text = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false}"#;
        let c: SchedulerConfig = serde_json::from_str(text).unwrap();
        assert_eq!(c, SchedulerConfig::stable_diffusion_v1_5());
        assert_eq!(c.class_kind(), Some(SchedulerKind::Pndm));
        let d = SchedulerConfig::default();
        assert_eq!(d.num_train_timesteps, 1000);
        assert_eq!(d.beta_schedule, BetaSchedule::Linear);
    }

    #[test]
    fn spacing_matches_numpy() {
        let c = SchedulerConfig {
            steps_offset: 1,
            ..Default::default()
        };
        let lead = c.int_timesteps(10, TimestepSpacing::Leading).unwrap();
        assert_eq!(lead, vec![901, 801, 701, 601, 501, 401, 301, 201, 101, 1]);
        let trail = c.int_timesteps(3, TimestepSpacing::Trailing).unwrap();
        assert_eq!(trail, vec![999, 666, 332]);
        let lin = c.int_timesteps(4, TimestepSpacing::Linspace).unwrap();
        assert_eq!(lin, vec![999, 666, 333, 0]);
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
    }
}
