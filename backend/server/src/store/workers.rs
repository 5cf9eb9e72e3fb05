//! The generation workers that announced themselves: in-process ones (`serve`) and separate
//! `storygpt-v worker` processes on any host, with their last heartbeat.

use serde::Serialize;
use sqlx::AnyPool;
use utoipa::ToSchema;

use crate::db::now;
use crate::error::ApiResult;

/// What a worker says about itself when it starts.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// Unique per start: host, process id and a random part.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: i64,
    /// Device it draws on (cpu, cuda:0, ...).
    pub device: String,
    /// Model bundle directory, as the worker names it.
    pub bundle: String,
}

/// A worker as the admin API lists it.
#[derive(Debug, Clone, Serialize, ToSchema, sqlx::FromRow)]
pub struct WorkerInfo {
    /// Unique per start of a worker.
    pub id: String,
    /// Host name.
    pub host: String,
    /// Process id on that host.
    pub pid: i64,
    /// Device it draws on.
    pub device: String,
    /// Model bundle directory on its host.
    pub bundle: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// Its latest heartbeat (RFC 3339).
    pub last_heartbeat: String,
    /// When it stopped cleanly; absent while it runs or after a crash.
    pub stopped_at: Option<String>,
    /// The job it draws now.
    pub job_id: Option<i64>,
    /// Whether it is running: not stopped, and its heartbeat is recent (within the lease).
    #[sqlx(skip)]
    pub alive: bool,
}

/// Records a worker that starts.
pub async fn announce(pool: &AnyPool, worker: &Announcement) -> ApiResult<()> {
    let now = now();
    sqlx::query(
        "INSERT INTO workers (id, host, pid, device, bundle, started_at, last_heartbeat)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&worker.id)
    .bind(&worker.host)
    .bind(worker.pid)
    .bind(&worker.device)
    .bind(&worker.bundle)
    .bind(&now)
    .bind(&now)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records a clean stop.
pub async fn stopped(pool: &AnyPool, id: &str) -> ApiResult<()> {
    sqlx::query("UPDATE workers SET stopped_at = $1, job_id = NULL WHERE id = $2")
        .bind(now())
        .bind(id)
        .execute(pool)
        .await?;
    Ok(())
}

/// RFC 3339 time `ago` before now (a day when `ago` does not fit).
fn before_now(ago: std::time::Duration) -> String {
    let ago = chrono::Duration::from_std(ago).unwrap_or(chrono::Duration::days(1));
    (chrono::Utc::now() - ago).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Workers whose last heartbeat is within the last day (running ones, and those that stopped
/// or went silent since), newest first; at most 200. `alive`: heartbeat within `lease`.
pub async fn list(pool: &AnyPool, lease: std::time::Duration) -> ApiResult<Vec<WorkerInfo>> {
    let mut workers: Vec<WorkerInfo> = sqlx::query_as(
        "SELECT id, host, pid, device, bundle, started_at, last_heartbeat, stopped_at, job_id
         FROM workers WHERE last_heartbeat > $1 ORDER BY started_at DESC, id LIMIT 200",
    )
    .bind(before_now(std::time::Duration::from_secs(24 * 3600)))
    .fetch_all(pool)
    .await?;
    let fresh = before_now(lease);
    for worker in &mut workers {
        worker.alive = worker.stopped_at.is_none() && worker.last_heartbeat > fresh;
    }
    Ok(workers)
}

/// How many workers run (not stopped, heartbeat within `lease`).
pub async fn alive(pool: &AnyPool, lease: std::time::Duration) -> ApiResult<i64> {
    Ok(sqlx::query_scalar(
        "SELECT COUNT(*) FROM workers WHERE stopped_at IS NULL AND last_heartbeat > $1",
    )
    .bind(before_now(lease))
    .fetch_one(pool)
    .await?)
}
