//! `/api/stories`: stories, their cast, and caption editing (insert, edit, reorder, delete).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::characters::image_response;
use super::{ApiJson, ApiPath, ApiQuery, ListParams};
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult, Problem};
use crate::store::frame_attention;
use crate::store::stories::{self as store, Story, StorySummary};
use crate::store::{page_limit, Page};
use crate::{validate, AppState};

/// Body that creates a story.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "In the garden", "captions": ["Mia walks in the forest.", "She waves at Bob.", "They laugh."], "character_ids": [1, 2]}))]
pub struct NewStory {
    /// Title, 1..=200 characters.
    pub title: String,
    /// Captions in story order, each 1..=1000 characters, at most 200.
    #[serde(default)]
    pub captions: Vec<String>,
    /// Characters the captions may name (ids from /api/characters).
    #[serde(default)]
    pub character_ids: Vec<i64>,
}

/// Body that changes a story; absent fields are kept.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"title": "In the forest", "character_ids": [1, 2, 3]}))]
pub struct StoryPatch {
    /// New title.
    pub title: Option<String>,
    /// New cast (replaces the old one).
    pub character_ids: Option<Vec<i64>>,
}

/// Body that inserts a caption.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"caption": "They look at a red ball.", "position": 3}))]
pub struct NewFrame {
    /// The caption.
    pub caption: String,
    /// 0-based place to insert at (default: after the last frame).
    pub position: Option<i64>,
}

/// Body that edits a caption.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"caption": "She waves at Bob and Rex."}))]
pub struct FramePatch {
    /// The new caption.
    pub caption: String,
}

/// Body that reorders frames.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"frame_ids": [12, 10, 11]}))]
pub struct FrameOrder {
    /// Every frame id of the story, in the new order.
    pub frame_ids: Vec<i64>,
}

/// Create a story from a title, captions and a cast.
#[utoipa::path(post, path = "/api/stories", tag = "stories", request_body = NewStory,
    responses((status = 201, description = "Created", body = Story),
              (status = 400, description = "Malformed JSON", body = Problem),
              (status = 422, description = "Invalid title, caption, too many captions or unknown character", body = Problem)))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiJson(body): ApiJson<NewStory>,
) -> ApiResult<Response> {
    let title = validate::title(&body.title)?;
    let captions = validate::captions(&body.captions)?;
    let cast = validate::cast(&body.character_ids)?;
    let story = store::create(&state.pool, principal.owner(), &title, &captions, &cast).await?;
    let location = format!("/api/stories/{}", story.id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(story),
    )
        .into_response())
}

/// Import a story archive (a story's `export.zip`) as a new story: its captions, its cast
/// (the library character of the same name, else a new one with the archive's portrait) and
/// its drawn frames with their seeds.
#[utoipa::path(post, path = "/api/stories/import", tag = "stories",
    request_body(content = Vec<u8>, content_type = "application/zip", description = "The ZIP that GET /api/stories/{id}/export.zip downloads (at most 64 MiB)"),
    responses((status = 201, description = "Created; Location names the new story", body = Story),
              (status = 413, description = "Larger than 64 MiB", body = Problem),
              (status = 415, description = "Not sent as application/zip", body = Problem),
              (status = 422, description = "Not a story archive, or a part of it is invalid (`invalid_archive`, `invalid_image`, ...)", body = Problem)))]
pub async fn import(
    State(state): State<AppState>,
    principal: Principal,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let is_zip = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/zip"));
    if !is_zip {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the archive as the body with Content-Type: application/zip",
        ));
    }
    let story = import_archive(&state, principal.owner(), body.to_vec()).await?;
    let location = format!("/api/stories/{}", story.id);
    Ok((
        StatusCode::CREATED,
        [(axum::http::header::LOCATION, location)],
        Json(story),
    )
        .into_response())
}

