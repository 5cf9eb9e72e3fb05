//! The story page: title and cast, the caption editor (add, edit, move up/down, delete) with
//! live highlights of who each caption names or refers to, the read-only frames strip, the
//! export links, and an empty `#generate-panel` the generation controls will fill.

use askama::Template;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use super::{form_field, frames_strip, is_htmx, render, sentence, COLOURS};
use crate::api::ApiPath;
use crate::error::{ApiError, ApiResult};
use crate::mentions::{self, CastMember, Span, SpanKind};
use crate::store::characters::{self, Character};
use crate::store::stories::{self, Story};
use crate::validate::{self, MAX_CAPTION_CHARS};
use crate::AppState;
use models::clip::ClipTokenizer;

pub(super) fn router() -> Router<AppState> {
    Router::new()
        .route("/stories/{id}", get(story_page))
        .route(
            "/ui/stories/{id}/frames",
            get(strip_fragment).post(add_caption),
        )
        .route("/ui/stories/{id}/captions", get(captions_fragment))
        .route("/ui/stories/{id}/details", post(save_details))
        .route("/ui/stories/{id}/highlight", post(highlight))
        .route("/ui/stories/{id}/frames/{frame_id}", post(edit_caption))
        .route(
            "/ui/stories/{id}/frames/{frame_id}/move",
            post(move_caption),
        )
        .route(
            "/ui/stories/{id}/frames/{frame_id}/delete",
            post(delete_caption),
        )
}

/// One highlighted piece of a caption.
struct Mark {
    class: String,
    title: String,
    /// Colour class of the chip before a name (`c0`..), empty for none.
    chip: String,
    /// Small text after the span: "→ Fred" for a pronoun, "?" for an unknown name.
    label: String,
}

struct Segment {
    text: String,
    mark: Option<Mark>,
}

/// A sentence about a mention, for screen readers and for anyone who prefers words to colours.
pub(super) struct Note {
    pub(super) class: &'static str,
    pub(super) text: String,
}

/// The highlight of one caption (`highlight.html`).
#[derive(Template)]
#[template(path = "highlight.html")]
struct HighlightFragment {
    segments: Vec<Segment>,
    notes: Vec<Note>,
}

fn colour(index: usize) -> String {
    format!("c{}", index % COLOURS)
}

fn names(indices: &[usize], cast: &[CastMember], joiner: &str) -> String {
    let names: Vec<&str> = indices.iter().map(|&i| cast[i].name.as_str()).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} {joiner} {last}", rest.join(", ")),
    }
}

