//! End-to-end tests of the JSON API: every endpoint over real HTTP against the real binary,
//! including each kind of bad input, which must be refused clearly and change nothing.

#[macro_use]
mod common;

use common::{
    character_form, create_character, encode, get_json, http, jpeg_with_exif_orientation, png,
    png_claiming, test_image, Backend, Server,
};
use image::ImageFormat;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The API's problem documents also carry their status and a type URL named by the code.
async fn problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    let body = common::problem(response, status, code).await;
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(body["type"], format!("/problems/{code}"));
    body
}

async fn count(server: &Server, what: &str) -> usize {
    let body = get_json(server, &format!("/api/{what}?limit=200")).await;
    body["items"].as_array().unwrap().len()
}

async fn character_lifecycle_over_http(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = http();

    let response = http
        .post(server.at("/api/characters"))
        .multipart(character_form("Fred", "he", png(8, 6), "fred.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let fred: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/api/characters/{}", fred["id"]));
    assert_eq!(fred["name"], "Fred");
    assert_eq!(fred["pronoun"], "he");
    assert_eq!(fred["portrait"]["width"], 8);
    assert_eq!(fred["portrait"]["height"], 6);
    assert_eq!(fred["portrait"]["mime"], "image/png");

    let got: Value = get_json(&server, &location).await;
    assert_eq!(got, fred);

    // The portrait comes back with its type, an ETag, and 304 when unchanged.
    let portrait_url = server.at(fred["portrait"]["url"].as_str().unwrap());
    let response = http.get(&portrait_url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let etag = response.headers()["etag"].to_str().unwrap().to_string();
    let bytes = response.bytes().await.unwrap();
    let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
    assert_eq!(decoded, test_image(8, 6));
    let response = http
        .get(&portrait_url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // PATCH with JSON renames and changes the pronoun; the portrait stays.
    let patched: Value = http
        .patch(server.at(&location))
        .json(&json!({"name": "Frederick", "pronoun": "they"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(patched["name"], "Frederick");
    assert_eq!(patched["pronoun"], "they");
    assert_eq!(patched["portrait"]["width"], 8);

    // PATCH with a multipart form replaces the portrait; the ETag changes.
    let form = reqwest::multipart::Form::new().part(
        "portrait",
        reqwest::multipart::Part::bytes(png(3, 5)).file_name("new.png"),
    );
    let response = http
        .patch(server.at(&location))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let patched: Value = response.json().await.unwrap();
    assert_eq!(
        (
            patched["portrait"]["width"].as_i64(),
            patched["portrait"]["height"].as_i64()
        ),
        (Some(3), Some(5))
    );
    assert_eq!(patched["name"], "Frederick");
    let response = http
        .get(&portrait_url)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "old ETag must not match a new portrait"
    );

    // DELETE, then everything about it is 404.
    let response = http.delete(server.at(&location)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    problem(
        http.get(server.at(&location)).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        http.get(&portrait_url).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        http.delete(server.at(&location)).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

async fn jpeg_and_webp_portraits_are_normalised(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = http();

    // EXIF orientation 6 (rotate 90° clockwise): a 4x2 photo is stored as 2x4, EXIF gone.
    let jpeg = jpeg_with_exif_orientation(4, 2, 6);
    assert!(jpeg.windows(9).any(|w| w == b"SecretCam"));
    let response = http
        .post(server.at("/api/characters"))
        .multipart(character_form("Wilma", "she", jpeg, "wilma.jpg"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let wilma: Value = response.json().await.unwrap();
    assert_eq!(
        (
            wilma["portrait"]["width"].as_i64(),
            wilma["portrait"]["height"].as_i64()
        ),
        (Some(2), Some(4))
    );
    assert_eq!(wilma["portrait"]["mime"], "image/jpeg");
    let stored = http
        .get(server.at(wilma["portrait"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(stored.headers()["content-type"], "image/jpeg");
    let stored = stored.bytes().await.unwrap();
    assert!(
        !stored.windows(4).any(|w| w == b"Exif"),
        "EXIF metadata must be stripped"
    );
    assert!(!stored.windows(9).any(|w| w == b"SecretCam"));
    assert_eq!(image::load_from_memory(&stored).unwrap().width(), 2);

    // A WebP (lossless) is accepted and stored as PNG with the same pixels.
    let webp = encode(&test_image(5, 4), ImageFormat::WebP);
    let response = http
        .post(server.at("/api/characters"))
        .multipart(character_form("Betty", "she", webp, "betty.webp"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let betty: Value = response.json().await.unwrap();
    assert_eq!(betty["portrait"]["mime"], "image/png");
    let stored = http
        .get(server.at(betty["portrait"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(
        image::load_from_memory(&stored).unwrap().to_rgb8(),
        test_image(5, 4)
    );
}

async fn bad_character_input_is_refused_and_changes_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = http();
    let fred = create_character(&server, "Fred", "he").await;
    let fred_url = server.at(&format!("/api/characters/{}", fred["id"]));

    let post = |form| {
        http.post(server.at("/api/characters"))
            .multipart(form)
            .send()
    };
    let text = b"just some text, not an image".to_vec();
    problem(
        post(character_form("A", "he", text, "a.png"))
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_image_type",
    )
    .await;
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    problem(
        post(character_form("A", "he", gif, "a.gif")).await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_image_type",
    )
    .await;
    let mut truncated = png(32, 32);
    truncated.truncate(60);
    problem(
        post(character_form("A", "he", truncated, "a.png"))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_image",
    )
    .await;
    problem(
        post(character_form("A", "he", png(4097, 2), "a.png"))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "image_too_large",
    )
    .await;
    problem(
        post(character_form(
            "A",
            "he",
            png_claiming(60_000, 60_000),
            "a.png",
        ))
        .await
        .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "image_too_large",
    )
    .await;
    let mut huge = png(1, 1);
    huge.resize(11 * 1024 * 1024, 0);
    problem(
        post(character_form("A", "he", huge, "a.png"))
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    let mut just_over = png(1, 1);
    just_over.resize(10 * 1024 * 1024 + 1, 0);
    problem(
        post(character_form("A", "he", just_over, "a.png"))
            .await
            .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    problem(
        post(character_form("  ", "he", png(2, 2), "a.png"))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
    )
    .await;
    problem(
        post(character_form(&"n".repeat(65), "he", png(2, 2), "a.png"))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
    )
    .await;
    problem(
        post(character_form("A", "xe", png(2, 2), "a.png"))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_pronoun",
    )
    .await;
    problem(
        post(character_form("fred", "he", png(2, 2), "a.png"))
            .await
            .unwrap(),
        StatusCode::CONFLICT,
        "name_taken",
    )
    .await;
    let no_portrait = reqwest::multipart::Form::new()
        .text("name", "A")
        .text("pronoun", "he");
    problem(
        post(no_portrait).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_portrait",
    )
    .await;
    let response = http
        .post(server.at("/api/characters"))
        .json(&json!({"name": "A"}))
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    // PATCH refusals.
    let patch = |body: &'static str| {
        http.patch(&fred_url)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    problem(
        patch("{\"name\": ").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_json",
    )
    .await;
    problem(
        patch("{\"name\": 7}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
    problem(
        patch("{\"pronoun\": \"zz\"}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
    problem(
        patch("{\"name\": \"\"}").await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
    )
    .await;
    let form = reqwest::multipart::Form::new().part(
        "portrait",
        reqwest::multipart::Part::bytes(b"nope".to_vec()),
    );
    problem(
        http.patch(&fred_url).multipart(form).send().await.unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_image_type",
    )
    .await;

    // Unknown and malformed ids.
    for path in [
        "/api/characters/9999",
        "/api/characters/abc",
        "/api/characters/9999/portrait",
    ] {
        problem(
            http.get(server.at(path)).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    problem(
        http.patch(server.at("/api/characters/9999"))
            .json(&json!({"name": "X"}))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        http.get(server.at("/api/characters?cursor=bogus"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_cursor",
    )
    .await;
    problem(
        http.get(server.at("/api/characters?limit=0"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_limit",
    )
    .await;
    problem(
        http.get(server.at("/api/characters?limit=x"))
            .send()
            .await
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_query",
    )
    .await;
    problem(
        http.get(server.at("/api/nothing-here"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "no_route",
    )
    .await;

    // Nothing changed.
    assert_eq!(count(&server, "characters").await, 1);
    let still: Value = http
        .get(&fred_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(still, fred);
}

async fn characters_paginate_with_cursors(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let names = ["Fred", "Wilma", "Barney", "Betty", "Dino"];
    for name in names {
        create_character(&server, name, "he").await;
    }
    let mut seen = Vec::new();
    let mut url = server.at("/api/characters?limit=2");
    let mut pages = 0;
    loop {
        let page: Value = http().get(&url).send().await.unwrap().json().await.unwrap();
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => url = server.at(&format!("/api/characters?limit=2&cursor={cursor}")),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, names);
}

async fn story_lifecycle_and_caption_editing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = http();
    let fred = create_character(&server, "Fred", "he").await;
    let wilma = create_character(&server, "Wilma", "she").await;

    let response = http
        .post(server.at("/api/stories"))
        .json(&json!({
            "title": "At the door",
            "captions": ["Fred opens the door.", "He waves at Wilma.", "They laugh."],
            "character_ids": [fred["id"], wilma["id"]],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let story: Value = response.json().await.unwrap();
    let url = server.at(&location);
    assert_eq!(story["title"], "At the door");
    assert_eq!(story["character_ids"], json!([fred["id"], wilma["id"]]));
    let frames = story["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[1]["caption"], "He waves at Wilma.");
    assert_eq!(frames[1]["position"], 1);
    assert_eq!(frames[1]["status"], "pending");
    assert!(frames[1]["image_url"].is_null());
    let ids: Vec<i64> = frames.iter().map(|f| f["id"].as_i64().unwrap()).collect();

    let listed: Value = get_json(&server, "/api/stories").await;
    assert_eq!(listed["items"][0]["frame_count"], 3);
    assert!(listed["next_cursor"].is_null());

    // Insert in the middle: later frames move down.
    let response = http
        .post(format!("{url}/frames"))
        .json(&json!({"caption": "Dino barks.", "position": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let story: Value = response.json().await.unwrap();
    let captions: Vec<&str> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["caption"].as_str().unwrap())
        .collect();
    assert_eq!(
        captions,
        [
            "Fred opens the door.",
            "Dino barks.",
            "He waves at Wilma.",
            "They laugh."
        ]
    );
    let dino = story["frames"][1]["id"].as_i64().unwrap();

    // Append without a position.
    let story: Value = http
        .post(format!("{url}/frames"))
        .json(&json!({"caption": "The end."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(story["frames"][4]["caption"], "The end.");
    let end = story["frames"][4]["id"].as_i64().unwrap();

    // Edit a caption.
    let story: Value = http
        .patch(format!("{url}/frames/{}", ids[2]))
        .json(&json!({"caption": "They laugh together."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(story["frames"][3]["caption"], "They laugh together.");

    // Reorder: reverse.
    let order = vec![end, ids[2], ids[1], dino, ids[0]];
    let story: Value = http
        .put(format!("{url}/frames/order"))
        .json(&json!({"frame_ids": order}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let got: Vec<i64> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_i64().unwrap())
        .collect();
    assert_eq!(got, order);
    let positions: Vec<i64> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, [0, 1, 2, 3, 4]);

    // Delete a frame: positions close up.
    let story: Value = http
        .delete(format!("{url}/frames/{dino}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let positions: Vec<i64> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, [0, 1, 2, 3]);
    assert!(story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["id"] != dino));

    // No image yet.
    problem(
        http.get(format!("{url}/frames/{end}/image"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "no_image",
    )
    .await;

    // PATCH title and cast.
    let story: Value = http
        .patch(&url)
        .json(&json!({"title": "Doorstep", "character_ids": [wilma["id"]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(story["title"], "Doorstep");
    assert_eq!(story["character_ids"], json!([wilma["id"]]));

    // Deleting a character removes it from casts, not the story.
    http.delete(server.at(&format!("/api/characters/{}", wilma["id"])))
        .send()
        .await
        .unwrap();
    let story: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(story["character_ids"], json!([]));
    assert_eq!(story["frames"].as_array().unwrap().len(), 4);

    // Delete the story.
    assert_eq!(
        http.delete(&url).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    problem(
        http.get(&url).send().await.unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(count(&server, "stories").await, 0);
}

async fn bad_story_input_is_refused_and_changes_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = http();
    let create = |body: Value| http.post(server.at("/api/stories")).json(&body).send();

    problem(
        create(json!({"title": "", "captions": ["a"]}))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_title",
    )
    .await;
    problem(
        create(json!({"title": "T", "captions": [" "]}))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_caption",
    )
    .await;
    problem(
        create(json!({"title": "T", "captions": ["x".repeat(1001)]}))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_caption",
    )
    .await;
    let many: Vec<String> = (0..201).map(|i| format!("Caption {i}.")).collect();
    problem(
        create(json!({"title": "T", "captions": many}))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_many_captions",
    )
    .await;
    problem(
        create(json!({"title": "T", "captions": ["a"], "character_ids": [42]}))
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_character",
    )
    .await;
    problem(
        create(json!({"title": 5})).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
    problem(
        create(json!({"title": "T", "extra": 1})).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;
    let response = http
        .post(server.at("/api/stories"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_json").await;
    let response = http
        .post(server.at("/api/stories"))
        .body("title=T")
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    // Its own client: the server closes a connection whose body it did not read.
    let response = common::http()
        .post(server.at("/api/stories"))
        .json(&json!({"title": "x".repeat(3 * 1024 * 1024)}))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
    assert_eq!(
        count(&server, "stories").await,
        0,
        "a refused story must not be half-created"
    );

    // Exactly 200 captions is fine; the 201st insert is refused.
    let max: Vec<String> = (0..200).map(|i| format!("Caption {i}.")).collect();
    let story: Value = create(json!({"title": "Long", "captions": max}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let url = server.at(&format!("/api/stories/{}", story["id"]));
    let frames = story["frames"].as_array().unwrap().clone();
    problem(
        http.post(format!("{url}/frames"))
            .json(&json!({"caption": "one more"}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "too_many_captions",
    )
    .await;

    let small: Value = create(json!({"title": "Small", "captions": ["a", "b"]}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let small_url = server.at(&format!("/api/stories/{}", small["id"]));
    let a = small["frames"][0]["id"].as_i64().unwrap();
    let b = small["frames"][1]["id"].as_i64().unwrap();
    problem(
        http.post(format!("{small_url}/frames"))
            .json(&json!({"caption": "c", "position": 5}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_position",
    )
    .await;
    problem(
        http.post(format!("{small_url}/frames"))
            .json(&json!({"caption": ""}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_caption",
    )
    .await;
    problem(
        http.patch(format!("{small_url}/frames/{a}"))
            .json(&json!({"caption": ""}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_caption",
    )
    .await;
    // A frame of another story is not found through this story.
    let other = frames[0]["id"].as_i64().unwrap();
    problem(
        http.patch(format!("{small_url}/frames/{other}"))
            .json(&json!({"caption": "x"}))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        http.delete(format!("{small_url}/frames/{other}"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    for order in [
        json!([a]),
        json!([a, a]),
        json!([a, b, other]),
        json!([b, 99999]),
    ] {
        problem(
            http.put(format!("{small_url}/frames/order"))
                .json(&json!({"frame_ids": order}))
                .send()
                .await
                .unwrap(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_order",
        )
        .await;
    }
    problem(
        http.patch(&small_url)
            .json(&json!({"character_ids": [777]}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_character",
    )
    .await;
    problem(
        http.patch(&small_url)
            .json(&json!({"title": "x".repeat(201)}))
            .send()
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_title",
    )
    .await;
    for path in ["/api/stories/424242", "/api/stories/-1", "/api/stories/x"] {
        problem(
            http.get(server.at(path)).send().await.unwrap(),
            StatusCode::NOT_FOUND,
            "not_found",
        )
        .await;
    }
    problem(
        http.post(server.at("/api/stories/424242/frames"))
            .json(&json!({"caption": "x"}))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    problem(
        http.delete(server.at("/api/stories/424242"))
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // Nothing changed.
    let again: Value = http
        .get(&small_url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["frames"], small["frames"]);
    assert_eq!(again["title"], "Small");
    let long: Value = http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(long["frames"].as_array().unwrap().len(), 200);
}

async fn openapi_document_describes_every_endpoint(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let doc = get_json(&server, "/openapi.json").await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    let expected = [
        ("/api/characters", vec!["get", "post"]),
        ("/api/characters/{id}", vec!["get", "patch", "delete"]),
        ("/api/characters/{id}/portrait", vec!["get"]),
        ("/api/stories", vec!["get", "post"]),
        ("/api/stories/{id}", vec!["get", "patch", "delete"]),
        ("/api/stories/{id}/frames", vec!["post"]),
        ("/api/stories/{id}/frames/order", vec!["put"]),
        (
            "/api/stories/{id}/frames/{frame_id}",
            vec!["patch", "delete"],
        ),
        ("/api/stories/{id}/frames/{frame_id}/image", vec!["get"]),
        ("/healthz", vec!["get"]),
        ("/readyz", vec!["get"]),
    ];
    for (path, methods) in expected {
        for method in methods {
            assert!(
                paths[path][method].is_object(),
                "{method} {path} missing from the OpenAPI document"
            );
        }
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["schemas"]["Character"].is_object());

    // An empty body is a valid generate request, so the document must not call it required.
    let generate = &paths["/api/stories/{id}/generate"]["post"]["requestBody"];
    assert!(generate.is_object());
    assert_ne!(generate["required"], true, "{generate}");
    // Every JSON request body comes with an example a client can start from.
    for (path, item) in paths {
        for (method, op) in item.as_object().unwrap() {
            let Some(json_body) = op["requestBody"]["content"].get("application/json") else {
                continue;
            };
            let name = json_body["schema"]["$ref"]
                .as_str()
                .or_else(|| json_body["schema"]["oneOf"][1]["$ref"].as_str())
                .and_then(|r| r.rsplit('/').next())
                .unwrap_or_else(|| panic!("{method} {path}: {json_body}"));
            let schema = &doc["components"]["schemas"][name];
            assert!(
                schema.get("example").is_some() || schema.get("examples").is_some(),
                "{method} {path}: schema {name} has no example"
            );
        }
    }

    let docs = http().get(server.at("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), StatusCode::OK);
    let html = docs.text().await.unwrap();
    assert!(html.contains("/api/stories/{id}/frames/order"));
    assert!(html.contains("PATCH"));
    // Request schemas (fields with their types and meanings) and examples are on the page.
    assert!(
        html.contains("(<code>GenerateRequest</code>), optional"),
        "the generate body is shown as optional"
    );
    assert!(html.contains("(<code>NewStory</code>), required"));
    assert!(html.contains("<code>guidance_scale</code>"));
    assert!(html.contains("Classifier-free guidance scale, 1..=30"));
    assert!(
        html.contains("&quot;guidance_scale&quot;: 4.0")
            || html.contains("&#34;guidance_scale&#34;: 4.0")
    );
    assert!(html.contains("<code>Idempotency-Key (header)</code>"));
}

on_both_stores!(
    character_lifecycle_over_http,
    jpeg_and_webp_portraits_are_normalised,
    bad_character_input_is_refused_and_changes_nothing,
    characters_paginate_with_cursors,
    story_lifecycle_and_caption_editing,
    bad_story_input_is_refused_and_changes_nothing,
    openapi_document_describes_every_endpoint,
);