/// Reads (off the async threads) and stores an archive: the API's and the studio's import.
pub async fn import_archive(
    state: &AppState,
    owner: crate::auth::Owner,
    bytes: Vec<u8>,
) -> ApiResult<Story> {
    // The archive's size bounds what it stores (its images are PNGs, re-encoded).
    state
        .settings
        .quotas
        .check_storage(&state.pool, owner, bytes.len())
        .await?;
    let read = tokio::task::spawn_blocking(move || crate::import::read_archive(&bytes))
        .await
        .map_err(ApiError::internal)??;
    crate::import::store(&state.pool, owner, read).await
}

/// List stories, oldest first, with cursor pagination.
#[utoipa::path(get, path = "/api/stories", tag = "stories", params(ListParams),
    responses((status = 200, description = "A page of stories", body = Page<StorySummary>),
              (status = 400, description = "Bad cursor or limit", body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<StorySummary>>> {
    let limit = page_limit(params.limit)?;
    Ok(Json(
        store::list(
            &state.pool,
            principal.owner(),
            params.cursor.as_deref(),
            limit,
        )
        .await?,
    ))
}

/// Get a story with its cast and frames.
#[utoipa::path(get, path = "/api/stories/{id}", tag = "stories", params(("id" = i64, Path)),
    responses((status = 200, description = "The story", body = Story),
              (status = 404, description = "No such story", body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Story>> {
    Ok(Json(store::get(&state.pool, id).await?))
}

/// Change a story's title or cast.
#[utoipa::path(patch, path = "/api/stories/{id}", tag = "stories", params(("id" = i64, Path)), request_body = StoryPatch,
    responses((status = 200, description = "The updated story", body = Story),
              (status = 404, description = "No such story", body = Problem),
              (status = 422, description = "Invalid title or unknown character", body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<StoryPatch>,
) -> ApiResult<Json<Story>> {
    let title = body.title.as_deref().map(validate::title).transpose()?;
    let cast = body
        .character_ids
        .as_deref()
        .map(validate::cast)
        .transpose()?;
    Ok(Json(
        store::update(&state.pool, id, title.as_deref(), cast.as_deref()).await?,
    ))
}

/// Delete a story with all its frames.
#[utoipa::path(delete, path = "/api/stories/{id}", tag = "stories", params(("id" = i64, Path)),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such story", body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    store::delete(&state.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Insert a caption (a new frame) at a position, default the end.
#[utoipa::path(post, path = "/api/stories/{id}/frames", tag = "stories", params(("id" = i64, Path)), request_body = NewFrame,
    responses((status = 201, description = "The story with the new frame", body = Story),
              (status = 404, description = "No such story", body = Problem),
              (status = 422, description = "Invalid caption or position, or story full", body = Problem)))]
pub async fn insert_frame(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<NewFrame>,
) -> ApiResult<(StatusCode, Json<Story>)> {
    let caption = validate::caption(&body.caption)?;
    Ok((
        StatusCode::CREATED,
        Json(store::insert_frame(&state.pool, id, &caption, body.position).await?),
    ))
}

/// Replace a frame's caption (a generated image becomes `stale`).
#[utoipa::path(patch, path = "/api/stories/{id}/frames/{frame_id}", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path)), request_body = FramePatch,
    responses((status = 200, description = "The updated story", body = Story),
              (status = 404, description = "No such story or frame", body = Problem),
              (status = 422, description = "Invalid caption", body = Problem)))]
pub async fn edit_frame(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
    ApiJson(body): ApiJson<FramePatch>,
) -> ApiResult<Json<Story>> {
    let caption = validate::caption(&body.caption)?;
    Ok(Json(
        store::edit_caption(&state.pool, id, frame_id, &caption).await?,
    ))
}

/// Delete a frame; later frames move up.
#[utoipa::path(delete, path = "/api/stories/{id}/frames/{frame_id}", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path)),
    responses((status = 200, description = "The story without the frame", body = Story),
              (status = 404, description = "No such story or frame", body = Problem)))]
pub async fn delete_frame(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
) -> ApiResult<Json<Story>> {
    Ok(Json(store::delete_frame(&state.pool, id, frame_id).await?))
}