/// Renders a caption with its mentions marked. `library` is every character, so an unknown
/// name that is in the library but not in the story's cast can say so.
fn highlight_html(
    text: &str,
    spans: &[Span],
    cast: &[CastMember],
    library: &[Character],
    limits: Vec<Note>,
) -> String {
    let mut segments = Vec::new();
    let mut notes = Vec::new();
    let mut at = 0;
    for span in spans {
        if span.byte_start < at {
            continue;
        }
        if span.byte_start > at {
            segments.push(Segment {
                text: text[at..span.byte_start].to_string(),
                mark: None,
            });
        }
        let quoted = format!("\u{201c}{}\u{201d}", span.text);
        let mark = match &span.kind {
            SpanKind::Character { cast_index, .. } => {
                let c = &cast[*cast_index];
                Mark {
                    class: format!("mention character {}", colour(*cast_index)),
                    title: format!("{} ({})", c.name, c.pronoun.as_str()),
                    chip: colour(*cast_index),
                    label: String::new(),
                }
            }
            SpanKind::Pronoun {
                pronoun,
                refers_to,
                ambiguous,
                ..
            } => match refers_to.as_slice() {
                [] => {
                    notes.push(Note {
                        class: "unresolved",
                        text: format!(
                            "{quoted}: no character before it goes by {}.",
                            pronoun.as_str()
                        ),
                    });
                    Mark {
                        class: "mention pronoun unresolved".into(),
                        title: format!("no character before it goes by {}", pronoun.as_str()),
                        chip: String::new(),
                        label: "\u{2192} ?".into(),
                    }
                }
                [one] => {
                    notes.push(Note {
                        class: "resolved",
                        text: format!("{quoted} refers to {}.", cast[*one].name),
                    });
                    Mark {
                        class: format!("mention pronoun {}", colour(*one)),
                        title: format!("refers to {}", cast[*one].name),
                        chip: String::new(),
                        label: format!("\u{2192} {}", cast[*one].name),
                    }
                }
                many if *ambiguous => {
                    let who = names(many, cast, "or");
                    notes.push(Note {
                        class: "ambiguous",
                        text: format!("{quoted} is ambiguous: it could be {who}."),
                    });
                    Mark {
                        class: "mention pronoun ambiguous".into(),
                        title: format!("ambiguous: {who}"),
                        chip: String::new(),
                        label: format!("\u{2192} {who}?"),
                    }
                }
                many => {
                    let who = names(many, cast, "and");
                    notes.push(Note {
                        class: "resolved",
                        text: format!("{quoted} refers to {who}."),
                    });
                    Mark {
                        class: "mention pronoun group".into(),
                        title: format!("refers to {who}"),
                        chip: String::new(),
                        label: format!("\u{2192} {who}"),
                    }
                }
            },
            SpanKind::Unknown => {
                let in_library = library.iter().any(|c| {
                    data::rules::normalise_name(&c.name) == data::rules::normalise_name(&span.text)
                });
                notes.push(Note {
                    class: "unknown",
                    text: if in_library {
                        format!(
                            "{quoted}: unknown character in this story. It is in your library; \
                             add it to the cast to use it."
                        )
                    } else {
                        format!(
                            "{quoted}: unknown character. It looks like a name, but no character \
                             of this story has it."
                        )
                    },
                });
                Mark {
                    class: "mention unknown".into(),
                    title: "unknown character".into(),
                    chip: String::new(),
                    label: "?".into(),
                }
            }
        };
        segments.push(Segment {
            text: span.text.clone(),
            mark: Some(mark),
        });
        at = span.byte_end;
    }
    if at < text.len() {
        segments.push(Segment {
            text: text[at..].to_string(),
            mark: None,
        });
    }
    notes.splice(0..0, limits);
    HighlightFragment { segments, notes }
        .render()
        .unwrap_or_default()
}

/// A character offered in the story's cast checkboxes.
struct CastOption {
    id: i64,
    name: String,
    pronoun: &'static str,
    checked: bool,
    /// Colour class when in the cast.
    colour: String,
}

/// A cast member in the story page's legend.
struct CastEntry {
    name: String,
    pronoun: &'static str,
    colour: String,
    portrait_url: String,
}

/// A caption in the editor.
struct CaptionItem {
    id: i64,
    number: usize,
    text: String,
    error: String,
    highlight_html: String,
    first: bool,
    last: bool,
}

/// Everything the story page and its fragments show.
struct StoryView {
    id: i64,
    title: String,
    title_value: String,
    details_error: String,
    cast_options: Vec<CastOption>,
    /// The cast with their colours and portraits, for the legend.
    legend: Vec<CastEntry>,
    items: Vec<CaptionItem>,
    new_text: String,
    new_position: String,
    new_error: String,
    new_highlight_html: String,
    status: String,
    strip_html: String,
    panel_html: String,
}

#[derive(Template)]
#[template(path = "story.html")]
struct StoryPage {
    view: StoryView,
}

#[derive(Template)]
#[template(path = "story_body.html")]
struct StoryBody {
    view: StoryView,
}

#[derive(Template)]
#[template(path = "captions_editor.html")]
struct CaptionsEditor {
    view: StoryView,
}

/// What a refused form or a finished action changes in the page.
#[derive(Default)]
struct StoryInput {
    status: String,
    /// A refused caption edit: frame id, the text typed, the message.
    edit: Option<(i64, String, String)>,
    /// A refused new caption: text, position, message.
    new_caption: Option<(String, String, String)>,
    /// A refused title/cast change: title, cast ids, message.
    details: Option<(String, Vec<i64>, String)>,
    /// A message for the generate panel (a refused generation without HTMX).
    panel_message: String,
}

