//! The worker's side of the job queue: claiming the next job, recording its progress and
//! finished frames, ending it, and putting interrupted jobs right at start-up. Each function
//! is one transaction that also stores the event it announces (see `store::jobs`).

use sqlx::{AnyConnection, AnyPool};

use crate::db::Flag;

use super::frame_attention::AttentionPng;
use super::frame_versions::{self, NewVersion};
use super::job_events::{self, kind, JobEvent};
use super::jobs::{
    job_frames, parse_params, refresh_frames, JobFrameRow, JobParams, Progress, FRAME_STATUS,
};
use super::stories;
use crate::db::now;
use crate::error::{ApiError, ApiResult};

/// A job a worker claimed.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Job id.
    pub job_id: i64,
    /// The worker that holds it: every later write checks that it still does (a worker
    /// whose lease ran out may still be drawing while another took the job over).
    pub worker: String,
    /// Its story.
    pub story_id: i64,
    /// How many times it has been started, this time included.
    pub attempt: i64,
    /// The snapshot and options.
    pub params: JobParams,
    /// Its frames in drawing order (some may be done by an interrupted earlier attempt).
    pub frames: Vec<JobFrameRow>,
    /// The `started` event to publish.
    pub event: JobEvent,
}

/// Claims the next queued job for `worker`, atomically: one UPDATE picks and marks it, so
/// two workers can never both take a job.
///
/// Stories take turns: the job picked is the oldest queued job (FIFO within a story, which a
/// later job of the story may depend on for its context frames) of the story whose latest
/// turn is oldest, a story never served yet first, ties to the oldest job. Each claim takes
/// the next turn number, so a job that handed its turn back ([`other_story_waiting`]) goes
/// behind every other waiting story.
///
/// The job's lease runs for `lease` from now: the worker renews it with [`heartbeat`], and a
/// job whose lease ran out goes back to the queue ([`requeue_expired`]).
pub async fn claim(
    pool: &AnyPool,
    worker: &str,
    lease: std::time::Duration,
) -> ApiResult<Option<Claimed>> {
    let mut tx = crate::db::begin_write(pool).await?;
    let row: Option<(i64, i64, String, i64)> = sqlx::query_as(
        "UPDATE jobs SET status = 'running', started_at = $1, attempts = attempts + 1, worker = $2,
                turn = (SELECT COALESCE(MAX(turn), 0) + 1 FROM jobs), lease_until = $3
         WHERE id = (
             SELECT q.id FROM jobs q
             WHERE q.status = 'queued'
               AND q.id = (SELECT MIN(f.id) FROM jobs f
                           WHERE f.story_id = q.story_id AND f.status = 'queued')
             ORDER BY (SELECT MAX(s.turn) FROM jobs s WHERE s.story_id = q.story_id) NULLS FIRST,
                      q.id
             LIMIT 1)
         RETURNING id, story_id, params, attempts",
    )
    .bind(now())
    .bind(worker)
    .bind(lease_end(lease))
    .fetch_optional(&mut *tx)
    .await?;
    let Some((job_id, story_id, params, attempt)) = row else {
        return Ok(None);
    };
    let params = parse_params(&params)?;
    let frames = job_frames(&mut tx, job_id).await?;
    let done = frames.iter().filter(|f| f.state == "done").count();
    let event = job_events::insert(
        &mut tx,
        JobEvent::new(
            job_id,
            story_id,
            kind::STARTED,
            serde_json::json!({"attempt": attempt, "frames": frames.len(), "frames_done": done,
                               "worker": worker}),
        ),
    )
    .await?;
    refresh_frames(&mut tx, story_id).await?;
    tx.commit().await?;
    Ok(Some(Claimed {
        job_id,
        worker: worker.to_string(),
        story_id,
        attempt,
        params,
        frames,
        event,
    }))
}

/// Whether a job of a story other than `story` waits in the queue: the running job of
/// `story` then hands its turn back between two frames (see [`Outcome::Requeued`]).
pub async fn other_story_waiting(pool: &AnyPool, story: i64) -> ApiResult<bool> {
    let waiting: Flag = sqlx::query_scalar(
        "SELECT CASE WHEN EXISTS (SELECT 1 FROM jobs WHERE status = 'queued' AND story_id <> $1)
                THEN 1 ELSE 0 END",
    )
    .bind(story)
    .fetch_one(pool)
    .await?;
    Ok(waiting.0)
}

