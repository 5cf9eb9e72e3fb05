//! The SQLite database: opening it (created on first start, WAL journal, foreign keys on)
//! and running the migrations embedded from `migrations/`.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use crate::error::ApiError;

/// Migrations compiled into the binary, so a fresh data directory needs nothing else.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Opens (creating if needed) the database file and brings its schema up to date.
pub async fn open(path: &Path) -> anyhow::Result<SqlitePool> {
    open_limited(path, None).await
}

/// [`open`], with every connection's database size capped at `page_limit` pages (SQLite's
/// `max_page_count`, which never goes below the database's current size), so that writes
/// beyond it fail with SQLITE_FULL exactly as on a full disk. `None`: no cap.
///
/// A database that cannot be opened or written is refused here, at start-up, with a sentence
/// that says what is wrong and what to do (see [`StorageFault::startup_error`]), rather than
/// failing each request later.
pub async fn open_limited(path: &Path, page_limit: Option<u32>) -> anyhow::Result<SqlitePool> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        }
    }
    let url = format!("sqlite://{}", path.display());
    let mut options = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL is durable across process crashes in WAL mode (only an OS crash can lose the
        // last transactions), at a fraction of FULL's fsync cost.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(Duration::from_secs(10));
    if let Some(pages) = page_limit {
        options = options.pragma("max_page_count", pages.to_string());
    }
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .map_err(|e| StorageFault::startup_error(path, "open", &e))?;
    MIGRATOR.run(&pool).await.map_err(|e| match &e {
        sqlx::migrate::MigrateError::Execute(db)
        | sqlx::migrate::MigrateError::ExecuteMigration(db, _) => {
            StorageFault::startup_error(path, "migrate", db)
        }
        _ => anyhow::Error::new(e).context(format!("cannot migrate database {}", path.display())),
    })?;
    // Migrations that were all applied before write nothing, and SQLite quietly opens a file
    // it may not write read-only: take the write lock once (and give it back unused) so a
    // read-only database stops the start instead of failing every later write.
    let probe = async {
        let mut conn = pool.acquire().await?;
        sqlx::query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
        sqlx::query("ROLLBACK").execute(&mut *conn).await?;
        Ok::<_, sqlx::Error>(())
    };
    probe
        .await
        .map_err(|e| StorageFault::startup_error(path, "write", &e))?;
    Ok(pool)
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
    pub fn startup_error(path: &Path, stage: &str, err: &sqlx::Error) -> anyhow::Error {
        let fault = Self::of(err);
        tracing::error!(database = %path.display(), stage, error = %err, ?fault, "the database failed at start-up");
        Self::sentence(fault, path, stage, err)
    }

    /// The same for a start-up step that reports errors as [`ApiError`]s (crash recovery of
    /// jobs), whose `code` says which fault it was; the cause was logged when it was made.
    pub fn startup_api_error(path: &Path, err: ApiError) -> anyhow::Error {
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
        path: &Path,
        stage: &str,
        cause: &dyn std::fmt::Display,
    ) -> anyhow::Error {
        let path = path.display();
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
}

/// Current time as RFC 3339 with millisecond precision, the format every timestamp column uses.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
