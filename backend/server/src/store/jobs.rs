//! Generation jobs: the durable queue (the worker's side is in `job_runs`). A job is queued
//! with a snapshot of its story (captions, cast, frame ids) and a fixed seed per frame,
//! claimed atomically by a worker (stories taking turns, see `job_runs::claim`), and finished
//! as succeeded, failed or cancelled. Every state change is one transaction that also appends its event to
//! `job_events`, so what a client sees over SSE and what the database holds never disagree,
//! and a crash leaves each change fully applied or not at all.
//!
//! Frame statuses (`frames.status`) are derived here from the facts (which active job still
//! has to draw the frame, whether it has an image, which caption that image was drawn from)
//! by [`refresh_frames`], called in every transaction that changes one of those facts.

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, AnyPool};
use utoipa::ToSchema;

use super::job_events::{self, kind, JobEvent};
use super::job_runs::{finish_in, Outcome};
use super::{decode_cursor, paginate, Page};
use crate::db::now;
use crate::error::{ApiError, ApiResult};
use crate::validate::MAX_CAPTIONS;

pub use models::limits::MAX_SEED;

/// Job statuses a worker has not finished with.
const ACTIVE: &str = "('queued', 'running')";

/// What a frame's status is, from the facts: drawn now by a running job; waiting in an active
/// job; has an image drawn from its current caption (ready) or from an older one (stale); the
/// last job that tried it failed; or never drawn (pending).
pub(crate) const FRAME_STATUS: &str = "CASE
    WHEN EXISTS (SELECT 1 FROM job_frames jf JOIN jobs j ON j.id = jf.job_id
                 WHERE jf.frame_id = frames.id AND j.status = 'running' AND jf.state = 'running')
        THEN 'running'
    WHEN EXISTS (SELECT 1 FROM job_frames jf JOIN jobs j ON j.id = jf.job_id
                 WHERE jf.frame_id = frames.id AND j.status IN ('queued', 'running')
                   AND jf.state IN ('queued', 'running'))
        THEN 'queued'
    WHEN image IS NOT NULL THEN
        CASE WHEN image_caption IS NOT DISTINCT FROM caption THEN 'ready' ELSE 'stale' END
    WHEN (SELECT jf.state FROM job_frames jf WHERE jf.frame_id = frames.id
          ORDER BY jf.job_id DESC LIMIT 1) = 'failed' THEN 'failed'
    ELSE 'pending' END";

/// Brings the status of every frame of a story in line with the facts (see [`FRAME_STATUS`]).
pub async fn refresh_frames(conn: &mut AnyConnection, story: i64) -> ApiResult<()> {
    let sql = format!(
        "UPDATE frames SET status = {FRAME_STATUS}, updated_at = $1
         WHERE story_id = $2 AND status IS DISTINCT FROM ({FRAME_STATUS})"
    );
    sqlx::query(&sql)
        .bind(now())
        .bind(story)
        .execute(conn)
        .await?;
    Ok(())
}

/// A member of the story's cast as the job saw it when it was queued.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CastMember {
    /// Character id (its portrait is read when the job runs).
    pub id: i64,
    /// Name as captions write it.
    pub name: String,
    /// he, she, they or it.
    pub pronoun: String,
}

/// What a job draws, fixed when it is queued (stored as JSON in `jobs.params`). The job works
/// from this snapshot, so editing the story while it waits or runs cannot mix two versions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobParams {
    /// Denoising steps per frame.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler (`pndm`, `ddim`, `euler-a`, `ddpm`); absent in jobs queued before it could be
    /// chosen, which draw with the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// Name of the model bundle that drew it (absent in older jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// What guidance steered away from ("" or absent: the empty prompt).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub negative_prompt: String,
    /// Frame size in pixels (absent: the model's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Frame height in pixels (absent: the model's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Story continuation: the seeds of the frames whose captions the LLM still has to write
    /// after the last caption, in order. Each written caption is appended to `captions` (and
    /// its new frame to `frame_ids`) and its seed removed from here, in one transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub continue_seeds: Vec<u64>,
    /// Every caption of the story, in story order.
    pub captions: Vec<String>,
    /// The frame id at each caption position.
    pub frame_ids: Vec<i64>,
    /// The story's cast.
    pub characters: Vec<CastMember>,
}

