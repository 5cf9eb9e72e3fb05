//! The database: SQLite (the embedded default: one file in the data directory, created on
//! first start, WAL journal, foreign keys on) or PostgreSQL (`--database postgres://...`, shared
//! by every process of a deployment), each with its migrations embedded from `migrations/`.
//!
//! Both go through sqlx's `Any` driver so the store has one code path: its SQL is written in
//! the part of the dialect both engines share (`$N` parameters, which SQLite accepts too).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

use crate::error::ApiError;

/// SQLite's migrations, compiled into the binary, so a fresh data directory needs nothing else.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");
/// PostgreSQL's, the same schema in its dialect.
pub static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// Which engine a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The engine behind `pool`.
    pub fn of(pool: &AnyPool) -> Self {
        Self::of_url(pool.connect_options().database_url.as_str()).unwrap_or(Self::Sqlite)
    }

    /// The engine a database URL names, if it is one we support.
    pub fn of_url(url: &str) -> Option<Self> {
        let scheme = url.split(':').next()?;
        match scheme {
            "sqlite" => Some(Self::Sqlite),
            "postgres" | "postgresql" => Some(Self::Postgres),
            _ => None,
        }
    }
}

/// Opens (creating if needed) the SQLite database file and brings its schema up to date.
pub async fn open(path: &Path) -> anyhow::Result<AnyPool> {
    open_limited(path, None).await
}

/// Opens the database a URL names (`sqlite://PATH` or `postgres://...`) and migrates it.
pub async fn open_url(url: &str) -> anyhow::Result<AnyPool> {
    match Backend::of_url(url) {
        Some(Backend::Sqlite) => {
            let path = url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .split('?')
                .next()
                .unwrap_or_default();
            open(Path::new(path)).await
        }
        Some(Backend::Postgres) => open_postgres(url).await,
        None => anyhow::bail!(
            "the database URL must start with postgres:// (or postgresql://) or sqlite://; \
             leave --database out to use the SQLite file in the data directory"
        ),
    }
}

/// `sqlite://` URL of a file path (percent-encoded, so any path works).
fn sqlite_url(path: &Path) -> String {
    let mut url = String::from("sqlite://");
    for byte in path.to_string_lossy().bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'.' | b'-' | b'_' | b'~' => {
                url.push(byte as char)
            }
            _ => url.push_str(&format!("%{byte:02X}")),
        }
    }
    url.push_str("?mode=rwc");
    url
}

