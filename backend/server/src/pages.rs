//! Server-rendered HTML: the home page with the character library and stories, the story
//! page (`pages/story.rs`: caption editor with live highlights, frames strip, exports), and
//! the form handlers behind them. Forms work without JavaScript (POST, then a 303 redirect;
//! a refused form is rendered again with the messages next to its fields); with HTMX loaded
//! they swap just the section that changed and show the same messages in place.

mod account;
mod draft;
mod forms;
mod frames;
mod generate;
mod history;
mod starter;
mod story;

use askama::Template;
use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::ApiPath;
use crate::auth::{Owner, Principal};
use crate::config::MAX_PORTRAIT_BYTES;
use crate::error::{ApiError, ApiResult};
use crate::images::normalize_portrait_bounded;
use crate::store::characters::{self, Character, CharacterChanges, Pronoun};
use crate::store::stories::{self, StorySummary};
use crate::store::{frame_media, frame_versions};
use crate::{validate, AppState};

const HTMX_JS: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../node_modules/htmx.org/dist/htmx.min.js"
));
const APP_CSS: &str = include_str!("../../../static/app.css");
const STUDIO_JS: &str = include_str!("../../../static/studio.js");
const GENERATE_JS: &str = include_str!("../../../static/generate.js");
const FRAMES_JS: &str = include_str!("../../../static/frames.js");

/// Highlight colours (`c0`..`c7` in app.css); a cast member's colour is its cast index mod 8.
pub const COLOURS: usize = 8;

/// Routes of the HTML interface and its static assets.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route(
            "/ui/characters",
            post(add_character).layer(crate::api::upload_limit()),
        )
        .route("/ui/characters/{id}/rename", post(rename_character))
        .route("/ui/characters/{id}/delete", post(delete_character))
        .route(
            "/ui/characters/{id}/portrait",
            post(replace_portrait).layer(crate::api::upload_limit()),
        )
        .route("/ui/stories", get(stories_section).post(add_story))
        .route("/ui/stories/{id}/delete", post(delete_story))
        .route(
            "/ui/stories/import",
            post(import_story).layer(axum::extract::DefaultBodyLimit::max(
                crate::import::MAX_ARCHIVE_BYTES,
            )),
        )
        .merge(account::router())
        .merge(story::router())
        .merge(draft::router())
        .merge(starter::router())
        .merge(generate::router())
        .merge(frames::router())
        .merge(history::router())
        .route(
            "/static/htmx.min.js",
            get(|| async { asset(HTMX_JS.to_vec(), "text/javascript") }),
        )
        .route(
            "/static/app.css",
            get(|| async { asset(APP_CSS.as_bytes().to_vec(), "text/css") }),
        )
        .route(
            "/static/studio.js",
            get(|| async { asset(STUDIO_JS.as_bytes().to_vec(), "text/javascript") }),
        )
        .route(
            "/static/generate.js",
            get(|| async { asset(GENERATE_JS.as_bytes().to_vec(), "text/javascript") }),
        )
        .route(
            "/static/frames.js",
            get(|| async { asset(FRAMES_JS.as_bytes().to_vec(), "text/javascript") }),
        )
        .layer(axum::middleware::from_fn(forms::strict_urlencoded))
}

/// The studio's error page (`error.html`).
#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    title: String,
    detail: String,
    status: u16,
}

/// An error of a studio address as the HTML page a browser shows: the status's name as the
/// heading and the detail as a sentence. The API answers the same errors as problem documents
/// (see `surface`).
pub fn error_page(status: StatusCode, detail: &str) -> Response {
    let page = ErrorPage {
        title: status.canonical_reason().unwrap_or("Error").to_string(),
        detail: sentence(detail),
        status: status.as_u16(),
    };
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        // Rendering a page this simple does not fail; if it did, say so without a page
        // (another ApiError would come back here).
        Err(e) => {
            tracing::error!(error = %e, "cannot render the error page");
            (status, detail.to_string()).into_response()
        }
    }
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

/// A problem detail as a sentence for a form: capitalised, ending with a full stop.
fn sentence(detail: &str) -> String {
    let mut chars = detail.trim().chars();
    let mut out: String = match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => return String::new(),
    };
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