impl JobParams {
    /// How this job draws, as each frame version records it.
    pub fn draw_options(&self) -> super::frame_versions::DrawOptions {
        super::frame_versions::DrawOptions {
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler.clone(),
            bundle: self.bundle.clone(),
            negative_prompt: self.negative_prompt.clone(),
            width: self.width,
            height: self.height,
        }
    }
}

/// A validated request to draw frames of a story (the story itself is checked in [`enqueue`]).
#[derive(Debug, Clone)]
pub struct GenerateSpec {
    /// Positions to draw with an optional explicit seed each; `None`: every frame.
    pub frames: Option<Vec<(i64, Option<u64>)>>,
    /// Frame at position p gets `seed + p` unless it has its own.
    pub base_seed: Option<u64>,
    /// Reuse a frame's stored seed when it has one and no other seed is given.
    pub keep_seeds: bool,
    /// Denoising steps per frame.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler, by its short name.
    pub scheduler: String,
    /// Name of the model bundle that will draw it.
    pub bundle: String,
    /// What guidance steers away from ("" = the empty prompt).
    pub negative_prompt: String,
    /// Frame size `(width, height)`, one the model offers (absent: its default).
    pub size: Option<(u32, u32)>,
    /// How many captions the LLM writes (and draws) after the story's last one.
    pub continue_frames: u32,
}

/// An `Idempotency-Key` with the fingerprint of the request that carried it.
#[derive(Debug, Clone)]
pub struct Idempotency {
    /// The key as the client sent it.
    pub key: String,
    /// SHA-256 (hex) of the story id and the request body.
    pub request_hash: String,
}

/// Latest progress of a running job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// 1-based number of the frame being drawn, within the job.
    pub frame: usize,
    /// How many frames the job draws.
    pub frames: usize,
    /// How many of them are finished.
    pub frames_done: usize,
    /// 0-based caption position (in the job's snapshot) of the frame being drawn.
    pub position: usize,
    /// Id of the frame being drawn (absent if it was deleted meanwhile).
    pub frame_id: Option<i64>,
    /// Denoising steps done for this frame.
    pub step: usize,
    /// Denoising steps per frame.
    pub steps: usize,
}

/// One frame of a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobFrame {
    /// The frame's id; absent when the frame was deleted after the job was queued.
    pub frame_id: Option<i64>,
    /// 0-based caption position in the job's snapshot of the story.
    pub position: i64,
    /// The caption the job draws (as it was when the job was queued).
    pub caption: String,
    /// Seed of the frame's noise, fixed when the job was queued.
    pub seed: i64,
    /// queued, running, done, failed or cancelled.
    pub status: String,
}

/// A generation job as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Stable id.
    pub id: i64,
    /// The story it draws.
    pub story_id: i64,
    /// queued, running, succeeded, failed or cancelled. A running job goes back to queued
    /// between two frames when another story's job waits (its turn), keeping what it drew.
    pub status: String,
    /// Denoising steps per frame.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// Sampler (`pndm`, `ddim`, `euler-a`, `ddpm`); null for a job queued before it could be
    /// chosen (it drew with the model's default).
    pub scheduler: Option<String>,
    /// What guidance steers away from ("" = the empty prompt).
    pub negative_prompt: String,
    /// Frame width in pixels (null: the model's default).
    pub width: Option<u32>,
    /// Frame height in pixels (null: the model's default).
    pub height: Option<u32>,
    /// Story continuation: how many captions the LLM has still to write and draw after the
    /// story's last frame (each written one joins `frames` as it is added to the story).
    pub continue_frames: usize,
    /// The frames it draws, in drawing order.
    pub frames: Vec<JobFrame>,
    /// Latest progress, once started (kept while it waits for its next turn).
    pub progress: Option<Progress>,
    /// Why it failed.
    pub error: Option<String>,
    /// Whether cancellation was asked for (a running job stops at its next step).
    pub cancel_requested: bool,
    /// How many times a worker started it (more than 1 after a restart interrupted it).
    pub attempts: i64,
    /// When it was queued (RFC 3339).
    pub created_at: String,
    /// When a worker last started it.
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// Its server-sent event stream.
    pub events_url: String,
}

