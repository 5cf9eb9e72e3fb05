//! Server-rendered HTML: the home page with the character library and stories, and the
//! form handlers behind it. Forms work without JavaScript (POST, then redirect); with
//! HTMX loaded they swap just the section that changed and show errors in place.

use askama::Template;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::ApiPath;
use crate::error::{ApiError, ApiResult};
use crate::images::normalize_portrait;
use crate::store::characters::{self, Character, Pronoun};
use crate::store::stories::{self, StorySummary};
use crate::{validate, AppState};

const HTMX_JS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../node_modules/htmx.org/dist/htmx.min.js"
));
const APP_CSS: &str = include_str!("../../../static/app.css");

/// Routes of the HTML interface and its static assets.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route(
            "/ui/characters",
            post(add_character).layer(crate::api::upload_limit()),
        )
        .route("/ui/characters/{id}/delete", post(delete_character))
        .route("/ui/stories", get(stories_section).post(add_story))
        .route("/ui/stories/{id}/delete", post(delete_story))
        .route(
            "/static/htmx.min.js",
            get(|| async { asset(HTMX_JS.to_vec(), "text/javascript") }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset(APP_CSS.as_bytes().to_vec(), "text/css") }),
        )
}

fn asset(bytes: Vec<u8>, mime: &'static str) -> Response {
    // Assets are embedded in the binary, so they change only with the version.
    (
        [
            (header::CONTENT_TYPE, mime),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        bytes,
    )
        .into_response()
}

/// What the character form last held, so a refused submission keeps the user's typing.
#[derive(Default)]
struct CharacterFormState {
    name: String,
    pronoun: String,
    error: String,
}

/// What the story form last held.
#[derive(Default)]
struct StoryFormState {
    title: String,
    captions: String,
    cast: Vec<i64>,
    error: String,
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    characters: Vec<Character>,
    stories: Vec<StorySummary>,
    char_form: CharacterFormState,
    story_form: StoryFormState,
}

#[derive(Template)]
#[template(path = "characters_section.html")]
struct CharactersSection {
    characters: Vec<Character>,
    char_form: CharacterFormState,
}

#[derive(Template)]
#[template(path = "stories_section.html")]
struct StoriesSection {
    characters: Vec<Character>,
    stories: Vec<StorySummary>,
    story_form: StoryFormState,
}

fn render(template: impl Template, status: StatusCode) -> Response {
    match template.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

fn is_htmx(headers: &HeaderMap) -> bool {
    headers.contains_key("hx-request")
}

async fn all_stories(state: &AppState) -> ApiResult<Vec<StorySummary>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = stories::list(&state.pool, cursor.as_deref(), crate::store::MAX_PAGE).await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

async fn page(
    state: &AppState,
    char_form: CharacterFormState,
    story_form: StoryFormState,
    status: StatusCode,
) -> ApiResult<Response> {
    let characters = characters::all(&state.pool).await?;
    let stories = all_stories(state).await?;
    Ok(render(
        IndexPage {
            characters,
            stories,
            char_form,
            story_form,
        },
        status,
    ))
}

async fn index(State(state): State<AppState>) -> ApiResult<Response> {
    page(
        &state,
        CharacterFormState::default(),
        StoryFormState::default(),
        StatusCode::OK,
    )
    .await
}

async fn characters_view(
    state: &AppState,
    headers: &HeaderMap,
    form: CharacterFormState,
    status: StatusCode,
) -> ApiResult<Response> {
    if !is_htmx(headers) {
        if status.is_success() {
            return Ok(Redirect::to("/").into_response());
        }
        return page(state, form, StoryFormState::default(), status).await;
    }
    let characters = characters::all(&state.pool).await?;
    // Adding or removing a character changes the story form's cast checkboxes too.
    let mut response = render(
        CharactersSection {
            characters,
            char_form: form,
        },
        status,
    );
    response.headers_mut().insert(
        "hx-trigger",
        header::HeaderValue::from_static("characters-changed"),
    );
    Ok(response)
}

async fn stories_view(
    state: &AppState,
    headers: &HeaderMap,
    form: StoryFormState,
    status: StatusCode,
) -> ApiResult<Response> {
    if !is_htmx(headers) {
        if status.is_success() {
            return Ok(Redirect::to("/").into_response());
        }
        return page(state, CharacterFormState::default(), form, status).await;
    }
    let characters = characters::all(&state.pool).await?;
    let stories = all_stories(state).await?;
    Ok(render(
        StoriesSection {
            characters,
            stories,
            story_form: form,
        },
        status,
    ))
}

async fn add_character(
    State(state): State<AppState>,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let mut form = CharacterFormState::default();
    let result = async {
        let mut multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let mut portrait = None;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?
        {
            match field.name().unwrap_or_default() {
                "name" => form.name = field.text().await.unwrap_or_default(),
                "pronoun" => form.pronoun = field.text().await.unwrap_or_default(),
                "portrait" => {
                    let bytes = field.bytes().await.map_err(|e| {
                        ApiError::new(e.status(), "payload_too_large", e.body_text())
                    })?;
                    if !bytes.is_empty() {
                        portrait = Some(bytes);
                    }
                }
                _ => {}
            }
        }
        let name = validate::name(&form.name)?;
        let pronoun = Pronoun::parse(&form.pronoun)?;
        let bytes = portrait
            .ok_or_else(|| ApiError::invalid("missing_portrait", "choose a portrait image"))?;
        let image = tokio::task::spawn_blocking(move || normalize_portrait(&bytes))
            .await
            .map_err(ApiError::internal)??;
        characters::create(&state.pool, &name, pronoun, &image).await
    }
    .await;
    match result {
        Ok(_) => {
            characters_view(
                &state,
                &headers,
                CharacterFormState::default(),
                StatusCode::OK,
            )
            .await
        }
        Err(e) if e.status.is_server_error() => Err(e),
        Err(e) => {
            form.error = e.detail;
            characters_view(&state, &headers, form, StatusCode::UNPROCESSABLE_ENTITY).await
        }
    }
}

async fn delete_character(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    characters::delete(&state.pool, id).await?;
    characters_view(
        &state,
        &headers,
        CharacterFormState::default(),
        StatusCode::OK,
    )
    .await
}

/// Parses an urlencoded story form: `title`, `captions` (one per line), repeated `character_id`.
fn parse_story_form(body: &[u8]) -> StoryFormState {
    let mut form = StoryFormState::default();
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "title" => form.title = value.into_owned(),
            "captions" => form.captions = value.into_owned(),
            "character_id" => form.cast.extend(value.parse::<i64>().ok()),
            _ => {}
        }
    }
    form
}

async fn add_story(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let mut form = parse_story_form(&body);
    let result = async {
        let title = validate::title(&form.title)?;
        let lines: Vec<String> = form
            .captions
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        let captions = validate::captions(&lines)?;
        let cast = validate::cast(&form.cast)?;
        stories::create(&state.pool, &title, &captions, &cast).await
    }
    .await;
    match result {
        Ok(_) => stories_view(&state, &headers, StoryFormState::default(), StatusCode::OK).await,
        Err(e) if e.status.is_server_error() => Err(e),
        Err(e) => {
            form.error = e.detail;
            stories_view(&state, &headers, form, StatusCode::UNPROCESSABLE_ENTITY).await
        }
    }
}

async fn stories_section(State(state): State<AppState>, headers: HeaderMap) -> ApiResult<Response> {
    stories_view(&state, &headers, StoryFormState::default(), StatusCode::OK).await
}

async fn delete_story(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    stories::delete(&state.pool, id).await?;
    stories_view(&state, &headers, StoryFormState::default(), StatusCode::OK).await
}