/// What the add-character form last held, so a refused submission keeps the user's typing,
/// with each message next to the field it is about.
#[derive(Default)]
struct CharacterFormState {
    name: String,
    pronoun: String,
    name_error: String,
    pronoun_error: String,
    portrait_error: String,
    /// A problem with the request as a whole (not a multipart body, say).
    error: String,
}

impl CharacterFormState {
    /// Files a refused request's message under the field it is about.
    fn file(&mut self, e: &ApiError) {
        let message = sentence(&e.detail);
        match e.code {
            "invalid_name" | "name_taken" => self.name_error = message,
            "invalid_pronoun" => self.pronoun_error = message,
            "missing_portrait"
            | "payload_too_large"
            | "unsupported_image_type"
            | "invalid_image"
            | "image_too_large" => self.portrait_error = message,
            _ => self.error = message,
        }
    }

    /// A refused form whose portrait was fine: HTMX keeps the chosen file (and its preview)
    /// across the swap, so fixing the name does not mean choosing the file again.
    fn keep_portrait(&self) -> bool {
        self.has_errors() && self.portrait_error.is_empty()
    }

    fn has_errors(&self) -> bool {
        !(self.name_error.is_empty()
            && self.pronoun_error.is_empty()
            && self.portrait_error.is_empty()
            && self.error.is_empty())
    }
}

/// A refused rename, shown in that character's card.
#[derive(Default)]
struct RenameState {
    id: i64,
    name: String,
    pronoun: String,
    name_error: String,
    pronoun_error: String,
    /// A refused replacement portrait.
    portrait_error: String,
}

/// A character in the library list, with its inline edit form's state.
struct CharacterCard {
    id: i64,
    name: String,
    pronoun: &'static str,
    portrait_url: String,
    edit_name: String,
    edit_pronoun: String,
    name_error: String,
    pronoun_error: String,
    portrait_error: String,
    /// The edit form starts open (it holds a refused rename).
    open: bool,
}

fn cards(characters: &[Character], rename: Option<RenameState>) -> Vec<CharacterCard> {
    characters
        .iter()
        .map(|c| {
            let mut card = CharacterCard {
                id: c.id,
                name: c.name.clone(),
                pronoun: c.pronoun.as_str(),
                portrait_url: c.portrait.url.clone(),
                edit_name: c.name.clone(),
                edit_pronoun: c.pronoun.as_str().to_string(),
                name_error: String::new(),
                pronoun_error: String::new(),
                portrait_error: String::new(),
                open: false,
            };
            if let Some(r) = rename.as_ref().filter(|r| r.id == c.id) {
                card.edit_name = r.name.clone();
                card.edit_pronoun = r.pronoun.clone();
                card.name_error = r.name_error.clone();
                card.pronoun_error = r.pronoun_error.clone();
                card.portrait_error = r.portrait_error.clone();
                card.open = true;
            }
            card
        })
        .collect()
}

/// What the story form last held.
#[derive(Default)]
struct StoryFormState {
    title: String,
    captions: String,
    cast: Vec<i64>,
    error: String,
    /// Said before a story is created without a cast: what that means, or which characters
    /// the captions name and were ticked for it. Pressing Create again creates it.
    notice: String,
    /// The user has seen the notice (a hidden field), so the next Create goes through.
    cast_confirmed: bool,
    /// The notes under the captions (limits, names found), rendered by `draft::notes_html`.
    draft_html: String,
    /// What the last story import did, or why it was refused.
    import_status: String,
    import_error: String,
}

const PRONOUNS: [&str; 4] = ["he", "she", "they", "it"];

/// A character of the model's starter cast, as its panel lists it.
struct StarterEntry {
    name: String,
    pronoun: &'static str,
    portrait_url: String,
}

/// The panel that offers the model's starter cast; `members` is empty (and the panel and the
/// add form's note are not shown) when the bundle lists none.
struct StarterPanel {
    members: Vec<StarterEntry>,
    /// The example story fits the cast (its captions name only cast members).
    example_story: bool,
    /// Every cast member's name is in the library already.
    all_there: bool,
}