#[derive(sqlx::FromRow)]
struct JobRow {
    id: i64,
    story_id: i64,
    status: String,
    params: String,
    progress: Option<String>,
    error: Option<String>,
    #[sqlx(try_from = "crate::db::Flag")]
    cancel_requested: bool,
    attempts: i64,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

/// A row of `job_frames`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobFrameRow {
    /// 1-based place in the job's drawing order.
    pub ordinal: i64,
    /// 0-based caption position in the snapshot.
    pub position: i64,
    /// The frame (NULL once deleted).
    pub frame_id: Option<i64>,
    /// Noise seed.
    pub seed: i64,
    /// queued, running, done, failed or cancelled.
    pub state: String,
}

const JOB_COLUMNS: &str = "id, story_id, status, params, progress, error, cancel_requested, \
                           attempts, created_at, started_at, finished_at";

pub(crate) fn parse_params(text: &str) -> ApiResult<JobParams> {
    serde_json::from_str(text).map_err(|e| ApiError::internal(format!("job params: {e}")))
}

pub(crate) async fn job_frames(conn: &mut AnyConnection, job: i64) -> ApiResult<Vec<JobFrameRow>> {
    Ok(sqlx::query_as(
        "SELECT ordinal, position, frame_id, seed, state FROM job_frames
         WHERE job_id = $1 ORDER BY ordinal",
    )
    .bind(job)
    .fetch_all(conn)
    .await?)
}

async fn to_job(conn: &mut AnyConnection, row: JobRow) -> ApiResult<Job> {
    let params = parse_params(&row.params)?;
    let frames = job_frames(conn, row.id)
        .await?
        .into_iter()
        .map(|f| JobFrame {
            frame_id: f.frame_id,
            position: f.position,
            caption: params
                .captions
                .get(f.position as usize)
                .cloned()
                .unwrap_or_default(),
            seed: f.seed,
            status: f.state,
        })
        .collect();
    Ok(Job {
        id: row.id,
        story_id: row.story_id,
        status: row.status,
        steps: params.steps,
        guidance_scale: params.guidance_scale,
        scheduler: params.scheduler.clone(),
        negative_prompt: params.negative_prompt.clone(),
        width: params.width,
        height: params.height,
        continue_frames: params.continue_seeds.len(),
        frames,
        progress: row
            .progress
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok()),
        error: row.error,
        cancel_requested: row.cancel_requested,
        attempts: row.attempts,
        created_at: row.created_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        events_url: format!("/api/jobs/{}/events", row.id),
    })
}

