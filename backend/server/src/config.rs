//! Service configuration: defaults, an optional TOML file, environment variables and flags,
//! merged in that order of increasing precedence (the CLI resolves flags and environment).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

pub use crate::surface::AllowedHosts;

/// Default listen address.
pub const DEFAULT_BIND: &str = "127.0.0.1:8080";
/// Default data directory (holds the SQLite database).
pub const DEFAULT_DATA_DIR: &str = "./data";
/// Largest accepted portrait upload.
pub const MAX_PORTRAIT_BYTES: usize = 10 * 1024 * 1024;
/// Hard cap on the body of an upload route. Portraits are limited to 10 MiB by the handlers,
/// which read (and discard) an oversized upload up to this cap so the client gets a clean 413
/// rather than a reset connection; bodies beyond it are cut off at once. Other routes keep
/// axum's 2 MiB default, plenty for 200 captions.
pub const UPLOAD_BODY_LIMIT: usize = 32 * 1024 * 1024;
/// Largest urlencoded form body of a studio route (axum's default body limit, which the JSON
/// routes keep).
pub const FORM_BODY_LIMIT: usize = 2 * 1024 * 1024;
/// Default device of the generation worker.
pub const DEFAULT_DEVICE: &str = "cpu";
/// Default number of jobs that may wait in the queue before new ones get 429.
pub const DEFAULT_QUEUE_CAPACITY: usize = 32;
/// Default interval between SSE heartbeat comments on a quiet stream.
pub const DEFAULT_SSE_HEARTBEAT_MS: u64 = 15_000;
/// Default number of times a job is started before an interruption (crash) fails it.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Whether the worker keeps each frame's cross-attention heatmaps by default: capturing them
/// costs a little time per denoising step and a few KiB per mention.
pub const DEFAULT_CAPTURE_ATTENTION: bool = true;
/// Live previews every this many steps by default (one VAE decode each; docs/BENCHMARKS.md
/// measures what that costs).
pub const DEFAULT_PREVIEW_EVERY: usize = 10;
/// How long a connection may take to send a complete request head (request line and
/// headers), counted from when the server starts waiting for it; a client that is slower, or
/// that opens a connection and sends nothing, is disconnected.
pub const DEFAULT_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// How long a shutdown (SIGINT/SIGTERM) waits for open connections to finish their requests
/// before it closes them.
pub const DEFAULT_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// The settings a TOML config file may hold; every key is optional.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on, e.g. "0.0.0.0:8080".
    pub bind: Option<String>,
    /// Directory for the database and other state.
    pub data_dir: Option<PathBuf>,
    /// Database URL: `postgres://USER:PASSWORD@HOST/DB` to share one database between
    /// processes; absent: the SQLite file in the data directory.
    pub database: Option<String>,
    /// Model bundle directory.
    pub bundle: Option<PathBuf>,
    /// Device of the generation worker: cpu, cuda or cuda:N.
    pub device: Option<String>,
    /// Generation workers in this process: 1, or 0 for an API-only process whose jobs
    /// `storygpt-v worker` processes draw (PostgreSQL only).
    pub workers: Option<usize>,
    /// Seconds a claimed job's lease lasts without a heartbeat from its worker.
    pub lease_s: Option<u64>,
    /// How many jobs may wait in the queue.
    pub queue_capacity: Option<usize>,
    /// Interval between SSE heartbeats, in milliseconds.
    pub sse_heartbeat_ms: Option<u64>,
    /// Starts of a job before an interruption fails it.
    pub max_attempts: Option<u32>,
    /// Store each frame's cross-attention heatmaps.
    pub capture_attention: Option<bool>,
    /// Send a live preview of the frame being drawn every this many steps (0: never).
    pub preview_every: Option<usize>,
    /// Seconds a connection may take to send a request head.
    pub header_read_timeout_s: Option<u64>,
    /// Seconds a shutdown waits for open connections before closing them.
    pub shutdown_grace_s: Option<u64>,
    /// Host names (optionally with a port) requests may be addressed to; `*`: any.
    pub allowed_hosts: Option<Vec<String>>,
    /// `on`: accounts, sessions and API tokens; `off` (default): one local person, no login.
    pub auth: Option<crate::auth::AuthMode>,
    /// Serve beyond loopback with auth off (anyone who reaches the port can do anything).
    pub allow_public_without_auth: Option<bool>,
    /// Jobs one user may have queued or running at once (auth on).
    pub user_max_queued_jobs: Option<i64>,
    /// MiB of portraits and frame images one user may store (auth on).
    pub user_max_storage_mb: Option<i64>,
}

