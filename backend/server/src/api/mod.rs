//! The JSON API under `/api`: routes grouped by resource, and extractors that turn every
//! malformed request into a problem document instead of axum's plain-text rejections.

pub mod account;
pub mod characters;
pub mod events;
pub mod export;
pub mod frame_versions;
pub mod health;
pub mod jobs;
pub mod mentions;
pub mod openapi;
pub mod starter_cast;
pub mod stories;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::Router;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::AppState;

/// All `/api` routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/characters",
            post(characters::create)
                .layer(upload_limit())
                .get(characters::list),
        )
        .route(
            "/characters/{id}",
            get(characters::get_one)
                .patch(characters::update)
                .layer(upload_limit())
                .delete(characters::delete),
        )
        .route("/characters/{id}/portrait", get(characters::portrait))
        .route("/characters/starter-cast", post(starter_cast::add))
        .route("/model/cast", get(starter_cast::list))
        .route("/model/cast/{k}/portrait", get(starter_cast::portrait))
        .route("/stories", post(stories::create).get(stories::list))
        .route(
            "/stories/import",
            post(stories::import).layer(axum::extract::DefaultBodyLimit::max(
                crate::import::MAX_ARCHIVE_BYTES,
            )),
        )
        .route(
            "/stories/{id}",
            get(stories::get_one)
                .patch(stories::update)
                .delete(stories::delete),
        )
        .route("/stories/{id}/frames", post(stories::insert_frame))
        .route("/stories/{id}/frames/order", put(stories::reorder))
        .route(
            "/stories/{id}/frames/{frame_id}",
            axum::routing::patch(stories::edit_frame).delete(stories::delete_frame),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/image",
            get(stories::frame_image),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/attention",
            get(stories::frame_attention),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/attention/{k}",
            get(stories::frame_attention_map),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/versions",
            get(frame_versions::list),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/versions/{version_id}",
            axum::routing::delete(frame_versions::delete),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/versions/{version_id}/image",
            get(frame_versions::image),
        )
        .route(
            "/stories/{id}/frames/{frame_id}/versions/{version_id}/restore",
            post(frame_versions::restore),
        )
        .route("/stories/{id}/export.zip", get(export::zip))
        .route("/stories/{id}/export.gif", get(export::gif))
        .route("/stories/{id}/export.pdf", get(export::pdf))
        .route("/mentions", post(mentions::find))
        .route("/me", get(account::me))
        .route("/tokens", get(account::tokens).post(account::create_token))
        .route("/tokens/{id}", axum::routing::delete(account::revoke_token))
        .route("/users", get(account::users).post(account::add_user))
        .route("/workers", get(account::workers))
        .route("/stories/{id}/generate", post(jobs::generate))
        .route("/stories/{id}/events", get(events::story_events))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::get_one))
        .route("/jobs/{id}/cancel", post(jobs::cancel))
        .route("/jobs/{id}/events", get(events::job_events))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no_route",
                "no API endpoint at this path; see /openapi.json",
            )
        })
}

/// Body limit layer for routes that accept a portrait upload.
pub fn upload_limit() -> axum::extract::DefaultBodyLimit {
    axum::extract::DefaultBodyLimit::max(crate::config::UPLOAD_BODY_LIMIT)
}

/// JSON body extractor whose rejections are problem documents: 400 for malformed JSON,
/// 415 without a JSON content type, 422 for JSON of the wrong shape, 413 when too large.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

pub(crate) fn json_rejection(rejection: JsonRejection) -> ApiError {
    let detail = rejection.body_text();
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::invalid("invalid_body", detail),
        JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("invalid_json", detail),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ),
        other => {
            let status = other.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
                "payload_too_large"
            } else {
                "invalid_body"
            };
            ApiError::new(status, code, detail)
        }
    }
}

/// Path extractor: a path id that is not a number names no resource, so it is a 404.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(ApiPath(value)),
            Err(PathRejection::FailedToDeserializePathParams(e)) => Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such resource: {}", e.body_text()),
            )),
            Err(other) => Err(ApiError::internal(other.body_text())),
        }
    }
}

/// Query-string extractor with problem-document rejections (400).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(v)| ApiQuery(v))
            .map_err(|e: QueryRejection| ApiError::bad_request("invalid_query", e.body_text()))
    }
}

/// Query parameters of list endpoints.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct ListParams {
    /// Page size, 1..=200 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` from the previous page.
    pub cursor: Option<String>,
}