fn story_cast(story: &Story, library: &[Character]) -> Vec<CastMember> {
    story
        .character_ids
        .iter()
        .filter_map(|id| library.iter().find(|c| c.id == *id))
        .map(|c| CastMember {
            name: c.name.clone(),
            pronoun: c.pronoun,
        })
        .collect()
}

/// What the limits say about a caption being typed: its length against the 1000 characters
/// a caption may have (a longer one is refused, never cut), and its CLIP tokens against the
/// 77 the text encoder reads (the rest is silently ignored by the model, so say so).
pub(super) fn limit_notes(text: &str, tokenizer: &ClipTokenizer) -> Vec<Note> {
    let chars = text.chars().count();
    let mut notes = Vec::new();
    if chars > MAX_CAPTION_CHARS {
        notes.push(Note {
            class: "invalid",
            text: format!(
                "The caption is {chars} characters long; at most {MAX_CAPTION_CHARS} are \
                 allowed, so it cannot be saved."
            ),
        });
        return notes;
    }
    if text.trim().is_empty() {
        return notes;
    }
    let fit = tokenizer.fit(text);
    // CLIP's count includes its start and end tokens: 77 in all for SD 1.5.
    let (used, most) = (fit.tokens + 2, fit.limit + 2);
    match fit.first_dropped {
        Some(word) => notes.push(Note {
            class: "truncated",
            text: format!(
                "{used} of {most} tokens: the model reads only the first {most}, so it ignores \
                 the caption from \u{201c}{word}\u{201d} on. Shorten it, or split it into two \
                 frames."
            ),
        }),
        None => notes.push(Note {
            class: "meter",
            text: format!("{chars} of {MAX_CAPTION_CHARS} characters, {used} of {most} tokens."),
        }),
    }
    notes
}

async fn story_view(state: &AppState, id: i64, input: StoryInput) -> ApiResult<StoryView> {
    let story = stories::get(&state.pool, id).await?;
    let library = characters::all(&state.pool, stories::owner_of(&state.pool, id).await?).await?;
    let cast = story_cast(&story, &library);
    let mut texts: Vec<String> = story.frames.iter().map(|f| f.caption.clone()).collect();
    if let Some((frame_id, text, _)) = &input.edit {
        if let Some(i) = story.frames.iter().position(|f| f.id == *frame_id) {
            texts[i] = text.clone();
        }
    }
    let analysed = mentions::analyse_off_thread(texts.clone(), cast.clone()).await?;
    let count = story.frames.len();
    let items = story
        .frames
        .iter()
        .zip(texts.iter().zip(analysed))
        .enumerate()
        .map(|(i, (frame, (text, spans)))| CaptionItem {
            id: frame.id,
            number: i + 1,
            text: text.clone(),
            error: match &input.edit {
                Some((fid, _, error)) if *fid == frame.id => error.clone(),
                _ => String::new(),
            },
            highlight_html: highlight_html(
                text,
                &spans,
                &cast,
                &library,
                limit_notes(text, &state.worker.tokenizer),
            ),
            first: i == 0,
            last: i + 1 == count,
        })
        .collect();
    let (new_text, new_position, new_error) = input.new_caption.unwrap_or_default();
    let new_highlight_html = if new_text.trim().is_empty() {
        String::new()
    } else {
        let mut all = texts.clone();
        all.push(new_text.clone());
        let spans = mentions::analyse_off_thread(all, cast.clone())
            .await?
            .pop()
            .unwrap_or_default();
        highlight_html(
            &new_text,
            &spans,
            &cast,
            &library,
            limit_notes(&new_text, &state.worker.tokenizer),
        )
    };
    let (title_value, cast_ids, details_error) = input.details.unwrap_or_else(|| {
        (
            story.title.clone(),
            story.character_ids.clone(),
            String::new(),
        )
    });
    // A refused form shows back the ids it sent, however many: look them up in a set.
    let checked: std::collections::HashSet<i64> = cast_ids.iter().copied().collect();
    let cast_options = library
        .iter()
        .map(|c| CastOption {
            id: c.id,
            name: c.name.clone(),
            pronoun: c.pronoun.as_str(),
            checked: checked.contains(&c.id),
            colour: story
                .character_ids
                .iter()
                .position(|cid| *cid == c.id)
                .map(colour)
                .unwrap_or_default(),
        })
        .collect();
    // The cast in story order with their portraits: what the frames are conditioned on.
    let legend = story
        .character_ids
        .iter()
        .filter_map(|cid| library.iter().find(|c| c.id == *cid))
        .enumerate()
        .map(|(i, c)| CastEntry {
            name: c.name.clone(),
            pronoun: c.pronoun.as_str(),
            colour: colour(i),
            portrait_url: c.portrait.url.clone(),
        })
        .collect();
    Ok(StoryView {
        id,
        title: story.title,
        title_value,
        details_error,
        cast_options,
        legend,
        items,
        new_text,
        new_position,
        new_error,
        new_highlight_html,
        status: input.status,
        strip_html: frames_strip(state, id).await?,
        panel_html: super::generate::panel_html(state, id, &input.panel_message).await?,
    })
}