/// Fetches a job with its frames, or 404.
pub async fn get_in(conn: &mut AnyConnection, id: i64) -> ApiResult<Job> {
    let row: Option<JobRow> =
        sqlx::query_as(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let row = row.ok_or_else(|| ApiError::not_found("job", id))?;
    to_job(conn, row).await
}

/// Fetches a job with its frames, or 404.
pub async fn get(pool: &AnyPool, id: i64) -> ApiResult<Job> {
    get_in(&mut *pool.acquire().await?, id).await
}

/// Lists jobs in id order, optionally of one story and/or in some statuses.
pub async fn list(
    pool: &AnyPool,
    owner: crate::auth::Owner,
    story: Option<i64>,
    statuses: &[String],
    cursor: Option<&str>,
    limit: i64,
) -> ApiResult<Page<Job>> {
    let after = cursor.map(decode_cursor).transpose()?.unwrap_or(0);
    let mut sql = format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE id > $1
           AND ($2 IS NULL OR story_id IN (SELECT id FROM stories WHERE owner_id = $3))"
    );
    let mut next = 4;
    let mut mark = || {
        next += 1;
        format!("${}", next - 1)
    };
    if story.is_some() {
        sql.push_str(&format!(" AND story_id = {}", mark()));
    }
    if !statuses.is_empty() {
        let marks: Vec<String> = statuses.iter().map(|_| mark()).collect();
        sql.push_str(&format!(" AND status IN ({})", marks.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY id LIMIT {}", mark()));
    let mut query = sqlx::query_as::<_, JobRow>(&sql)
        .bind(after)
        .bind(owner)
        .bind(owner);
    if let Some(story) = story {
        query = query.bind(story);
    }
    for status in statuses {
        query = query.bind(status);
    }
    let mut conn = pool.acquire().await?;
    let rows = query.bind(limit + 1).fetch_all(&mut *conn).await?;
    let mut jobs = Vec::with_capacity(rows.len());
    for row in rows {
        jobs.push(to_job(&mut conn, row).await?);
    }
    Ok(paginate(jobs, limit, |j| j.id))
}

/// How many jobs wait in the queue and how many run.
pub async fn counts(pool: &AnyPool) -> ApiResult<(i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT COALESCE(SUM(CASE WHEN status = 'queued' THEN 1 ELSE 0 END), 0),
                COALESCE(SUM(CASE WHEN status = 'running' THEN 1 ELSE 0 END), 0)
         FROM jobs WHERE status IN ('queued', 'running')",
    )
    .fetch_one(pool)
    .await?)
}

/// The result of [`enqueue`].
#[derive(Debug)]
pub enum Enqueued {
    /// A new job, with the `queued` event to publish.
    New(Job, JobEvent),
    /// The job an earlier request with the same Idempotency-Key and body created.
    Replayed(Job),
}

/// Queues a job for a story: checks the key, the queue's room and the request against the
/// story, snapshots the story, fixes the seeds, and writes the job, its frames and its
/// `queued` event in one transaction.
pub async fn enqueue(
    pool: &AnyPool,
    story: i64,
    spec: &GenerateSpec,
    idempotency: Option<&Idempotency>,
    capacity: i64,
) -> ApiResult<Enqueued> {
    // IMMEDIATE takes the write lock first, so the capacity check and the key lookup cannot
    // race another enqueue (and the transaction never needs to upgrade a read lock).
    let mut tx = crate::db::begin_write(pool).await?;
    if let Some(idem) = idempotency {
        let found: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT id, request_hash FROM jobs WHERE idempotency_key = $1")
                .bind(&idem.key)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((id, hash)) = found {
            if hash.as_deref() != Some(idem.request_hash.as_str()) {
                return Err(ApiError::invalid(
                    "idempotency_key_reused",
                    format!(
                        "Idempotency-Key {:?} was already used for a different request (job {id}); \
                         use a new key for a new request",
                        idem.key
                    ),
                ));
            }
            return Ok(Enqueued::Replayed(get_in(&mut tx, id).await?));
        }
    }
    let exists: Option<i64> = sqlx::query_scalar("SELECT id FROM stories WHERE id = $1")
        .bind(story)
        .fetch_optional(&mut *tx)
        .await?;
    if exists.is_none() {
        return Err(ApiError::not_found("story", story));
    }
    let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(&mut *tx)
        .await?;
    if queued >= capacity {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!(
                "the generation queue is full ({queued} jobs waiting); retry after the time in Retry-After"
            ),
        ));
    }
    let frames: Vec<(i64, i64, String, Option<i64>, crate::db::Flag)> = sqlx::query_as(
        "SELECT id, position, caption, seed, CASE WHEN image IS NOT NULL THEN 1 ELSE 0 END
         FROM frames WHERE story_id = $1 ORDER BY position",
    )
    .bind(story)
    .fetch_all(&mut *tx)
    .await?;
    let frames: Vec<(i64, i64, String, Option<i64>, bool)> = frames
        .into_iter()
        .map(|(id, position, caption, seed, drawn)| (id, position, caption, seed, drawn.0))
        .collect();
    if frames.is_empty() {
        return Err(ApiError::invalid(
            "empty_story",
            format!("story {story} has no captions; add captions before generating"),
        ));
    }
    // Continuing a story draws only the new frames unless `frames` says otherwise.
    let wanted = if spec.frames.is_none() && spec.continue_frames > 0 {
        Vec::new()
    } else {
        requested_positions(spec, frames.len())?
    };
    let continue_seeds = continuation_seeds(spec, frames.len())?;
    // The LLM reads every frame before a caption it writes: all of them need an image.
    let through = if continue_seeds.is_empty() {
        wanted.last().map_or(0, |w| w.0)
    } else {
        frames.len()
    };
    check_context(&mut tx, story, &frames, &wanted, through).await?;
    let characters: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT c.id, c.name, c.pronoun FROM story_characters sc
         JOIN characters c ON c.id = sc.character_id WHERE sc.story_id = $1 ORDER BY sc.rowid",
    )
    .bind(story)
    .fetch_all(&mut *tx)
    .await?;
    let params = JobParams {
        steps: spec.steps,
        guidance_scale: spec.guidance_scale,
        scheduler: Some(spec.scheduler.clone()),
        bundle: Some(spec.bundle.clone()),
        negative_prompt: spec.negative_prompt.clone(),
        width: spec.size.map(|s| s.0),
        height: spec.size.map(|s| s.1),
        continue_seeds,
        captions: frames.iter().map(|f| f.2.clone()).collect(),
        frame_ids: frames.iter().map(|f| f.0).collect(),
        characters: characters
            .into_iter()
            .map(|(id, name, pronoun)| CastMember { id, name, pronoun })
            .collect(),
    };
    let now = now();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO jobs (story_id, params, idempotency_key, request_hash, created_at)
         VALUES ($1, $2, $3, $4, $5) RETURNING id",
    )
    .bind(story)
    .bind(serde_json::to_string(&params).map_err(ApiError::internal)?)
    .bind(idempotency.map(|i| &i.key))
    .bind(idempotency.map(|i| &i.request_hash))
    .bind(&now)
    .fetch_one(&mut *tx)
    .await?;
    for (ordinal, &(position, seed)) in wanted.iter().enumerate() {
        let (frame_id, _, _, stored_seed, _) = &frames[position];
        let seed = seed
            .or_else(|| spec.base_seed.map(|base| base + position as u64))
            .or_else(|| {
                stored_seed
                    .filter(|_| spec.keep_seeds)
                    .map(|s| s as u64 & MAX_SEED)
            })
            .unwrap_or_else(|| rand::random::<u64>() & MAX_SEED);
        sqlx::query(
            "INSERT INTO job_frames (job_id, ordinal, position, frame_id, seed) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id)
        .bind(ordinal as i64 + 1)
        .bind(position as i64)
        .bind(frame_id)
        .bind(seed as i64)
        .execute(&mut *tx)
        .await?;
    }
    refresh_frames(&mut tx, story).await?;
    let positions: Vec<usize> = wanted.iter().map(|w| w.0).collect();
    let event = job_events::insert(
        &mut tx,
        JobEvent::new(
            id,
            story,
            kind::QUEUED,
            serde_json::json!({
                "frames": positions.len(), "positions": positions, "requeued": false,
                "continue_frames": params.continue_seeds.len(),
            }),
        ),
    )
    .await?;
    let job = get_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(Enqueued::New(job, event))
}

