//! The frames strip's actions: "Redraw" one frame with a new seed, and "Redraw the rest" from
//! a frame drawn from an older context. They queue through the same code path as
//! `POST /api/stories/{id}/generate` with `{"frames": [...]}` (validation,
//! context check, queue capacity, the `queued` event, waking the worker), so the strip and
//! the API can never disagree on what may be queued.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::Router;

use super::{form_field, frames_strip_with, is_htmx, sentence, StripNotice};
use crate::api::jobs::{queue, FrameChoice, GenerateRequest, SeededFrame};
use crate::api::ApiPath;
use crate::error::{ApiError, ApiResult};
use crate::store::jobs::Job;
use crate::store::stories;
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    // The second segment is a 0-based position (as in the API's `frames`), but the router
    // needs the same parameter name as the caption routes at that place in the path.
    Router::new()
        .route(
            "/ui/stories/{id}/frames/{frame_id}/regenerate",
            post(regenerate),
        )
        .route(
            "/ui/stories/{id}/frames/{frame_id}/redraw-rest",
            post(redraw_rest),
        )
}

/// `POST /ui/stories/{id}/frames/{position}/regenerate`: queues a job drawing just that frame
/// with a fresh random seed (the other frames are its context and stay as they are).
///
/// Without HTMX: a 303 back to the frame on the story page, or the page with the reason in
/// the strip. With HTMX: the strip, which then polls while the frame is queued, and
/// `jobs-changed` triggered on the body so the generation panel picks up the new job; a
/// refusal comes back as 422 (which the page's HTMX swaps) with the reason in the strip's
/// alert region.
async fn regenerate(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((id, position)): ApiPath<(i64, i64)>,
    body: Bytes,
) -> ApiResult<Response> {
    // An optional `seed` field redraws with that seed; empty, with a new one.
    let seed = form_field(&body, "seed").filter(|s| !s.trim().is_empty());
    let choice = match seed.map(|s| s.trim().parse::<u64>()) {
        None => Ok(FrameChoice::Position(position)),
        Some(Ok(seed)) => Ok(FrameChoice::Seeded(SeededFrame { position, seed })),
        Some(Err(_)) => Err(ApiError::invalid(
            "invalid_form",
            "the seed must be a whole number from 0 to 9007199254740991",
        )),
    };
    let queued = match choice {
        Ok(choice) => {
            let request = GenerateRequest {
                frames: Some(vec![choice]),
                ..GenerateRequest::default()
            };
            queue(&state, id, &request, None).await
        }
        Err(e) => Err(e),
    };
    let success = |job: &Job| {
        let seed = job.frames.first().map(|f| f.seed).unwrap_or_default();
        format!("Frame {} will be redrawn with seed {seed}.", position + 1)
    };
    let failure = format!("Frame {} was not redrawn", position + 1);
    answer(&state, &headers, id, position, queued, success, &failure).await
}

/// `POST /ui/stories/{id}/frames/{position}/redraw-rest`: "Redraw the rest" after an earlier
/// frame changed: queues the frame at `position` and every frame after it, each with the seed
/// of its current image (so only the context they are drawn from changes).
async fn redraw_rest(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((id, position)): ApiPath<(i64, i64)>,
) -> ApiResult<Response> {
    let count = stories::get(&state.pool, id).await?.frames.len() as i64;
    let queued = if position < 0 || position >= count {
        Err(ApiError::invalid(
            "invalid_frames",
            format!("the story has no frame {}", position + 1),
        ))
    } else {
        let request = GenerateRequest {
            frames: Some((position..count).map(FrameChoice::Position).collect()),
            keep_seeds: true,
            ..GenerateRequest::default()
        };
        queue(&state, id, &request, None).await
    };
    let success = |job: &Job| {
        format!(
            "Frames {} to {count} will be redrawn with their seeds ({} frames).",
            position + 1,
            job.frames.len()
        )
    };
    let failure = format!("Frames {} to {count} were not redrawn", position + 1);
    answer(&state, &headers, id, position, queued, success, &failure).await
}

/// How a strip action that queues a job answers. Without HTMX: a 303 back to the frame on the
/// story page, or the page with the reason in the strip. With HTMX: the strip (which then
/// polls while frames are queued) and `jobs-changed` on the body so the generation panel picks
/// up the new job; a refusal comes back as 422 with the reason in the strip's alert region.
async fn answer(
    state: &AppState,
    headers: &HeaderMap,
    id: i64,
    position: i64,
    queued: ApiResult<(Job, bool)>,
    success: impl Fn(&Job) -> String,
    failure: &str,
) -> ApiResult<Response> {
    let (notice, status, retry_after) = match queued {
        Ok((job, _)) => (
            StripNotice {
                text: success(&job),
                error: false,
            },
            StatusCode::OK,
            false,
        ),
        // An unknown story is the one error with no strip to show it in.
        Err(e) if e.status == StatusCode::NOT_FOUND || e.status.is_server_error() => return Err(e),
        Err(e) => (
            StripNotice {
                text: format!("{failure}: {}", sentence(&e.detail)),
                error: true,
            },
            e.status,
            e.code == "queue_full",
        ),
    };
    if !is_htmx(headers) {
        if status.is_success() {
            return Ok(Redirect::to(&format!("/stories/{id}#frame-{position}")).into_response());
        }
        let mut response = super::story::page_with_strip_notice(state, id, notice, status).await?;
        if retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(state.settings.retry_after_secs),
            );
        }
        return Ok(response);
    }
    let html = frames_strip_with(state, id, notice).await?;
    let status = if status.is_success() {
        StatusCode::OK
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    let mut response = (status, Html(html)).into_response();
    if status.is_success() {
        response.headers_mut().insert(
            "hx-trigger",
            HeaderValue::from_static(r#"{"jobs-changed": {"target": "body"}}"#),
        );
    }
    Ok(response)
}