/// The whole story page with a message in the generate panel (a refused generation request
/// without HTMX), answered with `status`.
pub(super) async fn page_with_panel_message(
    state: &AppState,
    id: i64,
    message: String,
    status: StatusCode,
) -> ApiResult<Response> {
    let view = story_view(
        state,
        id,
        StoryInput {
            panel_message: message,
            ..Default::default()
        },
    )
    .await?;
    Ok(render(StoryPage { view }, status))
}

/// `GET /stories/{id}`; a story that does not exist (deleted, or a mistyped address) gets
/// the HTML error page (404), as every studio address does.
async fn story_page(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let view = story_view(&state, id, StoryInput::default()).await?;
    Ok(render(StoryPage { view }, StatusCode::OK))
}

/// The story page with a message in the frames strip: how a strip action refused without
/// JavaScript answers (`pages::frames`).
pub(super) async fn page_with_strip_notice(
    state: &AppState,
    id: i64,
    notice: super::StripNotice,
    status: StatusCode,
) -> ApiResult<Response> {
    let mut view = story_view(state, id, StoryInput::default()).await?;
    view.strip_html = super::frames_strip_with(state, id, notice).await?;
    Ok(render(StoryPage { view }, status))
}

async fn strip_fragment(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    Ok(Html(frames_strip(&state, id).await?).into_response())
}

/// The caption editor alone: what the page re-reads when a story continuation added a caption.
async fn captions_fragment(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Response> {
    let view = story_view(&state, id, StoryInput::default()).await?;
    Ok(render(CaptionsEditor { view }, StatusCode::OK))
}

/// Which part of the page an action answers with under HTMX.
enum Part {
    /// The caption editor (`#captions-editor`).
    Editor,
    /// Everything below the site header (`#story`): title and cast change all highlights.
    Body,
}

/// Answers a story form: without HTMX a 303 to the page (success) or the page with the
/// messages (refused); with HTMX the changed part, and on success a `frames-changed` event
/// so the strip refreshes.
async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    id: i64,
    input: StoryInput,
    status: StatusCode,
    part: Part,
    anchor: &str,
) -> ApiResult<Response> {
    if !is_htmx(headers) && status.is_success() {
        return Ok(Redirect::to(&format!("/stories/{id}{anchor}")).into_response());
    }
    let view = story_view(state, id, input).await?;
    let mut response = if !is_htmx(headers) {
        render(StoryPage { view }, status)
    } else {
        match part {
            Part::Editor => render(CaptionsEditor { view }, status),
            Part::Body => render(StoryBody { view }, status),
        }
    };
    if status.is_success() {
        response
            .headers_mut()
            .insert("hx-trigger", HeaderValue::from_static("frames-changed"));
    }
    Ok(response)
}

/// Answers with the page (or its `part`) carrying a status message.
async fn say(
    state: &AppState,
    headers: &HeaderMap,
    id: i64,
    message: String,
    status: StatusCode,
    part: Part,
    anchor: &str,
) -> ApiResult<Response> {
    let input = StoryInput {
        status: message,
        ..StoryInput::default()
    };
    respond(state, headers, id, input, status, part, anchor).await
}