/// The positions to draw, in drawing (story) order, each with its explicit seed if any.
fn requested_positions(spec: &GenerateSpec, count: usize) -> ApiResult<Vec<(usize, Option<u64>)>> {
    let Some(frames) = &spec.frames else {
        return Ok((0..count).map(|p| (p, None)).collect());
    };
    let mut wanted = Vec::with_capacity(frames.len());
    for &(position, seed) in frames {
        if position < 0 || position as usize >= count {
            return Err(ApiError::invalid(
                "unknown_frame",
                format!(
                    "the story has {count} frames (positions 0 to {}); there is no position {position}",
                    count - 1
                ),
            ));
        }
        wanted.push((position as usize, seed));
    }
    wanted.sort_by_key(|w| w.0);
    if let Some(base) = spec.base_seed {
        let last = wanted.last().map_or(0, |w| w.0) as u64;
        if base + last > MAX_SEED {
            return Err(ApiError::invalid(
                "invalid_seed",
                format!("seed + position must stay at most {MAX_SEED}; use a smaller seed"),
            ));
        }
    }
    Ok(wanted)
}

/// The seeds of the frames a continuation adds after the story's `count` frames: `seed + p`
/// for the frame that lands at position p when a base seed is given, else fresh ones.
fn continuation_seeds(spec: &GenerateSpec, count: usize) -> ApiResult<Vec<u64>> {
    let n = spec.continue_frames as usize;
    if n == 0 {
        return Ok(Vec::new());
    }
    if count + n > MAX_CAPTIONS {
        return Err(ApiError::invalid(
            "too_many_captions",
            format!(
                "the story has {count} captions and a story has at most {MAX_CAPTIONS}; it can be \
                 continued by at most {} more",
                MAX_CAPTIONS.saturating_sub(count)
            ),
        ));
    }
    (count..count + n)
        .map(|position| match spec.base_seed {
            Some(base) if base + position as u64 > MAX_SEED => Err(ApiError::invalid(
                "invalid_seed",
                format!("seed + position must stay at most {MAX_SEED}; use a smaller seed"),
            )),
            Some(base) => Ok(base + position as u64),
            None => Ok(rand::random::<u64>() & MAX_SEED),
        })
        .collect()
}

