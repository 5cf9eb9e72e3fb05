//! DDIM (diffusers `DDIMScheduler`): deterministic for `eta = 0`, ancestral-like for `eta > 0`.

use super::{
    int_timestep, lin2, noise_like, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};
use candle_core::{Result, Tensor};

/// `DDIMScheduler`. Defaults: `clip_sample = true`, `set_alpha_to_one = true`, leading spacing.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
    /// Weight of the stochastic part (0 = deterministic DDIM, 1 = DDPM-like).
    pub eta: f32,
    /// Recompute epsilon from the clipped `x0` (diffusers' `use_clipped_model_output`).
    pub use_clipped_model_output: bool,
}

impl DdimScheduler {
    /// Builds the scheduler with `eta = 0`.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if config.thresholding {
            candle_core::bail!("DDIMScheduler: `thresholding` is not supported")
        }
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let n = config.num_train_timesteps;
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            num_inference_steps: n,
            eta: 0.0,
            use_clipped_model_output: false,
            config,
        })
    }

    /// Sets `eta` (builder style).
    pub fn with_eta(mut self, eta: f32) -> Self {
        self.eta = eta;
        self
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let spacing = self
            .config
            .timestep_spacing
            .unwrap_or(TimestepSpacing::Leading);
        self.timesteps = self
            .config
            .int_timesteps(num_inference_steps, spacing)?
            .into_iter()
            .map(|t| t as f64)
            .collect();
        self.num_inference_steps = num_inference_steps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let big = self.config.num_train_timesteps;
        let t = int_timestep(t, big)?;
        let prev_t = t as i64 - (big / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t];
        let a_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            self.final_alpha_cumprod
        };
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let dtype = sample.dtype();
        let mo = model_output.to_dtype(dtype)?;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let (mut x0, mut eps) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                (sample - mo.affine(sb as f64, 0.0)?)?.affine(1.0 / sa as f64, 0.0)?,
                mo.clone(),
            ),
            PredictionType::Sample => (
                mo.clone(),
                (sample - mo.affine(sa as f64, 0.0)?)?.affine(1.0 / sb as f64, 0.0)?,
            ),
            PredictionType::VPrediction => {
                (lin2(sample, sa, &mo, -sb)?, lin2(&mo, sa, sample, sb)?)
            }
        };
        if self.config.clip_sample.unwrap_or(true) {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std = self.eta * variance.sqrt();
        if self.use_clipped_model_output {
            eps = (sample - x0.affine(sa as f64, 0.0)?)?.affine(1.0 / sb as f64, 0.0)?;
        }
        let dir_coeff = (1.0 - a_prev - std * std).sqrt();
        let mut prev = lin2(&x0, a_prev.sqrt(), &eps, dir_coeff)?;
        if self.eta > 0.0 {
            let noise = noise_like(noise, sample)?;
            prev = (prev + noise.affine(std as f64, 0.0)?)?;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let t = int_timestep(t, self.config.num_train_timesteps)?;
        let a = self.alphas_cumprod[t];
        lin2(original, a.sqrt(), noise, (1.0 - a).sqrt())
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}
