//! `/api/characters`: the character library (name, pronoun, portrait).

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

use super::{ApiJson, ApiPath, ApiQuery, ListParams};
use crate::auth::Principal;
use crate::config::MAX_PORTRAIT_BYTES;
use crate::error::{ApiError, ApiResult, Problem};
use crate::images::{normalize_portrait_bounded, NormalizedImage};
use crate::store::characters::{self as store, Character, CharacterChanges, Pronoun};
use crate::store::{page_limit, Page};
use crate::{validate, AppState};

/// The multipart form that creates a character (also the shape of a multipart PATCH).
#[derive(ToSchema)]
#[allow(dead_code)] // documents the form for OpenAPI; the handler reads the parts directly
pub struct CharacterForm {
    /// Name as captions write it, 1..=64 characters, unique.
    name: String,
    /// he, she, they or it.
    pronoun: Pronoun,
    /// PNG, JPEG or WebP image, at most 10 MiB and 4096 px a side.
    #[schema(value_type = String, format = Binary)]
    portrait: Vec<u8>,
}

/// JSON body of a character update; absent fields are kept.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "Mia", "pronoun": "she", "rewrite_captions": true}))]
pub struct CharacterPatch {
    /// New name.
    pub name: Option<String>,
    /// New pronoun.
    pub pronoun: Option<Pronoun>,
    /// With a new name: also write it into the captions of every story whose cast includes
    /// the character, where they name it by the old one (default false). Rewritten captions
    /// mark their drawn frames `stale`.
    #[serde(default)]
    pub rewrite_captions: bool,
}

/// Form fields read from a multipart body; each optional here, required ones checked later.
#[derive(Default)]
struct CharacterParts {
    name: Option<String>,
    pronoun: Option<String>,
    portrait: Option<NormalizedImage>,
}

fn multipart_error(err: axum::extract::multipart::MultipartError) -> ApiError {
    let status = err.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            status,
            "payload_too_large",
            "the upload is larger than 10 MiB",
        )
    } else {
        ApiError::bad_request("invalid_multipart", err.body_text())
    }
}

async fn read_parts(mut form: Multipart) -> ApiResult<CharacterParts> {
    let mut parts = CharacterParts::default();
    let mut oversized = false;
    let mut seen = std::collections::HashSet::new();
    loop {
        let next = form.next_field().await;
        let mut field = match next {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(_) if oversized => break,
            Err(e) => return Err(multipart_error(e)),
        };
        let field_name = field.name().unwrap_or_default().to_string();
        if oversized {
            // Keep reading (and discarding) so the client finishes sending and then sees the
            // 413, instead of a connection reset in the middle of its upload.
            while let Ok(Some(_)) = field.chunk().await {}
            continue;
        }
        if !seen.insert(field_name.clone()) {
            // Else the last one would silently win.
            return Err(ApiError::invalid(
                "duplicate_field",
                format!("the form field {field_name:?} is sent more than once; send it once"),
            ));
        }
        match field_name.as_str() {
            "name" | "pronoun" => {
                // Bytes, not `text()`, which would turn what is not UTF-8 into U+FFFD.
                let bytes = field.bytes().await.map_err(multipart_error)?;
                let text = String::from_utf8(bytes.to_vec()).map_err(|_| {
                    let code = if field_name == "name" {
                        "invalid_name"
                    } else {
                        "invalid_pronoun"
                    };
                    ApiError::invalid(
                        code,
                        format!("the {field_name} is not valid UTF-8 text; send it as UTF-8"),
                    )
                })?;
                if field_name == "name" {
                    parts.name = Some(text);
                } else {
                    parts.pronoun = Some(text);
                }
            }
            "portrait" => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(multipart_error)? {
                    if bytes.len() + chunk.len() > MAX_PORTRAIT_BYTES {
                        oversized = true;
                        bytes = Vec::new();
                        while let Ok(Some(_)) = field.chunk().await {}
                        break;
                    }
                    bytes.extend_from_slice(&chunk);
                }
                if oversized {
                    continue;
                }
                if bytes.is_empty() {
                    return Err(ApiError::invalid(
                        "missing_portrait",
                        "the portrait file is empty",
                    ));
                }
                let normalized = normalize_portrait_bounded(bytes).await?;
                parts.portrait = Some(normalized);
            }
            other => {
                return Err(ApiError::invalid(
                    "unknown_field",
                    format!("unexpected form field {other:?}; expected name, pronoun, portrait"),
                ))
            }
        }
    }
    if oversized {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the portrait is larger than {MAX_PORTRAIT_BYTES} bytes (10 MiB)"),
        ));
    }
    Ok(parts)
}