/// Whether the job still runs and whether cancellation was asked for; `None` once the job
/// is gone (its story was deleted).
pub async fn poll(pool: &AnyPool, job: i64) -> ApiResult<Option<(String, bool)>> {
    let found: Option<(String, Flag)> =
        sqlx::query_as("SELECT status, cancel_requested FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_optional(pool)
            .await?;
    Ok(found.map(|(status, cancel)| (status, cancel.0)))
}

/// What a worker finds when it looks at the job it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Held {
    /// Still its job; whether cancellation was asked for.
    Yes { cancel_requested: bool },
    /// The job is gone (its story was deleted).
    Gone,
    /// The job exists but is no longer this worker's running job: its lease ran out and it
    /// went back to the queue (and perhaps to another worker).
    Lost,
}

/// Whether `job` is still `job.worker`'s running job.
pub async fn held(pool: &AnyPool, job: &Claimed) -> ApiResult<Held> {
    let found: Option<(String, Option<String>, Flag)> =
        sqlx::query_as("SELECT status, worker, cancel_requested FROM jobs WHERE id = $1")
            .bind(job.job_id)
            .fetch_optional(pool)
            .await?;
    Ok(match found {
        None => Held::Gone,
        Some((status, worker, Flag(cancel_requested)))
            if status == "running" && worker.as_deref() == Some(job.worker.as_str()) =>
        {
            Held::Yes { cancel_requested }
        }
        Some(_) => Held::Lost,
    })
}

/// Whether `job` still runs under the worker that claimed it.
async fn is_running(conn: &mut AnyConnection, job: &Claimed) -> ApiResult<bool> {
    let found: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, worker FROM jobs WHERE id = $1")
            .bind(job.job_id)
            .fetch_optional(conn)
            .await?;
    Ok(matches!(found, Some((status, worker))
        if status == "running" && worker.as_deref() == Some(job.worker.as_str())))
}

