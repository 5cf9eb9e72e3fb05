//! The story page's generate panel: start a generation job, follow it live, cancel it.
//!
//! The panel is server-rendered (it shows the job that is queued or running when the page
//! loads, with its progress) and its forms work without JavaScript. `static/generate.js`
//! follows the story's event stream (`/api/stories/{id}/events`) to move the progress bars
//! step by step, refresh the frames strip as each frame is stored, and re-render the panel
//! when a job ends. Jobs are queued through [`crate::api::jobs::queue`], the same path as
//! `POST /api/stories/{id}/generate`.

use askama::Template;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use models::schedulers::SchedulerKind;

use super::{form_field, is_htmx, sentence};
use crate::api::jobs::{queue, stop, GenerateRequest};
use crate::api::ApiPath;
use crate::error::{ApiError, ApiResult};
use crate::store::jobs::{self as job_store, Job};
use crate::store::stories;
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/ui/stories/{id}/generate", post(start))
        .route("/ui/stories/{id}/generate-panel", get(panel_fragment))
        .route("/ui/stories/{story}/jobs/{job}/cancel", post(cancel))
}

/// What the panel shows of the active job.
struct ActiveJob {
    id: i64,
    status: String,
    frames: usize,
    frames_done: usize,
    frame: usize,
    step: usize,
    steps: usize,
    cancel_requested: bool,
    /// Jobs (of any story) the worker takes before this one.
    ahead: usize,
    /// "about 40 s" until this job is done, from the measured step time; empty before any
    /// step was measured.
    eta: String,
}

/// Denoising steps a job still has to run.
fn steps_left(job: &Job) -> usize {
    let steps = job.steps as usize;
    match &job.progress {
        Some(p) => (p.frames.saturating_sub(p.frames_done) * steps).saturating_sub(p.step),
        None => (job.frames.len() + job.continue_frames) * steps,
    }
}

/// A duration in words, rounded as a waiting time is read: "about 40 s", "about 3 min".
fn about(seconds: f64) -> String {
    if seconds < 1.0 {
        "under a second".into()
    } else if seconds < 90.0 {
        format!("about {} s", seconds.round())
    } else {
        format!("about {} min", (seconds / 60.0).round())
    }
}