impl FileConfig {
    /// Reads and validates a config file; unknown keys are an error so typos do not pass silently.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// The resolved configuration the server runs with.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Socket address to bind.
    pub bind: SocketAddr,
    /// Directory holding `storygpt-v.db` (unless `database` names another) and the bundles.
    pub data_dir: PathBuf,
    /// PostgreSQL URL; `None`: the SQLite file in `data_dir`.
    pub database: Option<String>,
    /// Model bundle directory; `None`: the default (see `model::resolve_bundle`).
    pub bundle: Option<PathBuf>,
    /// Device of the generation worker.
    pub device: String,
    /// Generation workers in this process (0 or 1).
    pub workers: usize,
    /// How long a claimed job's lease lasts without a heartbeat.
    pub lease: std::time::Duration,
    /// How many jobs may wait in the queue before new ones get 429.
    pub queue_capacity: usize,
    /// Interval between SSE heartbeat comments on a quiet stream.
    pub sse_heartbeat: std::time::Duration,
    /// Starts of a job before an interruption (crash, kill -9) fails it instead of requeuing.
    pub max_attempts: u32,
    /// Store each frame's cross-attention heatmaps (one per character mention).
    pub capture_attention: bool,
    /// Live preview of the frame being drawn every this many steps (0: never).
    pub preview_every: usize,
    /// Longest a connection may take to send a request head; see
    /// [`DEFAULT_HEADER_READ_TIMEOUT`].
    pub header_read_timeout: std::time::Duration,
    /// Longest a shutdown waits for open connections before closing them; see
    /// [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: std::time::Duration,
    /// The `Host` names requests may carry (a guard against DNS rebinding): by default the
    /// loopback names when bound to a loopback address, any otherwise.
    pub allowed_hosts: AllowedHosts,
    /// Caps the database at this many pages (SQLite's `max_page_count`, never below its size
    /// when a connection opens), so that writes fail as on a full disk. No flag or config key
    /// sets it: the tests use it to check how a full disk is answered without needing root.
    pub database_page_limit: Option<u32>,
    /// Whether requests must sign in.
    pub auth: crate::auth::AuthMode,
    /// Per-user limits (auth on).
    pub quotas: crate::auth::Quotas,
}

/// Values given explicitly (flags or environment, already resolved by the CLI); each wins
/// over the config file. They are the same optional settings as a config file holds, so they
/// share its type and cannot drift apart from it.
pub type Overrides = FileConfig;

impl ServeConfig {
    /// Merges explicit values (flags or environment, already resolved) over the file config
    /// over the defaults.
    pub fn resolve(
        bind: Option<String>,
        data_dir: Option<PathBuf>,
        file: FileConfig,
    ) -> anyhow::Result<Self> {
        Self::resolve_with(
            Overrides {
                bind,
                data_dir,
                ..Overrides::default()
            },
            file,
        )
    }