fn starter_panel(state: &AppState, characters: &[Character]) -> StarterPanel {
    let members = state.cast.members();
    StarterPanel {
        members: members
            .iter()
            .enumerate()
            .map(|(k, m)| StarterEntry {
                name: m.name.clone(),
                pronoun: m.pronoun.as_str(),
                portrait_url: format!("/api/model/cast/{k}/portrait"),
            })
            .collect(),
        example_story: state.cast.offers_example_story(),
        all_there: members
            .iter()
            .all(|m| name_in_use(characters, &m.name, None)),
    }
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    characters: Vec<Character>,
    cards: Vec<CharacterCard>,
    stories: Vec<StorySummary>,
    char_form: CharacterFormState,
    char_status: String,
    story_form: StoryFormState,
    pronouns: [&'static str; 4],
    starter: StarterPanel,
}

#[derive(Template)]
#[template(path = "characters_section.html")]
struct CharactersSection {
    cards: Vec<CharacterCard>,
    char_form: CharacterFormState,
    char_status: String,
    pronouns: [&'static str; 4],
    starter: StarterPanel,
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

/// Form fields of an urlencoded body, first value of each name.
fn form_field(body: &[u8], name: &str) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

async fn all_stories(state: &AppState, owner: Owner) -> ApiResult<Vec<StorySummary>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = stories::list(
            &state.pool,
            owner,
            cursor.as_deref(),
            crate::store::MAX_PAGE,
        )
        .await?;
        out.extend(page.items);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(out),
        }
    }
}

/// The characters section's parts that a refused form or a status message changes.
#[derive(Default)]
struct CharactersInput {
    form: CharacterFormState,
    rename: Option<RenameState>,
    status: String,
}

/// Fills in the notes under the captions of a form that comes back with text in it.
async fn with_draft_notes(
    state: &AppState,
    mut form: StoryFormState,
    library: &[Character],
) -> ApiResult<StoryFormState> {
    form.draft_html = draft::notes_html(&form.captions, library, &state.worker.tokenizer).await?;
    Ok(form)
}

async fn page(
    state: &AppState,
    owner: Owner,
    chars: CharactersInput,
    story_form: StoryFormState,
    status: StatusCode,
) -> ApiResult<Response> {
    let characters = characters::all(&state.pool, owner).await?;
    let story_form = with_draft_notes(state, story_form, &characters).await?;
    let stories = all_stories(state, owner).await?;
    Ok(render(
        IndexPage {
            cards: cards(&characters, chars.rename),
            starter: starter_panel(state, &characters),
            characters,
            stories,
            char_form: chars.form,
            char_status: chars.status,
            story_form,
            pronouns: PRONOUNS,
        },
        status,
    ))
}

async fn index(State(state): State<AppState>, principal: Principal) -> ApiResult<Response> {
    page(
        &state,
        principal.owner(),
        CharactersInput::default(),
        StoryFormState::default(),
        StatusCode::OK,
    )
    .await
}

/// Answers a character form: without HTMX a redirect (success) or the whole page with the
/// messages (refused); with HTMX the characters section.
async fn characters_view(
    state: &AppState,
    owner: Owner,
    headers: &HeaderMap,
    input: CharactersInput,
    status: StatusCode,
    anchor: &str,
) -> ApiResult<Response> {
    if !is_htmx(headers) {
        if status.is_success() {
            return Ok(Redirect::to(&format!("/{anchor}")).into_response());
        }
        return page(state, owner, input, StoryFormState::default(), status).await;
    }
    let characters = characters::all(&state.pool, owner).await?;
    let mut response = render(
        CharactersSection {
            cards: cards(&characters, input.rename),
            char_form: input.form,
            char_status: input.status,
            pronouns: PRONOUNS,
            starter: starter_panel(state, &characters),
        },
        status,
    );
    if status.is_success() {
        // Adding, renaming or removing a character changes the story form's cast too.
        response.headers_mut().insert(
            "hx-trigger",
            header::HeaderValue::from_static("characters-changed"),
        );
    }
    Ok(response)
}

