//! One module per subcommand; each exposes its clap arguments and a `run` function.

pub mod bundle;
pub mod component;
pub mod data;
pub mod eval;
pub mod generate;
pub mod serve;
pub mod toyworld;
pub mod train;
pub mod user;
pub mod worker;

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line (for log collectors).
    Json,
}

/// Sets up tracing on stderr; `RUST_LOG` overrides the default `info` level.
pub fn init_logging(format: LogFormat) {
    // PostgreSQL's notices ("relation ... already exists, skipping" on every start) stay out.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