    /// Merges every explicit value over the file config over the defaults, and checks them.
    pub fn resolve_with(explicit: Overrides, file: FileConfig) -> anyhow::Result<Self> {
        let Overrides {
            bind,
            data_dir,
            database,
            bundle,
            device,
            workers,
            lease_s,
            queue_capacity,
            sse_heartbeat_ms,
            max_attempts,
            capture_attention,
            preview_every,
            header_read_timeout_s,
            shutdown_grace_s,
            allowed_hosts,
            auth,
            allow_public_without_auth,
            user_max_queued_jobs,
            user_max_storage_mb,
        } = explicit;
        let bind_text = bind
            .or(file.bind)
            .unwrap_or_else(|| DEFAULT_BIND.to_string());
        let bind = parse_bind(&bind_text)?;
        let data_dir = data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        if data_dir.as_os_str().is_empty() {
            bail!("the data directory must not be empty");
        }
        let queue_capacity = queue_capacity
            .or(file.queue_capacity)
            .unwrap_or(DEFAULT_QUEUE_CAPACITY);
        if queue_capacity == 0 {
            bail!("the queue capacity must be at least 1");
        }
        let heartbeat_ms = sse_heartbeat_ms
            .or(file.sse_heartbeat_ms)
            .unwrap_or(DEFAULT_SSE_HEARTBEAT_MS);
        if heartbeat_ms < 10 {
            bail!("the SSE heartbeat interval must be at least 10 ms; got {heartbeat_ms}");
        }
        let max_attempts = max_attempts
            .or(file.max_attempts)
            .unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts == 0 {
            bail!("max_attempts must be at least 1");
        }
        let header_read_timeout = match header_read_timeout_s.or(file.header_read_timeout_s) {
            Some(0) => bail!("the header read timeout must be at least 1 s"),
            Some(s) => std::time::Duration::from_secs(s),
            None => DEFAULT_HEADER_READ_TIMEOUT,
        };
        let shutdown_grace = shutdown_grace_s
            .or(file.shutdown_grace_s)
            .map_or(DEFAULT_SHUTDOWN_GRACE, std::time::Duration::from_secs);
        let auth = auth.or(file.auth).unwrap_or_default();
        let allow_public = allow_public_without_auth
            .or(file.allow_public_without_auth)
            .unwrap_or(false);
        if auth == crate::auth::AuthMode::Off && !bind.ip().is_loopback() && !allow_public {
            bail!(
                "refusing to listen on {bind} with auth off: anyone who can reach that address \
                 could read every portrait and story, queue work and delete everything. Turn \
                 accounts on (--auth on, STORYGPT_AUTH=on; make the first user with \
                 `storygpt-v user add NAME`), listen on a loopback address such as \
                 127.0.0.1:8080, or, on a network you trust, pass --allow-public-without-auth"
            );
        }
        let max_queued_jobs = user_max_queued_jobs
            .or(file.user_max_queued_jobs)
            .unwrap_or(crate::auth::DEFAULT_USER_MAX_QUEUED_JOBS);
        let max_storage_mb = user_max_storage_mb
            .or(file.user_max_storage_mb)
            .unwrap_or(crate::auth::DEFAULT_USER_MAX_STORAGE_MB);
        if max_queued_jobs < 1 || max_storage_mb < 1 {
            bail!("user_max_queued_jobs and user_max_storage_mb must be at least 1");
        }
        let quotas = crate::auth::Quotas {
            max_queued_jobs,
            max_storage_bytes: max_storage_mb.saturating_mul(1024 * 1024),
        };
        let allowed_hosts = match allowed_hosts.or(file.allowed_hosts) {
            Some(list) => AllowedHosts::parse(&list)?,
            None => AllowedHosts::default_for(bind),
        };
        let database = database.or(file.database).filter(|url| !url.is_empty());
        if let Some(url) = &database {
            match crate::db::Backend::of_url(url) {
                Some(crate::db::Backend::Postgres) => {}
                Some(crate::db::Backend::Sqlite) => bail!(
                    "--database takes a postgres:// URL; the SQLite database is always the file \
                     storygpt-v.db in the data directory (choose it with --data-dir)"
                ),
                None => bail!(
                    "the database URL {} must start with postgres:// or postgresql://",
                    crate::db::redact(url)
                ),
            }
        }
        let workers = workers.or(file.workers).unwrap_or(1);
        if workers > 1 {
            bail!(
                "--workers is 0 or 1 (one worker per process and device); for more, start \
                 `storygpt-v worker` processes"
            );
        }
        if workers == 0 && database.is_none() {
            bail!(
                "--workers 0 needs --database postgres://...: workers in other processes reach \
                 the queue through a shared PostgreSQL database (with the SQLite store the \
                 server draws the jobs itself)"
            );
        }
        let lease = match lease_s.or(file.lease_s) {
            None => crate::worker::DEFAULT_LEASE,
            Some(s) if (2..=3600).contains(&s) => std::time::Duration::from_secs(s),
            Some(s) => bail!("the lease must be between 2 and 3600 seconds; got {s}"),
        };
        Ok(Self {
            bind,
            data_dir,
            database,
            workers,
            lease,
            bundle: bundle.or(file.bundle),
            device: device
                .or(file.device)
                .unwrap_or_else(|| DEFAULT_DEVICE.to_string()),
            queue_capacity,
            sse_heartbeat: std::time::Duration::from_millis(heartbeat_ms),
            max_attempts,
            capture_attention: capture_attention
                .or(file.capture_attention)
                .unwrap_or(DEFAULT_CAPTURE_ATTENTION),
            preview_every: preview_every
                .or(file.preview_every)
                .unwrap_or(DEFAULT_PREVIEW_EVERY),
            header_read_timeout,
            shutdown_grace,
            allowed_hosts,
            database_page_limit: None,
            auth,
            quotas,
        })
    }

