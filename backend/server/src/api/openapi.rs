//! The OpenAPI 3 document, generated from the handlers' annotations, and a readable HTML
//! rendering of it at `/docs` that needs no JavaScript or network access.

use askama::Template;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::Value;
use utoipa::openapi::path::HttpMethod;
use utoipa::openapi::Required;
use utoipa::{Modify, OpenApi};

use super::{
    account, characters, events, export, frame_versions, health, jobs, mentions, starter_cast,
    stories,
};
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
        stories::create, stories::import, stories::list, stories::get_one, stories::update, stories::delete,
        stories::insert_frame, stories::edit_frame, stories::delete_frame, stories::reorder,
        stories::frame_image, stories::frame_attention, stories::frame_attention_map,
        frame_versions::list, frame_versions::image, frame_versions::restore, frame_versions::delete,
        mentions::find,
        export::zip, export::gif, export::pdf,
        jobs::generate, jobs::get_one, jobs::list, jobs::cancel,
        events::job_events, events::story_events,
        account::me, account::tokens, account::create_token, account::revoke_token,
        account::users, account::add_user, account::workers,
    ),
    tags(
        (name = "characters", description = "The character library"),
        (name = "stories", description = "Stories and their captions"),
        (name = "exports", description = "Downloads of a story: ZIP, animated GIF, printable PDF"),
        (name = "jobs", description = "Generation jobs and their live progress (server-sent events)"),
        (name = "model", description = "The loaded model: the characters it was trained on"),
        (name = "health", description = "Probes"),
        (name = "accounts", description = "The signed-in user, API tokens and (admins) users; with `--auth on`"),
    ),
    modifiers(&OptionalBodies)
)]
pub struct ApiDoc;

/// Operations whose handler accepts an empty body. utoipa marks every body of a non-`Option`
/// type required, and `Option<T>` would turn the schema into `oneOf [null, T]`.
const OPTIONAL_BODIES: [(&str, HttpMethod); 1] = [("/api/stories/{id}/generate", HttpMethod::Post)];

struct OptionalBodies;

impl Modify for OptionalBodies {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, method) in OPTIONAL_BODIES {
            let Some(item) = doc.paths.paths.get_mut(path) else {
                continue;
            };
            let op = match method {
                HttpMethod::Post => item.post.as_mut(),
                HttpMethod::Put => item.put.as_mut(),
                HttpMethod::Patch => item.patch.as_mut(),
                _ => None,
            };
            if let Some(body) = op.and_then(|op| op.request_body.as_mut()) {
                body.required = Some(Required::False);
            }
        }
    }
}

/// `GET /openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// One field of a request body or one parameter, as the docs page lists it.
struct FieldView {
    name: String,
    kind: String,
    required: bool,
    description: String,
}

/// A request body in one media type: its fields and an example.
struct BodyView {
    media_type: String,
    schema_name: String,
    required: bool,
    description: String,
    fields: Vec<FieldView>,
    example: String,
}

struct OperationView {
    method: &'static str,
    path: String,
    summary: String,
    description: String,
    parameters: Vec<FieldView>,
    bodies: Vec<BodyView>,
    responses: Vec<(String, String)>,
}

#[derive(Template)]
#[template(path = "api_docs.html")]
struct DocsPage {
    title: String,
    description: String,
    operations: Vec<OperationView>,
}

/// The schema `schema` points to when it is a `$ref` into the components, else itself.
fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.strip_prefix("#/components/schemas/"))
        .and_then(|name| doc.pointer(&format!("/components/schemas/{name}")))
        .unwrap_or(schema)
}

fn ref_name(schema: &Value) -> Option<&str> {
    schema
        .get("$ref")
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit('/').next())
}

/// A short type for people: `integer`, `string (binary)`, `array of FrameChoice`, `Pronoun`.
fn type_label(schema: &Value) -> String {
    if let Some(name) = ref_name(schema) {
        return name.to_string();
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(options) = schema.get(key).and_then(Value::as_array) {
            let labels: Vec<String> = options
                .iter()
                .map(type_label)
                .filter(|l| l != "null")
                .collect();
            return labels.join(" or ");
        }
    }
    let kinds: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => Vec::new(),
    };
    let mut label = kinds.join(" or ");
    if kinds == ["array"] {
        if let Some(items) = schema.get("items") {
            label = format!("array of {}", type_label(items));
        }
    }
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        let names: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
        label = format!("one of {}", names.join(", "));
    }
    if let Some(format) = schema.get("format").and_then(Value::as_str) {
        label = format!("{label} ({format})");
    }
    if label.is_empty() {
        "any".into()
    } else {
        label
    }
}