/// Answers a form that changed the story, the same way for each form: on success the message
/// that `done` makes (with the anchor to return to without HTMX); when the change was refused
/// for something the user can fix (a 4xx other than 404), a 422 with the form as `refused`
/// fills it back in (typed text and the reason); any other error stays an error.
async fn answer<T>(
    state: &AppState,
    headers: &HeaderMap,
    id: i64,
    part: Part,
    result: ApiResult<T>,
    done: impl FnOnce(T) -> (String, String),
    refused: impl FnOnce(String) -> StoryInput,
) -> ApiResult<Response> {
    match result {
        Ok(value) => {
            let (message, anchor) = done(value);
            say(state, headers, id, message, StatusCode::OK, part, &anchor).await
        }
        Err(e) if e.status.is_client_error() && e.status != StatusCode::NOT_FOUND => {
            let input = refused(sentence(&e.detail));
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            respond(state, headers, id, input, status, part, "").await
        }
        Err(e) => Err(e),
    }
}

fn short(caption: &str) -> String {
    let mut out: String = caption.chars().take(40).collect();
    if caption.chars().count() > 40 {
        out.push('\u{2026}');
    }
    format!("\u{201c}{out}\u{201d}")
}

async fn save_details(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let title_text = form_field(&body, "title").unwrap_or_default();
    let cast: Vec<i64> = form_urlencoded::parse(&body)
        .filter(|(k, _)| k == "character_id")
        .filter_map(|(_, v)| v.parse().ok())
        .collect();
    let result = async {
        let title = validate::title(&title_text)?;
        let cast = validate::cast(&cast)?;
        stories::update(&state.pool, id, Some(&title), Some(&cast)).await
    }
    .await;
    let done = |story: Story| {
        let message = format!("Saved the title and cast of {}.", short(&story.title));
        (message, String::new())
    };
    let refused = |reason| StoryInput {
        details: Some((title_text, cast, reason)),
        ..StoryInput::default()
    };
    answer(&state, &headers, id, Part::Body, result, done, refused).await
}

async fn add_caption(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let text = form_field(&body, "caption").unwrap_or_default();
    let position_text = form_field(&body, "position").unwrap_or_default();
    let result = async {
        let caption = validate::caption(&text)?;
        let position = match position_text.trim() {
            "" => None,
            p => Some(p.parse::<i64>().map_err(|_| {
                ApiError::invalid("invalid_position", format!("{p:?} is not a position"))
            })?),
        };
        stories::insert_frame(&state.pool, id, &caption, position)
            .await
            .map(|story| (story, position))
    }
    .await;
    let done = |(story, position): (Story, Option<i64>)| {
        let index = position.map_or(story.frames.len() - 1, |p| p as usize);
        let frame = &story.frames[index];
        let message = format!("Added caption {}: {}.", index + 1, short(&frame.caption));
        (message, format!("#caption-{}", frame.id))
    };
    let refused = |reason| StoryInput {
        new_caption: Some((text, position_text, reason)),
        ..StoryInput::default()
    };
    answer(&state, &headers, id, Part::Editor, result, done, refused).await
}

async fn edit_caption(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
    body: Bytes,
) -> ApiResult<Response> {
    let text = form_field(&body, "caption").unwrap_or_default();
    let result = async {
        let caption = validate::caption(&text)?;
        stories::edit_caption(&state.pool, id, frame_id, &caption).await
    }
    .await;
    let done = |story: Story| {
        let number = story
            .frames
            .iter()
            .position(|f| f.id == frame_id)
            .map_or(0, |i| i + 1);
        (
            format!("Saved caption {number}."),
            format!("#caption-{frame_id}"),
        )
    };
    let refused = |reason| StoryInput {
        edit: Some((frame_id, text, reason)),
        ..StoryInput::default()
    };
    answer(&state, &headers, id, Part::Editor, result, done, refused).await
}

