//! `/api/stories/{id}/frames/{frame_id}/versions`: a frame's history. Every image drawn for a
//! frame is kept with its seed, options and time; one can be viewed, made the frame's image
//! again, or deleted.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::Json;
use sha2::{Digest, Sha256};

use super::characters::image_response;
use super::ApiPath;
use crate::error::{ApiResult, Problem};
use crate::store::frame_versions::{self as store, FrameVersion};
use crate::store::stories::{self, Story};
use crate::AppState;

/// Every drawn version of a frame, newest first, with the one shown now marked `current`.
#[utoipa::path(get, path = "/api/stories/{id}/frames/{frame_id}/versions", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path)),
    responses((status = 200, description = "The versions, newest first", body = Vec<FrameVersion>),
              (status = 404, description = "No such story or frame", body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
) -> ApiResult<Json<Vec<FrameVersion>>> {
    Ok(Json(store::list(&state.pool, id, frame_id).await?))
}

/// The image of one version.
#[utoipa::path(get, path = "/api/stories/{id}/frames/{frame_id}/versions/{version_id}/image", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path), ("version_id" = i64, Path)),
    responses((status = 200, description = "The image", content_type = "image/png"),
              (status = 304, description = "Not modified (If-None-Match matched the ETag)"),
              (status = 404, description = "No such story, frame or version", body = Problem)))]
pub async fn image(
    State(state): State<AppState>,
    ApiPath((id, frame_id, version)): ApiPath<(i64, i64, i64)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (bytes, mime) = store::image(&state.pool, id, frame_id, version).await?;
    let hash = hex::encode(Sha256::digest(&bytes));
    Ok(image_response(bytes, &mime, &hash, &headers))
}

/// Makes a version the frame's image again, with its seed, timing and heatmaps. The frame is
/// `stale` if its caption changed since that version was drawn, and the frames after it are
/// then drawn from an older context (`older_context`). Refused while a job of the story is
/// queued or running.
#[utoipa::path(post, path = "/api/stories/{id}/frames/{frame_id}/versions/{version_id}/restore", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path), ("version_id" = i64, Path)),
    responses((status = 200, description = "The story after the restore", body = Story),
              (status = 404, description = "No such story, frame or version", body = Problem),
              (status = 409, description = "A job of the story is queued or running", body = Problem)))]
pub async fn restore(
    State(state): State<AppState>,
    ApiPath((id, frame_id, version)): ApiPath<(i64, i64, i64)>,
) -> ApiResult<Json<Story>> {
    store::restore(&state.pool, id, frame_id, version).await?;
    Ok(Json(stories::get(&state.pool, id).await?))
}

/// Deletes a version from the history; the frame's current image cannot be deleted (restore
/// another version first).
#[utoipa::path(delete, path = "/api/stories/{id}/frames/{frame_id}/versions/{version_id}", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path), ("version_id" = i64, Path)),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such story, frame or version", body = Problem),
              (status = 409, description = "It is the frame's current image", body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath((id, frame_id, version)): ApiPath<(i64, i64, i64)>,
) -> ApiResult<StatusCode> {
    store::delete(&state.pool, id, frame_id, version).await?;
    Ok(StatusCode::NO_CONTENT)
}
