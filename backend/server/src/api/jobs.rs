//! Generation jobs over HTTP: queue a story (or some of its frames) for drawing, follow a job,
//! list jobs, cancel one. The queue itself lives in the database (`store::jobs`); the worker
//! thread (`crate::worker`) draws.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::{ApiPath, ApiQuery};
use crate::error::{ApiError, ApiResult, Problem};
use crate::store::jobs::{self as store, Cancel, Enqueued, GenerateSpec, Idempotency, Job};
use crate::store::{page_limit, Page};
use crate::validate::MAX_CAPTIONS;
use crate::AppState;
use models::limits;
use models::schedulers::SchedulerKind;

use crate::model::ModelInfo;

/// Longest Idempotency-Key.
const MAX_KEY_LEN: usize = 255;

/// A frame to draw: its 0-based position, or the position with a seed.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum FrameChoice {
    /// Just the position; the seed comes from `seed`, `keep_seeds` or chance.
    Position(i64),
    /// A position with the seed to draw it with.
    Seeded(SeededFrame),
}

/// A position with an explicit seed.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeededFrame {
    /// 0-based position of the frame in the story.
    pub position: i64,
    /// Seed of its noise, 0..=2^53-1.
    pub seed: u64,
}

/// Body of `POST /api/stories/{id}/generate`; every field is optional and an empty body
/// draws the whole story with the model's default options and fresh seeds.
#[derive(Debug, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"frames": [0, {"position": 2, "seed": 42}], "steps": 30, "guidance_scale": 4.0, "scheduler": "ddim", "negative_prompt": "blurry"}))]
pub struct GenerateRequest {
    /// Frames to (re)draw, as positions or `{"position", "seed"}`; default: every frame.
    /// Frames before a drawn frame must have an image (they are its context) or be drawn too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<Vec<FrameChoice>>,
    /// Base seed: the frame at position p gets `seed + p` (a reproducible story). Default: a
    /// fresh random seed per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Redraw a frame with the seed of its current image when it has one (e.g. after editing
    /// its caption) and no other seed is given.
    #[serde(default)]
    pub keep_seeds: bool,
    /// Denoising steps per frame, 1..=200 (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale, 1..=30 (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_scale: Option<f64>,
    /// Sampler: `pndm` (PLMS, SD 1.5's), `ddim`, `euler-a` or `ddpm` (default: the model's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// What guidance steers away from, one line of at most 1000 characters (default: none,
    /// the empty prompt the model was trained with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    /// Frame width in pixels, with `height`: one of the sizes `/readyz` lists under
    /// `model.sizes` (default: the model's first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Frame height in pixels, with `width`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Continue the story: after drawing `frames`, the LLM writes this many more captions
    /// (1..=10), each after looking at every frame before it, and each is added to the story
    /// and drawn before the next is written. Captions are sampled (top-p 0.9) with the new
    /// frame's seed. With `continue_frames`, `frames` defaults to none (only the new frames are
    /// drawn), and every frame of the story must have an image or be drawn by this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continue_frames: Option<u32>,
}

/// Most captions one job may add to a story.
pub const MAX_CONTINUE: u32 = 10;

fn check_seed(seed: u64) -> ApiResult<()> {
    limits::check_seed(seed).map_err(|e| ApiError::invalid("invalid_seed", e))
}

