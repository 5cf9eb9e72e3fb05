//! Noise schedulers, built from diffusers' `scheduler_config.json` and numerically faithful to
//! diffusers (timesteps identical, trajectories within f32 rounding).
//!
//! Schedulers are pure maths: no network, no randomness of their own when the caller passes the
//! noise (so tests and seeded generation are deterministic). Four kinds:
//!
//! * [`DdpmScheduler`]: training maths ([`DdpmScheduler::add_noise`], velocity, training targets)
//!   and ancestral DDPM sampling.
//! * [`DdimScheduler`]: DDIM with `eta`.
//! * [`PndmScheduler`]: PLMS (`skip_prk_steps = true`, the Stable Diffusion 1.5 default) and the
//!   Runge-Kutta warm-up (`skip_prk_steps = false`).
//! * [`EulerAncestralScheduler`]: Euler ancestral with `init_noise_sigma` and input scaling.
//!
//! All implement [`Scheduler`]. The sampling loop is the diffusers one:
//!
//! ```text
//! sched.set_timesteps(n)?;
//! let mut x = (initial_noise * sched.init_noise_sigma())?;
//! for &t in sched.timesteps().to_vec().iter() {
//!     let inp = sched.scale_model_input(&x, t)?;
//!     let out = unet(inp, t);
//!     x = sched.step(&out, t, &x, Some(&noise_for_this_step))?;
//! }
//! ```

mod config;
mod ddim;
mod ddpm;
mod euler_ancestral;
mod pndm;

pub use config::{
    BetaSchedule, PredictionType, SchedulerConfig, SchedulerKind, TimestepSpacing, VarianceType,
};
pub use ddim::DdimScheduler;
pub use ddpm::DdpmScheduler;
pub use euler_ancestral::EulerAncestralScheduler;
pub use pndm::PndmScheduler;

use candle_core::{Result, Tensor};
use std::path::Path;

/// The interface shared by every sampler (mirrors diffusers' `SchedulerMixin`).
///
/// Timesteps are `f64` because Euler-type schedulers use fractional timesteps; integer
/// schedulers hold whole numbers. Pass the values of [`Scheduler::timesteps`] back unchanged.
pub trait Scheduler: Send {
    /// Prepares `num_inference_steps` sampling steps (resets any multistep state).
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;
    /// The timesteps to visit, in order (after [`Scheduler::set_timesteps`]).
    fn timesteps(&self) -> &[f64];
    /// The standard deviation of the initial noise (multiply unit Gaussian noise by it);
    /// 1 except for sigma-parameterised (Euler-type) schedulers.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the denoising model's input for timestep `t`: the identity except for
    /// Euler-type schedulers.
    fn scale_model_input(&mut self, sample: &Tensor, _t: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// One reverse step: from `sample` at `t` and the model output, the previous sample.
    /// `noise` (unit Gaussian, shaped like `sample`) is used by stochastic steps; `None` draws
    /// it from candle's generator.
    fn step(
        &mut self,
        model_output: &Tensor,
        t: f64,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor>;
    /// Forward-diffuses `original` to timestep `t` (image-to-image starts, training).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: f64) -> Result<Tensor>;
    /// The configuration the scheduler was built from.
    fn config(&self) -> &SchedulerConfig;
}

/// Builds the scheduler named by `kind` from `config`.
pub fn build(kind: SchedulerKind, config: SchedulerConfig) -> Result<Box<dyn Scheduler>> {
    Ok(match kind {
        SchedulerKind::Ddpm => Box::new(DdpmScheduler::new(config)?),
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config)?),
        SchedulerKind::EulerAncestral => Box::new(EulerAncestralScheduler::new(config)?),
    })
}

/// Reads a `scheduler_config.json` (file, or a directory holding it, such as a diffusers
/// pipeline's `scheduler/`) and builds `kind`, or the class the file names when `kind` is
/// `None`.
pub fn from_file(path: &Path, kind: Option<SchedulerKind>) -> anyhow::Result<Box<dyn Scheduler>> {
    let config = SchedulerConfig::from_file(path)?;
    let kind = match kind {
        Some(k) => k,
        None => config.class_kind().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: `_class_name` {:?} is not a scheduler this build knows (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerAncestralDiscreteScheduler); name the kind explicitly",
                path.display(),
                config.class_name
            )
        })?,
    };
    build(kind, config).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

/// Converts a timestep to an index into the training schedule, refusing fractions.
pub(crate) fn int_timestep(t: f64, num_train_timesteps: usize) -> Result<usize> {
    if t < 0.0 || t.fract() != 0.0 || t as usize >= num_train_timesteps {
        candle_core::bail!(
            "timestep {t} is not an integer in 0..{num_train_timesteps} (pass the values of timesteps() unchanged)"
        )
    }
    Ok(t as usize)
}

/// Draws unit Gaussian noise like `sample` when the caller passed none, and checks the shape.
pub(crate) fn noise_like(noise: Option<&Tensor>, sample: &Tensor) -> Result<Tensor> {
    match noise {
        Some(n) => {
            if n.dims() != sample.dims() {
                candle_core::bail!(
                    "noise has shape {:?}, the sample {:?}",
                    n.dims(),
                    sample.dims()
                )
            }
            n.to_dtype(sample.dtype())
        }
        None => {
            Tensor::randn(0f32, 1f32, sample.shape(), sample.device())?.to_dtype(sample.dtype())
        }
    }
}

/// `a * x + b * y` for scalars `a`, `b`.
pub(crate) fn lin2(x: &Tensor, a: f32, y: &Tensor, b: f32) -> Result<Tensor> {
    x.affine(a as f64, 0.0)? + y.affine(b as f64, 0.0)?
}
