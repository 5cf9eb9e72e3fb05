//! `storygpt-v serve`: run the web service.

use std::io::Write;
use std::path::PathBuf;

use server::{FileConfig, ServeConfig};

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free one) [default: 127.0.0.1:8080].
    #[arg(long, env = "STORYGPT_BIND")]
    bind: Option<String>,

    /// Directory for the SQLite database; created on first start [default: ./data].
    #[arg(long, env = "STORYGPT_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Optional TOML file with `bind` and `data_dir`; flags and environment win over it.
    #[arg(long, env = "STORYGPT_CONFIG")]
    config: Option<PathBuf>,
}

/// Resolves the configuration and serves until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let config = ServeConfig::resolve(args.bind, args.data_dir, file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::serve(config, |addr| {
        // One line on stdout that scripts (and the end-to-end tests) can read the port from.
        println!("storygpt-v listening on http://{addr}");
        let _ = std::io::stdout().flush();
    }))
}
