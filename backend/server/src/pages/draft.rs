//! The new-story form while it is typed: each caption against the limits (characters, CLIP
//! tokens), and the library characters its captions name, which the form offers as the cast.

use askama::Template;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use models::clip::ClipTokenizer;

use super::parse_story_form;
use super::story::{limit_notes, Note};
use crate::error::{ApiError, ApiResult};
use crate::mentions::{self, CastMember, SpanKind};
use crate::store::characters::{self, Character};
use crate::validate::MAX_CAPTIONS;
use crate::AppState;

pub(super) fn router() -> Router<AppState> {
    Router::new().route("/ui/stories/draft", post(draft_notes))
}

/// The notes under the new-story captions (`story_draft.html`).
#[derive(Template)]
#[template(path = "story_draft.html")]
struct DraftNotes {
    notes: Vec<Note>,
    /// Ids of the library characters the captions name, comma-separated, for studio.js to
    /// tick (boxes the user has touched are left alone).
    named_ids: String,
}

/// The non-empty lines of the captions box, as the form handler reads them.
pub(super) fn caption_lines(captions: &str) -> Vec<String> {
    captions
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The library characters that `captions` name, in library order.
pub(super) async fn named_characters(
    captions: &[String],
    library: &[Character],
) -> ApiResult<Vec<i64>> {
    let cast: Vec<CastMember> = library
        .iter()
        .map(|c| CastMember {
            name: c.name.clone(),
            pronoun: c.pronoun,
        })
        .collect();
    let analysed = mentions::analyse_off_thread(captions.to_vec(), cast).await?;
    let mut named = vec![false; library.len()];
    for span in analysed.iter().flatten() {
        if let SpanKind::Character { cast_index, .. } = span.kind {
            named[cast_index] = true;
        }
    }
    Ok(library
        .iter()
        .zip(named)
        .filter(|(_, n)| *n)
        .map(|(c, _)| c.id)
        .collect())
}

/// The draft's notes as HTML, for the form's first render and for the live endpoint.
pub(super) async fn notes_html(
    captions: &str,
    library: &[Character],
    tokenizer: &ClipTokenizer,
) -> ApiResult<String> {
    let lines = caption_lines(captions);
    let mut notes = Vec::new();
    if lines.len() > MAX_CAPTIONS {
        notes.push(Note {
            class: "invalid",
            text: format!(
                "{} captions; a story has at most {MAX_CAPTIONS}.",
                lines.len()
            ),
        });
    }
    for (i, line) in lines.iter().enumerate() {
        for note in limit_notes(line, tokenizer) {
            // Only what needs attention: a meter per line would drown the list.
            if note.class != "meter" {
                notes.push(Note {
                    class: note.class,
                    text: format!("Caption {}: {}", i + 1, note.text),
                });
            }
        }
    }
    let named = named_characters(&lines, library).await?;
    if !named.is_empty() {
        let names: Vec<&str> = library
            .iter()
            .filter(|c| named.contains(&c.id))
            .map(|c| c.name.as_str())
            .collect();
        notes.push(Note {
            class: "meter",
            text: format!("Named in the captions: {}.", names.join(", ")),
        });
    }
    DraftNotes {
        notes,
        named_ids: named
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(","),
    }
    .render()
    .map_err(ApiError::internal)
}

/// `POST /ui/stories/draft`: the notes for the new-story form as typed (HTMX swaps them in).
async fn draft_notes(
    State(state): State<AppState>,
    principal: crate::auth::Principal,
    body: Bytes,
) -> ApiResult<Response> {
    let form = parse_story_form(&body);
    let library = characters::all(&state.pool, principal.owner()).await?;
    let html = notes_html(&form.captions, &library, &state.worker.tokenizer).await?;
    Ok((
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Html(html),
    )
        .into_response())
}