    /// Path of the SQLite database inside the data directory.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join("storygpt-v.db")
    }

    /// The database as messages name it: the SQLite file's path, or the PostgreSQL URL
    /// without its password.
    pub fn database_shown(&self) -> String {
        match &self.database {
            Some(url) => crate::db::redact(url),
            None => self.database_path().display().to_string(),
        }
    }
}

fn parse_bind(text: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    text.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .with_context(|| {
            format!("invalid bind address {text:?}: expected HOST:PORT such as 127.0.0.1:8080")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_values_win_over_file_and_defaults() {
        let file = FileConfig {
            bind: Some("0.0.0.0:9000".into()),
            data_dir: Some("/srv/a".into()),
            queue_capacity: Some(4),
            ..FileConfig::default()
        };
        let cfg = ServeConfig::resolve(Some("127.0.0.1:7000".into()), None, file).unwrap();
        assert_eq!(cfg.bind.port(), 7000);
        assert_eq!(cfg.data_dir, PathBuf::from("/srv/a"));
        assert_eq!(cfg.queue_capacity, 4);
        let cfg = ServeConfig::resolve(None, None, FileConfig::default()).unwrap();
        assert_eq!(cfg.device, DEFAULT_DEVICE);
        assert_eq!(cfg.queue_capacity, DEFAULT_QUEUE_CAPACITY);
        assert!(cfg.bundle.is_none());
        assert_eq!(cfg.bind.to_string(), DEFAULT_BIND);
        assert_eq!(cfg.database_path(), PathBuf::from("./data/storygpt-v.db"));
        assert!(cfg.capture_attention);
        let file = FileConfig {
            capture_attention: Some(false),
            ..FileConfig::default()
        };
        let cfg = ServeConfig::resolve(None, None, file).unwrap();
        assert!(!cfg.capture_attention);
    }

    #[test]
    fn connection_timeouts_come_from_flags_or_file() {
        let cfg = ServeConfig::resolve(None, None, FileConfig::default()).unwrap();
        assert_eq!(cfg.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(cfg.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "header_read_timeout_s = 30\nshutdown_grace_s = 2\n").unwrap();
        let file = FileConfig::load(&path).unwrap();
        let explicit = Overrides {
            shutdown_grace_s: Some(0),
            ..Overrides::default()
        };
        let cfg = ServeConfig::resolve_with(explicit, file).unwrap();
        assert_eq!(cfg.header_read_timeout, std::time::Duration::from_secs(30));
        assert_eq!(
            cfg.shutdown_grace,
            std::time::Duration::ZERO,
            "the flag wins"
        );
        let zero = Overrides {
            header_read_timeout_s: Some(0),
            ..Overrides::default()
        };
        let err = ServeConfig::resolve_with(zero, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("at least 1 s"), "{err}");
    }

    #[test]
    fn allowed_hosts_default_to_loopback_names_on_a_loopback_address() {
        let loopback = ServeConfig::resolve(None, None, FileConfig::default()).unwrap();
        assert!(loopback.allowed_hosts.allows("localhost:8080"));
        assert!(loopback.allowed_hosts.allows("127.0.0.1"));
        assert!(loopback.allowed_hosts.allows("[::1]:1"));
        assert!(!loopback.allowed_hosts.allows("evil.example"));
        assert!(!loopback.allowed_hosts.allows("evil.example:8080"));
        let public = Overrides {
            bind: Some("0.0.0.0:0".into()),
            auth: Some(crate::auth::AuthMode::On),
            ..Overrides::default()
        };
        let open = ServeConfig::resolve_with(public, FileConfig::default()).unwrap();
        assert_eq!(open.allowed_hosts, AllowedHosts::Any);
        // The flag (or environment) wins over the file; `*` allows any.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "allowed_hosts = [\"studio.example\"]\n").unwrap();
        let file = FileConfig::load(&path).unwrap();
        let cfg = ServeConfig::resolve_with(Overrides::default(), file.clone()).unwrap();
        assert!(cfg.allowed_hosts.allows("Studio.Example.:443"));
        assert!(!cfg.allowed_hosts.allows("localhost"));
        let explicit = Overrides {
            allowed_hosts: Some(vec!["*".into()]),
            ..Overrides::default()
        };
        let cfg = ServeConfig::resolve_with(explicit, file).unwrap();
        assert_eq!(cfg.allowed_hosts, AllowedHosts::Any);
        let empty = Overrides {
            allowed_hosts: Some(vec![]),
            ..Overrides::default()
        };
        assert!(ServeConfig::resolve_with(empty, FileConfig::default()).is_err());
        let url = Overrides {
            allowed_hosts: Some(vec!["http://a.example/".into()]),
            ..Overrides::default()
        };
        let err = ServeConfig::resolve_with(url, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("http://a.example/"), "{err}");
    }

    #[test]
    fn auth_off_refuses_to_listen_beyond_loopback_unless_told() {
        let err = ServeConfig::resolve(Some("0.0.0.0:8080".into()), None, FileConfig::default())
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("with auth off") && text.contains("--auth on"),
            "{text}"
        );
        assert!(text.contains("--allow-public-without-auth"), "{text}");
        let told = Overrides {
            bind: Some("0.0.0.0:8080".into()),
            allow_public_without_auth: Some(true),
            ..Overrides::default()
        };
        assert!(ServeConfig::resolve_with(told, FileConfig::default()).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bind = \"0.0.0.0:8080\"\nauth = \"on\"\n").unwrap();
        let cfg = ServeConfig::resolve_with(Overrides::default(), FileConfig::load(&path).unwrap())
            .unwrap();
        assert_eq!(cfg.auth, crate::auth::AuthMode::On);
        // Loopback stays open to the one local person.
        let cfg = ServeConfig::resolve(None, None, FileConfig::default()).unwrap();
        assert_eq!(cfg.auth, crate::auth::AuthMode::Off);
    }

    #[test]
    fn bad_bind_and_unknown_keys_are_refused() {
        assert!(
            ServeConfig::resolve(Some("nonsense".into()), None, FileConfig::default()).is_err()
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "bnd = \"1.2.3.4:5\"\n").unwrap();
        let err = FileConfig::load(&path).unwrap_err();
        assert!(format!("{err:#}").contains("unknown field"), "{err:#}");
    }

    #[test]
    fn database_workers_and_lease_are_checked() {
        let resolve = |o: Overrides| ServeConfig::resolve_with(o, FileConfig::default());
        let error = |o: Overrides| format!("{:#}", resolve(o).unwrap_err());
        // The SQLite store is always the data directory's file.
        let sqlite = error(Overrides {
            database: Some("sqlite:///tmp/x.db".into()),
            ..Overrides::default()
        });
        assert!(sqlite.contains("--data-dir"), "{sqlite}");
        // Another engine is named, and the password stays out of the message.
        let mysql = error(Overrides {
            database: Some("mysql://me:secret@db/x".into()),
            ..Overrides::default()
        });
        assert!(
            mysql.contains("postgres://") && !mysql.contains("secret"),
            "{mysql}"
        );
        // No worker in this process needs a queue others can reach.
        let alone = error(Overrides {
            workers: Some(0),
            ..Overrides::default()
        });
        assert!(alone.contains("--database postgres://"), "{alone}");
        let many = error(Overrides {
            workers: Some(2),
            ..Overrides::default()
        });
        assert!(many.contains("storygpt-v worker"), "{many}");
        let lease = error(Overrides {
            lease_s: Some(1),
            ..Overrides::default()
        });
        assert!(lease.contains("between 2 and 3600"), "{lease}");
        let api_only = resolve(Overrides {
            database: Some("postgres://u:p@db:5432/s".into()),
            workers: Some(0),
            lease_s: Some(10),
            ..Overrides::default()
        })
        .unwrap();
        assert_eq!(
            (api_only.workers, api_only.lease),
            (0, std::time::Duration::from_secs(10))
        );
        assert_eq!(api_only.database_shown(), "postgres://u:***@db:5432/s");
        let defaults = resolve(Overrides::default()).unwrap();
        assert_eq!(
            (defaults.workers, defaults.lease, defaults.database),
            (1, crate::worker::DEFAULT_LEASE, None)
        );
    }
}
