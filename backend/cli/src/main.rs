//! The `storygpt-v` command: one binary for serving, generating, training and data tools.

mod commands;

use clap::{Parser, Subcommand};

/// Illustrate co-referential stories with consistent characters (StoryGPT-V).
#[derive(Parser)]
#[command(name = "storygpt-v", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = commands::LogFormat::Pretty, env = "STORYGPT_LOG_FORMAT")]
    log_format: commands::LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the web service: the studio page at `/`, the JSON API under `/api`, API docs at `/docs`.
    ///
    /// On first start it creates the data directory and the SQLite database. Stops cleanly on
    /// SIGINT or SIGTERM. Settings come from flags, then STORYGPT_* environment variables,
    /// then the --config TOML file, then defaults.
    Serve(commands::serve::ServeArgs),
    /// Story data tools: referential captions, caption mentions, dataset statistics.
    Data(commands::data::DataArgs),
    /// The toy world: a seeded stand-in for FlintstonesSV that runs on a CPU.
    Toyworld(commands::toyworld::ToyworldArgs),
    /// Run one network (unet, vae-encode, vae-decode, clip-text, clip-vision, llm) from a reference
    /// model directory on tensors in a safetensors file and write its outputs (conformance).
    Component(commands::component::ComponentArgs),
    /// Model bundles: `bundle random --config toy --out DIR` writes an untrained toy bundle;
    /// `bundle info DIR` loads one and says what it is.
    Bundle(commands::bundle::BundleArgs),
    /// Illustrate a story (STORY.json: characters with portraits, captions) with a model
    /// bundle: writes frame-NN.png and story.json.
    Generate(commands::generate::GenerateArgs),
    /// Train a stage of the toy bundle: `train vae --config configs/vae.toml --data DIR --out DIR`
    /// (checkpoints, --resume, metrics as JSON lines; see docs/TRAINING.md).
    Train(commands::train::TrainArgs),
    /// Evaluate a bundle on a dataset split: Char-Acc, Char-F1, BG-Acc, BG-F1, FID in the
    /// evaluation classifier's feature space and CLIP similarity per system and story length;
    /// writes results.json and results.md (see docs/EVALUATION.md).
    Eval(commands::eval::EvalArgs),
    /// Local accounts of the service (for `serve --auth on`): `user add NAME`, `user list`,
    /// `user token NAME` (an API token, printed once).
    User(commands::user::UserArgs),
    /// A generation worker without the web service, sharing the job queue of a PostgreSQL
    /// database with `serve` processes and other workers, on this host or another:
    /// `worker --database postgres://... --bundle DIR --device cuda:0`.
    Worker(commands::worker::WorkerArgs),
}

fn main() -> std::process::ExitCode {
    nn::pin_cpu_threads();
    let cli = Cli::parse();
    commands::init_logging(cli.log_format);
    if matches!(
        cli.command,
        Command::Train(_) | Command::Generate(_) | Command::Eval(_)
    ) {
        // CPU training / generation allocate and free activation-sized buffers per op: keep
        // them in the heap rather than paying page faults for fresh mmaps (see nn::alloc).
        nn::retain_freed_memory();
        // These commands work on the main thread: make it one of the pool's threads, so the
        // parallel kernels it calls run partly on it instead of waking sleeping workers.
        nn::join_cpu_pool();
    }
    let result = match cli.command {
        Command::Serve(args) => commands::serve::run(args),
        Command::User(args) => commands::user::run(args),
        Command::Worker(args) => commands::worker::run(args),
        Command::Data(args) => commands::data::run(args),
        Command::Toyworld(args) => commands::toyworld::run(args),
        Command::Component(args) => commands::component::run(args),
        Command::Bundle(args) => commands::bundle::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Train(args) => commands::train::run(args, cli.log_format),
        Command::Eval(args) => commands::eval::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
