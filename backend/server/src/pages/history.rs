//! A frame's history page: every image drawn for the frame, newest first, with its seed, how
//! it was drawn and when, and buttons to make one the frame's image again or delete it. Plain
//! forms and redirects, so it works without JavaScript.

use askama::Template;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::{render, sentence, StripNotice};
use crate::api::ApiPath;
use crate::error::ApiResult;
use crate::store::frame_versions::{self, FrameVersion};
use crate::store::stories;
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/stories/{id}/frames/{frame_id}/history", get(history_page))
        .route(
            "/ui/stories/{id}/frames/{frame_id}/versions/{version_id}/restore",
            post(restore),
        )
        .route(
            "/ui/stories/{id}/frames/{frame_id}/versions/{version_id}/delete",
            post(delete),
        )
}

/// One version as the page shows it.
struct VersionView {
    id: i64,
    current: bool,
    image_url: String,
    seed: String,
    /// "30 steps, guidance 5, pndm, bundle toy", or "not recorded".
    recipe: String,
    negative_prompt: String,
    drawn_at: String,
    timing: String,
    /// The caption it was drawn from, when it differs from the frame's caption now.
    other_caption: Option<String>,
    older_context: bool,
}

#[derive(Template)]
#[template(path = "frame_history.html")]
struct HistoryPage {
    story_id: i64,
    story_title: String,
    frame_id: i64,
    position: i64,
    number: i64,
    caption: String,
    versions: Vec<VersionView>,
    notice: StripNotice,
}

fn view(version: FrameVersion, caption_now: &str) -> VersionView {
    let recipe = match &version.options {
        None => "not recorded".to_string(),
        Some(o) => {
            let mut parts = vec![
                format!("{} steps", o.steps),
                format!("guidance {}", o.guidance_scale),
            ];
            parts.extend(o.scheduler.clone());
            if let (Some(w), Some(h)) = (o.width, o.height) {
                parts.push(format!("{w}×{h}"));
            }
            if let Some(bundle) = &o.bundle {
                parts.push(format!("bundle {bundle}"));
            }
            parts.join(", ")
        }
    };
    VersionView {
        id: version.id,
        current: version.current,
        image_url: version.image_url,
        seed: version
            .seed
            .map(|s| s.to_string())
            .unwrap_or_else(|| "unknown".into()),
        negative_prompt: version
            .options
            .map(|o| o.negative_prompt)
            .unwrap_or_default(),
        recipe,
        // RFC 3339 to the second reads well enough and sorts as it reads.
        drawn_at: version
            .created_at
            .get(..19)
            .unwrap_or(&version.created_at)
            .replace('T', " "),
        timing: version
            .duration_ms
            .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
            .unwrap_or_else(|| "unknown".into()),
        other_caption: version.caption.filter(|c| c != caption_now),
        older_context: version.older_context,
    }
}

async fn page(
    state: &AppState,
    id: i64,
    frame_id: i64,
    notice: StripNotice,
    status: StatusCode,
) -> ApiResult<Response> {
    let story = stories::get(&state.pool, id).await?;
    let versions = frame_versions::list(&state.pool, id, frame_id).await?;
    // `list` found the frame in the story, so it is there.
    let frame = story
        .frames
        .iter()
        .find(|f| f.id == frame_id)
        .ok_or_else(|| crate::error::ApiError::not_found("frame", frame_id))?;
    let page = HistoryPage {
        story_id: id,
        story_title: story.title.clone(),
        frame_id,
        position: frame.position,
        number: frame.position + 1,
        caption: frame.caption.clone(),
        versions: versions
            .into_iter()
            .map(|v| view(v, &frame.caption))
            .collect(),
        notice,
    };
    Ok(render(page, status))
}

/// `GET /stories/{id}/frames/{frame_id}/history`.
async fn history_page(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
) -> ApiResult<Response> {
    page(&state, id, frame_id, StripNotice::default(), StatusCode::OK).await
}

/// An action's refusal on the history page itself (an unknown story or frame stays a 404).
async fn refused(
    state: &AppState,
    id: i64,
    frame_id: i64,
    what: &str,
    error: crate::error::ApiError,
) -> ApiResult<Response> {
    if error.status == StatusCode::NOT_FOUND && error.code == "not_found" {
        // The version may be gone while the frame is not: show the page if it still exists.
        if frame_versions::list(&state.pool, id, frame_id)
            .await
            .is_err()
        {
            return Err(error);
        }
    } else if error.status.is_server_error() {
        return Err(error);
    }
    let notice = StripNotice {
        text: format!("{what}: {}", sentence(&error.detail)),
        error: true,
    };
    page(state, id, frame_id, notice, error.status).await
}

/// `POST /ui/stories/{id}/frames/{frame_id}/versions/{version_id}/restore`: back to the frame
/// on the story page, or this page with the reason.
async fn restore(
    State(state): State<AppState>,
    ApiPath((id, frame_id, version)): ApiPath<(i64, i64, i64)>,
) -> ApiResult<Response> {
    match frame_versions::restore(&state.pool, id, frame_id, version).await {
        Ok(()) => {
            let story = stories::get(&state.pool, id).await?;
            let anchor = story
                .frames
                .iter()
                .find(|f| f.id == frame_id)
                .map(|f| format!("#frame-{}", f.position))
                .unwrap_or_default();
            Ok(Redirect::to(&format!("/stories/{id}{anchor}")).into_response())
        }
        Err(e) => refused(&state, id, frame_id, "The version was not restored", e).await,
    }
}

/// `POST /ui/stories/{id}/frames/{frame_id}/versions/{version_id}/delete`: back to this page.
async fn delete(
    State(state): State<AppState>,
    ApiPath((id, frame_id, version)): ApiPath<(i64, i64, i64)>,
) -> ApiResult<Response> {
    match frame_versions::delete(&state.pool, id, frame_id, version).await {
        Ok(()) => {
            Ok(Redirect::to(&format!("/stories/{id}/frames/{frame_id}/history")).into_response())
        }
        Err(e) => refused(&state, id, frame_id, "The version was not deleted", e).await,
    }
}
