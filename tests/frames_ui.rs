//! End-to-end tests of the frames strip's per-frame features against the real binary and a
//! real (random toy) model bundle: the cross-attention heatmaps stored with each frame (API,
//! replaced on redraw, kept on a caption edit, deleted with the frame), and the strip's
//! "Redraw" route with and without HTMX, including its refusals.

#[macro_use]
mod common;

use common::{
    character_form, create_character_from, create_story, generate_job, get_ok, get_png, get_text,
    http, no_redirects, png, wait_job, Backend, Server,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn problem(response: reqwest::Response, status: StatusCode) {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

/// A character with a 24x24 portrait; returns its id.
async fn character(server: &Server, name: &str, pronoun: &str) -> i64 {
    create_character_from(server, character_form(name, pronoun, png(24, 24), "p.png")).await["id"]
        .as_i64()
        .unwrap()
}

/// A story titled "Strip"; returns its id.
async fn story(server: &Server, captions: &[&str], cast: &[i64]) -> i64 {
    create_story(server, "Strip", captions, cast).await["id"]
        .as_i64()
        .unwrap()
}

/// The story's jobs, oldest first.
async fn jobs_of(server: &Server, story: i64) -> Vec<Value> {
    get_ok(server, &format!("/api/jobs?story_id={story}")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

/// Each heatmap of a frame: (text, characters, PNG bytes), checking each decodes as a grey
/// image the size of the frame.
async fn heatmaps(server: &Server, story: i64, frame: &Value) -> Vec<(String, Value, Vec<u8>)> {
    let id = frame["id"].as_i64().unwrap();
    let list = get_ok(
        server,
        &format!("/api/stories/{story}/frames/{id}/attention"),
    )
    .await;
    let drawn =
        image::load_from_memory(&get_png(server, frame["image_url"].as_str().unwrap()).await)
            .unwrap();
    let mut out = Vec::new();
    for (k, entry) in list.as_array().unwrap().iter().enumerate() {
        let url = entry["image_url"].as_str().unwrap();
        assert_eq!(
            url,
            format!("/api/stories/{story}/frames/{id}/attention/{k}")
        );
        let png = get_png(server, url).await;
        let map = image::load_from_memory(&png).unwrap();
        assert_eq!(map.color(), image::ColorType::L8, "a grey heatmap");
        assert_eq!((map.width(), map.height()), (drawn.width(), drawn.height()));
        out.push((
            entry["text"].as_str().unwrap().to_string(),
            entry["characters"].clone(),
            png,
        ));
    }
    out
}

async fn frames(server: &Server, story: i64) -> Vec<Value> {
    get_ok(server, &format!("/api/stories/{story}")).await["frames"]
        .as_array()
        .unwrap()
        .clone()
}

async fn attention_rows(server: &Server, frame: i64) -> i64 {
    let mut conn = server.db().await;
    sqlx::query_scalar("SELECT COUNT(*) FROM frame_attention WHERE frame_id = $1")
        .bind(frame)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

/// Presses a frame's Redraw button: with HTMX, or as a plain form post whose redirect is
/// returned rather than followed.
async fn press_redraw(
    server: &Server,
    story: i64,
    position: usize,
    htmx: bool,
) -> reqwest::Response {
    let url = server.at(&format!("/ui/stories/{story}/frames/{position}/regenerate"));
    let request = if htmx {
        http().post(url).header("hx-request", "true")
    } else {
        no_redirects().post(url)
    };
    request.send().await.unwrap()
}

async fn heatmaps_follow_the_image_and_redraw_changes_only_its_frame(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    // One waiting job at most, so the test can fill the queue on purpose.
    let server = Server::start_on(backend, dir.path(), &["--queue-capacity", "1"]);
    let tom = character(&server, "Tom", "he").await;
    let mia = character(&server, "Mia", "she").await;
    let id = story(
        &server,
        &["Tom meets Mia.", "He waves.", "Mia laughs."],
        &[tom, mia],
    )
    .await;
    let job = generate_job(&server, id, json!({"steps": 2, "seed": 7})).await;
    wait_job(&server, job, "succeeded").await;
    let before = frames(&server, id).await;
    let mut before_images = Vec::new();
    for frame in &before {
        before_images.push(get_png(&server, frame["image_url"].as_str().unwrap()).await);
    }

    // One map per mention, in caption order; the pronoun resolves to the earlier caption's
    // character of its gender.
    let first = heatmaps(&server, id, &before[0]).await;
    let summary: Vec<(&str, &Value)> = first.iter().map(|(t, c, _)| (t.as_str(), c)).collect();
    assert_eq!(
        summary,
        vec![("Tom", &json!(["Tom"])), ("Mia", &json!(["Mia"]))]
    );
    let second = heatmaps(&server, id, &before[1]).await;
    let summary: Vec<(&str, &Value)> = second.iter().map(|(t, c, _)| (t.as_str(), c)).collect();
    assert_eq!(summary, vec![("He", &json!(["Tom"]))]);

    // Heatmaps are cached like frame images.
    let map_url = format!("/api/stories/{id}/frames/{}/attention/0", before[1]["id"]);
    let response = http().get(server.at(&map_url)).send().await.unwrap();
    assert_eq!(response.headers()["cache-control"], "private, no-cache");
    let etag = response.headers()["etag"].clone();
    let response = http()
        .get(server.at(&map_url))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // Unknown story, frame (or a frame of another story) and map: 404 problem documents.
    let other = story(&server, &["Nobody here."], &[]).await;
    let other_frame = frames(&server, other).await[0]["id"].as_i64().unwrap();
    let frame1 = before[1]["id"].as_i64().unwrap();
    for path in [
        format!("/api/stories/999999/frames/{frame1}/attention"),
        format!("/api/stories/{id}/frames/999999/attention"),
        format!("/api/stories/{id}/frames/{other_frame}/attention"),
        format!("/api/stories/{id}/frames/{frame1}/attention/1"),
        format!("/api/stories/{id}/frames/{frame1}/attention/x"),
        format!("/api/stories/{id}/frames/999999/attention/0"),
    ] {
        let response = http().get(server.at(&path)).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND).await;
    }
    // A frame never drawn has no maps yet.
    assert_eq!(
        get_ok(
            &server,
            &format!("/api/stories/{other}/frames/{other_frame}/attention")
        )
        .await,
        json!([])
    );

    // The strip offers Redraw and the heatmap toggle on every drawn frame.
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    for (position, n) in [(0, 1), (1, 2), (2, 3)] {
        assert!(strip.contains(&format!("id=\"regenerate-{position}\"")));
        assert!(strip.contains(&format!("aria-label=\"Redraw frame {n}\"")));
        assert!(strip.contains(&format!("id=\"redraw-seed-{position}\" name=\"seed\"")));
        assert!(strip.contains(&format!("id=\"attention-{position}\"")));
    }
    assert!(strip.contains(">Where characters are</button>"));
    let script = http()
        .get(server.at("/static/frames.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(script.headers()["content-type"], "text/javascript");

    // Editing a caption keeps the maps: they describe the image, which is still there.
    let response = http()
        .patch(server.at(&format!("/api/stories/{id}/frames/{frame1}")))
        .json(&json!({"caption": "He runs to Mia."}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(heatmaps(&server, id, &before[1]).await, second);

    // Redraw frame 2 with HTMX while another job holds the worker, so the answer is certain
    // to show the frame waiting: the strip polls, and the generate panel is told.
    let blocker_story = story(&server, &["Tom sleeps."], &[tom]).await;
    let blocker = generate_job(&server, blocker_story, json!({"steps": 200})).await;
    wait_job(&server, blocker, "running").await;
    let response = press_redraw(&server, id, 1, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    let trigger = response.headers()["hx-trigger"]
        .to_str()
        .unwrap()
        .to_string();
    let trigger: Value = serde_json::from_str(&trigger).unwrap();
    assert_eq!(trigger["jobs-changed"]["target"], "body");
    let strip = response.text().await.unwrap();
    assert!(strip.starts_with("<section id=\"frames-strip\""), "{strip}");
    assert!(strip.contains("every 3s"), "a busy strip polls: {strip}");
    assert!(strip.contains("Frame 2 will be redrawn with seed"));
    let redraw = jobs_of(&server, id).await.last().unwrap().clone();
    assert_eq!(redraw["frames"].as_array().unwrap().len(), 1, "{redraw}");
    assert_eq!(redraw["frames"][0]["position"], 1);

    // The queue (capacity 1) is now full: the strip says so instead of redrawing, under
    // HTMX as a 422 it swaps in, without it as the story page with 429 and Retry-After.
    let response = press_redraw(&server, id, 2, true).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response.headers().get("hx-trigger").is_none());
    let strip = response.text().await.unwrap();
    assert!(strip.contains("role=\"alert\""), "{strip}");
    assert!(
        strip.contains("Frame 3 was not redrawn: The generation queue is full"),
        "{strip}"
    );
    let response = press_redraw(&server, id, 2, false).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "10");
    let page = response.text().await.unwrap();
    assert!(page.contains("<h1 id=\"story-title\">Strip</h1>"));
    assert!(page.contains("Frame 3 was not redrawn"));

    let cancel = http()
        .post(server.at(&format!("/api/jobs/{blocker}/cancel")))
        .send()
        .await
        .unwrap();
    assert!(cancel.status().is_success());
    wait_job(&server, redraw["id"].as_i64().unwrap(), "succeeded").await;

    // Only frame 2 changed: a new seed, a new image, and new maps, drawn from the caption as
    // it is now (which names Mia too).
    let after = frames(&server, id).await;
    for k in [0, 2] {
        assert_eq!(after[k]["seed"], before[k]["seed"]);
        assert_eq!(
            get_png(&server, after[k]["image_url"].as_str().unwrap()).await,
            before_images[k]
        );
    }
    assert_eq!(after[1]["seed"], redraw["frames"][0]["seed"]);
    assert_ne!(after[1]["seed"], before[1]["seed"]);
    assert_eq!(after[1]["status"], "ready");
    assert_ne!(
        get_png(&server, after[1]["image_url"].as_str().unwrap()).await,
        before_images[1]
    );
    let redrawn = heatmaps(&server, id, &after[1]).await;
    let summary: Vec<(&str, &Value)> = redrawn.iter().map(|(t, c, _)| (t.as_str(), c)).collect();
    assert_eq!(
        summary,
        vec![("He", &json!(["Tom"])), ("Mia", &json!(["Mia"]))]
    );
    assert_ne!(redrawn[0].2, second[0].2, "the map of the new image");

    // Without HTMX: a 303 back to the frame, and the job draws just that frame.
    let response = press_redraw(&server, id, 2, false).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()["location"],
        format!("/stories/{id}#frame-2").as_str()
    );
    let redraw = jobs_of(&server, id).await.last().unwrap().clone();
    assert_eq!(redraw["frames"].as_array().unwrap().len(), 1);
    assert_eq!(redraw["frames"][0]["position"], 2);
    wait_job(&server, redraw["id"].as_i64().unwrap(), "succeeded").await;
    let last = frames(&server, id).await;
    assert_eq!(last[2]["seed"], redraw["frames"][0]["seed"]);
    assert_ne!(
        get_png(&server, last[2]["image_url"].as_str().unwrap()).await,
        before_images[2]
    );
    assert_eq!(last[0]["seed"], before[0]["seed"]);
    assert_eq!(last[1]["seed"], after[1]["seed"]);

    // A seed of one's own for one frame: redrawing frame 3 with its current seed gives back
    // the same image; a malformed seed is refused in the strip.
    let same_seed = last[2]["seed"].as_i64().unwrap().to_string();
    let drawn = get_png(&server, last[2]["image_url"].as_str().unwrap()).await;
    let response = no_redirects()
        .post(server.at(&format!("/ui/stories/{id}/frames/2/regenerate")))
        .form(&[("seed", same_seed.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let seeded = jobs_of(&server, id).await.last().unwrap().clone();
    assert_eq!(seeded["frames"][0]["seed"].to_string(), same_seed);
    wait_job(&server, seeded["id"].as_i64().unwrap(), "succeeded").await;
    let again = frames(&server, id).await;
    assert_eq!(
        get_png(&server, again[2]["image_url"].as_str().unwrap()).await,
        drawn,
        "the same seed draws the same frame"
    );
    let response = http()
        .post(server.at(&format!("/ui/stories/{id}/frames/2/regenerate")))
        .header("hx-request", "true")
        .form(&[("seed", "abc")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("The seed must be a whole number"));

    // Deleting a frame deletes its maps with it.
    let frame2 = last[2]["id"].as_i64().unwrap();
    assert_eq!(attention_rows(&server, frame2).await, 1);
    let response = http()
        .delete(server.at(&format!("/api/stories/{id}/frames/{frame2}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(attention_rows(&server, frame2).await, 0);
}

async fn a_redraw_without_its_context_is_refused_in_the_strip(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &["--capture-attention", "false"]);
    let fred = character(&server, "Fred", "he").await;
    let id = story(&server, &["Fred opens the door.", "He waves."], &[fred]).await;

    // Frame 2 looks at frame 1, which has no image: nothing is queued, and the strip says why.
    let response = press_redraw(&server, id, 1, true).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let strip = response.text().await.unwrap();
    assert!(strip.contains("Frame 2 was not redrawn:"), "{strip}");
    let response = press_redraw(&server, id, 1, false).await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("Frame 2 was not redrawn:"));
    assert!(jobs_of(&server, id).await.is_empty());
    // An unknown story has no strip to answer with: the studio's error page (issue #18: a
    // form route's errors are HTML, not problem documents).
    let response = press_redraw(&server, 999_999, 0, false).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("Story 999999 does not exist."));

    // With capture turned off, frames are drawn without maps.
    let job = generate_job(&server, id, json!({"steps": 1})).await;
    wait_job(&server, job, "succeeded").await;
    let drawn = frames(&server, id).await;
    assert!(heatmaps(&server, id, &drawn[0]).await.is_empty());
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    assert!(strip.contains("data-attention-count=\"0\""));

    // Both endpoints are in the API description.
    let doc = get_ok(&server, "/openapi.json").await;
    for path in [
        "/api/stories/{id}/frames/{frame_id}/attention",
        "/api/stories/{id}/frames/{frame_id}/attention/{k}",
    ] {
        assert!(doc["paths"][path]["get"].is_object(), "{path}");
    }
}

/// The versions of a frame, newest first.
async fn versions(server: &Server, story: i64, frame: i64) -> Vec<Value> {
    get_ok(
        server,
        &format!("/api/stories/{story}/frames/{frame}/versions"),
    )
    .await
    .as_array()
    .unwrap()
    .clone()
}

fn flags(frames: &[Value]) -> Vec<bool> {
    frames
        .iter()
        .map(|f| f["older_context"].as_bool().unwrap())
        .collect()
}

async fn frame_history_keeps_every_version_restores_one_and_marks_the_frames_after_it(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let tom = character(&server, "Tom", "he").await;
    let id = story(&server, &["Tom walks.", "He waves.", "Tom sits."], &[tom]).await;
    let job = generate_job(&server, id, json!({"steps": 2, "seed": 7})).await;
    wait_job(&server, job, "succeeded").await;
    let first = frames(&server, id).await;
    assert_eq!(flags(&first), [false, false, false]);
    assert!(first.iter().all(|f| f["versions"] == 1));
    let f0 = first[0]["id"].as_i64().unwrap();
    let old_image = get_png(&server, first[0]["image_url"].as_str().unwrap()).await;
    let old_maps = heatmaps(&server, id, &first[0]).await;

    // Redrawing frame 1 keeps its first image as a version, and marks frames 2 and 3, which
    // the model drew while looking at the old frame 1.
    let job = generate_job(
        &server,
        id,
        json!({"frames": [{"position": 0, "seed": 99}], "steps": 3, "guidance_scale": 2.5}),
    )
    .await;
    wait_job(&server, job, "succeeded").await;
    let after = frames(&server, id).await;
    assert_eq!(flags(&after), [false, true, true]);
    assert_eq!(after[0]["versions"], 2);
    let list = versions(&server, id, f0).await;
    assert_eq!(list.len(), 2);
    assert_eq!(
        (
            list[0]["current"].clone(),
            list[0]["seed"].clone(),
            list[0]["job_id"].clone()
        ),
        (json!(true), json!(99), json!(job))
    );
    assert_eq!(list[0]["options"]["steps"], 3);
    assert_eq!(list[0]["options"]["guidance_scale"], 2.5);
    assert_eq!(after[0]["version_id"], list[0]["id"]);
    assert_eq!(
        (list[1]["current"].clone(), list[1]["seed"].clone()),
        (json!(false), json!(7))
    );
    assert_eq!(list[1]["options"]["steps"], 2);
    assert_eq!(list[1]["caption"], "Tom walks.");
    let old_version = list[1]["id"].as_i64().unwrap();
    let new_version = list[0]["id"].as_i64().unwrap();
    assert_eq!(
        get_png(&server, list[1]["image_url"].as_str().unwrap()).await,
        old_image
    );
    assert_ne!(
        get_png(&server, list[0]["image_url"].as_str().unwrap()).await,
        old_image
    );

    // The strip says so, with "Redraw the rest" from frame 2, and links every frame's history.
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    assert!(
        strip.contains("Frames 2 and 3 were drawn from an older"),
        "{strip}"
    );
    assert!(strip.contains(&format!("action=\"/ui/stories/{id}/frames/1/redraw-rest\"")));
    assert!(strip.contains("id=\"older-context-1\"") && strip.contains("id=\"older-context-2\""));
    assert!(!strip.contains("id=\"older-context-0\""));
    assert!(strip.contains(&format!("href=\"/stories/{id}/frames/{f0}/history\"")));
    assert!(strip.contains("History (2)"));
    let page = get_text(&server, &format!("/stories/{id}/frames/{f0}/history")).await;
    assert!(page.contains("History of frame 1"));
    assert!(page.contains(&format!("id=\"restore-{old_version}\"")));
    assert!(
        !page.contains(&format!("id=\"restore-{new_version}\"")),
        "the current one"
    );
    assert!(page.contains("3 steps, guidance 2.5, pndm"));

    // While a job of the story waits or runs, the history stays as it is.
    let busy = generate_job(&server, id, json!({"steps": 200})).await;
    let response = http()
        .post(server.at(&format!(
            "/api/stories/{id}/frames/{f0}/versions/{old_version}/restore"
        )))
        .send()
        .await
        .unwrap();
    common::problem(response, StatusCode::CONFLICT, "story_busy").await;
    let response = no_redirects()
        .post(server.at(&format!(
            "/ui/stories/{id}/frames/{f0}/versions/{old_version}/restore"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert!(response
        .text()
        .await
        .unwrap()
        .contains("The version was not restored: Job"));
    http()
        .post(server.at(&format!("/api/jobs/{busy}/cancel")))
        .send()
        .await
        .unwrap();
    wait_job(&server, busy, "cancelled").await;
    // The cancelled job may have redrawn frames: put frame 1's history back to two versions
    // to look at (a version it drew is the newest).
    let list = versions(&server, id, f0).await;
    let current = list.iter().find(|v| v["current"] == true).unwrap()["id"].clone();

    // Restoring the first version (a plain form) brings back its image, seed and heatmaps, and
    // frames 2 and 3 are no longer out of date if they were drawn from it.
    let response = no_redirects()
        .post(server.at(&format!(
            "/ui/stories/{id}/frames/{f0}/versions/{old_version}/restore"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()["location"],
        format!("/stories/{id}#frame-0")
    );
    let restored = frames(&server, id).await;
    assert_eq!(restored[0]["seed"], 7);
    assert_eq!(restored[0]["version_id"], old_version);
    assert_eq!(restored[0]["status"], "ready");
    assert_eq!(
        get_png(&server, restored[0]["image_url"].as_str().unwrap()).await,
        old_image
    );
    assert_eq!(heatmaps(&server, id, &restored[0]).await, old_maps);
    let untouched = restored[1]["versions"] == 1 && restored[2]["versions"] == 1;
    if untouched {
        assert_eq!(flags(&restored), [false, false, false]);
    }

    // The current version cannot be deleted; another can.
    let response = http()
        .delete(server.at(&format!(
            "/api/stories/{id}/frames/{f0}/versions/{old_version}"
        )))
        .send()
        .await
        .unwrap();
    common::problem(response, StatusCode::CONFLICT, "current_version").await;
    let count = versions(&server, id, f0).await.len();
    let response = http()
        .delete(server.at(&format!("/api/stories/{id}/frames/{f0}/versions/{current}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(versions(&server, id, f0).await.len(), count - 1);
    for path in [
        format!("/api/stories/{id}/frames/{f0}/versions/{current}/image"),
        format!("/api/stories/{id}/frames/{f0}/versions/999999/image"),
        format!("/api/stories/{id}/frames/999999/versions"),
        format!("/api/stories/999999/frames/{f0}/versions"),
    ] {
        let response = http().get(server.at(&path)).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND).await;
    }

    // Redraw frame 1 again, then "Redraw the rest" (a plain form): frames 2 and 3 are drawn
    // again with their own seeds, from the new frame 1, and nothing is out of date.
    let job = generate_job(
        &server,
        id,
        json!({"frames": [{"position": 0, "seed": 5}], "steps": 2}),
    )
    .await;
    wait_job(&server, job, "succeeded").await;
    let before_rest = frames(&server, id).await;
    assert_eq!(flags(&before_rest), [false, true, true]);
    let response = no_redirects()
        .post(server.at(&format!("/ui/stories/{id}/frames/1/redraw-rest")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let rest = jobs_of(&server, id).await.last().unwrap().clone();
    let drawn: Vec<(i64, i64)> = rest["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["position"].as_i64().unwrap(), f["seed"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        drawn,
        [
            (1, before_rest[1]["seed"].as_i64().unwrap()),
            (2, before_rest[2]["seed"].as_i64().unwrap())
        ]
    );
    wait_job(&server, rest["id"].as_i64().unwrap(), "succeeded").await;
    let done = frames(&server, id).await;
    assert_eq!(flags(&done), [false, false, false]);
    assert_eq!(
        done[1]["versions"].as_i64().unwrap(),
        before_rest[1]["versions"].as_i64().unwrap() + 1
    );
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    assert!(!strip.contains("id=\"older-context\""));

    // Inserting a caption before frame 3 leaves frame 3 drawn without it: marked.
    let response = http()
        .post(server.at(&format!("/api/stories/{id}/frames")))
        .json(&json!({"caption": "Tom jumps.", "position": 2}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    assert_eq!(
        flags(&frames(&server, id).await),
        [false, false, false, true]
    );
}

on_both_stores!(
    heatmaps_follow_the_image_and_redraw_changes_only_its_frame,
    a_redraw_without_its_context_is_refused_in_the_strip,
    frame_history_keeps_every_version_restores_one_and_marks_the_frames_after_it,
);
