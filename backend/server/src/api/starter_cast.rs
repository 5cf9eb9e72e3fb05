//! The model's starter cast over the API: `GET /api/model/cast` lists the characters the
//! loaded bundle was trained on, `GET /api/model/cast/{k}/portrait` serves one's portrait, and
//! `POST /api/characters/starter-cast` adds them to the library as ordinary characters.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::characters::image_response;
use super::ApiPath;
use crate::error::{ApiError, ApiResult, Problem};
use crate::store::characters::{Character, Pronoun};
use crate::{starter_cast, AppState};

/// A character the loaded model was trained on.
#[derive(Debug, Serialize, ToSchema)]
pub struct CastMember {
    /// Name as captions write it.
    pub name: String,
    /// Pronoun the captions use for it.
    pub pronoun: Pronoun,
    /// What it looks like, as the training data describes it (may be empty).
    pub description: String,
    /// The portrait the model learned it from.
    pub portrait_url: String,
}

/// What `POST /api/characters/starter-cast` did.
#[derive(Debug, Serialize, ToSchema)]
pub struct StarterCastAdded {
    /// The characters it created, in cast order.
    pub added: Vec<Character>,
    /// Cast names it skipped because a character of that name (any case) already existed.
    pub skipped: Vec<String>,
    /// The library's character for each cast member, in cast order (added or already there):
    /// ready to be a story's `character_ids`.
    pub character_ids: Vec<i64>,
}

/// The characters the loaded model was trained on (empty for a bundle that lists none, such
/// as an untrained one). A trained model draws only these; a character added with another
/// portrait is drawn as the nearest of them.
#[utoipa::path(get, path = "/api/model/cast", tag = "model",
    responses((status = 200, description = "The cast, in the bundle's order", body = Vec<CastMember>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<CastMember>> {
    Json(
        state
            .cast
            .members()
            .iter()
            .enumerate()
            .map(|(k, m)| CastMember {
                name: m.name.clone(),
                pronoun: m.pronoun,
                description: m.description.clone(),
                portrait_url: format!("/api/model/cast/{k}/portrait"),
            })
            .collect(),
    )
}

/// The portrait of one cast member (the `portrait_url` of its entry), with a content-hash ETag.
#[utoipa::path(get, path = "/api/model/cast/{k}/portrait", tag = "model",
    params(("k" = usize, Path, description = "0-based index in the cast")),
    responses((status = 200, description = "The image (PNG or JPEG)", content_type = "image/*"),
              (status = 304, description = "Unchanged since the ETag sent in If-None-Match"),
              (status = 404, description = "No cast member at this index", body = Problem)))]
pub async fn portrait(
    State(state): State<AppState>,
    ApiPath(k): ApiPath<usize>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let member = state.cast.members().get(k).ok_or_else(|| {
        ApiError::new(
            axum::http::StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "the model's cast has {} characters; there is none at index {k}",
                state.cast.members().len()
            ),
        )
    })?;
    Ok(image_response(
        member.portrait.bytes.clone(),
        member.portrait.mime,
        &member.sha256,
        &headers,
    ))
}

/// Add the model's starter cast to the library: each cast member whose name (any case) is not
/// taken yet becomes an ordinary character with the cast's portrait; the others are skipped,
/// so calling it again adds nothing. Answers 200, not 201: it may create several characters
/// or none, so there is no single `Location`.
#[utoipa::path(post, path = "/api/characters/starter-cast", tag = "characters",
    responses((status = 200, description = "What was added and what was skipped", body = StarterCastAdded),
              (status = 404, description = "The loaded model lists no starter cast (`no_starter_cast`)", body = Problem)))]
pub async fn add(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
) -> ApiResult<Json<StarterCastAdded>> {
    let done = starter_cast::add(&state.pool, principal.owner(), &state.cast).await?;
    Ok(Json(StarterCastAdded {
        added: done.added,
        skipped: done.skipped,
        character_ids: done.character_ids,
    }))
}