fn created(location: String, body: impl serde::Serialize) -> Response {
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// Create a character from a multipart form.
#[utoipa::path(post, path = "/api/characters", tag = "characters",
    request_body(content = CharacterForm, content_type = "multipart/form-data"),
    responses(
        (status = 201, description = "Created", body = Character),
        (status = 409, description = "Name already taken", body = Problem),
        (status = 413, description = "Portrait over 10 MiB", body = Problem),
        (status = 415, description = "Portrait is not PNG, JPEG or WebP", body = Problem),
        (status = 422, description = "Missing or invalid field, undecodable or oversized image", body = Problem),
    ))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    request: Request,
) -> ApiResult<Response> {
    let form = Multipart::from_request(request, &state)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "send a multipart/form-data body with name, pronoun and portrait ({})",
                    e.body_text()
                ),
            )
        })?;
    let parts = read_parts(form).await?;
    let name = validate::name(parts.name.as_deref().unwrap_or_default())?;
    let pronoun = Pronoun::parse(parts.pronoun.as_deref().ok_or_else(|| {
        ApiError::invalid(
            "invalid_pronoun",
            "the pronoun field is required (he, she, they or it)",
        )
    })?)?;
    let portrait = parts
        .portrait
        .ok_or_else(|| ApiError::invalid("missing_portrait", "the portrait file is required"))?;
    state
        .settings
        .quotas
        .check_storage(&state.pool, principal.owner(), portrait.bytes.len())
        .await?;
    let character =
        store::create(&state.pool, principal.owner(), &name, pronoun, &portrait).await?;
    Ok(created(
        format!("/api/characters/{}", character.id),
        character,
    ))
}

/// List characters, oldest first, with cursor pagination.
#[utoipa::path(get, path = "/api/characters", tag = "characters", params(ListParams),
    responses((status = 200, description = "A page of characters", body = Page<Character>),
              (status = 400, description = "Bad cursor or limit", body = Problem)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<Page<Character>>> {
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

/// Get one character.
#[utoipa::path(get, path = "/api/characters/{id}", tag = "characters", params(("id" = i64, Path)),
    responses((status = 200, description = "The character", body = Character),
              (status = 404, description = "No such character", body = Problem)))]
pub async fn get_one(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<Character>> {
    Ok(Json(store::get(&state.pool, id).await?))
}

/// Change a character's name or pronoun (JSON), or also its portrait (multipart form).
#[utoipa::path(patch, path = "/api/characters/{id}", tag = "characters", params(("id" = i64, Path)),
    request_body(content(
        (CharacterPatch = "application/json"),
        (CharacterForm = "multipart/form-data"))),
    responses((status = 200, description = "The updated character", body = Character),
              (status = 404, description = "No such character", body = Problem),
              (status = 409, description = "Name already taken", body = Problem),
              (status = 422, description = "Invalid field", body = Problem)))]
pub async fn update(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Json<Character>> {
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (name, pronoun, portrait, rewrite) = if is_multipart {
        let form = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let parts = read_parts(form).await?;
        let pronoun = parts.pronoun.as_deref().map(Pronoun::parse).transpose()?;
        (parts.name, pronoun, parts.portrait, false)
    } else {
        let ApiJson(patch) = ApiJson::<CharacterPatch>::from_request(request, &state).await?;
        (patch.name, patch.pronoun, None, patch.rewrite_captions)
    };
    let name = name.as_deref().map(validate::name).transpose()?;
    let captions = match &name {
        Some(new_name) if rewrite => {
            crate::rename::caption_rewrites(&state.pool, id, new_name).await?
        }
        _ => Vec::new(),
    };
    if let Some(portrait) = &portrait {
        let owner = store::owner_of(&state.pool, id).await?;
        state
            .settings
            .quotas
            .check_storage(&state.pool, owner, portrait.bytes.len())
            .await?;
    }
    let changes = CharacterChanges {
        name,
        pronoun,
        portrait,
        captions,
    };
    Ok(Json(
        store::update(&state.pool, id, changes).await?.character,
    ))
}

/// Delete a character; it leaves the casts of the stories it was in.
#[utoipa::path(delete, path = "/api/characters/{id}", tag = "characters", params(("id" = i64, Path)),
    responses((status = 204, description = "Deleted"),
              (status = 404, description = "No such character", body = Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<StatusCode> {
    store::delete(&state.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The character's portrait image, with a content-hash ETag.
#[utoipa::path(get, path = "/api/characters/{id}/portrait", tag = "characters", params(("id" = i64, Path)),
    responses((status = 200, description = "The image (PNG or JPEG)", content_type = "image/*"),
              (status = 304, description = "Unchanged since the ETag sent in If-None-Match"),
              (status = 404, description = "No such character", body = Problem)))]
pub async fn portrait(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let portrait = store::portrait(&state.pool, id).await?;
    Ok(image_response(
        portrait.bytes,
        &portrait.mime,
        &portrait.sha256,
        &headers,
    ))
}

/// An image response that honours `If-None-Match` and lets caches revalidate by ETag.
pub fn image_response(bytes: Vec<u8>, mime: &str, hash: &str, headers: &HeaderMap) -> Response {
    let etag = format!("\"{hash}\"");
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::CACHE_CONTROL, "private, no-cache");
    let response = if matches {
        builder.status(StatusCode::NOT_MODIFIED).body(Body::empty())
    } else {
        builder
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, mime)
            .header("x-content-type-options", "nosniff")
            .body(Body::from(bytes))
    };
    response.unwrap_or_else(|e| ApiError::internal(e).into_response())
}
