//! DDPM (diffusers `DDPMScheduler`): the training-time forward process (noising, velocity,
//! training targets) and ancestral sampling.

use super::{
    int_timestep, lin2, noise_like, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
    VarianceType,
};
use candle_core::{Result, Tensor};

/// `DDPMScheduler`. Defaults: `clip_sample = true`, leading spacing, `fixed_small` variance.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
}

impl DdpmScheduler {
    /// Builds the scheduler; refuses settings this crate does not implement.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if config.thresholding {
            candle_core::bail!("DDPMScheduler: `thresholding` is not supported")
        }
        let alphas_cumprod = config.alphas_cumprod()?;
        let n = config.num_train_timesteps;
        Ok(Self {
            alphas_cumprod,
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            config,
        })
    }

    /// The cumulative products of `1 - beta` (length `num_train_timesteps`).
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// Per-batch-element `(sqrt(a_t), sqrt(1 - a_t))` as `(b, 1, .., 1)` tensors for `x`.
    fn coefficients(&self, x: &Tensor, timesteps: &[usize]) -> Result<(Tensor, Tensor)> {
        let b = x.dim(0)?;
        if timesteps.len() != b {
            candle_core::bail!(
                "{} timesteps for a batch of {b} (one timestep per sample)",
                timesteps.len()
            )
        }
        let mut sa = Vec::with_capacity(b);
        let mut sb = Vec::with_capacity(b);
        for &t in timesteps {
            let a = *self.alphas_cumprod.get(t).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "timestep {t} >= num_train_timesteps {}",
                    self.config.num_train_timesteps
                ))
            })?;
            sa.push(a.sqrt());
            sb.push((1.0 - a).sqrt());
        }
        let mut shape = vec![b];
        shape.extend(std::iter::repeat_n(1, x.rank() - 1));
        let dev = x.device();
        let sa = Tensor::from_vec(sa, shape.as_slice(), dev)?.to_dtype(x.dtype())?;
        let sb = Tensor::from_vec(sb, shape.as_slice(), dev)?.to_dtype(x.dtype())?;
        Ok((sa, sb))
    }

    /// `sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`, one timestep per batch element.
    pub fn add_noise_batch(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(x0, timesteps)?;
        x0.broadcast_mul(&sa)? + noise.broadcast_mul(&sb)?
    }

    /// The velocity `sqrt(a_t) * noise - sqrt(1 - a_t) * x0` (v-prediction target).
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[usize]) -> Result<Tensor> {
        let (sa, sb) = self.coefficients(x0, timesteps)?;
        noise.broadcast_mul(&sa)? - x0.broadcast_mul(&sb)?
    }

    /// What the network should predict for `prediction_type`: the noise, the velocity or `x0`.
    pub fn training_target(
        &self,
        x0: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        match self.config.prediction_type {
            PredictionType::Epsilon => Ok(noise.clone()),
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => Ok(x0.clone()),
        }
    }

    fn prev_timestep(&self, t: usize) -> i64 {
        match self.timesteps.iter().position(|&x| x == t as f64) {
            Some(i) if i + 1 < self.timesteps.len() => self.timesteps[i + 1] as i64,
            Some(_) => -1,
            None => t as i64 - 1,
        }
    }

    fn alpha_prev(&self, prev_t: i64) -> f32 {
        if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize]
        } else {
            1.0
        }
    }
}

impl Scheduler for DdpmScheduler {
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
        let t = int_timestep(t, self.config.num_train_timesteps)?;
        let prev_t = self.prev_timestep(t);
        let a_t = self.alphas_cumprod[t];
        let a_prev = self.alpha_prev(prev_t);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let dtype = sample.dtype();
        let model_output = model_output.to_dtype(dtype)?;
        let mut x0 = match self.config.prediction_type {
            PredictionType::Epsilon => (sample - model_output.affine(b_t.sqrt() as f64, 0.0)?)?
                .affine(1.0 / a_t.sqrt() as f64, 0.0)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => lin2(sample, a_t.sqrt(), &model_output, -b_t.sqrt())?,
        };
        if self.config.clip_sample.unwrap_or(true) {
            let r = self.config.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let x0_coeff = a_prev.sqrt() * cur_beta / b_t;
        let sample_coeff = cur_alpha.sqrt() * b_prev / b_t;
        let mut prev = lin2(&x0, x0_coeff, sample, sample_coeff)?;
        if t > 0 {
            let noise = noise_like(noise, sample)?;
            let variance = (b_prev / b_t * cur_beta).max(1e-20);
            let std = match self.config.variance_type.unwrap_or_default() {
                VarianceType::FixedSmall => variance.sqrt(),
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => cur_beta.sqrt(),
            };
            prev = (prev + noise.affine(std as f64, 0.0)?)?;
        }
        prev.to_dtype(dtype)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let t = int_timestep(t, self.config.num_train_timesteps)?;
        let b = original.dim(0)?;
        self.add_noise_batch(original, noise, &vec![t; b])
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}