/// [`open`], with every connection's database size capped at `page_limit` pages (SQLite's
/// `max_page_count`, which never goes below the database's current size), so that writes
/// beyond it fail with SQLITE_FULL exactly as on a full disk. `None`: no cap.
///
/// A database that cannot be opened or written is refused here, at start-up, with a sentence
/// that says what is wrong and what to do (see [`StorageFault::startup_error`]), rather than
/// failing each request later.
pub async fn open_limited(path: &Path, page_limit: Option<u32>) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        }
    }
    let options = AnyConnectOptions::from_str(&sqlite_url(path))?;
    // NORMAL is durable across process crashes in WAL mode (only an OS crash can lose the
    // last transactions), at a fraction of FULL's fsync cost.
    let mut pragmas = String::from(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON; \
         PRAGMA busy_timeout = 10000;",
    );
    if let Some(pages) = page_limit {
        pragmas.push_str(&format!(" PRAGMA max_page_count = {pages};"));
    }
    let pool = AnyPoolOptions::new()
        .max_connections(8)
        .after_connect(move |conn, _| {
            let pragmas = pragmas.clone();
            Box::pin(async move {
                conn.execute(pragmas.as_str()).await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await
        .map_err(|e| StorageFault::startup_error(&path.display(), "open", &e))?;
    let shown = path.display();
    migrate(&pool, &SQLITE_MIGRATOR, &shown).await?;
    // Migrations that were all applied before write nothing, and SQLite quietly opens a file
    // it may not write read-only: take the write lock once (and give it back unused) so a
    // read-only database stops the start instead of failing every later write.
    let probe = async {
        let mut conn = pool.acquire().await?;
        conn.execute("BEGIN IMMEDIATE").await?;
        conn.execute("ROLLBACK").await?;
        Ok::<_, sqlx::Error>(())
    };
    probe
        .await
        .map_err(|e| StorageFault::startup_error(&shown, "write", &e))?;
    Ok(pool)
}

/// Connects to a PostgreSQL database (which must exist) and brings its schema up to date.
async fn open_postgres(url: &str) -> anyhow::Result<AnyPool> {
    sqlx::any::install_default_drivers();
    let shown = redact(url);
    let options = AnyConnectOptions::from_str(url)
        .with_context(|| format!("the database URL {shown} is not valid"))?;
    // One connection first: its error says why (refused, unknown database, password), where
    // the pool's would only say that it timed out.
    {
        use sqlx::Connection;
        let probe = sqlx::AnyConnection::connect_with(&options)
            .await
            .map_err(|e| StorageFault::startup_error(&shown, "open", &e))?;
        let _ = probe.close().await;
    }
    let pool = AnyPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| StorageFault::startup_error(&shown, "open", &e))?;
    migrate(&pool, &POSTGRES_MIGRATOR, &shown).await?;
    Ok(pool)
}

async fn migrate(
    pool: &AnyPool,
    migrator: &sqlx::migrate::Migrator,
    shown: &dyn std::fmt::Display,
) -> anyhow::Result<()> {
    migrator.run(pool).await.map_err(|e| match &e {
        sqlx::migrate::MigrateError::Execute(db)
        | sqlx::migrate::MigrateError::ExecuteMigration(db, _) => {
            StorageFault::startup_error(shown, "migrate", db)
        }
        _ => anyhow::Error::new(e).context(format!("cannot migrate database {shown}")),
    })
}

/// A database URL with its password replaced, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let credentials = &url[scheme_end + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Key of the advisory lock every PostgreSQL write transaction takes (any number unlikely to
/// clash with another application's locks on the same database).
const WRITE_LOCK_KEY: i64 = 0x5354_4f52_5947_5054; // "STORYGPT"

/// Begins a transaction that reads and then writes, holding the database's write lock from the
/// start, so two of them never interleave: SQLite's `BEGIN IMMEDIATE` (a deferred transaction
/// that reads and then writes fails at once with SQLITE_BUSY if another connection wrote
/// meanwhile; busy_timeout only covers waiting for a lock taken up front), and on PostgreSQL a
/// transaction-scoped advisory lock, which gives the same one-writer-at-a-time order the
/// store's read-then-write transactions were written for.
pub async fn begin_write(pool: &AnyPool) -> Result<Transaction<'static, Any>, sqlx::Error> {
    match Backend::of(pool) {
        Backend::Sqlite => pool.begin_with("BEGIN IMMEDIATE").await,
        Backend::Postgres => {
            let mut tx = pool.begin().await?;
            // The function returns `void`, which the Any driver cannot read: count it instead.
            sqlx::query("SELECT COUNT(*) FROM (SELECT pg_advisory_xact_lock($1)) AS locked")
                .bind(WRITE_LOCK_KEY)
                .execute(&mut *tx)
                .await?;
            Ok(tx)
        }
    }
}

/// A failure of the storage itself rather than of the request: how it is answered (see
/// `ApiError::from(sqlx::Error)`) and reported at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFault {
    /// No space left: SQLITE_FULL (a full disk, ENOSPC, or the database's size cap).
    Full,
    /// The database file or its directory cannot be written: SQLITE_READONLY, EROFS, EACCES.
    ReadOnly,
    /// Another connection or program held a lock for longer than the busy timeout.
    Busy,
    /// The database cannot be opened or read: SQLITE_CANTOPEN, SQLITE_IOERR, a closed pool.
    Unavailable,
}