fn text(value: Option<&Value>) -> String {
    value
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn fields_of(doc: &Value, schema: &Value) -> Vec<FieldView> {
    let schema = resolve(doc, schema);
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return Vec::new();
    };
    properties
        .iter()
        .map(|(name, property)| FieldView {
            name: name.clone(),
            kind: type_label(property),
            required: required.contains(&name.as_str()),
            // A field whose type is a named schema carries its description there.
            description: [property, resolve(doc, property)]
                .iter()
                .map(|p| text(p.get("description")))
                .find(|d| !d.is_empty())
                .unwrap_or_default(),
        })
        .collect()
}

/// The example a schema or media type carries (`example`, or the first of `examples`).
fn example_of(values: &[&Value]) -> String {
    values
        .iter()
        .find_map(|v| {
            v.get("example").or_else(|| {
                v.get("examples")
                    .and_then(Value::as_array)
                    .and_then(|e| e.first())
            })
        })
        .and_then(|e| serde_json::to_string_pretty(e).ok())
        .unwrap_or_default()
}

fn body_views(doc: &Value, body: &Value) -> Vec<BodyView> {
    let required = body.get("required").and_then(Value::as_bool) == Some(true);
    let description = text(body.get("description"));
    let Some(content) = body.get("content").and_then(Value::as_object) else {
        return Vec::new();
    };
    content
        .iter()
        .map(|(media_type, media)| {
            let schema = media.get("schema").unwrap_or(&Value::Null);
            let resolved = resolve(doc, schema);
            BodyView {
                media_type: media_type.clone(),
                schema_name: ref_name(schema).unwrap_or_default().to_string(),
                required,
                description: description.clone(),
                fields: fields_of(doc, schema),
                example: example_of(&[media, schema, resolved]),
            }
        })
        .collect()
}

fn parameter_views(op: &Value) -> Vec<FieldView> {
    op.get("parameters")
        .and_then(Value::as_array)
        .map(|params| {
            params
                .iter()
                .map(|p| FieldView {
                    name: format!("{} ({})", text(p.get("name")), text(p.get("in"))),
                    kind: p.get("schema").map(type_label).unwrap_or_default(),
                    required: p.get("required").and_then(Value::as_bool) == Some(true),
                    description: text(p.get("description")),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn view(doc: &Value, method: &'static str, path: &str, op: &Value) -> OperationView {
    let responses = op
        .get("responses")
        .and_then(Value::as_object)
        .map(|all| {
            all.iter()
                .map(|(code, r)| (code.clone(), text(r.get("description"))))
                .collect()
        })
        .unwrap_or_default();
    OperationView {
        method,
        path: path.to_string(),
        summary: text(op.get("summary")),
        description: text(op.get("description")),
        parameters: parameter_views(op),
        bodies: op
            .get("requestBody")
            .map(|b| body_views(doc, b))
            .unwrap_or_default(),
        responses,
    }
}

/// `GET /docs`: every operation with its parameters, request bodies (fields and an example)
/// and responses, read from the same document as `/openapi.json`.
pub async fn page() -> Response {
    let doc = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(doc) => doc,
        Err(e) => return ApiError::internal(e).into_response(),
    };
    let mut operations = Vec::new();
    if let Some(paths) = doc.get("paths").and_then(Value::as_object) {
        for (path, item) in paths {
            for (key, name) in [
                ("get", "GET"),
                ("post", "POST"),
                ("put", "PUT"),
                ("patch", "PATCH"),
                ("delete", "DELETE"),
            ] {
                if let Some(op) = item.get(key) {
                    operations.push(view(&doc, name, path, op));
                }
            }
        }
    }
    let page = DocsPage {
        title: text(doc.pointer("/info/title")),
        description: text(doc.pointer("/info/description")),
        operations,
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}
