//! The event log of generation jobs (`job_events`): every state change of a job, in order.
//! A row's id is the SSE event id, so a client that reconnects with `Last-Event-ID` gets
//! exactly the events it missed, read back from here.

use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::AnyConnection;

use crate::db::now;
use crate::error::ApiResult;

/// Event names, as sent in the SSE `event:` field and stored in `job_events.kind`.
pub mod kind {
    /// The job entered the queue (or went back to it after a restart).
    pub const QUEUED: &str = "queued";
    /// A worker claimed the job and started drawing.
    pub const STARTED: &str = "started";
    /// Denoising progress: frame i/N, step j/M.
    pub const PROGRESS: &str = "progress";
    /// A frame finished and its image is stored.
    pub const FRAME: &str = "frame";
    /// Story continuation: the LLM wrote a caption, now a new frame of the story (and of the
    /// job), drawn next.
    pub const CAPTION: &str = "caption";
    /// What the frame being drawn looks like so far (a PNG data URL; live only, not stored).
    pub const PREVIEW: &str = "preview";
    /// Every frame is drawn.
    pub const COMPLETED: &str = "completed";
    /// The job stopped with an error.
    pub const FAILED: &str = "failed";
    /// The job was cancelled.
    pub const CANCELLED: &str = "cancelled";

    /// Whether an event of this kind ends its job (nothing follows it).
    pub fn is_final(kind: &str) -> bool {
        matches!(kind, COMPLETED | FAILED | CANCELLED)
    }
}

/// One job event, stored or live-only.
#[derive(Debug, Clone, Serialize)]
pub struct JobEvent {
    /// Row id in `job_events` (the SSE id); `None` for live-only progress ticks, which are
    /// not stored (a reconnecting client resumes from the last stored event instead).
    pub id: Option<i64>,
    /// The job it belongs to.
    pub job_id: i64,
    /// The story of that job (for the per-story stream).
    pub story_id: i64,
    /// Event name (see [`kind`]).
    pub kind: &'static str,
    /// JSON payload; always has `job_id`, `story_id` and `at` (RFC 3339).
    pub data: Value,
}

impl JobEvent {
    /// Builds an event, adding the ids and the time to its payload.
    pub fn new(job_id: i64, story_id: i64, kind: &'static str, fields: Value) -> Self {
        let mut data = match fields {
            Value::Object(map) => map,
            _ => Map::new(),
        };
        data.insert("job_id".into(), job_id.into());
        data.insert("story_id".into(), story_id.into());
        data.insert("at".into(), now().into());
        Self {
            id: None,
            job_id,
            story_id,
            kind,
            data: Value::Object(data),
        }
    }

    /// Whether this event ends its job's stream.
    pub fn is_final(&self) -> bool {
        kind::is_final(self.kind)
    }
}

/// Stores an event (inside the caller's transaction) and returns it with its id.
pub async fn insert(conn: &mut AnyConnection, mut event: JobEvent) -> ApiResult<JobEvent> {
    let at = event.data["at"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(now);
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, kind, data, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(event.job_id)
    .bind(event.kind)
    .bind(event.data.to_string())
    .bind(at)
    .fetch_one(conn)
    .await?;
    event.id = Some(id);
    Ok(event)
}

/// Which events a stream follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// One job's events.
    Job(i64),
    /// The events of every job of one story.
    Story(i64),
}

impl Scope {
    /// Whether `event` belongs to this scope.
    pub fn contains(&self, event: &JobEvent) -> bool {
        match *self {
            Scope::Job(id) => event.job_id == id,
            Scope::Story(id) => event.story_id == id,
        }
    }
}

/// The kind constant an event kind read back (from the database or another process) names.
pub fn known_kind(text: &str) -> &'static str {
    use kind::*;
    [
        QUEUED, STARTED, PROGRESS, FRAME, CAPTION, PREVIEW, COMPLETED, FAILED, CANCELLED,
    ]
    .into_iter()
    .find(|k| *k == text)
    .unwrap_or("unknown")
}

/// Stored events of a scope with ids above `after`, oldest first, at most `limit`.
pub async fn after(
    conn: &mut AnyConnection,
    scope: Scope,
    after: i64,
    limit: i64,
) -> ApiResult<Vec<JobEvent>> {
    let (filter, id) = match scope {
        Scope::Job(id) => ("e.job_id = $1", id),
        Scope::Story(id) => ("j.story_id = $1", id),
    };
    let sql = format!(
        "SELECT e.id, e.job_id, j.story_id, e.kind, e.data
         FROM job_events e JOIN jobs j ON j.id = e.job_id
         WHERE {filter} AND e.id > $2 ORDER BY e.id LIMIT $3"
    );
    let rows: Vec<(i64, i64, i64, String, String)> = sqlx::query_as(&sql)
        .bind(id)
        .bind(after)
        .bind(limit)
        .fetch_all(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, job_id, story_id, kind, data)| JobEvent {
            id: Some(id),
            job_id,
            story_id,
            kind: known_kind(&kind),
            data: serde_json::from_str(&data).unwrap_or(Value::Null),
        })
        .collect())
}

/// The id of the newest stored event (0 when there is none): where a live-only stream starts.
pub async fn newest_id(conn: &mut AnyConnection) -> ApiResult<i64> {
    Ok(
        sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM job_events")
            .fetch_one(conn)
            .await?,
    )
}