#[derive(Template)]
#[template(path = "generate_panel.html")]
struct GeneratePanel {
    story_id: i64,
    has_frames: bool,
    model_name: String,
    trained: bool,
    default_steps: u32,
    max_steps: usize,
    default_guidance: f64,
    max_guidance: f64,
    /// The measured time per step (ms) for the script's estimates; empty before any.
    step_ms: String,
    /// Every sampler, with whether it is the model's default (selected).
    schedulers: Vec<(&'static str, bool)>,
    /// Every frame size the model draws ("512x512"), the default first.
    sizes: Vec<String>,
    /// Most frames one continuation adds.
    max_continue: u32,
    job: Option<ActiveJob>,
    message: String,
}

/// The job of story `id` that is running, else the oldest queued one.
async fn active_job(state: &AppState, id: i64) -> ApiResult<Option<Job>> {
    let statuses = ["running".to_string(), "queued".to_string()];
    let page = job_store::list(&state.pool, None, Some(id), &statuses, None, 50).await?;
    Ok(page
        .items
        .iter()
        .find(|j| j.status == "running")
        .or_else(|| page.items.first())
        .cloned())
}

/// The panel's HTML for story `id`, with `message` in its status line.
pub(super) async fn panel_html(state: &AppState, id: i64, message: &str) -> ApiResult<String> {
    let story = stories::get(&state.pool, id).await?;
    let active = active_job(state, id).await?;
    // The queue as the worker sees it: every story's waiting and running jobs, oldest first.
    let statuses = ["running".to_string(), "queued".to_string()];
    let queue = match &active {
        Some(_) => {
            job_store::list(&state.pool, None, None, &statuses, None, 200)
                .await?
                .items
        }
        None => Vec::new(),
    };
    let step_ms = state.worker.step_ms();
    let job = active.map(|j| {
        let ahead: Vec<&Job> = if j.status == "running" {
            Vec::new()
        } else {
            queue
                .iter()
                .filter(|q| q.id != j.id && (q.status == "running" || q.id < j.id))
                .collect()
        };
        let work: usize = ahead.iter().map(|q| steps_left(q)).sum::<usize>() + steps_left(&j);
        let eta = step_ms.map_or(String::new(), |ms| about(work as f64 * ms / 1e3));
        let p = j.progress.as_ref();
        ActiveJob {
            id: j.id,
            status: j.status.clone(),
            frames: p.map_or(j.frames.len(), |p| p.frames),
            frames_done: p.map_or(0, |p| p.frames_done),
            frame: p.map_or(0, |p| p.frame),
            step: p.map_or(0, |p| p.step),
            steps: p.map_or(j.steps as usize, |p| p.steps),
            cancel_requested: j.cancel_requested,
            ahead: ahead.len(),
            eta,
        }
    });
    let model = &state.worker.model;
    GeneratePanel {
        story_id: id,
        has_frames: !story.frames.is_empty(),
        model_name: model.name.clone(),
        trained: model.trained,
        default_steps: model.default_steps,
        max_steps: *models::limits::STEPS.end(),
        default_guidance: model.default_guidance,
        max_guidance: *models::limits::GUIDANCE.end(),
        step_ms: step_ms.map_or(String::new(), |ms| format!("{ms:.1}")),
        schedulers: SchedulerKind::ALL
            .iter()
            .map(|k| (k.as_str(), k.as_str() == model.default_scheduler))
            .collect(),
        sizes: model
            .sizes
            .iter()
            .map(|s| format!("{}x{}", s.width, s.height))
            .collect(),
        max_continue: crate::api::jobs::MAX_CONTINUE,
        job,
        message: message.to_string(),
    }
    .render()
    .map_err(ApiError::internal)
}

async fn panel_fragment(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    Ok(Html(panel_html(&state, id, "").await?).into_response())
}

/// Answers a panel form: with HTMX the re-rendered panel (and `frames-changed` so the strip
/// shows the new statuses), without it a 303 back to the page, or the page with the message
/// when refused.
async fn answer(
    state: &AppState,
    headers: &HeaderMap,
    id: i64,
    outcome: Result<String, ApiError>,
) -> ApiResult<Response> {
    let (message, status) = match outcome {
        Ok(message) => (message, StatusCode::OK),
        // A story or job that does not exist has no panel to show a message in.
        Err(e) if e.status == StatusCode::NOT_FOUND => return Err(e),
        // 422 so that HTMX swaps the panel in (see base.html's responseHandling); the
        // message carries the reason, including a full queue.
        Err(e) => (sentence(&e.detail), StatusCode::UNPROCESSABLE_ENTITY),
    };
    if !is_htmx(headers) {
        if status.is_success() {
            return Ok(Redirect::to(&format!("/stories/{id}#generate-panel")).into_response());
        }
        return super::story::page_with_panel_message(state, id, message, status).await;
    }
    let mut response = (status, Html(panel_html(state, id, &message).await?)).into_response();
    if status.is_success() {
        response
            .headers_mut()
            .insert("hx-trigger", HeaderValue::from_static("frames-changed"));
    }
    Ok(response)
}

fn parse_number<T: std::str::FromStr>(body: &[u8], name: &str, what: &str) -> ApiResult<Option<T>> {
    match form_field(body, name).map(|v| v.trim().to_string()) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::invalid(
                "invalid_form",
                format!("{what} must be a whole number; got {v:?}"),
            )
        }),
    }
}

