//! `storygpt-v train STAGE --config FILE.toml --data DIR --out DIR`: trains one stage of the
//! toy bundle (see docs/TRAINING.md).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, ValueEnum};

/// Arguments of `storygpt-v train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// The stage to train.
    #[arg(value_enum)]
    pub stage: StageArg,
    /// The stage's TOML configuration ([run], [optim] and the stage's own section).
    #[arg(long)]
    pub config: PathBuf,
    /// The dataset directory (FlintstonesSV layout, e.g. from `storygpt-v toyworld generate`).
    #[arg(long)]
    pub data: PathBuf,
    /// The bundle directory: the stage writes its part here; runs and checkpoints go under
    /// `runs/STAGE`.
    #[arg(long)]
    pub out: PathBuf,
    /// Continue the stage's run from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Overrides run.max_steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Overrides run.max_minutes (the run stops with a checkpoint; --resume continues).
    #[arg(long)]
    pub max_minutes: Option<f64>,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "STORYGPT_DEVICE")]
    pub device: String,
}

/// The trainable stages.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum StageArg {
    /// The toy AutoencoderKL on the dataset's frames.
    Vae,
    /// The toy CLIP text and vision towers, contrastively (caption <-> frame, name <-> portrait).
    Clip,
    /// The toy causal LM (OPT family) on the dataset's stories, with its own BPE vocabulary.
    Lm,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    // candle's element-wise thread pool spins while idle, which on a 2-core machine takes cycles
    // from the rayon threads doing the convolutions: measured 10-15% faster steps without it.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let device = nn::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let stop = Arc::new(AtomicBool::new(false));
    // A stop signal finishes the current step and writes a checkpoint before exiting.
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let driver = train::driver::DriverArgs {
        config: args.config,
        data: args.data,
        out: args.out,
        resume: args.resume,
        max_steps: args.max_steps,
        max_minutes: args.max_minutes,
        device,
        stop,
    };
    let report = match args.stage {
        StageArg::Vae => train::driver::train_vae(&driver)?,
        StageArg::Lm => train::driver::train_lm(&driver)?,
        StageArg::Clip => train::driver::train_clip(&driver)?,
    };
    tracing::info!(steps = report.steps, ending = ?report.ending, "training stopped");
    Ok(())
}