/// Put the frames in a new order.
#[utoipa::path(put, path = "/api/stories/{id}/frames/order", tag = "stories", params(("id" = i64, Path)), request_body = FrameOrder,
    responses((status = 200, description = "The reordered story", body = Story),
              (status = 404, description = "No such story", body = Problem),
              (status = 422, description = "Not a permutation of the story's frames", body = Problem)))]
pub async fn reorder(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    ApiJson(body): ApiJson<FrameOrder>,
) -> ApiResult<Json<Story>> {
    // A story has at most MAX_CAPTIONS frames: a longer list is refused before the write
    // transaction that compares it with them.
    if body.frame_ids.len() > validate::MAX_CAPTIONS {
        return Err(ApiError::invalid(
            "invalid_order",
            format!(
                "frame_ids lists {} ids; a story has at most {} frames",
                body.frame_ids.len(),
                validate::MAX_CAPTIONS
            ),
        ));
    }
    Ok(Json(
        store::reorder(&state.pool, id, &body.frame_ids).await?,
    ))
}

/// The generated image of a frame.
#[utoipa::path(get, path = "/api/stories/{id}/frames/{frame_id}/image", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path)),
    responses((status = 200, description = "The image", content_type = "image/png"),
              (status = 404, description = "No such frame, or not generated yet", body = Problem)))]
pub async fn frame_image(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (bytes, mime) = store::frame_image(&state.pool, id, frame_id).await?;
    let hash = hex::encode(Sha256::digest(&bytes));
    Ok(image_response(bytes, &mime, &hash, &headers))
}

/// Where the model looked for one character mention while drawing a frame's image.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AttentionMapInfo {
    /// The mention as the caption writes it ("Fred", "He").
    pub text: String,
    /// The characters it refers to: the name itself, or for a pronoun the characters of the
    /// latest earlier caption that names any (matching the pronoun).
    pub characters: Vec<String>,
    /// The heatmap: a frame-sized grey PNG, brighter where the mention's cross-attention is
    /// stronger (255 at its peak).
    pub image_url: String,
}

/// The cross-attention heatmaps of a frame's image, one per character mention of the caption
/// it was drawn from, in caption order. They belong to the image: redrawing the frame replaces
/// them, editing its caption does not. Empty before the frame is drawn, when its caption names
/// nobody, or when the server does not capture attention.
#[utoipa::path(get, path = "/api/stories/{id}/frames/{frame_id}/attention", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path)),
    responses((status = 200, description = "The maps, in caption order", body = Vec<AttentionMapInfo>),
              (status = 404, description = "No such story or frame", body = Problem)))]
pub async fn frame_attention(
    State(state): State<AppState>,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
) -> ApiResult<Json<Vec<AttentionMapInfo>>> {
    let entries = frame_attention::list(&state.pool, id, frame_id).await?;
    Ok(Json(
        entries
            .into_iter()
            .map(|e| AttentionMapInfo {
                image_url: format!(
                    "/api/stories/{id}/frames/{frame_id}/attention/{}",
                    e.ordinal
                ),
                text: e.text,
                characters: e.characters,
            })
            .collect(),
    ))
}

/// One cross-attention heatmap of a frame (the `image_url` of its entry in the list).
#[utoipa::path(get, path = "/api/stories/{id}/frames/{frame_id}/attention/{k}", tag = "stories",
    params(("id" = i64, Path), ("frame_id" = i64, Path),
           ("k" = i64, Path, description = "0-based index in the frame's list of maps")),
    responses((status = 200, description = "A frame-sized grey PNG", content_type = "image/png"),
              (status = 304, description = "Not modified (If-None-Match matched the ETag)"),
              (status = 404, description = "No such story, frame or map", body = Problem)))]
pub async fn frame_attention_map(
    State(state): State<AppState>,
    ApiPath((id, frame_id, k)): ApiPath<(i64, i64, i64)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let bytes = frame_attention::png(&state.pool, id, frame_id, k).await?;
    let hash = hex::encode(Sha256::digest(&bytes));
    Ok(image_response(bytes, "image/png", &hash, &headers))
}
