//! Euler ancestral (diffusers `EulerAncestralDiscreteScheduler`): k-diffusion's ancestral Euler
//! sampler in sigma space, with fractional timesteps interpolated from the training schedule.

use super::config::{linspace_f64, round_half_even, trailing_f64};
use super::{lin2, noise_like, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use candle_core::{Result, Tensor};

/// `EulerAncestralDiscreteScheduler`. Default spacing: linspace.
#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    config: SchedulerConfig,
    /// `sqrt((1 - a) / a)` over the training schedule, as f32 (diffusers' numpy copy).
    train_sigmas: Vec<f32>,
    sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    step_index: Option<usize>,
}

impl EulerAncestralScheduler {
    /// Builds the scheduler.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if config.prediction_type == PredictionType::Sample {
            candle_core::bail!("EulerAncestralDiscreteScheduler: prediction_type `sample` is not supported (as in diffusers)")
        }
        let mut ac = config.alphas_cumprod()?;
        if config.rescale_betas_zero_snr {
            // diffusers: "close to 0 without being 0 so first sigma is not inf".
            if let Some(last) = ac.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas: Vec<f32> = ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        let mut sigmas: Vec<f32> = train_sigmas.iter().rev().copied().collect();
        sigmas.push(0.0);
        let n = config.num_train_timesteps;
        Ok(Self {
            timesteps: (0..n).rev().map(|t| t as f64).collect(),
            train_sigmas,
            sigmas,
            step_index: None,
            config,
        })
    }

    /// The sigmas of the current schedule (one more than the timesteps, ending in 0).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn spacing(&self) -> TimestepSpacing {
        self.config
            .timestep_spacing
            .unwrap_or(TimestepSpacing::Linspace)
    }

    /// diffusers' `index_for_timestep`: the second match if the timestep repeats, else the first.
    fn index_for(&self, t: f64) -> Result<usize> {
        let hits: Vec<usize> = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, x)| (**x as f32) == (t as f32))
            .map(|(i, _)| i)
            .collect();
        match hits.len() {
            0 => candle_core::bail!(
                "timestep {t} is not in the schedule (pass the values of timesteps())"
            ),
            1 => Ok(hits[0]),
            _ => Ok(hits[1]),
        }
    }

    fn current_index(&mut self, t: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => {
                let i = self.index_for(t)?;
                self.step_index = Some(i);
                Ok(i)
            }
        }
    }
}

impl Scheduler for EulerAncestralScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let big = self.config.num_train_timesteps;
        if n == 0 || n > big {
            candle_core::bail!("num_inference_steps must be in 1..={big}, got {n}")
        }
        let ts: Vec<f32> = match self.spacing() {
            TimestepSpacing::Linspace => linspace_f64(0.0, (big - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|x| x as f32)
                .collect(),
            TimestepSpacing::Leading => (0..n)
                .rev()
                .map(|i| (i * (big / n)) as f32 + self.config.steps_offset as f32)
                .collect(),
            TimestepSpacing::Trailing => trailing_f64(big, n)
                .into_iter()
                .map(|x| round_half_even(x) as f32 - 1.0)
                .collect(),
        };
        // np.interp(timesteps, arange(N), sigmas) in f64, then cast to f32.
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| {
                let t = t as f64;
                let lo = (t.floor() as usize).min(big - 1);
                let hi = (lo + 1).min(big - 1);
                let (s0, s1) = (self.train_sigmas[lo] as f64, self.train_sigmas[hi] as f64);
                let frac = t - lo as f64;
                (if hi == lo { s0 } else { s0 + (s1 - s0) * frac }) as f32
            })
            .collect();
        sigmas.push(0.0);
        self.sigmas = sigmas;
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().cloned().fold(0f32, f32::max);
        match self.spacing() {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    fn scale_model_input(&mut self, sample: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.current_index(t)?;
        let sigma = self.sigmas[i];
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt() as f64, 0.0)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let i = self.current_index(t)?;
        if i + 1 >= self.sigmas.len() {
            candle_core::bail!("Euler ancestral: step {i} is past the end of the schedule")
        }
        let sigma = self.sigmas[i];
        let mo = model_output.to_dtype(sample.dtype())?;
        let x0 = match self.config.prediction_type {
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                lin2(&mo, -sigma / s2.sqrt(), sample, 1.0 / s2)?
            }
            _ => lin2(sample, 1.0, &mo, -sigma)?,
        };
        let sigma_to = self.sigmas[i + 1];
        let sigma_up =
            (sigma_to * sigma_to * (sigma * sigma - sigma_to * sigma_to) / (sigma * sigma)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).sqrt();
        let derivative = (sample - x0)?.affine(1.0 / sigma as f64, 0.0)?;
        let dt = sigma_down - sigma;
        let mut prev = (sample + derivative.affine(dt as f64, 0.0)?)?;
        if sigma_up > 0.0 {
            let noise = noise_like(noise, sample)?;
            prev = (prev + noise.affine(sigma_up as f64, 0.0)?)?;
        }
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor> {
        let i = self.index_for(t)?;
        lin2(original, 1.0, noise, self.sigmas[i])
    }

    fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}
