//! `storygpt-v data ...`: referential captions for JSON-lines stories, caption mentions,
//! and Table-11 style statistics of a dataset directory or of JSON-lines stories.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Context;
use data::dataset::{DatasetKind, DatasetReader, Split};
use data::jsonl::{self, RuleChoice};
use data::stats;

/// Story data tools.
#[derive(clap::Args)]
pub struct DataArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: DataCommand,
}

/// `data` subcommands.
#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Add a "referential" caption to every frame of JSON-lines stories read on stdin.
    ///
    /// Each input line is {"frames": [{"caption": str, "characters": [str]}]} (with
    /// "pronouns": {name: "he"|"she"|"they"|"it"} for --dataset custom); each output line is
    /// the same object with "referential" added to every frame.
    MakeReferential(MakeReferentialArgs),
    /// Print Table-11 statistics (references per story before/after the extension,
    /// characters, backgrounds) of a dataset directory, or of JSON-lines stories on stdin.
    Stats(StatsArgs),
    /// Print the character and pronoun mentions of a caption as JSON (offsets in characters).
    Mentions(MentionsArgs),
}

/// Character rules for JSON-lines stories.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RulesArg {
    /// FlintstonesSV: Wilma, Betty, Pebbles are "she"; Fred, Barney, Dino, Mr Slate "he".
    Flintstones,
    /// PororoSV: Petty and Loopy are "she"; text-based rules with the "they" prefix rule.
    Pororo,
    /// User stories: pronouns from each line's "pronouns" map ("they" when missing).
    Custom,
}

impl From<RulesArg> for RuleChoice {
    fn from(r: RulesArg) -> RuleChoice {
        match r {
            RulesArg::Flintstones => RuleChoice::Flintstones,
            RulesArg::Pororo => RuleChoice::Pororo,
            RulesArg::Custom => RuleChoice::Custom,
        }
    }
}

/// Arguments of `data make-referential`.
#[derive(clap::Args)]
pub struct MakeReferentialArgs {
    /// Which characters and rules to use.
    #[arg(long, value_enum)]
    pub dataset: RulesArg,
}

/// Dataset split.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum SplitArg {
    /// Training stories.
    Train,
    /// Validation stories.
    Val,
    /// Test stories.
    Test,
}

/// Arguments of `data stats`.
#[derive(clap::Args)]
pub struct StatsArgs {
    /// Dataset directory in the authors' layout (toy world included); JSON lines on stdin
    /// when omitted.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Character rules: for a directory, flintstones/pororo (default: the directory's
    /// characters.json, else flintstones); for JSON lines, flintstones/pororo/custom.
    #[arg(long, value_enum)]
    pub dataset: Option<RulesArg>,
    /// Frames per story when reading a directory.
    #[arg(long, default_value_t = 4)]
    pub frames: usize,
    /// Only this split of a directory (default: all).
    #[arg(long, value_enum)]
    pub split: Option<SplitArg>,
    /// Dataset name shown in the table.
    #[arg(long, default_value = "Dataset")]
    pub name: String,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
}

/// Character names recognised by `data mentions`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum NamesArg {
    /// FlintstonesSV characters.
    Flintstones,
    /// PororoSV characters.
    Pororo,
    /// The toy world's characters.
    Toyworld,
}

/// Arguments of `data mentions`.
#[derive(clap::Args)]
pub struct MentionsArgs {
    /// Character names to recognise.
    #[arg(long, value_enum, default_value = "flintstones")]
    pub dataset: NamesArg,
    /// The caption ("-" reads one line from stdin).
    pub caption: String,
}

/// Run a `data` subcommand.
pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::MakeReferential(a) => {
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            let n = jsonl::make_referential_lines(
                stdin,
                std::io::BufWriter::new(stdout),
                a.dataset.into(),
            )?;
            tracing::info!(stories = n, "referential captions written");
            Ok(())
        }
        DataCommand::Stats(a) => {
            let st = match &a.dir {
                Some(dir) => {
                    let kind = match a.dataset {
                        None => DatasetKind::Auto,
                        Some(RulesArg::Flintstones) => DatasetKind::Flintstones,
                        Some(RulesArg::Pororo) => DatasetKind::Pororo,
                        Some(RulesArg::Custom) => anyhow::bail!(
                            "--dataset custom applies to JSON lines; omit it for a directory"
                        ),
                    };
                    let reader = DatasetReader::open(dir, kind, a.frames)
                        .with_context(|| format!("opening dataset {}", dir.display()))?;
                    let split = a.split.map(|s| match s {
                        SplitArg::Train => Split::Train,
                        SplitArg::Val => Split::Val,
                        SplitArg::Test => Split::Test,
                    });
                    reader.stats(&a.name, split)?
                }
                None => {
                    let rules = a.dataset.unwrap_or(RulesArg::Flintstones).into();
                    jsonl::stats_lines(std::io::stdin().lock(), rules, &a.name)?
                }
            };
            let text = if a.json {
                stats::to_json(&st)
            } else {
                stats::to_markdown(&[st])
            };
            writeln!(std::io::stdout(), "{text}")?;
            Ok(())
        }
        DataCommand::Mentions(a) => {
            let rules = match a.dataset {
                NamesArg::Flintstones => data::RuleSet::flintstones(),
                NamesArg::Pororo => data::RuleSet::pororo(),
                NamesArg::Toyworld => data::toyworld::rules(),
            };
            let caption = if a.caption == "-" {
                std::io::stdin()
                    .lock()
                    .lines()
                    .next()
                    .transpose()?
                    .unwrap_or_default()
            } else {
                a.caption
            };
            writeln!(
                std::io::stdout(),
                "{}",
                data::mentions::to_json(&data::find_mentions(&caption, &rules))
            )?;
            Ok(())
        }
    }
}