impl StorageFault {
    /// The storage fault an error is, if it is one (`None`: a bug, a constraint, bad SQL).
    pub fn of(err: &sqlx::Error) -> Option<Self> {
        match err {
            sqlx::Error::Database(db) => {
                if let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    return Self::of_sqlstate(pg.code());
                }
                // sqlx gives SQLite's extended result code; its low byte is the primary code.
                let code: i32 = db.code()?.parse().ok()?;
                match code & 0xff {
                    13 => Some(Self::Full),             // SQLITE_FULL
                    8 => Some(Self::ReadOnly),          // SQLITE_READONLY
                    5 | 6 => Some(Self::Busy),          // SQLITE_BUSY, SQLITE_LOCKED
                    10 | 14 => Some(Self::Unavailable), // SQLITE_IOERR, SQLITE_CANTOPEN
                    _ => None,
                }
            }
            sqlx::Error::Io(e) => Some(Self::of_io(e)),
            sqlx::Error::PoolTimedOut => Some(Self::Busy),
            sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => Some(Self::Unavailable),
            _ => None,
        }
    }

    /// PostgreSQL's SQLSTATE codes (appendix A of its manual) that are storage faults.
    fn of_sqlstate(code: &str) -> Option<Self> {
        match code {
            "53100" => Some(Self::Full),     // disk_full
            "25006" => Some(Self::ReadOnly), // read_only_sql_transaction
            "53300" | "55P03" | "40001" | "40P01" | "57014" => Some(Self::Busy), // connections, lock, serialisation, deadlock, timeout
            _ if code.starts_with("08") || code.starts_with("57P") || code.starts_with("58") => {
                Some(Self::Unavailable) // connection lost, server shutting down, system error
            }
            _ if code.starts_with("53") => Some(Self::Busy), // insufficient resources
            _ => None,
        }
    }

    fn of_io(err: &std::io::Error) -> Self {
        use std::io::ErrorKind;
        match err.kind() {
            ErrorKind::StorageFull | ErrorKind::QuotaExceeded => Self::Full,
            ErrorKind::ReadOnlyFilesystem | ErrorKind::PermissionDenied => Self::ReadOnly,
            _ => Self::Unavailable,
        }
    }

    /// The error `serve` stops with when the database at `path` fails at start-up (`stage`:
    /// open, migrate or write): one sentence saying what is wrong and what to do. The
    /// underlying error is logged as well.
    pub fn startup_error(
        path: &dyn std::fmt::Display,
        stage: &str,
        err: &sqlx::Error,
    ) -> anyhow::Error {
        let fault = Self::of(err);
        tracing::error!(database = %path, stage, error = %err, ?fault, "the database failed at start-up");
        Self::sentence(fault, path, stage, err)
    }

    /// The same for a start-up step that reports errors as [`ApiError`]s (crash recovery of
    /// jobs), whose `code` says which fault it was; the cause was logged when it was made.
    pub fn startup_api_error(path: &dyn std::fmt::Display, err: ApiError) -> anyhow::Error {
        let fault = match err.code {
            "storage_full" => Some(Self::Full),
            "storage_read_only" => Some(Self::ReadOnly),
            "storage_busy" => Some(Self::Busy),
            "storage_unavailable" => Some(Self::Unavailable),
            _ => None,
        };
        Self::sentence(fault, path, "recover the jobs in", &err.detail)
    }

    fn sentence(
        fault: Option<Self>,
        path: &dyn std::fmt::Display,
        stage: &str,
        cause: &dyn std::fmt::Display,
    ) -> anyhow::Error {
        if Backend::of_url(&path.to_string()) == Some(Backend::Postgres) {
            return Self::postgres_sentence(fault, path, stage, cause);
        }
        match fault {
            Some(Self::ReadOnly) => anyhow::anyhow!(
                "cannot write the database at {path}: the file or its directory is read-only; \
                 make it writable or choose another --data-dir"
            ),
            Some(Self::Full) => anyhow::anyhow!(
                "cannot write the database at {path}: the disk is full; free some space or \
                 choose another --data-dir"
            ),
            Some(Self::Busy) => anyhow::anyhow!(
                "cannot use the database at {path}: another program keeps it locked; stop that \
                 program (an sqlite3 shell, a backup tool) and start again"
            ),
            Some(Self::Unavailable) => anyhow::anyhow!(
                "cannot open the database at {path} ({cause}); check that the data directory \
                 exists and is readable and writable, or choose another --data-dir"
            ),
            None => anyhow::anyhow!("cannot {stage} the database at {path}: {cause}"),
        }
    }

    fn postgres_sentence(
        fault: Option<Self>,
        url: &dyn std::fmt::Display,
        stage: &str,
        cause: &dyn std::fmt::Display,
    ) -> anyhow::Error {
        match fault {
            Some(Self::Unavailable) | Some(Self::Busy) => anyhow::anyhow!(
                "cannot reach the PostgreSQL database at {url} ({cause}); check that the server \
                 runs, accepts connections from this host and that the database exists"
            ),
            Some(Self::Full) => anyhow::anyhow!(
                "the PostgreSQL server at {url} has no disk space left; free some and start again"
            ),
            Some(Self::ReadOnly) => anyhow::anyhow!(
                "the PostgreSQL database at {url} is read-only (a standby?); point --database at \
                 the primary"
            ),
            None => anyhow::anyhow!("cannot {stage} the PostgreSQL database at {url}: {cause}"),
        }
    }
}

/// Current time as RFC 3339 with millisecond precision, the format every timestamp column uses.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A yes/no column or expression, stored and returned as an integer (0 or 1) on both engines:
/// SQLite has no boolean type and the Any driver cannot read PostgreSQL's `boolean` as one, so
/// the store's SQL writes conditions as `CASE WHEN ... THEN 1 ELSE 0 END` and reads them here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl From<Flag> for bool {
    fn from(flag: Flag) -> bool {
        flag.0
    }
}

impl sqlx::Type<Any> for Flag {
    fn type_info() -> sqlx::any::AnyTypeInfo {
        <i64 as sqlx::Type<Any>>::type_info()
    }

    fn compatible(ty: &sqlx::any::AnyTypeInfo) -> bool {
        <i64 as sqlx::Type<Any>>::compatible(ty)
    }
}

impl<'r> sqlx::Decode<'r, Any> for Flag {
    fn decode(value: sqlx::any::AnyValueRef<'r>) -> Result<Self, sqlx::error::BoxDynError> {
        Ok(Flag(<i64 as sqlx::Decode<Any>>::decode(value)? != 0))
    }
}
