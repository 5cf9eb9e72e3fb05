//! `storygpt-v bundle`: write and inspect model bundles.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `storygpt-v bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub command: BundleCommand,
}

/// Bundle sub-commands.
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Write a randomly initialised (UNTRAINED) bundle: the real layout and loader, noise-like
    /// frames. For tests and development.
    Random {
        /// Configuration: `toy` (64x64 frames, every network a few million parameters, OPT) or
        /// `toy-llama` (the same with a Llama LLM).
        #[arg(long, default_value = "toy")]
        config: String,
        /// Output directory (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Copy a trained bundle without its training runs and generated data, optionally with
    /// f16 weights (how models/toy is made from `train all`'s output).
    Ship {
        /// The trained bundle (a `train all` output).
        #[arg(long)]
        from: PathBuf,
        /// Output directory (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Store f32 weights as f16 (computation stays in the manifest's dtype).
        #[arg(long)]
        f16: bool,
    },
    /// Load a bundle and print what it is (checks every path and tensor).
    Info {
        /// The bundle directory.
        dir: PathBuf,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Runs the sub-command.
pub fn run(args: BundleArgs) -> anyhow::Result<()> {
    match args.command {
        BundleCommand::Random { config, out, seed } => {
            let report = models::bundle::write_random(&config, &out, seed).with_context(|| {
                format!("writing a random `{config}` bundle to {}", out.display())
            })?;
            for (what, n) in &report.params {
                eprintln!("  {what:<32} {:>10} parameters", n);
            }
            eprintln!(
                "wrote {} ({} parameters in all; randomly initialised, UNTRAINED)",
                out.display(),
                report.total()
            );
            Ok(())
        }
        BundleCommand::Ship { from, out, f16 } => {
            let r = models::bundle::ship::ship(&from, &out, f16)?;
            eprintln!(
                "wrote {} ({} files, {:.1} MB; {} tensors as f16)",
                out.display(),
                r.files,
                r.bytes as f64 / 1e6,
                r.f16_tensors
            );
            Ok(())
        }
        BundleCommand::Info { dir, device } => {
            let device = nn::parse_device(&device).map_err(anyhow::Error::msg)?;
            let p = models::pipeline::StoryPipeline::load(&dir, &device)?;
            let info = p.info();
            let o = p.default_options();
            println!("name:        {}", info.name);
            println!("trained:     {}", info.trained);
            println!("description: {}", info.description);
            println!("llm:         {}", info.llm);
            println!(
                "sampling:    {}x{} px, {} steps, guidance {}, merge step {}, {:?}",
                o.width, o.height, o.steps, o.guidance_scale, o.start_merge_step, o.scheduler
            );
            Ok(())
        }
    }
}
