//! The studio's starter-cast panel: add the characters the model was trained on in one click,
//! optionally with an example story that uses them. Both go through [`crate::starter_cast`],
//! the same path as `POST /api/characters/starter-cast`.
//!
//! Adding answers like the other character forms (the characters section with a status line
//! under HTMX, a redirect back to the studio without). The example story's button goes to the
//! new story's page instead: `HX-Redirect` for HTMX, a 303 redirect without JavaScript.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::Router;

use super::{characters_view, is_htmx, CharactersInput};
use crate::error::{ApiError, ApiResult};
use crate::{starter_cast, AppState};

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/ui/characters/starter-cast", post(add_cast))
        .route(
            "/ui/characters/starter-cast/story",
            post(add_cast_and_story),
        )
}

async fn add_cast(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let added = starter_cast::add(&state.pool, principal.owner(), &state.cast).await?;
    characters_view(
        &state,
        principal.owner(),
        &headers,
        CharactersInput {
            status: added.summary(),
            ..CharactersInput::default()
        },
        StatusCode::OK,
        "#characters",
    )
    .await
}

async fn add_cast_and_story(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let (_, story) =
        starter_cast::add_with_example_story(&state.pool, principal.owner(), &state.cast).await?;
    let location = format!("/stories/{}", story.id);
    if !is_htmx(&headers) {
        return Ok(Redirect::to(&location).into_response());
    }
    // HTMX follows HX-Redirect with a full page load, which is what a link to the story does.
    let value = HeaderValue::from_str(&location).map_err(ApiError::internal)?;
    let mut response = StatusCode::OK.into_response();
    response.headers_mut().insert("hx-redirect", value);
    Ok(response)
}