/// When a lease taken now for `lease` ends (RFC 3339, as every timestamp column).
fn lease_end(lease: std::time::Duration) -> String {
    let lease = chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    (chrono::Utc::now() + lease).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Renews the lease of every job `worker` runs, for `lease` from now, and its heartbeat in
/// `workers`.
pub async fn heartbeat(pool: &AnyPool, worker: &str, lease: std::time::Duration) -> ApiResult<()> {
    // Under the write lock: the workers row's foreign key locks the job row, and a story's
    // deletion locks both in the other order.
    let mut tx = crate::db::begin_write(pool).await?;
    sqlx::query("UPDATE jobs SET lease_until = $1 WHERE worker = $2 AND status = 'running'")
        .bind(lease_end(lease))
        .bind(worker)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "UPDATE workers SET last_heartbeat = $1,
                job_id = (SELECT MIN(id) FROM jobs WHERE worker = $2 AND status = 'running')
         WHERE id = $3",
    )
    .bind(now())
    .bind(worker)
    .bind(worker)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

async fn set_progress(conn: &mut AnyConnection, job: i64, progress: &Progress) -> ApiResult<()> {
    sqlx::query("UPDATE jobs SET progress = $1 WHERE id = $2")
        .bind(serde_json::to_string(progress).map_err(ApiError::internal)?)
        .bind(job)
        .execute(conn)
        .await?;
    Ok(())
}

/// Records progress (and marks the frame being drawn `running` when `frame_started`), with a
/// stored `progress` event. `None` when the job no longer runs.
pub async fn progress(
    pool: &AnyPool,
    job: &Claimed,
    progress: &Progress,
    frame_started: Option<i64>,
) -> ApiResult<Option<JobEvent>> {
    let mut tx = crate::db::begin_write(pool).await?;
    if !is_running(&mut tx, job).await? {
        return Ok(None);
    }
    if let Some(ordinal) = frame_started {
        sqlx::query("UPDATE job_frames SET state = 'running' WHERE job_id = $1 AND ordinal = $2")
            .bind(job.job_id)
            .bind(ordinal)
            .execute(&mut *tx)
            .await?;
        refresh_frames(&mut tx, job.story_id).await?;
    }
    set_progress(&mut tx, job.job_id, progress).await?;
    let event = job_events::insert(
        &mut tx,
        JobEvent::new(
            job.job_id,
            job.story_id,
            kind::PROGRESS,
            serde_json::to_value(progress).map_err(ApiError::internal)?,
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(event))
}

/// A finished frame, ready to store.
#[derive(Debug, Clone)]
pub struct FinishedFrame {
    /// 1-based place in the job's drawing order.
    pub ordinal: i64,
    /// PNG bytes.
    pub png: Vec<u8>,
    /// How long drawing it took.
    pub duration_ms: i64,
    /// Cross-attention heatmaps of its caption's character mentions (empty when not
    /// captured); they replace the frame's old maps with its old image.
    pub attention: Vec<AttentionPng>,
}

/// Stores a finished frame: its image, seed, timing and attention maps, its job frame marked
/// done, and its `frame` event, all in one transaction, so a crash can neither lose a stored frame's event
/// nor store a frame twice. `None` when the job no longer runs or the frame was already
/// stored (by an earlier attempt).
pub async fn frame_done(
    pool: &AnyPool,
    job: &Claimed,
    frame: &FinishedFrame,
    progress: &Progress,
) -> ApiResult<Option<JobEvent>> {
    let mut tx = crate::db::begin_write(pool).await?;
    if !is_running(&mut tx, job).await? {
        return Ok(None);
    }
    let row: Option<(i64, Option<i64>, i64)> = sqlx::query_as(
        "UPDATE job_frames SET state = 'done' WHERE job_id = $1 AND ordinal = $2 AND state <> 'done'
         RETURNING position, frame_id, seed",
    )
    .bind(job.job_id)
    .bind(frame.ordinal)
    .fetch_optional(&mut *tx)
    .await?;
    let Some((position, frame_id, seed)) = row else {
        return Ok(None);
    };
    let caption = job.params.captions.get(position as usize).cloned();
    let now = now();
    let mut image_url = None;
    if let Some(frame_id) = frame_id {
        let before = &job.params.frame_ids[..(position as usize).min(job.params.frame_ids.len())];
        let context = frame_versions::versions_of_in(&mut tx, before).await?;
        let options = job.params.draw_options();
        frame_versions::record_in(
            &mut tx,
            &NewVersion {
                frame_id,
                image: &frame.png,
                mime: "image/png",
                caption: caption.as_deref(),
                seed: Some(seed),
                duration_ms: Some(frame.duration_ms),
                options: Some(&options),
                job_id: Some(job.job_id),
                context: Some(context),
                attention: &frame.attention,
            },
        )
        .await?;
        sqlx::query("UPDATE stories SET updated_at = $1 WHERE id = $2")
            .bind(&now)
            .bind(job.story_id)
            .execute(&mut *tx)
            .await?;
        image_url = Some(format!(
            "/api/stories/{}/frames/{frame_id}/image",
            job.story_id
        ));
    }
    refresh_frames(&mut tx, job.story_id).await?;
    set_progress(&mut tx, job.job_id, progress).await?;
    let event = job_events::insert(
        &mut tx,
        JobEvent::new(
            job.job_id,
            job.story_id,
            kind::FRAME,
            serde_json::json!({
                "frame": frame.ordinal, "frames": progress.frames, "frames_done": progress.frames_done,
                "position": position, "frame_id": frame_id, "seed": seed,
                "duration_ms": frame.duration_ms, "image_url": image_url,
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(event))
}

/// A caption the LLM wrote to continue the story, stored.
#[derive(Debug, Clone)]
pub struct Continuation {
    /// The job's new frame (queued), with its seed.
    pub row: JobFrameRow,
    /// The job's parameters with the caption and its frame appended.
    pub params: JobParams,
    /// The `caption` event to publish.
    pub event: JobEvent,
}

/// Stores a caption the LLM wrote to continue the story: a new frame right after the job's
/// last frame that still exists in the story (else at its end), a job frame drawing it with
/// the next continuation seed, and the job's parameters with the caption appended and the
/// seed used up, with the `caption` event, in one transaction; so a job interrupted after
/// this draws the frame on its next attempt and writes only the captions still missing.
/// `None` when the job no longer runs.
pub async fn add_continuation(
    pool: &AnyPool,
    job: &Claimed,
    caption: &str,
) -> ApiResult<Option<Continuation>> {
    let mut tx = crate::db::begin_write(pool).await?;
    if !is_running(&mut tx, job).await? {
        return Ok(None);
    }
    let text: String = sqlx::query_scalar("SELECT params FROM jobs WHERE id = $1")
        .bind(job.job_id)
        .fetch_one(&mut *tx)
        .await?;
    let mut params = parse_params(&text)?;
    if params.continue_seeds.is_empty() {
        return Err(ApiError::internal(format!(
            "job {} has no continuation left to write",
            job.job_id
        )));
    }
    let seed = params.continue_seeds.remove(0);
    let mut after: Option<i64> = None;
    for &id in params.frame_ids.iter().rev() {
        after = sqlx::query_scalar("SELECT position FROM frames WHERE id = $1 AND story_id = $2")
            .bind(id)
            .bind(job.story_id)
            .fetch_optional(&mut *tx)
            .await?;
        if after.is_some() {
            break;
        }
    }
    let (frame_id, story_position) =
        stories::insert_frame_in(&mut tx, job.story_id, caption, after.map(|p| p + 1)).await?;
    let position = params.captions.len() as i64;
    params.captions.push(caption.to_string());
    params.frame_ids.push(frame_id);
    let ordinal: i64 = sqlx::query_scalar(
        "SELECT COALESCE(MAX(ordinal), 0) + 1 FROM job_frames WHERE job_id = $1",
    )
    .bind(job.job_id)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO job_frames (job_id, ordinal, position, frame_id, seed) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(job.job_id)
    .bind(ordinal)
    .bind(position)
    .bind(frame_id)
    .bind(seed as i64)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE jobs SET params = $1 WHERE id = $2")
        .bind(serde_json::to_string(&params).map_err(ApiError::internal)?)
        .bind(job.job_id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE stories SET updated_at = $1 WHERE id = $2")
        .bind(now())
        .bind(job.story_id)
        .execute(&mut *tx)
        .await?;
    refresh_frames(&mut tx, job.story_id).await?;
    let event = job_events::insert(
        &mut tx,
        JobEvent::new(
            job.job_id,
            job.story_id,
            kind::CAPTION,
            serde_json::json!({
                "position": position, "story_position": story_position, "frame_id": frame_id,
                "caption": caption, "seed": seed, "continue_frames": params.continue_seeds.len(),
            }),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Continuation {
        row: JobFrameRow {
            ordinal,
            position,
            frame_id: Some(frame_id),
            seed: seed as i64,
            state: "queued".into(),
        },
        params,
        event,
    }))
}

/// How a job ends (or, for `Requeued`, pauses).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every frame is drawn.
    Succeeded,
    /// It stopped with this error.
    Failed(String),
    /// A client cancelled it; frames already drawn stay.
    Cancelled(Option<String>),
    /// Back to the queue (the server is stopping, restarted after a crash, or the job hands
    /// its turn to another story's waiting job), with why. Frames already stored are kept;
    /// the next claim draws only the others, from the stored images as context.
    Requeued {
        /// Why it went back.
        reason: String,
        /// Whether the interrupted attempt counts towards the attempt limit (a crash does, a
        /// clean shutdown or a handed-back turn does not).
        counts: bool,
    },
}

pub(crate) async fn finish_in(
    conn: &mut AnyConnection,
    job: i64,
    story: i64,
    outcome: &Outcome,
) -> ApiResult<JobEvent> {
    let now = now();
    let (frames, done): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*), COALESCE(SUM(CASE WHEN state = 'done' THEN 1 ELSE 0 END), 0) FROM job_frames WHERE job_id = $1",
    )
    .bind(job)
    .fetch_one(&mut *conn)
    .await?;
    let (status, frame_state, error, event_kind, fields) = match outcome {
        Outcome::Succeeded => (
            "succeeded",
            "done",
            None,
            kind::COMPLETED,
            serde_json::json!({"frames": frames, "frames_done": done}),
        ),
        Outcome::Failed(error) => (
            "failed",
            "failed",
            Some(error.clone()),
            kind::FAILED,
            serde_json::json!({"error": error, "frames": frames, "frames_done": done}),
        ),
        Outcome::Cancelled(reason) => (
            "cancelled",
            "cancelled",
            None,
            kind::CANCELLED,
            serde_json::json!({"frames": frames, "frames_done": done, "reason": reason}),
        ),
        Outcome::Requeued { reason, .. } => (
            "queued",
            "queued",
            None,
            kind::QUEUED,
            serde_json::json!({"frames": frames, "frames_done": done, "requeued": true, "reason": reason}),
        ),
    };
    let requeued = matches!(outcome, Outcome::Requeued { .. });
    let uncount = matches!(outcome, Outcome::Requeued { counts: false, .. });
    sqlx::query(
        "UPDATE jobs SET status = $1, error = $2, worker = NULL,
                finished_at = CASE WHEN $3 THEN NULL ELSE $4 END,
                attempts = attempts - CASE WHEN $5 THEN 1 ELSE 0 END,
                cancel_requested = CASE WHEN $6 THEN 1 ELSE cancel_requested END
         WHERE id = $7",
    )
    .bind(status)
    .bind(&error)
    .bind(requeued)
    .bind(&now)
    .bind(uncount)
    .bind(status == "cancelled")
    .bind(job)
    .execute(&mut *conn)
    .await?;
    sqlx::query("UPDATE job_frames SET state = $1 WHERE job_id = $2 AND state <> 'done'")
        .bind(frame_state)
        .bind(job)
        .execute(&mut *conn)
        .await?;
    refresh_frames(conn, story).await?;
    job_events::insert(conn, JobEvent::new(job, story, event_kind, fields)).await
}

/// Ends a running job with `outcome` and stores its event; `None` when the job no longer
/// runs (its story was deleted, or it was already finished). A job that would go back to the
/// queue but whose cancellation was asked for is cancelled instead.
pub async fn finish(
    pool: &AnyPool,
    job: &Claimed,
    outcome: &Outcome,
) -> ApiResult<Option<JobEvent>> {
    let mut tx = crate::db::begin_write(pool).await?;
    if !is_running(&mut tx, job).await? {
        return Ok(None);
    }
    let Flag(cancel_requested) =
        sqlx::query_scalar("SELECT cancel_requested FROM jobs WHERE id = $1")
            .bind(job.job_id)
            .fetch_one(&mut *tx)
            .await?;
    let cancelled = Outcome::Cancelled(None);
    let outcome = match outcome {
        Outcome::Requeued { .. } if cancel_requested => &cancelled,
        other => other,
    };
    let event = finish_in(&mut tx, job.job_id, job.story_id, outcome).await?;
    tx.commit().await?;
    Ok(Some(event))
}

/// What [`recover`] or [`requeue_expired`] did.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Jobs put back in the queue.
    pub requeued: Vec<i64>,
    /// Jobs failed after too many interrupted attempts.
    pub failed: Vec<i64>,
    /// Jobs whose cancellation was asked for before the interruption.
    pub cancelled: Vec<i64>,
    /// The events stored for them, for live viewers.
    pub events: Vec<JobEvent>,
}

impl Recovery {
    /// Whether nothing was done.
    pub fn is_empty(&self) -> bool {
        self.requeued.is_empty() && self.failed.is_empty() && self.cancelled.is_empty()
    }
}

/// Run at start-up of a server that is the only user of its database (SQLite: the data
/// directory lock sees to it), before any worker: a job still `running` was interrupted
/// (crash, kill -9, power loss). It goes back to the queue, keeping the frames it finished,
/// unless it was being cancelled (then it is cancelled) or it has been interrupted
/// `max_attempts` times (then it fails, since it may be what brings the server down).
pub async fn recover(pool: &AnyPool, max_attempts: u32) -> ApiResult<Recovery> {
    interrupted(pool, max_attempts, false).await
}

/// The same for running jobs whose lease ran out: their worker stopped renewing it (it was
/// killed, crashed, hung or lost the database), so the job goes back to the queue with the
/// attempt counted, exactly as after a crash. Safe with any number of servers and workers.
pub async fn requeue_expired(pool: &AnyPool, max_attempts: u32) -> ApiResult<Recovery> {
    interrupted(pool, max_attempts, true).await
}

async fn interrupted(pool: &AnyPool, max_attempts: u32, expired_only: bool) -> ApiResult<Recovery> {
    let mut tx = crate::db::begin_write(pool).await?;
    let filter = if expired_only {
        "AND (lease_until IS NULL OR lease_until < $1)"
    } else {
        "AND $1 IS NOT NULL"
    };
    let running: Vec<(i64, i64, i64, Flag)> = sqlx::query_as(&format!(
        "SELECT id, story_id, attempts, cancel_requested FROM jobs
         WHERE status = 'running' {filter} ORDER BY id"
    ))
    .bind(now())
    .fetch_all(&mut *tx)
    .await?;
    let what = if expired_only {
        "the worker running the job stopped renewing its lease (it was stopped, crashed or \
         lost the database)"
    } else {
        "the server stopped while the job was running"
    };
    let mut recovery = Recovery::default();
    for (id, story, attempts, Flag(cancel_requested)) in running {
        let outcome = if cancel_requested {
            recovery.cancelled.push(id);
            Outcome::Cancelled(Some(format!("{what}, before it noticed the cancellation")))
        } else if attempts >= max_attempts as i64 {
            recovery.failed.push(id);
            Outcome::Failed(format!(
                "{what}, on attempt {attempts} of {max_attempts}; giving up, as the job may be \
                 what stops it (see the log)"
            ))
        } else {
            recovery.requeued.push(id);
            Outcome::Requeued {
                reason: format!("{what}; frames already drawn are kept"),
                counts: true,
            }
        };
        recovery
            .events
            .push(finish_in(&mut tx, id, story, &outcome).await?);
    }
    // Any frame left marked queued or running without a job to back it is set right too.
    let sql = format!(
        "UPDATE frames SET status = {FRAME_STATUS}, updated_at = $1
         WHERE status IN ('queued', 'running') AND status IS DISTINCT FROM ({FRAME_STATUS})"
    );
    sqlx::query(&sql).bind(now()).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(recovery)
}

/// The stored bytes of each character's portrait (`None` for a deleted character).
pub async fn portraits(pool: &AnyPool, ids: &[i64]) -> ApiResult<Vec<Option<Vec<u8>>>> {
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        out.push(
            sqlx::query_scalar("SELECT portrait FROM characters WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?,
        );
    }
    Ok(out)
}

/// The stored image of a frame, if it has one.
pub async fn frame_image(pool: &AnyPool, frame: i64) -> ApiResult<Option<Vec<u8>>> {
    let image: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT image FROM frames WHERE id = $1")
            .bind(frame)
            .fetch_optional(pool)
            .await?;
    Ok(image.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::jobs::{enqueue, Enqueued, GenerateSpec};
    use crate::store::stories;

    async fn database() -> (tempfile::TempDir, AnyPool) {
        let dir = tempfile::tempdir().unwrap();
        let pool = crate::db::open(&dir.path().join("jobs.db")).await.unwrap();
        (dir, pool)
    }

    async fn story(pool: &AnyPool, frames: usize) -> i64 {
        let captions: Vec<String> = (0..frames).map(|i| format!("Caption {i}.")).collect();
        stories::create(pool, None, "A story", &captions, &[])
            .await
            .unwrap()
            .id
    }

    async fn queue(pool: &AnyPool, story: i64) -> i64 {
        let spec = GenerateSpec {
            frames: None,
            base_seed: Some(1),
            keep_seeds: false,
            steps: 1,
            guidance_scale: 1.0,
            scheduler: "pndm".into(),
            bundle: "test".into(),
            negative_prompt: String::new(),
            size: None,
            continue_frames: 0,
        };
        match enqueue(pool, story, &spec, None, 100).await.unwrap() {
            Enqueued::New(job, _) => job.id,
            Enqueued::Replayed(job) => panic!("replayed {job:?}"),
        }
    }

    async fn next(pool: &AnyPool) -> Claimed {
        claim(pool, "test", std::time::Duration::from_secs(30))
            .await
            .unwrap()
            .expect("a queued job")
    }

    fn handed_back() -> Outcome {
        Outcome::Requeued {
            reason: "another story's job is waiting".into(),
            counts: false,
        }
    }

    #[tokio::test]
    async fn stories_take_turns_and_each_story_keeps_its_order() {
        let (_dir, pool) = database().await;
        let (a, b, c) = (
            story(&pool, 3).await,
            story(&pool, 1).await,
            story(&pool, 1).await,
        );
        let a1 = queue(&pool, a).await;
        let a2 = queue(&pool, a).await;
        let b1 = queue(&pool, b).await;
        let c1 = queue(&pool, c).await;

        // Nobody served yet: the oldest job.
        let job = next(&pool).await;
        assert_eq!((job.job_id, job.attempt), (a1, 1));
        assert!(other_story_waiting(&pool, a).await.unwrap());
        // It hands its turn back after a frame: the stories never served come first, oldest
        // job first, and the handed-back turn does not count as an attempt.
        let event = finish(&pool, &job, &handed_back()).await.unwrap().unwrap();
        assert_eq!(event.kind, kind::QUEUED);
        assert_eq!(event.data["requeued"], true);
        let job = next(&pool).await;
        assert_eq!(job.job_id, b1);
        let b2 = queue(&pool, b).await;
        finish(&pool, &job, &Outcome::Succeeded).await.unwrap();
        let job = next(&pool).await;
        assert_eq!(job.job_id, c1);
        finish(&pool, &job, &Outcome::Succeeded).await.unwrap();
        // A was served longest ago, and within A the older job goes first (a later job of a
        // story may draw looking at the frames of an earlier one).
        let job = next(&pool).await;
        assert_eq!((job.job_id, job.attempt), (a1, 1));
        finish(&pool, &job, &Outcome::Succeeded).await.unwrap();
        let job = next(&pool).await;
        assert_eq!(job.job_id, b2, "B waited longer than A");
        assert!(other_story_waiting(&pool, b).await.unwrap());
        assert!(!other_story_waiting(&pool, a).await.unwrap());
        finish(&pool, &job, &Outcome::Succeeded).await.unwrap();
        let job = next(&pool).await;
        assert_eq!(job.job_id, a2);
        finish(&pool, &job, &Outcome::Succeeded).await.unwrap();
        assert!(claim(&pool, "test", std::time::Duration::from_secs(30))
            .await
            .unwrap()
            .is_none());
        assert!(!other_story_waiting(&pool, a).await.unwrap());
    }

    #[tokio::test]
    async fn a_handed_back_job_keeps_its_frames_and_a_pending_cancel_wins() {
        let (_dir, pool) = database().await;
        let (a, b) = (story(&pool, 3).await, story(&pool, 1).await);
        let a1 = queue(&pool, a).await;
        let job = next(&pool).await;
        let mut png = Vec::new();
        image::RgbImage::new(2, 2)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let frame = FinishedFrame {
            ordinal: 1,
            png,
            duration_ms: 5,
            attention: Vec::new(),
        };
        let progress = Progress {
            frame: 1,
            frames: 3,
            frames_done: 1,
            position: 0,
            frame_id: job.frames[0].frame_id,
            step: 1,
            steps: 1,
        };
        frame_done(&pool, &job, &frame, &progress)
            .await
            .unwrap()
            .unwrap();
        queue(&pool, b).await;
        finish(&pool, &job, &handed_back()).await.unwrap().unwrap();
        // Back in the queue with its stored frame and its progress; the others wait again.
        let waiting = crate::store::jobs::get(&pool, a1).await.unwrap();
        assert_eq!(waiting.status, "queued");
        assert_eq!(waiting.attempts, 0);
        assert_eq!(waiting.progress.as_ref().map(|p| p.frames_done), Some(1));
        let states: Vec<&str> = waiting.frames.iter().map(|f| f.status.as_str()).collect();
        assert_eq!(states, ["done", "queued", "queued"]);
        let story = stories::get(&pool, a).await.unwrap();
        let statuses: Vec<&str> = story.frames.iter().map(|f| f.status.as_str()).collect();
        assert_eq!(statuses, ["ready", "queued", "queued"]);

        // B's job runs; A's, claimed again later, resumes from its second frame. A cancel
        // asked for while it runs wins over handing the turn back.
        let other = next(&pool).await;
        finish(&pool, &other, &Outcome::Succeeded).await.unwrap();
        let job = next(&pool).await;
        assert_eq!((job.job_id, job.attempt), (a1, 1));
        let left: Vec<i64> = job
            .frames
            .iter()
            .filter(|f| f.state != "done")
            .map(|f| f.position)
            .collect();
        assert_eq!(left, [1, 2]);
        crate::store::jobs::cancel(&pool, a1).await.unwrap();
        let event = finish(&pool, &job, &handed_back()).await.unwrap().unwrap();
        assert_eq!(event.kind, kind::CANCELLED);
    }
}
