//! `storygpt-v eval`: the paper's metrics on a dataset split, per system and story length
//! (see docs/EVALUATION.md).

use std::path::PathBuf;

use clap::{Args, ValueEnum};

/// Arguments of `storygpt-v eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    /// The model bundle to evaluate.
    #[arg(long)]
    pub bundle: PathBuf,
    /// The dataset (FlintstonesSV layout, e.g. from `storygpt-v toyworld generate`).
    #[arg(long)]
    pub data: PathBuf,
    /// The split whose stories are drawn.
    #[arg(long, value_enum, default_value_t = SplitArg::Test)]
    pub split: SplitArg,
    /// A system to evaluate (repeatable): ldm-text, char-ldm-names, storygpt-v. Default: all
    /// three.
    #[arg(long = "system")]
    pub systems: Vec<String>,
    /// The evaluation classifier (`train classifier --out DIR`, or its `classifier/`).
    #[arg(long)]
    pub classifier: PathBuf,
    /// Story lengths in frames, comma-separated (e.g. 4,10,20,40,50); the dataset needs
    /// stories at least that long.
    #[arg(long, value_delimiter = ',', default_value = "4")]
    pub frames: Vec<usize>,
    /// At most this many stories per length (default: the whole split; 2 with --quick).
    #[arg(long)]
    pub stories: Option<usize>,
    /// A handful of stories at few denoising steps, in seconds (CI's smoke run): 2 stories and
    /// 5 steps unless --stories / --steps say otherwise.
    #[arg(long)]
    pub quick: bool,
    /// Denoising steps (default: the bundle's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Base seed; frame i of story k uses SEED + 1000 k + i in every system.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory: results.json, results.md, grids/.
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "STORYGPT_DEVICE")]
    pub device: String,
}

/// Dataset splits.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum SplitArg {
    /// Validation stories.
    Val,
    /// Test stories.
    Test,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    use train::eval::{EvalOptions, System};
    // As for training: candle's idle pool spinning takes cycles from the convolutions.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let device = nn::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let mut systems = Vec::new();
    for s in &args.systems {
        let s = System::parse(s)?;
        if !systems.contains(&s) {
            systems.push(s);
        }
    }
    if systems.is_empty() {
        systems = System::ALL.to_vec();
    }
    let opts = EvalOptions {
        bundle: args.bundle,
        data: args.data,
        split: match args.split {
            SplitArg::Val => data::dataset::Split::Val,
            SplitArg::Test => data::dataset::Split::Test,
        },
        systems,
        classifier: args.classifier,
        lengths: args.frames,
        stories: args.stories.or(args.quick.then_some(2)),
        steps: args.steps.or(args.quick.then_some(5)),
        seed: args.seed,
        out: args.out,
        device,
    };
    let r = train::eval::run(&opts)?;
    for l in &r.lengths {
        for s in &l.systems {
            tracing::info!(
                frames = l.frames,
                system = %s.system,
                char_acc = ?s.all.char_acc,
                pronoun_char_acc = ?s.pronoun.char_acc,
                "evaluated"
            );
        }
    }
    Ok(())
}