/// What the add-character form sent. An oversized portrait is read to the end and dropped,
/// so the browser finishes its upload and then sees the message, not a reset connection.
#[derive(Default)]
struct Upload {
    name: String,
    pronoun: String,
    portrait: Option<Vec<u8>>,
    /// The body was cut off at the route's hard limit: the connection cannot be reused.
    cut_off: bool,
    /// Text fields whose bytes are not UTF-8 (`name`, `pronoun`).
    invalid_utf8: Vec<String>,
}

async fn read_upload(request: Request, state: &AppState, form: &mut CharacterFormState) -> Upload {
    let mut upload = Upload::default();
    let too_large = || {
        format!(
            "The portrait is larger than {} MiB; choose a smaller image.",
            MAX_PORTRAIT_BYTES / (1024 * 1024)
        )
    };
    let mut multipart = match Multipart::from_request(request, state).await {
        Ok(m) => m,
        Err(e) => {
            form.error = sentence(&format!(
                "send the form as multipart/form-data ({})",
                e.body_text()
            ));
            return upload;
        }
    };
    let mut seen = std::collections::HashSet::new();
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    form.portrait_error = too_large();
                    upload.cut_off = true;
                } else if form.portrait_error.is_empty() {
                    form.error = sentence(&e.body_text());
                }
                break;
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        if !seen.insert(name.clone()) {
            // The last one would otherwise silently win.
            form.error = sentence(&format!(
                "the form field {name:?} is sent more than once; send it once"
            ));
        }
        if name == "name" || name == "pronoun" {
            // Bytes, not `text()`, which would turn what is not UTF-8 into U+FFFD and store it.
            let bytes = field.bytes().await.unwrap_or_default();
            match String::from_utf8(bytes.to_vec()) {
                Ok(text) if name == "name" => upload.name = text,
                Ok(text) => upload.pronoun = text,
                Err(_) => {
                    upload.invalid_utf8.push(name);
                }
            }
            continue;
        }
        let mut bytes = Vec::new();
        let mut oversized = false;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) if name == "portrait" && !oversized => {
                    if bytes.len() + chunk.len() > MAX_PORTRAIT_BYTES {
                        oversized = true;
                        bytes = Vec::new();
                    } else {
                        bytes.extend_from_slice(&chunk);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                        oversized = true;
                        upload.cut_off = true;
                    }
                    break;
                }
            }
        }
        if name == "portrait" {
            if oversized {
                form.portrait_error = too_large();
            } else if !bytes.is_empty() {
                upload.portrait = Some(bytes);
            }
        }
        if upload.cut_off {
            break;
        }
    }
    upload
}

/// Whether a character other than `except` already has this name, compared the way the
/// database's `COLLATE NOCASE` unique index compares (ASCII letters only).
fn name_in_use(characters: &[Character], name: &str, except: Option<i64>) -> bool {
    characters
        .iter()
        .any(|c| Some(c.id) != except && c.name.eq_ignore_ascii_case(name))
}

fn name_taken_message(name: &str) -> String {
    format!("A character named {name:?} already exists; names must be unique so captions can refer to them.")
}