impl GenerateRequest {
    /// Checks the request on its own (the story is checked when it is queued).
    fn validate(&self, model: &ModelInfo) -> ApiResult<GenerateSpec> {
        let (default_steps, default_guidance) = (model.default_steps, model.default_guidance);
        let scheduler = match &self.scheduler {
            None => model.default_scheduler.clone(),
            Some(name) => name
                .parse::<SchedulerKind>()
                .map_err(|e| ApiError::invalid("invalid_scheduler", e))?
                .as_str()
                .to_string(),
        };
        let steps = self.steps.unwrap_or(default_steps);
        limits::check_steps(steps as usize).map_err(|e| ApiError::invalid("invalid_steps", e))?;
        let guidance_scale = self.guidance_scale.unwrap_or(default_guidance);
        limits::check_guidance(guidance_scale)
            .map_err(|e| ApiError::invalid("invalid_guidance", e))?;
        if let Some(seed) = self.seed {
            check_seed(seed)?;
        }
        let negative_prompt = match self.negative_prompt.as_deref().map(str::trim) {
            None | Some("") => String::new(),
            Some(text) => crate::validate::negative_prompt(text)?,
        };
        let continue_frames = self.continue_frames.unwrap_or(0);
        if self.continue_frames.is_some() && !(1..=MAX_CONTINUE).contains(&continue_frames) {
            return Err(ApiError::invalid(
                "invalid_continue",
                format!("continue_frames must be from 1 to {MAX_CONTINUE}; got {continue_frames}"),
            ));
        }
        let size = match (self.width, self.height) {
            (None, None) => None,
            (Some(width), Some(height)) => {
                let offered = crate::model::FrameSize { width, height };
                if !model.sizes.contains(&offered) {
                    let list: Vec<String> = model
                        .sizes
                        .iter()
                        .map(|s| format!("{}x{}", s.width, s.height))
                        .collect();
                    return Err(ApiError::invalid(
                        "invalid_size",
                        format!(
                            "the model {} draws frames of {} pixels (width x height); {width}x{height} \
                             is not one of them",
                            model.name,
                            list.join(", ")
                        ),
                    ));
                }
                Some((width, height))
            }
            _ => {
                return Err(ApiError::invalid(
                    "invalid_size",
                    "give both width and height, or neither",
                ))
            }
        };
        let frames = match &self.frames {
            None => None,
            Some(list) if list.is_empty() && continue_frames > 0 => Some(Vec::new()),
            Some(list) if list.is_empty() => {
                return Err(ApiError::invalid(
                    "invalid_frames",
                    "frames must name at least one position; leave it out to draw every frame",
                ))
            }
            // A story has at most MAX_CAPTIONS frames, so a longer list cannot be valid: it is
            // refused before any work is done on it.
            Some(list) if list.len() > MAX_CAPTIONS => {
                return Err(ApiError::invalid(
                    "invalid_frames",
                    format!(
                        "frames names {} positions; a story has at most {MAX_CAPTIONS} frames",
                        list.len()
                    ),
                ))
            }
            Some(list) => {
                let mut out: Vec<(i64, Option<u64>)> = Vec::with_capacity(list.len());
                let mut positions = std::collections::HashSet::with_capacity(list.len());
                for choice in list {
                    let (position, seed) = match choice {
                        FrameChoice::Position(p) => (*p, None),
                        FrameChoice::Seeded(f) => {
                            check_seed(f.seed)?;
                            (f.position, Some(f.seed))
                        }
                    };
                    if !positions.insert(position) {
                        return Err(ApiError::invalid(
                            "invalid_frames",
                            format!("position {position} appears twice in frames"),
                        ));
                    }
                    out.push((position, seed));
                }
                Some(out)
            }
        };
        Ok(GenerateSpec {
            frames,
            base_seed: self.seed,
            keep_seeds: self.keep_seeds,
            steps,
            guidance_scale,
            scheduler,
            bundle: model.name.clone(),
            negative_prompt,
            size,
            continue_frames,
        })
    }
}