/// Each drawn frame looks at the images of the frames before it, so every frame before
/// position `through` (the last drawn one, or the end of the story for a continuation) must
/// be drawn by this job, already have an image, or be waiting in an earlier active job.
async fn check_context(
    conn: &mut AnyConnection,
    story: i64,
    frames: &[(i64, i64, String, Option<i64>, bool)],
    wanted: &[(usize, Option<u64>)],
    through: usize,
) -> ApiResult<()> {
    if through == 0 {
        return Ok(());
    }
    let pending: Vec<i64> = sqlx::query_scalar(&format!(
        "SELECT DISTINCT jf.frame_id FROM job_frames jf JOIN jobs j ON j.id = jf.job_id
         WHERE j.story_id = $1 AND j.status IN {ACTIVE} AND jf.state IN ('queued', 'running')
           AND jf.frame_id IS NOT NULL"
    ))
    .bind(story)
    .fetch_all(conn)
    .await?;
    for (position, (frame_id, _, _, _, has_image)) in frames.iter().enumerate().take(through) {
        let drawn_here = wanted.iter().any(|w| w.0 == position);
        if !drawn_here && !has_image && !pending.contains(frame_id) {
            return Err(ApiError::invalid(
                "missing_context",
                format!(
                    "frame {frame_id} (position {position}) has no image yet, and the frames after \
                     it are drawn (or written) looking at it; include position {position} in \
                     `frames` or generate the whole story"
                ),
            ));
        }
    }
    Ok(())
}

/// What [`cancel`] did.
#[derive(Debug)]
pub enum Cancel {
    /// The job was waiting and is now cancelled; the event to publish.
    Cancelled(Job, JobEvent),
    /// The job runs; it stops at its next denoising step.
    Requested(Job),
    /// The job was already cancelled.
    AlreadyCancelled(Job),
}

/// Cancels a job: a queued one at once, a running one at its next step (the worker sees the
/// flag). A job that already succeeded or failed cannot be cancelled (409).
pub async fn cancel(pool: &AnyPool, id: i64) -> ApiResult<Cancel> {
    let mut tx = crate::db::begin_write(pool).await?;
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT story_id, status FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    let (story, status) = row.ok_or_else(|| ApiError::not_found("job", id))?;
    let result = match status.as_str() {
        "queued" => {
            let event = finish_in(&mut tx, id, story, &Outcome::Cancelled(None)).await?;
            Cancel::Cancelled(get_in(&mut tx, id).await?, event)
        }
        "running" => {
            sqlx::query("UPDATE jobs SET cancel_requested = 1 WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            Cancel::Requested(get_in(&mut tx, id).await?)
        }
        "cancelled" => Cancel::AlreadyCancelled(get_in(&mut tx, id).await?),
        other => {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "job_finished",
                format!("job {id} already {other}; there is nothing to cancel"),
            ))
        }
    };
    tx.commit().await?;
    Ok(result)
}
