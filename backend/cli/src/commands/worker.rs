//! `storygpt-v worker`: a generation worker without the web service, sharing a PostgreSQL
//! queue with `serve` processes (`serve --workers 0` for an API-only one) and other workers,
//! on this host or any other.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `worker`.
#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The PostgreSQL database the servers use: postgres://USER:PASSWORD@HOST:PORT/DATABASE.
    #[arg(long, env = "STORYGPT_DATABASE")]
    database: String,

    /// Model bundle directory, the same as the servers' [default: ./models/toy if present,
    /// else a random UNTRAINED toy bundle made under the data directory].
    #[arg(long, env = "STORYGPT_BUNDLE")]
    bundle: Option<PathBuf>,

    /// Where a random bundle is made when there is none [default: ./data].
    #[arg(long, env = "STORYGPT_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Device to draw on: cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "STORYGPT_DEVICE", default_value = "cpu")]
    device: String,

    /// Store each frame's cross-attention heatmaps [default: true].
    #[arg(long, env = "STORYGPT_CAPTURE_ATTENTION", num_args = 0..=1, default_missing_value = "true")]
    capture_attention: Option<bool>,

    /// Send a live preview of the frame being drawn every N steps; 0: never [default: 10].
    #[arg(long, env = "STORYGPT_PREVIEW_EVERY")]
    preview_every: Option<usize>,

    /// Seconds a claimed job's lease lasts without a heartbeat [default: 30]. Use the same
    /// value for every process of a deployment.
    #[arg(long, env = "STORYGPT_LEASE_S")]
    lease_s: Option<u64>,

    /// Starts of a job before an interruption fails it [default: 3].
    #[arg(long, env = "STORYGPT_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
}

/// Runs the worker until SIGINT/SIGTERM.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let lease = match args.lease_s {
        None => server::worker::DEFAULT_LEASE,
        Some(s) if (2..=3600).contains(&s) => Duration::from_secs(s),
        Some(s) => anyhow::bail!("the lease must be between 2 and 3600 seconds; got {s}"),
    };
    let max_attempts = args
        .max_attempts
        .unwrap_or(server::config::DEFAULT_MAX_ATTEMPTS);
    if max_attempts == 0 {
        anyhow::bail!("max_attempts must be at least 1");
    }
    let config = server::WorkerConfig {
        database: args.database,
        bundle: args.bundle,
        data_dir: args
            .data_dir
            .unwrap_or_else(|| PathBuf::from(server::config::DEFAULT_DATA_DIR)),
        settings: server::worker::WorkerSettings {
            device: args.device,
            capture_attention: args
                .capture_attention
                .unwrap_or(server::config::DEFAULT_CAPTURE_ATTENTION),
            preview_every: args
                .preview_every
                .unwrap_or(server::config::DEFAULT_PREVIEW_EVERY),
            lease,
            max_attempts,
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::run_worker(config, |id| {
        // One line on stdout that scripts (and the tests) can wait for.
        println!("storygpt-v worker ready: {id}");
        let _ = std::io::stdout().flush();
    }))
}