/// Parses an optional JSON body: empty means all defaults (so a bare POST, e.g. from an HTML
/// button, draws the whole story); otherwise it must be JSON, refused like every JSON body.
fn parse_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<GenerateRequest> {
    let body = body.map_err(|e| {
        let code = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_body"
        };
        ApiError::new(e.status(), code, e.body_text())
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(GenerateRequest::default());
    }
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim().to_ascii_lowercase();
            v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
        });
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json` (or no body at all)",
        ));
    }
    axum::Json::<GenerateRequest>::from_bytes(&body)
        .map(|axum::Json(request)| request)
        .map_err(super::json_rejection)
}

fn idempotency(
    headers: &HeaderMap,
    story: i64,
    request: &GenerateRequest,
) -> ApiResult<Option<Idempotency>> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value.to_str().unwrap_or_default().trim();
    if key.is_empty()
        || key.len() > MAX_KEY_LEN
        || !key.bytes().all(|b| b.is_ascii_graphic() || b == b' ')
    {
        return Err(ApiError::bad_request(
            "invalid_idempotency_key",
            format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} printable ASCII characters (a UUID is ideal)"),
        ));
    }
    let canonical = serde_json::to_string(request).map_err(ApiError::internal)?;
    let hash = hex::encode(Sha256::digest(format!("{story}\n{canonical}")));
    Ok(Some(Idempotency {
        key: key.to_string(),
        request_hash: hash,
    }))
}

fn job_location(job: &Job) -> String {
    format!("/api/jobs/{}", job.id)
}

/// Validates `request` against the model's defaults, queues it for `story`, announces the new
/// job and wakes the worker: the one way a job gets queued, shared by the API and the studio's
/// forms. Returns the job and whether it is an earlier one replayed for the same key. A full
/// queue is the `queue_full` error; callers add `Retry-After` (`AppState::settings`).
pub async fn queue(
    state: &AppState,
    story: i64,
    request: &GenerateRequest,
    idem: Option<&Idempotency>,
) -> ApiResult<(Job, bool)> {
    let defaults = &state.worker.model;
    let spec = request.validate(defaults)?;
    // Per-user limits go by the story's owner (nothing for a story made with auth off). A
    // replayed Idempotency-Key is checked as a new request would be: harmless, it only
    // refuses when the user is at a limit anyway.
    let owner = crate::store::stories::owner_of(&state.pool, story).await?;
    if idem.is_none() {
        state.settings.quotas.check_jobs(&state.pool, owner).await?;
    }
    state
        .settings
        .quotas
        .check_storage(&state.pool, owner, 0)
        .await?;
    let capacity = state.settings.queue_capacity as i64;
    Ok(
        match store::enqueue(&state.pool, story, &spec, idem, capacity).await? {
            Enqueued::New(job, event) => {
                state.hub.publish(event);
                state.worker.wake();
                (job, false)
            }
            Enqueued::Replayed(job) => (job, true),
        },
    )
}

/// Queue generation of a story, or of some of its frames.
#[utoipa::path(post, path = "/api/stories/{id}/generate", tag = "jobs",
    params(("id" = i64, Path),
           ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key with the same body returns the same job")),
    request_body(content = GenerateRequest, description = "Optional; an empty body draws every frame with default options"),
    responses((status = 202, description = "Queued (or, for a repeated Idempotency-Key, the job queued before); Location names the job", body = Job),
              (status = 400, description = "Malformed JSON or Idempotency-Key", body = Problem),
              (status = 404, description = "No such story", body = Problem),
              (status = 422, description = "Invalid frames, steps, guidance or seed; empty story; missing context frame; key reused for another request", body = Problem),
              (status = 429, description = "The queue is full; see Retry-After", body = Problem)))]
pub async fn generate(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let request = parse_body(&headers, body)?;
    let idem = idempotency(&headers, id, &request)?;
    let (job, replayed) = match queue(&state, id, &request, idem.as_ref()).await {
        Ok(queued) => queued,
        Err(e) if e.code == "queue_full" => {
            let mut response = e.into_response();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(state.settings.retry_after_secs),
            );
            return Ok(response);
        }
        Err(e) => return Err(e),
    };
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, job_location(&job))],
        Json(job),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Asks job `id` to stop (see [`cancel`]); the status says whether it already has (200) or
/// will at its next step (202).
pub(crate) async fn stop(state: &AppState, id: i64) -> ApiResult<(Job, StatusCode)> {
    Ok(match store::cancel(&state.pool, id).await? {
        Cancel::Cancelled(job, event) => {
            state.hub.publish(event);
            (job, StatusCode::OK)
        }
        Cancel::Requested(job) => {
            state.worker.cancel(job.id);
            (job, StatusCode::ACCEPTED)
        }
        Cancel::AlreadyCancelled(job) => (job, StatusCode::OK),
    })
}

/// Get a job: status, frames, progress, timestamps and error.
#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 200, description = "The job", body = Job),
              (status = 404, description = "No such job", body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Job>> {
    Ok(Json(store::get(&state.pool, id).await?))
}

/// Query parameters of the job list.
#[derive(Debug, Deserialize, IntoParams)]
pub struct JobListParams {
    /// Only this story's jobs.
    pub story_id: Option<i64>,
    /// Only jobs in these statuses, comma-separated (queued, running, succeeded, failed, cancelled).
    pub status: Option<String>,
    /// Page size, 1..=200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}

const STATUSES: [&str; 5] = ["queued", "running", "succeeded", "failed", "cancelled"];

/// List jobs, oldest first, optionally of one story or in some statuses.
#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(JobListParams),
    responses((status = 200, description = "A page of jobs", body = Page<Job>),
              (status = 400, description = "Bad cursor, limit or status", body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
    ApiQuery(params): ApiQuery<JobListParams>,
) -> ApiResult<Json<Page<Job>>> {
    let limit = page_limit(params.limit)?;
    let mut statuses = Vec::new();
    for status in params.status.iter().flat_map(|s| s.split(',')) {
        let status = status.trim();
        if !STATUSES.contains(&status) {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!(
                    "status must be among {}; got {status:?}",
                    STATUSES.join(", ")
                ),
            ));
        }
        statuses.push(status.to_string());
    }
    Ok(Json(
        // Admins (and the one local person) see the whole queue; a user, their stories' jobs.
        store::list(
            &state.pool,
            if principal.sees_queue() {
                None
            } else {
                principal.owner()
            },
            params.story_id,
            &statuses,
            params.cursor.as_deref(),
            limit,
        )
        .await?,
    ))
}

/// Cancel a job: a queued job at once (200), a running one at its next denoising step (202;
/// follow its events for `cancelled`). Frames already drawn stay.
#[utoipa::path(post, path = "/api/jobs/{id}/cancel", tag = "jobs", params(("id" = i64, Path)),
    responses((status = 200, description = "Cancelled (or already was)", body = Job),
              (status = 202, description = "Cancellation asked; the running job stops at its next step", body = Job),
              (status = 404, description = "No such job", body = Problem),
              (status = 409, description = "The job already succeeded or failed", body = Problem)))]
pub async fn cancel(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let (job, status) = stop(&state, id).await?;
    Ok((status, Json(job)).into_response())
}
