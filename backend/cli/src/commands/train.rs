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
    /// The stage's TOML configuration ([run], [optim] and the stage's own section); for `all`,
    /// the plan naming every stage's file (configs/toy.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// The dataset directory (FlintstonesSV layout, e.g. from `storygpt-v toyworld generate`).
    /// `all` without it generates the plan's toy world into OUT/data.
    #[arg(long)]
    pub data: Option<PathBuf>,
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
    /// The VAE's decoder fine-tuned with its encoder frozen (the latent space, and so every
    /// model trained on it, unchanged), on the VAE the vae stage wrote into --out.
    VaeDecoder,
    /// The toy CLIP text and vision towers, contrastively (caption <-> frame, name <-> portrait).
    Clip,
    /// The toy causal LM (OPT family) on the dataset's stories, with its own BPE vocabulary.
    Lm,
    /// StoryGPT-V stage 1: the Char-LDM (UNet, FuseModule, last CLIP vision layers) on the
    /// base models the vae and clip stages wrote into --out.
    CharLdm,
    /// StoryGPT-V stage 2: Mapper_LLM, the [IMG] rows and Mapper_LDM on the frozen LLM and
    /// stage 1; completes the bundle (bundle.toml).
    Stage2,
    /// Every stage in order into one bundle, from a plan (configs/toy.toml).
    All,
    /// The evaluation classifier (characters and background of a frame) on the dataset's
    /// ground-truth frames; writes OUT/classifier for `storygpt-v eval` (docs/EVALUATION.md).
    Classifier,
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
    let data = match (&args.data, args.stage) {
        (Some(d), _) => d.clone(),
        (None, StageArg::All) => PathBuf::new(),
        (None, _) => anyhow::bail!("--data DIR is required (only `train all` can make its own)"),
    };
    let driver = train::driver::DriverArgs {
        config: args.config,
        data,
        out: args.out,
        resume: args.resume,
        max_steps: args.max_steps,
        max_minutes: args.max_minutes,
        device,
        stop,
    };
    if let StageArg::All = args.stage {
        let report = train::all::train_all(&driver, args.data.as_deref())?;
        for (stage, r) in &report.stages {
            tracing::info!(stage = %stage, steps = r.steps, ending = ?r.ending, "stage done");
        }
        anyhow::ensure!(
            report.ending == train::Ending::Finished,
            "train all stopped before the end ({:?}); continue with --resume",
            report.ending
        );
        return Ok(());
    }
    let report = match args.stage {
        StageArg::Vae => train::driver::train_vae(&driver)?,
        StageArg::VaeDecoder => train::driver::train_vae_decoder(&driver)?,
        StageArg::Lm => train::driver::train_lm(&driver)?,
        StageArg::Clip => train::driver::train_clip(&driver)?,
        StageArg::CharLdm => train::driver::train_char_ldm(&driver)?,
        StageArg::Stage2 => train::driver::train_stage2(&driver)?,
        StageArg::Classifier => train::driver::train_classifier(&driver)?,
        StageArg::All => unreachable!("handled above"),
    };
    tracing::info!(steps = report.steps, ending = ?report.ending, "training stopped");
    Ok(())
}
