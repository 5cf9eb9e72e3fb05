//! `storygpt-v serve`: run the web service.

use std::io::Write;
use std::path::PathBuf;

use server::config::Overrides;
use server::{FileConfig, ServeConfig};

/// Arguments of `serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (HOST:PORT; port 0 picks a free one) [default: 127.0.0.1:8080].
    #[arg(long, env = "STORYGPT_BIND")]
    bind: Option<String>,

    /// Directory for the SQLite database and the made bundles; created on first start
    /// [default: ./data].
    #[arg(long, env = "STORYGPT_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// PostgreSQL database to keep everything in instead of the data directory's SQLite file:
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE (it must exist; the schema is made on first
    /// start).
    #[arg(long, env = "STORYGPT_DATABASE")]
    database: Option<String>,

    /// Optional TOML file with any of the settings below by the same names (`bind`,
    /// `data_dir`, `bundle`, ...); flags and environment win over it.
    #[arg(long, env = "STORYGPT_CONFIG")]
    config: Option<PathBuf>,

    /// Model bundle directory, loaded once at start [default: ./models/toy if present, else
    /// a random UNTRAINED toy bundle made under the data directory].
    #[arg(long, env = "STORYGPT_BUNDLE")]
    bundle: Option<PathBuf>,

    /// Device the generation worker runs the model on: cpu, cuda or cuda:N [default: cpu].
    #[arg(long, env = "STORYGPT_DEVICE")]
    device: Option<String>,

    /// Generation workers in this process: 1, or 0 to serve the API alone while
    /// `storygpt-v worker` processes draw the jobs (needs --database) [default: 1].
    #[arg(long, env = "STORYGPT_WORKERS")]
    workers: Option<usize>,

    /// Seconds a claimed job's lease lasts without a heartbeat from its worker; a job whose
    /// worker vanished goes back to the queue after it [default: 30].
    #[arg(long, env = "STORYGPT_LEASE_S")]
    lease_s: Option<u64>,

    /// Jobs that may wait in the queue before new requests get 429 [default: 32].
    #[arg(long, env = "STORYGPT_QUEUE_CAPACITY")]
    queue_capacity: Option<usize>,

    /// Milliseconds between heartbeat comments on a quiet event stream [default: 15000].
    #[arg(long, env = "STORYGPT_SSE_HEARTBEAT_MS")]
    sse_heartbeat_ms: Option<u64>,

    /// Starts of a job before an interruption (crash, kill -9) fails it rather than
    /// requeuing it [default: 3].
    #[arg(long, env = "STORYGPT_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,

    /// Store each frame's cross-attention heatmap of every character mention (shown in the
    /// studio's frames strip): true or false; the bare flag means true [default: true].
    #[arg(long, env = "STORYGPT_CAPTURE_ATTENTION", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    capture_attention: Option<bool>,

    /// Send a live preview of the frame being drawn to the studio every this many denoising
    /// steps; 0 turns previews off [default: 10].
    #[arg(long, env = "STORYGPT_PREVIEW_EVERY", value_name = "STEPS")]
    preview_every: Option<usize>,

    /// Seconds a connection may take to send a request head before it is closed [default: 15].
    #[arg(long, env = "STORYGPT_HEADER_READ_TIMEOUT_S")]
    header_read_timeout_s: Option<u64>,

    /// Seconds a shutdown (SIGINT/SIGTERM) waits for open connections before closing them
    /// [default: 5].
    #[arg(long, env = "STORYGPT_SHUTDOWN_GRACE_S")]
    shutdown_grace_s: Option<u64>,

    /// Host names (each optionally with :PORT) that requests may be addressed to, comma
    /// separated; others get 421 (a guard against DNS rebinding). `*` allows any [default:
    /// localhost, 127.0.0.1 and [::1] when bound to a loopback address, else any].
    #[arg(
        long,
        env = "STORYGPT_ALLOWED_HOSTS",
        value_delimiter = ',',
        value_name = "HOSTS"
    )]
    allowed_hosts: Option<Vec<String>>,

    /// Accounts: `on` makes every request sign in (session cookie from the login page, or
    /// `Authorization: Bearer` API token; make the first user, an admin, with `storygpt-v
    /// user add NAME`); `off` is one local person with no login [default: off].
    #[arg(long, env = "STORYGPT_AUTH", value_name = "on|off")]
    auth: Option<server::auth::AuthMode>,

    /// With auth off, listen beyond loopback anyway (anyone who reaches the port can read,
    /// queue and delete everything); without it such a start is refused.
    #[arg(long, env = "STORYGPT_ALLOW_PUBLIC_WITHOUT_AUTH", value_name = "BOOL",
          num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    allow_public_without_auth: Option<bool>,

    /// With auth on, jobs one user may have queued or running at once [default: 8].
    #[arg(long, env = "STORYGPT_USER_MAX_QUEUED_JOBS")]
    user_max_queued_jobs: Option<i64>,

    /// With auth on, MiB of portraits and frame images one user may store [default: 2048].
    #[arg(long, env = "STORYGPT_USER_MAX_STORAGE_MB")]
    user_max_storage_mb: Option<i64>,
}

/// Resolves the configuration and serves until SIGINT/SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let explicit = Overrides {
        bind: args.bind,
        data_dir: args.data_dir,
        database: args.database,
        bundle: args.bundle,
        device: args.device,
        workers: args.workers,
        lease_s: args.lease_s,
        queue_capacity: args.queue_capacity,
        sse_heartbeat_ms: args.sse_heartbeat_ms,
        max_attempts: args.max_attempts,
        capture_attention: args.capture_attention,
        preview_every: args.preview_every,
        header_read_timeout_s: args.header_read_timeout_s,
        shutdown_grace_s: args.shutdown_grace_s,
        allowed_hosts: args.allowed_hosts,
        auth: args.auth,
        allow_public_without_auth: args.allow_public_without_auth,
        user_max_queued_jobs: args.user_max_queued_jobs,
        user_max_storage_mb: args.user_max_storage_mb,
    };
    let config = ServeConfig::resolve_with(explicit, file)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(server::serve(config, |addr| {
        // One line on stdout that scripts (and the end-to-end tests) can read the port from.
        println!("storygpt-v listening on http://{addr}");
        let _ = std::io::stdout().flush();
    }))
}
