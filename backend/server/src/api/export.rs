//! `GET /api/stories/{id}/export.{zip,gif,pdf}`: downloads of a story (see `crate::export`
//! for what each holds).

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::ApiPath;
use crate::error::{ApiError, ApiResult, Problem};
use crate::export::{self, ExportCharacter, ExportStory};
use crate::store::{characters, frame_media, frame_versions, stories};
use crate::AppState;

/// Reads a story with its cast and frame images.
pub async fn load(state: &AppState, id: i64) -> ApiResult<ExportStory> {
    let story = stories::get(&state.pool, id).await?;
    let frames = frame_media::frames(&state.pool, id, true).await?;
    let library = characters::all(&state.pool, stories::owner_of(&state.pool, id).await?).await?;
    let mut cast = Vec::new();
    for c in story
        .character_ids
        .iter()
        .filter_map(|cid| library.iter().find(|c| c.id == *cid))
    {
        let portrait = characters::portrait(&state.pool, c.id).await?;
        cast.push(ExportCharacter {
            id: c.id,
            name: c.name.clone(),
            pronoun: c.pronoun,
            portrait: portrait.bytes,
            portrait_mime: portrait.mime,
        });
    }
    Ok(ExportStory {
        id,
        title: story.title,
        characters: cast,
        frames,
        drawn_with: frame_versions::drawn_with(&state.pool, id).await?,
    })
}

/// Builds an export on the blocking pool (image coding is CPU work) and answers it as a
/// download named after the story.
async fn download(
    state: AppState,
    id: i64,
    extension: &'static str,
    mime: &'static str,
    build: fn(&ExportStory) -> ApiResult<Vec<u8>>,
) -> ApiResult<Response> {
    let story = load(&state, id).await?;
    let name = format!("{}.{extension}", story.file_stem());
    let bytes = tokio::task::spawn_blocking(move || build(&story))
        .await
        .map_err(ApiError::internal)??;
    let disposition = HeaderValue::from_str(&format!("attachment; filename=\"{name}\""))
        .map_err(ApiError::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(mime)),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        bytes,
    )
        .into_response())
}

/// Download the story as a ZIP: `story.json` and every stored frame image, in story order.
///
/// `story.json` holds the title, the captions, the cast with pronouns and, per frame, its
/// position (1-based), status, seed, generation time and image file name (null when the
/// frame has no image yet). Works before generation too (then `story.json` alone).
#[utoipa::path(get, path = "/api/stories/{id}/export.zip", tag = "exports", params(("id" = i64, Path)),
    responses((status = 200, description = "ZIP with story.json and frame-01.png, frame-02.png, ...", content_type = "application/zip"),
              (status = 404, description = "No such story", body = Problem)))]
pub async fn zip(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    download(state, id, "zip", "application/zip", export::zip).await
}

/// Download the ready frames as an animated GIF (1.5 s a frame, looping).
#[utoipa::path(get, path = "/api/stories/{id}/export.gif", tag = "exports", params(("id" = i64, Path)),
    responses((status = 200, description = "Animated GIF of the ready frames", content_type = "image/gif"),
              (status = 404, description = "No such story", body = Problem),
              (status = 409, description = "No frame has a ready image yet (`story_not_generated`)", body = Problem)))]
pub async fn gif(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    download(state, id, "gif", "image/gif", export::gif).await
}

/// Download a printable comic: A4 pages, title, frames in a two-column grid with captions.
#[utoipa::path(get, path = "/api/stories/{id}/export.pdf", tag = "exports", params(("id" = i64, Path)),
    responses((status = 200, description = "PDF, six panels a page", content_type = "application/pdf"),
              (status = 404, description = "No such story", body = Problem),
              (status = 409, description = "No frame has a ready image yet (`story_not_generated`)", body = Problem)))]
pub async fn pdf(State(state): State<AppState>, ApiPath(id): ApiPath<i64>) -> ApiResult<Response> {
    download(state, id, "pdf", "application/pdf", export::pdf).await
}