/// Moves a caption one place up or down. Moving the first caption up (or the last down) is
/// answered with a message and changes nothing: the buttons stay focusable at the ends (they
/// are `aria-disabled`, not `disabled`) so keyboard focus is not lost after a move.
async fn move_caption(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
    body: Bytes,
) -> ApiResult<Response> {
    let direction = form_field(&body, "direction").unwrap_or_default();
    let story = stories::get(&state.pool, id).await?;
    let Some(from) = story.frames.iter().position(|f| f.id == frame_id) else {
        return Err(ApiError::not_found("frame", frame_id));
    };
    let to = match direction.as_str() {
        "up" => from.checked_sub(1),
        "down" => (from + 1 < story.frames.len()).then_some(from + 1),
        other => {
            let message = format!("Cannot move a caption {other:?}: use up or down.");
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            return say(&state, &headers, id, message, status, Part::Editor, "").await;
        }
    };
    let caption = short(&story.frames[from].caption);
    let count = story.frames.len();
    let status = match to {
        None => format!(
            "Caption {} is already {}.",
            from + 1,
            if direction == "up" { "first" } else { "last" }
        ),
        Some(to) => {
            let mut order: Vec<i64> = story.frames.iter().map(|f| f.id).collect();
            order.swap(from, to);
            stories::reorder(&state.pool, id, &order).await?;
            format!(
                "Moved {caption} {direction} to place {} of {count}.",
                to + 1
            )
        }
    };
    let anchor = format!("#caption-{frame_id}");
    say(
        &state,
        &headers,
        id,
        status,
        StatusCode::OK,
        Part::Editor,
        &anchor,
    )
    .await
}

async fn delete_caption(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath((id, frame_id)): ApiPath<(i64, i64)>,
) -> ApiResult<Response> {
    let story = stories::get(&state.pool, id).await?;
    let Some(index) = story.frames.iter().position(|f| f.id == frame_id) else {
        return Err(ApiError::not_found("frame", frame_id));
    };
    stories::delete_frame(&state.pool, id, frame_id).await?;
    let message = format!(
        "Deleted caption {}: {}.",
        index + 1,
        short(&story.frames[index].caption)
    );
    let anchor = "#captions-editor";
    say(
        &state,
        &headers,
        id,
        message,
        StatusCode::OK,
        Part::Editor,
        anchor,
    )
    .await
}

/// `POST /ui/stories/{id}/highlight`: the highlight of a caption being typed, in the context
/// of the story's saved captions before it. Form fields: `caption`, and `frame_id` (editing
/// that frame) or `position` (0-based insert place; empty or absent: the end).
///
/// A caption over the caption limit is refused before any analysis: 422 with a fragment that
/// says how long it is (the page swaps 422 answers in, so the note shows under the box).
async fn highlight(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<i64>,
    body: Bytes,
) -> ApiResult<Response> {
    let text = form_field(&body, "caption").unwrap_or_default();
    let story = stories::get(&state.pool, id).await?;
    let library = characters::all(&state.pool, stories::owner_of(&state.pool, id).await?).await?;
    let cast = story_cast(&story, &library);
    if !mentions::analysable(&text) {
        let html = highlight_html(
            "",
            &[],
            &cast,
            &library,
            limit_notes(&text, &state.worker.tokenizer),
        );
        return Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            Html(html),
        )
            .into_response());
    }
    let before = match form_field(&body, "frame_id").and_then(|f| f.parse::<i64>().ok()) {
        Some(frame_id) => story
            .frames
            .iter()
            .position(|f| f.id == frame_id)
            .unwrap_or(story.frames.len()),
        None => form_field(&body, "position")
            .and_then(|p| p.trim().parse::<usize>().ok())
            .map_or(story.frames.len(), |p| p.min(story.frames.len())),
    };
    let mut captions: Vec<String> = story.frames[..before]
        .iter()
        .map(|f| f.caption.clone())
        .collect();
    captions.push(text.clone());
    let spans = mentions::analyse_off_thread(captions, cast.clone())
        .await?
        .pop()
        .unwrap_or_default();
    let html = highlight_html(
        &text,
        &spans,
        &cast,
        &library,
        limit_notes(&text, &state.worker.tokenizer),
    );
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Html(html),
    )
        .into_response())
}
