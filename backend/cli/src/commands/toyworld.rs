//! `storygpt-v toyworld ...`: generate the toy world (a CPU-sized stand-in for FlintstonesSV
//! in the same directory layout) and its contact sheets.

use std::path::PathBuf;

use data::toyworld::{self, ToyConfig};

/// Toy-world tools.
#[derive(clap::Args)]
pub struct ToyworldArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ToyworldCommand,
}

/// `toyworld` subcommands.
#[derive(clap::Subcommand)]
pub enum ToyworldCommand {
    /// Generate a seeded toy dataset in the FlintstonesSV layout (split.json,
    /// following_cache3/4.pkl, cleaned_annotations.json, labels.pkl, labels_bg.pkl,
    /// video_frames_sampled_4x/, seg_mask_4x_comb/, characters.json, portraits/).
    Generate(GenerateArgs),
    /// Write contact sheets (sample stories with captions, portraits, backgrounds) as PNGs.
    ContactSheet(ContactSheetArgs),
}

/// Arguments of `toyworld generate`.
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of stories.
    #[arg(long, default_value_t = 10_000)]
    pub stories: usize,
    /// Frame width and height in pixels.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Random seed; the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames per story.
    #[arg(long, default_value_t = 5)]
    pub frames: usize,
    /// Worker threads (default: all cores); the output does not depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Arguments of `toyworld contact-sheet`.
#[derive(clap::Args)]
pub struct ContactSheetArgs {
    /// Output directory for toyworld-stories.png, toyworld-portraits.png and
    /// toyworld-backgrounds.png.
    #[arg(long, default_value = "docs/img")]
    pub out: PathBuf,
    /// Random seed of the sample stories.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Number of sample stories (rows).
    #[arg(long, default_value_t = 4)]
    pub stories: usize,
    /// Frame size in pixels (frames are shown three times larger).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
}

/// Run a `toyworld` subcommand.
pub fn run(args: ToyworldArgs) -> anyhow::Result<()> {
    match args.command {
        ToyworldCommand::Generate(a) => {
            anyhow::ensure!(a.size >= 16, "--size must be at least 16 pixels");
            anyhow::ensure!(a.frames >= 2, "--frames must be at least 2");
            let threads = a.threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let cfg = ToyConfig {
                stories: a.stories,
                size: a.size,
                seed: a.seed,
                story_len: a.frames,
                threads,
            };
            let r = toyworld::generate(&a.out, &cfg)?;
            println!(
                "wrote {} stories ({} frames; train/val/test {}/{}/{}) to {} in {:.1} s",
                r.stories,
                r.frames,
                r.splits[0],
                r.splits[1],
                r.splits[2],
                a.out.display(),
                r.seconds
            );
            Ok(())
        }
        ToyworldCommand::ContactSheet(a) => {
            toyworld::write_doc_images(&a.out, a.seed, a.stories, a.size)?;
            println!("wrote toyworld-stories.png, toyworld-portraits.png, toyworld-backgrounds.png to {}", a.out.display());
            Ok(())
        }
    }
}
