//! `storygpt-v train STAGE --config FILE.toml --data DIR --out DIR`: trains one stage of the
//! toy bundle (see docs/TRAINING.md).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
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
    /// `all` on the CPU: train every stage in this process, one after the other, instead of
    /// clip and lm in a second process beside vae and vae-decoder (the same weights either way).
    #[arg(long)]
    pub one_lane: bool,
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

/// Trains a stage, or every stage of a plan; `log_format` is passed on to a second lane's
/// process.
pub fn run(args: TrainArgs, log_format: super::LogFormat) -> anyhow::Result<()> {
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
        config: args.config.clone(),
        data,
        out: args.out.clone(),
        resume: args.resume,
        max_steps: args.max_steps,
        max_minutes: args.max_minutes,
        device,
        stop,
    };
    if let StageArg::All = args.stage {
        let exe = std::env::current_exe().context("finding this program to run a second lane")?;
        let second_lane = |stage: &str, stage_args: &train::driver::DriverArgs, threads: usize| {
            stage_in_a_process(&exe, stage, stage_args, &args.device, log_format, threads)
        };
        // One device cannot overlap two stages usefully; two CPU cores can (docs/TRAINING.md).
        let lanes = !args.one_lane && driver.device.is_cpu();
        let report = train::all::train_all(
            &driver,
            args.data.as_deref(),
            lanes.then_some(&second_lane as train::all::SecondLane<'_>),
        )?;
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

/// Runs `train STAGE` for `train all`'s second lane as a child process of this program and
/// waits for it, forwarding a stop (the child then writes a checkpoint and exits); the child
/// writes its part of the bundle and its record in `training.json`, which the report is read
/// back from (`train::all::report_from_files`).
fn stage_in_a_process(
    exe: &std::path::Path,
    stage: &str,
    args: &train::driver::DriverArgs,
    device: &str,
    log_format: super::LogFormat,
    threads: usize,
) -> anyhow::Result<train::driver::StageReport> {
    let format = match log_format {
        super::LogFormat::Pretty => "pretty",
        super::LogFormat::Json => "json",
    };
    let mut command = std::process::Command::new(exe);
    command
        .args(["--log-format", format, "train", stage, "--config"])
        .arg(&args.config)
        .arg("--data")
        .arg(&args.data)
        .arg("--out")
        .arg(&args.out)
        .args(["--device", device])
        // Its share of the cores (train::all::lane_threads); the kernels' results do not
        // depend on the thread count.
        .env("RAYON_NUM_THREADS", threads.to_string());
    if args.resume {
        command.arg("--resume");
    }
    if let Some(n) = args.max_steps {
        command.args(["--max-steps", &n.to_string()]);
    }
    if let Some(m) = args.max_minutes {
        command.args(["--max-minutes", &m.to_string()]);
    }
    eprintln!(
        "train all: stage {stage} from {} (second process)",
        args.config.display()
    );
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {} train {stage}", exe.display()))?;
    let mut stop_sent = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if !stop_sent && args.stop.load(std::sync::atomic::Ordering::SeqCst) {
            // SIGTERM, not kill(): the child stops after its step with a checkpoint.
            let pid = libc::pid_t::try_from(child.id()).context("child process id")?;
            // SAFETY: kill(2) with a pid this process spawned and has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            stop_sent = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    // A stop that came before the child had set up its signal handling ends it by the signal
    // itself: stopped all the same, with whatever checkpoint it had.
    let stopped_early =
        stop_sent && std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGTERM);
    anyhow::ensure!(
        status.success() || stopped_early,
        "train {stage} (a second process) failed ({status}); its messages are above"
    );
    // It ended cleanly: finished (its record is in training.json), or stopped or out of time
    // with a checkpoint.
    let unfinished = if stop_sent || args.stop.load(std::sync::atomic::Ordering::SeqCst) {
        train::Ending::Stopped
    } else {
        train::Ending::TimeLimit
    };
    train::all::report_from_files(&args.out, stage, unfinished)
}
