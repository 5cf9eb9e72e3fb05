//! The OpenAPI 3 document, generated from the handlers' annotations, and a readable HTML
//! rendering of it at `/docs` that needs no JavaScript or network access.

use askama::Template;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::OpenApi;

use super::{characters, events, export, health, jobs, mentions, starter_cast, stories};
use crate::error::ApiError;

/// The API description.
#[derive(OpenApi)]
#[openapi(
    info(title = "storygpt-v", description = "Illustrate co-referential stories with consistent characters (StoryGPT-V). Errors are RFC 9457 problem documents with a stable `code`."),
    paths(
        health::healthz, health::readyz,
        characters::create, characters::list, characters::get_one, characters::update,
        characters::delete, characters::portrait, starter_cast::add,
        starter_cast::list, starter_cast::portrait,
        stories::create, stories::list, stories::get_one, stories::update, stories::delete,
        stories::insert_frame, stories::edit_frame, stories::delete_frame, stories::reorder,
        stories::frame_image, stories::frame_attention, stories::frame_attention_map,
        mentions::find,
        export::zip, export::gif, export::pdf,
        jobs::generate, jobs::get_one, jobs::list, jobs::cancel,
        events::job_events, events::story_events,
    ),
    tags(
        (name = "characters", description = "The character library"),
        (name = "stories", description = "Stories and their captions"),
        (name = "exports", description = "Downloads of a story: ZIP, animated GIF, printable PDF"),
        (name = "jobs", description = "Generation jobs and their live progress (server-sent events)"),
        (name = "model", description = "The loaded model: the characters it was trained on"),
        (name = "health", description = "Probes"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct OperationView {
    method: &'static str,
    path: String,
    summary: String,
    description: String,
    responses: Vec<(String, String)>,
    request: Vec<String>,
}

#[derive(Template)]
#[template(path = "api_docs.html")]
struct DocsPage {
    title: String,
    description: String,
    operations: Vec<OperationView>,
}

fn view(method: &'static str, path: &str, op: &Operation) -> OperationView {
    let responses = op
        .responses
        .responses
        .iter()
        .map(|(code, r)| {
            let text = match r {
                utoipa::openapi::RefOr::T(resp) => resp.description.clone(),
                utoipa::openapi::RefOr::Ref(r) => r.ref_location.clone(),
            };
            (code.clone(), text)
        })
        .collect();
    let request = op
        .request_body
        .as_ref()
        .map(|b| b.content.keys().cloned().collect())
        .unwrap_or_default();
    OperationView {
        method,
        path: path.to_string(),
        summary: op.summary.clone().unwrap_or_default(),
        description: op.description.clone().unwrap_or_default(),
        responses,
        request,
    }
}

/// `GET /docs`: every operation with its request types and responses.
pub async fn page() -> Response {
    let doc = ApiDoc::openapi();
    let mut operations = Vec::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            (HttpMethod::Get, "GET", &item.get),
            (HttpMethod::Post, "POST", &item.post),
            (HttpMethod::Put, "PUT", &item.put),
            (HttpMethod::Patch, "PATCH", &item.patch),
            (HttpMethod::Delete, "DELETE", &item.delete),
        ];
        for (_, name, op) in methods {
            if let Some(op) = op {
                operations.push(view(name, path, op));
            }
        }
    }
    let page = DocsPage {
        title: doc.info.title.clone(),
        description: doc.info.description.clone().unwrap_or_default(),
        operations,
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}
