//! PNDM (diffusers `PNDMScheduler`): pseudo linear multistep (PLMS), optionally preceded by the
//! pseudo Runge-Kutta warm-up. Stable Diffusion 1.5 ships it with `skip_prk_steps = true`.
//!
//! Like diffusers, the scheduler is stateful: it keeps the last model outputs, and the PLMS
//! schedule visits the second timestep twice (`n + 1` model calls for `n` steps).

use super::config::{linspace_f64, round_half_even, trailing_f64};
use super::{int_timestep, lin2, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use candle_core::{Result, Tensor};

/// `PNDMScheduler`. Defaults: `set_alpha_to_one = false`, leading spacing, PRK warm-up on.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    prk_timesteps: Vec<i64>,
    num_inference_steps: usize,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl PndmScheduler {
    /// Builds the scheduler.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        if !matches!(
            config.prediction_type,
            PredictionType::Epsilon | PredictionType::VPrediction
        ) {
            candle_core::bail!(
                "PNDMScheduler supports prediction_type epsilon and v_prediction only"
            )
        }
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let mut s = Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            prk_timesteps: Vec::new(),
            num_inference_steps: 0,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
            config,
        };
        let n = s.config.num_train_timesteps;
        s.set_timesteps(n)?;
        Ok(s)
    }

    /// The spaced timesteps ascending, as diffusers' `_timesteps`.
    fn base_timesteps(&self, n: usize) -> Result<Vec<i64>> {
        let big = self.config.num_train_timesteps;
        if n == 0 || n > big {
            candle_core::bail!("num_inference_steps must be in 1..={big}, got {n}")
        }
        Ok(
            match self
                .config
                .timestep_spacing
                .unwrap_or(TimestepSpacing::Leading)
            {
                TimestepSpacing::Linspace => linspace_f64(0.0, (big - 1) as f64, n)
                    .into_iter()
                    .map(|x| round_half_even(x) as i64)
                    .collect(),
                TimestepSpacing::Leading => (0..n)
                    .map(|i| (i * (big / n) + self.config.steps_offset) as i64)
                    .collect(),
                TimestepSpacing::Trailing => trailing_f64(big, n)
                    .into_iter()
                    .rev()
                    .map(|x| round_half_even(x) as i64 - 1)
                    .collect(),
            },
        )
    }

    fn ratio(&self) -> i64 {
        (self.config.num_train_timesteps / self.num_inference_steps) as i64
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 {
            // A zero-terminal-SNR schedule ends at exactly 0, where formula (9) divides by
            // zero; 2^-24 is the floor diffusers' Euler schedulers use for the same reason.
            self.alphas_cumprod[t as usize].max(2f32.powi(-24))
        } else {
            self.final_alpha_cumprod
        }
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, mo: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev_t);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let mo = match self.config.prediction_type {
            PredictionType::VPrediction => lin2(mo, a_t.sqrt(), sample, b_t.sqrt())?,
            _ => mo.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lin2(sample, sample_coeff, &mo, -(a_prev - a_t) / denom)
    }

    fn step_prk(&mut self, mo: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 {
            0
        } else {
            self.ratio() / 2
        };
        let prev_t = t - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let mut mo = mo.clone();
        let acc = |cur: &Option<Tensor>, x: Tensor| -> Result<Tensor> {
            match cur {
                Some(c) => c + x,
                None => Ok(x),
            }
        };
        match self.counter % 4 {
            0 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, mo.affine(1.0 / 6.0, 0.0)?)?);
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                self.cur_model_output =
                    Some(acc(&self.cur_model_output, mo.affine(1.0 / 3.0, 0.0)?)?);
            }
            _ => {
                mo = acc(&self.cur_model_output, mo.affine(1.0 / 6.0, 0.0)?)?;
                self.cur_model_output = None;
            }
        }
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let out = self.prev_sample(&cur, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }

    fn step_plms(&mut self, mo: &Tensor, t: i64, sample: &Tensor) -> Result<Tensor> {
        if !self.config.skip_prk_steps && self.ets.len() < 3 {
            candle_core::bail!(
                "PNDM: PLMS step needs the Runge-Kutta warm-up first (run the steps in order)"
            )
        }
        let mut t = t;
        let mut prev_t = t - self.ratio();
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(mo.clone());
        } else {
            prev_t = t;
            t += self.ratio();
        }
        let mut sample = sample.clone();
        let e = &self.ets;
        let n = e.len();
        let mo = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            mo.clone()
        } else if n == 1 && self.counter == 1 {
            sample = self
                .cur_sample
                .take()
                .ok_or_else(|| candle_core::Error::Msg("PNDM: missing stored sample".into()))?;
            ((mo + &e[0])? * 0.5)?
        } else if n == 2 {
            lin2(&e[1], 1.5, &e[0], -0.5)?
        } else if n == 3 {
            ((e[2].affine(23.0, 0.0)? - e[1].affine(16.0, 0.0)?)? + e[0].affine(5.0, 0.0)?)?
                .affine(1.0 / 12.0, 0.0)?
        } else {
            (((e[3].affine(55.0, 0.0)? - e[2].affine(59.0, 0.0)?)? + e[1].affine(37.0, 0.0)?)?
                - e[0].affine(9.0, 0.0)?)?
            .affine(1.0 / 24.0, 0.0)?
        };
        let out = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
        Ok(out)
    }
}

impl Scheduler for PndmScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let base = self.base_timesteps(num_inference_steps)?;
        self.num_inference_steps = num_inference_steps;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.config.skip_prk_steps {
            let m = base.len();
            let mut plms: Vec<i64> = base[..m - 1].to_vec();
            if m >= 2 {
                plms.push(base[m - 2]);
            }
            plms.push(base[m - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if base.len() < 4 {
                candle_core::bail!("PNDM with Runge-Kutta warm-up needs at least 4 steps")
            }
            let half = self.ratio() / 2;
            let tail = &base[base.len() - 4..];
            // np.array(tail).repeat(2) + np.tile([0, half], 4)
            let rep: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            // (rep[:-1].repeat(2)[1:-1])[::-1]
            let r2: Vec<i64> = rep[..rep.len() - 1].iter().flat_map(|&t| [t, t]).collect();
            let mut prk = r2[1..r2.len() - 1].to_vec();
            prk.reverse();
            let mut plms = base[..base.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        self.timesteps = prk.iter().chain(plms.iter()).map(|&t| t as f64).collect();
        self.prk_timesteps = prk;
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        self.cur_model_output = None;
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
        _noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let t = int_timestep(t, self.config.num_train_timesteps)? as i64;
        let mo = model_output.to_dtype(sample.dtype())?;
        if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(&mo, t, sample)
        } else {
            self.step_plms(&mo, t, sample)
        }
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