fn parse_decimal(body: &[u8], name: &str, what: &str) -> ApiResult<Option<f64>> {
    match form_field(body, name).map(|v| v.trim().to_string()) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            ApiError::invalid(
                "invalid_form",
                format!("{what} must be a number such as 4 or 7.5; got {v:?}"),
            )
        }),
    }
}

/// The `size` field ("512x768", width x height) as a width and a height.
fn parse_size(body: &[u8]) -> ApiResult<(Option<u32>, Option<u32>)> {
    let Some(text) = form_field(body, "size").filter(|s| !s.trim().is_empty()) else {
        return Ok((None, None));
    };
    let parsed = text
        .trim()
        .split_once('x')
        .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)));
    match parsed {
        Some((width, height)) => Ok((Some(width), Some(height))),
        None => Err(ApiError::invalid(
            "invalid_form",
            format!("the frame size must read WIDTHxHEIGHT, such as 512x512; got {text:?}"),
        )),
    }
}

/// `POST /ui/stories/{id}/generate`: form fields `steps`, `guidance_scale`, `scheduler`,
/// `negative_prompt`, `seed` and `size` (each optional: the model's default), and `action`:
/// `continue` (the "Continue the story" button) lets the LLM write and draw
/// `continue_frames` more frames after the last one instead of drawing the story's frames.
async fn start(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let outcome = async {
        let continuing = form_field(&body, "action").as_deref() == Some("continue");
        let continue_frames = if continuing {
            Some(
                parse_number(&body, "continue_frames", "the number of frames to add")?.unwrap_or(1),
            )
        } else {
            None
        };
        let (width, height) = parse_size(&body)?;
        let request = GenerateRequest {
            steps: parse_number(&body, "steps", "steps")?,
            guidance_scale: parse_decimal(&body, "guidance_scale", "the guidance scale")?,
            scheduler: form_field(&body, "scheduler").filter(|s| !s.trim().is_empty()),
            negative_prompt: form_field(&body, "negative_prompt"),
            seed: parse_number(&body, "seed", "the seed")?,
            width,
            height,
            continue_frames,
            ..Default::default()
        };
        let (job, _) = queue(&state, id, &request, None).await?;
        let n = job.frames.len();
        let how = format!(
            "{} {} steps each, guidance {}",
            job.steps,
            job.scheduler.as_deref().unwrap_or("default"),
            job.guidance_scale
        );
        Ok(if job.continue_frames > 0 {
            let k = job.continue_frames;
            format!(
                "Queued job {}: the model writes {k} more caption{} and draws {}, with {how}.",
                job.id,
                if k == 1 { "" } else { "s" },
                if k == 1 { "it" } else { "them" },
            )
        } else {
            format!(
                "Queued job {}: {n} frame{} with {how}.",
                job.id,
                if n == 1 { "" } else { "s" },
            )
        })
    }
    .await;
    answer(&state, &headers, id, outcome).await
}

/// `POST /ui/stories/{story}/jobs/{job}/cancel`.
async fn cancel(
    State(state): State<AppState>,
    ApiPath((story, job)): ApiPath<(i64, i64)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let outcome = async {
        let existing = job_store::get(&state.pool, job).await?;
        if existing.story_id != story {
            return Err(ApiError::not_found("job", job));
        }
        let (job, status) = stop(&state, job).await?;
        Ok(if status == StatusCode::ACCEPTED {
            format!(
                "Stopping job {} after the current step; finished frames stay.",
                job.id
            )
        } else {
            format!("Job {} was cancelled.", job.id)
        })
    }
    .await;
    answer(&state, &headers, story, outcome).await
}

#[cfg(test)]
mod tests {
    use super::about;

    #[test]
    fn waiting_times_read_as_people_say_them() {
        assert_eq!(about(0.4), "under a second");
        assert_eq!(about(12.4), "about 12 s");
        assert_eq!(about(89.0), "about 89 s");
        assert_eq!(about(200.0), "about 3 min");
    }
}