async fn add_character(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let mut form = CharacterFormState::default();
    let upload = read_upload(request, &state, &mut form).await;
    form.name = upload.name.clone();
    form.pronoun = upload.pronoun.clone();
    // Every field is checked, so one answer lists every problem.
    let existing = characters::all(&state.pool, principal.owner()).await?;
    let not_utf8 = |field: &str| upload.invalid_utf8.iter().any(|f| f == field);
    let name = match validate::name(&upload.name) {
        _ if not_utf8("name") => {
            form.name_error = "The name is not valid UTF-8 text; type it again.".into();
            None
        }
        Ok(name) if name_in_use(&existing, &name, None) => {
            form.name_error = name_taken_message(&name);
            None
        }
        Ok(name) => Some(name),
        Err(e) => {
            form.file(&e);
            None
        }
    };
    let pronoun = if not_utf8("pronoun") {
        form.pronoun_error = "The pronoun is not valid UTF-8 text; choose one again.".into();
        None
    } else {
        Pronoun::parse(&upload.pronoun)
            .map_err(|e| form.file(&e))
            .ok()
    };
    let image = match upload.portrait {
        Some(bytes) => match normalize_portrait_bounded(bytes).await {
            Ok(image) => Some(image),
            Err(e) if e.status.is_server_error() => return Err(e),
            Err(e) => {
                form.file(&e);
                None
            }
        },
        None => {
            if form.portrait_error.is_empty() {
                form.portrait_error = "Choose a portrait image (PNG, JPEG or WebP).".into();
            }
            None
        }
    };
    let mut status_text = String::new();
    let mut anchor = String::new();
    if let (Some(name), Some(pronoun), Some(image), false) =
        (name, pronoun, image, form.has_errors())
    {
        let quota = state.settings.quotas;
        let created = match quota
            .check_storage(&state.pool, principal.owner(), image.bytes.len())
            .await
        {
            Ok(()) => {
                characters::create(&state.pool, principal.owner(), &name, pronoun, &image).await
            }
            Err(e) => Err(e),
        };
        match created {
            Ok(c) => {
                status_text = format!("Added {}.", c.name);
                anchor = format!("#character-{}", c.id);
            }
            Err(e) if e.status.is_server_error() => return Err(e),
            Err(e) => form.file(&e),
        }
    }
    let refused = form.has_errors();
    let mut response = characters_view(
        &state,
        principal.owner(),
        &headers,
        CharactersInput {
            form: if refused {
                form
            } else {
                CharacterFormState::default()
            },
            rename: None,
            status: status_text,
        },
        if refused {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::OK
        },
        &anchor,
    )
    .await?;
    if upload.cut_off {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

async fn rename_character(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let existing = characters::all(&state.pool, principal.owner()).await?;
    let Some(current) = existing.iter().find(|c| c.id == id) else {
        return Err(ApiError::not_found("character", id));
    };
    let old_name = current.name.clone();
    let mut rename = RenameState {
        id,
        name: form_field(&body, "name").unwrap_or_default(),
        pronoun: form_field(&body, "pronoun").unwrap_or_else(|| current.pronoun.as_str().into()),
        ..RenameState::default()
    };
    let name = match validate::name(&rename.name) {
        Ok(name) if name_in_use(&existing, &name, Some(id)) => {
            rename.name_error = name_taken_message(&name);
            None
        }
        Ok(name) => Some(name),
        Err(e) => {
            rename.name_error = sentence(&e.detail);
            None
        }
    };
    let pronoun = match Pronoun::parse(&rename.pronoun) {
        Ok(p) => Some(p),
        Err(e) => {
            rename.pronoun_error = sentence(&e.detail);
            None
        }
    };
    if let (Some(name), Some(pronoun)) = (name, pronoun) {
        // The box is ticked by default; unticked boxes are not sent.
        let rewrite = form_field(&body, "rewrite_captions").is_some_and(|v| v == "1");
        let captions = if rewrite && name != old_name {
            crate::rename::caption_rewrites(&state.pool, id, &name).await?
        } else {
            Vec::new()
        };
        let changes = CharacterChanges {
            name: Some(name),
            pronoun: Some(pronoun),
            portrait: None,
            captions,
        };
        match characters::update(&state.pool, id, changes).await {
            Ok(done) => {
                let c = done.character;
                let mut status = if c.name == old_name {
                    format!("Saved {} ({}).", c.name, c.pronoun.as_str())
                } else {
                    format!("Renamed {old_name} to {} ({}).", c.name, c.pronoun.as_str())
                };
                if done.captions > 0 {
                    status.push_str(&format!(
                        " {} caption{} in {} stor{} now say{} {}.",
                        done.captions,
                        if done.captions == 1 { "" } else { "s" },
                        done.stories,
                        if done.stories == 1 { "y" } else { "ies" },
                        if done.captions == 1 { "s" } else { "" },
                        c.name
                    ));
                }
                return characters_view(
                    &state,
                    principal.owner(),
                    &headers,
                    CharactersInput {
                        status,
                        ..CharactersInput::default()
                    },
                    StatusCode::OK,
                    &format!("#character-{id}"),
                )
                .await;
            }
            Err(e) if e.code == "name_taken" => rename.name_error = sentence(&e.detail),
            Err(e) => return Err(e),
        }
    }
    characters_view(
        &state,
        principal.owner(),
        &headers,
        CharactersInput {
            rename: Some(rename),
            ..CharactersInput::default()
        },
        StatusCode::UNPROCESSABLE_ENTITY,
        "",
    )
    .await
}

/// `POST /ui/characters/{id}/portrait`: a new portrait for a character (multipart field
/// `portrait`), checked and normalised as an upload is.
async fn replace_portrait(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
    request: Request,
) -> ApiResult<Response> {
    let current = characters::get(&state.pool, id).await?;
    let mut form = CharacterFormState::default();
    let upload = read_upload(request, &state, &mut form).await;
    let image = match upload.portrait {
        Some(bytes) if form.portrait_error.is_empty() => {
            match normalize_portrait_bounded(bytes).await {
                Ok(image) => Some(image),
                Err(e) if e.status.is_server_error() => return Err(e),
                Err(e) => {
                    form.file(&e);
                    None
                }
            }
        }
        Some(_) => None,
        None => {
            if form.portrait_error.is_empty() {
                form.portrait_error = "Choose a portrait image (PNG, JPEG or WebP).".into();
            }
            None
        }
    };
    if let Some(image) = image {
        state
            .settings
            .quotas
            .check_storage(
                &state.pool,
                characters::owner_of(&state.pool, id).await?,
                image.bytes.len(),
            )
            .await?;
        let changes = CharacterChanges {
            portrait: Some(image),
            ..CharacterChanges::default()
        };
        characters::update(&state.pool, id, changes).await?;
        return characters_view(
            &state,
            principal.owner(),
            &headers,
            CharactersInput {
                status: format!("Replaced the portrait of {}.", current.name),
                ..CharactersInput::default()
            },
            StatusCode::OK,
            &format!("#character-{id}"),
        )
        .await;
    }
    let message = [&form.portrait_error, &form.error]
        .into_iter()
        .find(|m| !m.is_empty())
        .cloned()
        .unwrap_or_default();
    characters_view(
        &state,
        principal.owner(),
        &headers,
        CharactersInput {
            rename: Some(RenameState {
                id,
                name: current.name.clone(),
                pronoun: current.pronoun.as_str().into(),
                portrait_error: message,
                ..RenameState::default()
            }),
            ..CharactersInput::default()
        },
        StatusCode::UNPROCESSABLE_ENTITY,
        "",
    )
    .await
}

async fn delete_character(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let character = characters::get(&state.pool, id).await?;
    characters::delete(&state.pool, id).await?;
    characters_view(
        &state,
        principal.owner(),
        &headers,
        CharactersInput {
            status: format!("Deleted {}.", character.name),
            ..CharactersInput::default()
        },
        StatusCode::OK,
        "#characters",
    )
    .await
}

async fn stories_view(
    state: &AppState,
    owner: Owner,
    headers: &HeaderMap,
    form: StoryFormState,
    status: StatusCode,
) -> ApiResult<Response> {
    if !is_htmx(headers) {
        if status.is_success() && form.notice.is_empty() {
            return Ok(Redirect::to("/").into_response());
        }
        return page(state, owner, CharactersInput::default(), form, status).await;
    }
    let characters = characters::all(&state.pool, owner).await?;
    let form = with_draft_notes(state, form, &characters).await?;
    let stories = all_stories(state, owner).await?;
    Ok(render(
        StoriesSection {
            characters,
            stories,
            story_form: form,
        },
        status,
    ))
}

/// Parses an urlencoded story form: `title`, `captions` (one per line), repeated `character_id`.
fn parse_story_form(body: &[u8]) -> StoryFormState {
    let mut form = StoryFormState::default();
    for (key, value) in form_urlencoded::parse(body) {
        match key.as_ref() {
            "title" => form.title = value.into_owned(),
            "captions" => form.captions = value.into_owned(),
            "character_id" => form.cast.extend(value.parse::<i64>().ok()),
            "cast_confirmed" => form.cast_confirmed = value == "1",
            _ => {}
        }
    }
    form
}

async fn add_story(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let mut form = parse_story_form(&body);
    let result = async {
        let title = validate::title(&form.title)?;
        let lines = draft::caption_lines(&form.captions);
        let captions = validate::captions(&lines)?;
        let cast = validate::cast(&form.cast)?;
        if cast.is_empty() && !form.cast_confirmed {
            // Without portraits nothing keeps a character the same from frame to frame: say
            // so, and offer the characters the captions name, before creating anything.
            let library = characters::all(&state.pool, principal.owner()).await?;
            let named = draft::named_characters(&lines, &library).await?;
            form.notice = if named.is_empty() {
                "No character is cast, so the frames will show whoever the model imagines, \
                 different in every frame. Tick this story's characters (add them to the \
                 library first), or press Create story again to create it without a cast."
                    .to_string()
            } else {
                let names: Vec<&str> = library
                    .iter()
                    .filter(|c| named.contains(&c.id))
                    .map(|c| c.name.as_str())
                    .collect();
                form.cast = named;
                format!(
                    "The captions name {}: ticked as the cast, so their portraits keep them \
                     the same in every frame. Press Create story again to create it, or untick \
                     them first.",
                    names.join(", ")
                )
            };
            form.cast_confirmed = true;
            return Ok(None);
        }
        stories::create(&state.pool, principal.owner(), &title, &captions, &cast)
            .await
            .map(Some)
    }
    .await;
    match result {
        Ok(None) => stories_view(&state, principal.owner(), &headers, form, StatusCode::OK).await,
        Ok(Some(_)) => {
            stories_view(
                &state,
                principal.owner(),
                &headers,
                StoryFormState::default(),
                StatusCode::OK,
            )
            .await
        }
        Err(e) if e.status.is_server_error() => Err(e),
        Err(e) => {
            form.error = e.detail;
            stories_view(
                &state,
                principal.owner(),
                &headers,
                form,
                StatusCode::UNPROCESSABLE_ENTITY,
            )
            .await
        }
    }
}

/// `POST /ui/stories/import`: a story archive (multipart field `archive`) as a new story.
async fn import_story(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    request: Request,
) -> ApiResult<Response> {
    let mut form = StoryFormState::default();
    let outcome = async {
        let mut multipart = Multipart::from_request(request, &state)
            .await
            .map_err(|e| ApiError::bad_request("invalid_multipart", e.body_text()))?;
        let mut archive = None;
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?
        {
            if field.name() == Some("archive") {
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::new(e.status(), "invalid_multipart", e.body_text()))?;
                archive = Some(bytes.to_vec());
            }
        }
        let Some(archive) = archive.filter(|a| !a.is_empty()) else {
            return Err(ApiError::invalid(
                "missing_archive",
                "choose a story archive (.zip) to import",
            ));
        };
        crate::api::stories::import_archive(&state, principal.owner(), archive).await
    }
    .await;
    let status = match outcome {
        Ok(story) => {
            form.import_status = format!(
                "Imported \u{201c}{}\u{201d} ({} caption{}).",
                story.title,
                story.frames.len(),
                if story.frames.len() == 1 { "" } else { "s" }
            );
            StatusCode::OK
        }
        Err(e) if e.status.is_server_error() => return Err(e),
        Err(e) => {
            form.import_error = sentence(&e.detail);
            StatusCode::UNPROCESSABLE_ENTITY
        }
    };
    stories_view(&state, principal.owner(), &headers, form, status).await
}

async fn stories_section(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
) -> ApiResult<Response> {
    stories_view(
        &state,
        principal.owner(),
        &headers,
        StoryFormState::default(),
        StatusCode::OK,
    )
    .await
}

async fn delete_story(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    stories::delete(&state.pool, id).await?;
    stories_view(
        &state,
        principal.owner(),
        &headers,
        StoryFormState::default(),
        StatusCode::OK,
    )
    .await
}

/// A frame as the strip shows it.
struct StripFrame {
    id: i64,
    position: i64,
    number: i64,
    caption: String,
    status: String,
    status_label: &'static str,
    seed: String,
    timing: String,
    image_url: Option<String>,
    /// The attention maps of the image, `data-attention-url` of its toggle.
    attention_url: String,
    /// How many attention maps the image has.
    attention_count: i64,
    /// Changes whenever the image does, so the heatmap URLs the strip's script builds from
    /// the list are fresh after a redraw.
    version: String,
    /// How many drawn versions the frame's history keeps.
    versions: i64,
    /// An earlier frame changed since this image was drawn (and it is not being redrawn).
    older_context: bool,
}

/// A message at the top of the strip, read out by screen readers (`role=status`), or
/// `role=alert` for a refused action.
#[derive(Default)]
pub struct StripNotice {
    /// The sentence.
    pub text: String,
    /// Whether it says something went wrong.
    pub error: bool,
}

/// The read-only frames strip of a story (`frames_strip.html`).
#[derive(Template)]
#[template(path = "frames_strip.html")]
struct FramesStrip {
    story_id: i64,
    frames: Vec<StripFrame>,
    /// Some frame is queued or running: the strip polls until none is.
    busy: bool,
    /// Frames with a ready image (GIF and PDF exports need one).
    ready_count: usize,
    notice: StripNotice,
    /// Numbers of the frames drawn from an older context ("3, 4 and 5"), empty for none.
    older_numbers: String,
    /// Position "Redraw the rest" starts at: the first frame drawn from an older context.
    older_from: i64,
}

/// "3", "3 and 4", "3, 4 and 5".
fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

fn status_label(status: &str) -> &'static str {
    match status {
        "pending" => "Not generated",
        "queued" => "Queued",
        "running" => "Generating",
        "ready" => "Ready",
        "stale" => "Out of date: caption changed",
        "failed" => "Failed",
        _ => "Unknown",
    }
}

/// Renders the frames strip of a story: every frame in order with its image (when there is
/// one), caption, seed, generation time and status, plus the export links. The story page
/// embeds it and `GET /ui/stories/{id}/frames` serves it alone, which is how HTMX refreshes
/// it (on a `frames-changed` event, and every few seconds while frames are being drawn).
pub async fn frames_strip(state: &AppState, story_id: i64) -> ApiResult<String> {
    frames_strip_with(state, story_id, StripNotice::default()).await
}

/// [`frames_strip`] with a message in its live region (what a Redraw button did).
pub async fn frames_strip_with(
    state: &AppState,
    story_id: i64,
    notice: StripNotice,
) -> ApiResult<String> {
    let frames = frame_media::frames(&state.pool, story_id, false).await?;
    let older = frame_versions::older_context(&state.pool, story_id).await?;
    let busy = frames
        .iter()
        .any(|f| matches!(f.status.as_str(), "queued" | "running"));
    let ready_count = frames
        .iter()
        .filter(|f| f.status == "ready" && f.has_image)
        .count();
    let frames: Vec<StripFrame> = frames
        .into_iter()
        .map(|f| StripFrame {
            // The version in the query string changes with each redraw or restore, so the
            // browser cannot keep showing the old image from its cache under the same address.
            image_url: f.has_image.then(|| {
                // Images stored before the history have no version: their seed tells them apart.
                let version = f.version_id.map_or_else(
                    || f.seed.unwrap_or_default().to_string(),
                    |v| format!("v{v}"),
                );
                format!("/api/stories/{story_id}/frames/{}/image?v={version}", f.id)
            }),
            attention_url: format!("/api/stories/{story_id}/frames/{}/attention", f.id),
            attention_count: f.attention_count,
            version: f.version_id.unwrap_or_default().to_string(),
            versions: f.version_count,
            older_context: older.get(&f.id).copied().unwrap_or(false)
                && !matches!(f.status.as_str(), "queued" | "running"),
            id: f.id,
            position: f.position,
            number: f.position + 1,
            status_label: status_label(&f.status),
            status: f.status,
            seed: f
                .seed
                .map(|s| s.to_string())
                .unwrap_or_else(|| "none".into()),
            timing: f
                .duration_ms
                .map(|ms| format!("{:.1} s", ms as f64 / 1000.0))
                .unwrap_or_else(|| "none".into()),
            caption: f.caption,
        })
        .collect();
    let older_numbers: Vec<String> = frames
        .iter()
        .filter(|f| f.older_context)
        .map(|f| f.number.to_string())
        .collect();
    let older_from = frames
        .iter()
        .find(|f| f.older_context)
        .map(|f| f.position)
        .unwrap_or_default();
    FramesStrip {
        story_id,
        frames,
        busy,
        ready_count,
        notice,
        older_numbers: and_list(&older_numbers),
        older_from,
    }
    .render()
    .map_err(ApiError::internal)
}
