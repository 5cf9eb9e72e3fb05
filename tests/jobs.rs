//! End-to-end tests of generation jobs against the real binary and a real (random toy) model
//! bundle: queueing, the worker drawing frames into the store, the SSE streams (order, resume
//! with Last-Event-ID, heartbeats), cancelling, a full queue, and recovery after kill -9.
//!
//! Frames of the toy bundle are 64x64 and take a fraction of a second with a few steps, so
//! most tests ask for 1-3 steps; the tests that need a job to be running for a while (cancel,
//! queue full, crash) ask for many.

#[macro_use]
mod common;

use std::time::Duration;

use common::sse::{names, stored_ids, Event, Stream};
use common::{
    character_form, create_character_from, create_story, get_ok, get_png, http, png, problem,
    wait_job, Backend, Server, PATIENCE,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn start(backend: Backend, dir: &std::path::Path, extra: &[&str]) -> Server {
    Server::start_on(backend, dir, extra)
}

async fn json_of(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

/// A story with these captions whose cast is one character (created on first use).
async fn story(server: &Server, captions: &[&str]) -> i64 {
    let characters = get_ok(server, "/api/characters").await;
    let fred = match characters["items"].as_array().unwrap().first() {
        Some(fred) => fred["id"].as_i64().unwrap(),
        None => {
            let form = character_form("Fred", "he", png(24, 24), "fred.png");
            create_character_from(server, form).await["id"]
                .as_i64()
                .unwrap()
        }
    };
    create_story(server, "Test", captions, &[fred]).await["id"]
        .as_i64()
        .unwrap()
}

async fn post_generate(server: &Server, story: i64, body: Value) -> reqwest::Response {
    http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn cancel(server: &Server, job: i64) -> reqwest::Response {
    http()
        .post(server.at(&format!("/api/jobs/{job}/cancel")))
        .send()
        .await
        .unwrap()
}

/// Queues a job and returns it (checking the 202 and its Location).
async fn generate(server: &Server, story: i64, body: Value) -> Value {
    let response = post_generate(server, story, body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let job = json_of(response).await;
    assert_eq!(location, format!("/api/jobs/{}", job["id"]));
    job
}

async fn a_story_is_drawn_frame_by_frame_with_its_progress_streamed(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let ready = get_ok(&server, "/readyz").await;
    assert_eq!(ready["model"]["trained"], false, "{ready}");
    assert_eq!(ready["model"]["device"], "cpu");
    assert!(ready["model"]["name"]
        .as_str()
        .is_some_and(|n| !n.is_empty()));
    let (width, height) = (
        ready["model"]["width"].as_u64().unwrap() as u32,
        ready["model"]["height"].as_u64().unwrap() as u32,
    );
    let story_id = story(
        &server,
        &["Fred opens the door.", "He waves.", "Fred laughs."],
    )
    .await;

    let job = generate(&server, story_id, json!({"steps": 2, "seed": 7})).await;
    let job_id = job["id"].as_i64().unwrap();
    let seeds: Vec<i64> = job["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["seed"].as_i64().unwrap())
        .collect();
    assert_eq!(seeds, [7, 8, 9], "frame p gets seed + p");
    assert_eq!(job["events_url"], format!("/api/jobs/{job_id}/events"));

    // A viewer follows the job up to its first finished frame, then drops off...
    let events_path = format!("/api/jobs/{job_id}/events");
    let mut first = Stream::open(&server, &events_path, None).await;
    let head = first.until("frame").await;
    drop(first);
    assert_eq!(names(&head)[..2], ["queued", "started"]);
    let resume_at = head.last().unwrap().id.expect("a frame event has an id");
    // ...and comes back with Last-Event-ID: it gets only what came after, to the end.
    let mut second = Stream::open(&server, &events_path, Some(resume_at)).await;
    let tail = second.rest().await;
    assert!(
        stored_ids(&tail).iter().all(|&id| id > resume_at),
        "{tail:?}"
    );
    assert_eq!(names(&tail).iter().filter(|n| **n == "frame").count(), 2);
    assert_eq!(tail.last().unwrap().name, "completed");

    // The whole stored history, replayed after the fact, in order and ending with `completed`.
    let all = Stream::open(&server, &events_path, None).await.rest().await;
    let ids = stored_ids(&all);
    assert_eq!(ids.len(), all.len(), "a replay sends stored events only");
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(names(&all)[..2], ["queued", "started"]);
    assert_eq!(*names(&all).last().unwrap(), "completed");
    let tail_ids: Vec<i64> = ids.iter().copied().filter(|&id| id > resume_at).collect();
    assert_eq!(
        stored_ids(&tail),
        tail_ids,
        "the resumed stream missed nothing"
    );
    let frames: Vec<&Event> = all.iter().filter(|e| e.name == "frame").collect();
    assert_eq!(
        frames
            .iter()
            .map(|e| e.data["position"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    for event in &all {
        assert_eq!(event.data["job_id"], job_id);
        assert_eq!(event.data["story_id"], story_id);
        if event.name == "progress" {
            let p = &event.data;
            assert_eq!(p["frames"], 3);
            assert!(p["frame"].as_u64().unwrap() >= 1 && p["frame"].as_u64().unwrap() <= 3);
            // The steps asked for, not the scheduler's timesteps (PNDM visits one more).
            assert_eq!(p["steps"], 2, "{p}");
            assert!(p["step"].as_u64().unwrap() <= 2);
        }
    }

    let finished = get_ok(&server, &format!("/api/jobs/{job_id}")).await;
    assert_eq!(finished["status"], "succeeded");
    assert_eq!(finished["attempts"], 1);
    assert!(finished["error"].is_null());
    assert!(finished["started_at"].is_string() && finished["finished_at"].is_string());
    assert_eq!(finished["progress"]["frames_done"], 3);

    // Every frame is stored: ready, with its seed and an image of the bundle's size.
    let drawn = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let mut before = Vec::new();
    for (p, frame) in drawn["frames"].as_array().unwrap().iter().enumerate() {
        assert_eq!(frame["status"], "ready", "{frame}");
        assert_eq!(frame["seed"], 7 + p as i64);
        let url = frame["image_url"].as_str().unwrap();
        assert_eq!(frames[p].data["image_url"], url);
        let bytes = get_png(&server, url).await;
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (width, height));
        before.push(bytes);
    }
    // Images are cacheable by content.
    let url = drawn["frames"][0]["image_url"].as_str().unwrap();
    let response = http().get(server.at(url)).send().await.unwrap();
    let etag = response.headers()["etag"].clone();
    let response = http()
        .get(server.at(url))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

    // Redrawing one frame with a given seed changes that frame only.
    let redo = generate(
        &server,
        story_id,
        json!({"frames": [{"position": 1, "seed": 99}], "steps": 2}),
    )
    .await;
    let redo_id = redo["id"].as_i64().unwrap();
    let events = Stream::open(&server, &format!("/api/jobs/{redo_id}/events"), None)
        .await
        .rest()
        .await;
    assert_eq!(names(&events).iter().filter(|n| **n == "frame").count(), 1);
    assert_eq!(*names(&events).last().unwrap(), "completed");
    let redrawn = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let frames_now = redrawn["frames"].as_array().unwrap();
    assert_eq!(frames_now[1]["seed"], 99);
    for (p, frame) in frames_now.iter().enumerate() {
        let bytes = get_png(&server, frame["image_url"].as_str().unwrap()).await;
        assert_eq!(bytes == before[p], p != 1, "frame {p}");
    }

    // Editing a caption makes its image stale; the job keeps the caption it drew.
    let frame_id = frames_now[2]["id"].as_i64().unwrap();
    let edited: Value = json_of(
        http()
            .patch(server.at(&format!("/api/stories/{story_id}/frames/{frame_id}")))
            .json(&json!({"caption": "Fred sits down."}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(edited["frames"][2]["status"], "stale");
    let old = get_ok(&server, &format!("/api/jobs/{job_id}")).await;
    assert_eq!(old["frames"][2]["caption"], "Fred laughs.");

    // A finished job cannot be cancelled.
    let response = cancel(&server, job_id).await;
    problem(response, StatusCode::CONFLICT, "job_finished").await;
}

async fn bad_requests_are_refused_and_idempotency_keys_make_retries_safe(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let story_id = story(&server, &["Fred opens the door.", "He waves."]).await;
    let empty = story(&server, &[]).await;

    let cases = [
        (json!({"steps": 0}), "invalid_steps"),
        (json!({"steps": 201}), "invalid_steps"),
        (json!({"guidance_scale": 0.5}), "invalid_guidance"),
        (json!({"scheduler": "heun"}), "invalid_scheduler"),
        (json!({"frames": [2]}), "unknown_frame"),
        (json!({"frames": [-1]}), "unknown_frame"),
        (json!({"frames": []}), "invalid_frames"),
        (json!({"frames": [0, 0]}), "invalid_frames"),
        (json!({"seed": 9_007_199_254_740_992u64}), "invalid_seed"),
        // Frame 1 is drawn looking at frame 0, which has no image yet.
        (json!({"frames": [1]}), "missing_context"),
        (json!({"stepz": 3}), "invalid_body"),
    ];
    for (body, code) in cases {
        let response = post_generate(&server, story_id, body.clone()).await;
        problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }
    let response = post_generate(&server, empty, json!({})).await;
    problem(response, StatusCode::UNPROCESSABLE_ENTITY, "empty_story").await;
    let response = post_generate(&server, 9999, json!({})).await;
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = http()
        .post(server.at(&format!("/api/stories/{story_id}/generate")))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_json").await;
    let response = http()
        .post(server.at(&format!("/api/stories/{story_id}/generate")))
        .header("content-type", "text/plain")
        .body("steps=3")
        .send()
        .await
        .unwrap();
    problem(
        response,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let response = http()
        .post(server.at(&format!("/api/stories/{story_id}/generate")))
        .header("idempotency-key", "x".repeat(300))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
    assert!(
        get_ok(&server, "/api/jobs").await["items"]
            .as_array()
            .unwrap()
            .is_empty(),
        "a refused request queues nothing"
    );

    // The same key with the same body is the same job, however often it is sent.
    let send = |body: Value| {
        http()
            .post(server.at(&format!("/api/stories/{story_id}/generate")))
            .header("idempotency-key", "retry-me-1")
            .json(&body)
            .send()
    };
    let first = send(json!({"steps": 1})).await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let location = first.headers()["location"].clone();
    let job = json_of(first).await;
    let again = send(json!({"steps": 1})).await.unwrap();
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(json_of(again).await["id"], job["id"]);
    let other = send(json!({"steps": 2})).await.unwrap();
    problem(
        other,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    let listed = get_ok(&server, &format!("/api/jobs?story_id={story_id}")).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);

    // A frame whose predecessor waits in an earlier job may be queued behind it.
    let second = generate(&server, story_id, json!({"frames": [1], "steps": 1})).await;
    wait_job(&server, second["id"].as_i64().unwrap(), "succeeded").await;
    assert_eq!(
        get_ok(&server, &format!("/api/jobs/{}", job["id"])).await["status"],
        "succeeded"
    );
    let listed = get_ok(&server, "/api/jobs?status=succeeded&limit=1").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert!(listed["next_cursor"].is_string());

    for path in [
        "/api/jobs/999999",
        "/api/jobs/abc",
        "/api/jobs/999999/events",
    ] {
        let response = http().get(server.at(path)).send().await.unwrap();
        problem(response, StatusCode::NOT_FOUND, "not_found").await;
    }
    let response = cancel(&server, 999_999).await;
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = http()
        .get(server.at("/api/jobs?status=done"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    let response = http()
        .get(server.at(&format!("/api/stories/{story_id}/events")))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_last_event_id").await;
}

async fn cancelling_a_running_job_stops_it_and_keeps_the_frames_it_drew(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let story_id = story(
        &server,
        &["Fred runs.", "He jumps.", "He falls.", "He laughs."],
    )
    .await;
    let job = generate(&server, story_id, json!({"steps": 40})).await;
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    events.until("frame").await;

    let response = cancel(&server, job_id).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    assert_eq!(json_of(response).await["cancel_requested"], true);
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap().name, "cancelled", "{:?}", names(&rest));

    let cancelled = get_ok(&server, &format!("/api/jobs/{job_id}")).await;
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    let done: Vec<bool> = cancelled["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["status"] == "done")
        .collect();
    let drawn = done.iter().filter(|d| **d).count();
    assert!((1..4).contains(&drawn), "{cancelled}");
    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    for (frame, done) in story["frames"].as_array().unwrap().iter().zip(&done) {
        if *done {
            assert_eq!(frame["status"], "ready");
            get_png(&server, frame["image_url"].as_str().unwrap()).await;
        } else {
            assert_eq!(frame["status"], "pending", "{frame}");
            assert!(frame["image_url"].is_null());
        }
    }
    // Cancelling again is harmless.
    let response = cancel(&server, job_id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["status"], "cancelled");
}

async fn a_full_queue_answers_429_with_retry_after_and_jobs_run_in_order(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--queue-capacity", "2"]);
    let story_id = story(&server, &["Fred waits.", "He waits more."]).await;
    let long = generate(&server, story_id, json!({"steps": 200})).await;
    let long_id = long["id"].as_i64().unwrap();
    wait_job(&server, long_id, "running").await;

    // The story shows which frame is being drawn and which wait.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
        let statuses: Vec<&str> = story["frames"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["status"].as_str().unwrap())
            .collect();
        if statuses == ["running", "queued"] {
            break;
        }
        assert_eq!(statuses, ["queued", "queued"]);
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = generate(&server, story_id, json!({"steps": 1})).await;
    let third = generate(&server, story_id, json!({"steps": 1})).await;
    let response = post_generate(&server, story_id, json!({"steps": 1})).await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0);
    problem(response, StatusCode::TOO_MANY_REQUESTS, "queue_full").await;
    let ready = get_ok(&server, "/readyz").await;
    assert_eq!(
        ready["queue"],
        json!({"queued": 2, "running": 1, "capacity": 2, "worker_alive": true, "workers": 1})
    );

    // Cancelling a queued job takes effect at once and makes room.
    let second_id = second["id"].as_i64().unwrap();
    let response = cancel(&server, second_id).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json_of(response).await["status"], "cancelled");
    let events = Stream::open(&server, &format!("/api/jobs/{second_id}/events"), None)
        .await
        .rest()
        .await;
    assert_eq!(names(&events), ["queued", "cancelled"]);
    let fourth = generate(&server, story_id, json!({"steps": 1})).await;

    // Stop the long job; the queue then runs the others in order.
    let response = cancel(&server, long_id).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_job(&server, long_id, "cancelled").await;
    let third = wait_job(&server, third["id"].as_i64().unwrap(), "succeeded").await;
    let fourth = wait_job(&server, fourth["id"].as_i64().unwrap(), "succeeded").await;
    assert!(third["finished_at"].as_str() <= fourth["started_at"].as_str());
}

async fn the_story_stream_follows_each_job_of_the_story_and_sends_heartbeats(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--sse-heartbeat-ms", "100"]);
    let story_id = story(&server, &["Fred sleeps."]).await;
    let path = format!("/api/stories/{story_id}/events");
    let mut stream = Stream::open(&server, &path, None).await;
    // A quiet stream carries heartbeats only.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let first = generate(&server, story_id, json!({"steps": 1})).await;
    let second = generate(&server, story_id, json!({"steps": 1})).await;
    let mut seen = Vec::new();
    while seen
        .iter()
        .filter(|e: &&Event| e.name == "completed")
        .count()
        < 2
    {
        seen.push(stream.next().await.expect("the story stream stays open"));
    }
    assert!(stream.heartbeats >= 2, "{} heartbeats", stream.heartbeats);
    let of = |job: &Value| -> Vec<&str> {
        seen.iter()
            .filter(|e| e.data["job_id"] == job["id"])
            .map(|e| e.name.as_str())
            .filter(|n| *n != "progress")
            .collect()
    };
    assert_eq!(of(&first), ["queued", "started", "frame", "completed"]);
    assert_eq!(of(&second), ["queued", "started", "frame", "completed"]);
    // The stream outlives the jobs, heartbeating.
    let before = stream.heartbeats;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let later = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(later.is_err(), "no event expected: {later:?}");
    assert!(stream.heartbeats > before);

    let response = http()
        .get(server.at("/api/stories/9999/events"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
}

async fn after_kill_9_a_restart_requeues_the_job_and_draws_each_frame_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--lease-s", "2"]);
    let captions = ["Fred opens the door.", "He waves.", "Fred laughs."];
    let story_id = story(&server, &captions).await;
    let job = generate(&server, story_id, json!({"steps": 12, "seed": 5})).await;
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    let head = events.until("frame").await;
    let first_url = head.last().unwrap().data["image_url"]
        .as_str()
        .unwrap()
        .to_string();
    let first_image = get_png(&server, &first_url).await;
    // Let the second frame get under way, then crash.
    events.until("progress").await;
    server.kill_hard();

    let server = start(backend, dir.path(), &["--lease-s", "2"]);
    let finished = wait_job(&server, job_id, "succeeded").await;
    assert_eq!(finished["attempts"], 2, "{finished}");
    let all = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None)
        .await
        .rest()
        .await;
    let requeued: Vec<&Event> = all
        .iter()
        .filter(|e| e.name == "queued" && e.data["requeued"] == true)
        .collect();
    assert_eq!(requeued.len(), 1, "{:?}", names(&all));
    let mut positions: Vec<i64> = all
        .iter()
        .filter(|e| e.name == "frame")
        .map(|e| e.data["position"].as_i64().unwrap())
        .collect();
    positions.sort();
    assert_eq!(positions, [0, 1, 2], "each frame exactly once");
    assert_eq!(*names(&all).last().unwrap(), "completed");

    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let stored: Vec<Vec<u8>> = {
        let mut out = Vec::new();
        for frame in story["frames"].as_array().unwrap() {
            assert_eq!(frame["status"], "ready");
            out.push(get_png(&server, frame["image_url"].as_str().unwrap()).await);
        }
        out
    };
    assert_eq!(
        stored[0], first_image,
        "the frame drawn before the crash is kept"
    );

    // The seeds were fixed at enqueue time, so the frames redrawn after the crash are the
    // frames an uninterrupted run draws.
    let twin = self::story(&server, &captions).await;
    let job = generate(&server, twin, json!({"steps": 12, "seed": 5})).await;
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    let twin = get_ok(&server, &format!("/api/stories/{twin}")).await;
    for (p, frame) in twin["frames"].as_array().unwrap().iter().enumerate() {
        let bytes = get_png(&server, frame["image_url"].as_str().unwrap()).await;
        assert!(
            bytes == stored[p],
            "frame {p} differs from an uninterrupted run"
        );
    }
}

async fn a_clean_stop_puts_the_running_job_back_without_counting_an_attempt(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let story_id = story(&server, &["Fred reads.", "He yawns."]).await;
    let job = generate(&server, story_id, json!({"steps": 25})).await;
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    events.until("progress").await;
    assert!(server.terminate(), "SIGTERM stops the server cleanly");

    let server = start(backend, dir.path(), &[]);
    let finished = wait_job(&server, job_id, "succeeded").await;
    assert_eq!(finished["attempts"], 1, "{finished}");
    let all = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None)
        .await
        .rest()
        .await;
    let requeued = all
        .iter()
        .find(|e| e.name == "queued" && e.data["requeued"] == true)
        .expect("a requeue event");
    assert!(requeued.data["reason"]
        .as_str()
        .unwrap()
        .contains("shutting down"));
}

async fn a_job_interrupted_too_often_fails_with_a_reason_and_keeps_its_drawn_frames(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        backend,
        dir.path(),
        &["--max-attempts", "1", "--lease-s", "2"],
    );
    let story_id = story(&server, &["Fred sings.", "He bows.", "They clap."]).await;
    let job = generate(&server, story_id, json!({"steps": 20})).await;
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    events.until("frame").await;
    server.kill_hard();

    let server = start(
        backend,
        dir.path(),
        &["--max-attempts", "1", "--lease-s", "2"],
    );
    // SQLite: at once (the restart's recovery). PostgreSQL: once the dead server's lease
    // runs out, since other servers and workers may share the database.
    let failed = wait_job(&server, job_id, "failed").await;
    assert!(failed["error"].as_str().unwrap().contains("attempt 1 of 1"));
    let all = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None)
        .await
        .rest()
        .await;
    assert_eq!(all.last().unwrap().name, "failed");
    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let statuses: Vec<&str> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "ready");
    assert!(statuses[1..].iter().all(|s| *s == "failed"), "{statuses:?}");
}

async fn editing_or_deleting_a_story_while_its_job_runs_corrupts_nothing(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &[]);
    let story_id = story(&server, &["Fred runs.", "He stops.", "He sits."]).await;
    let job = generate(&server, story_id, json!({"steps": 20})).await;
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    events.until("started").await;
    // While it runs: rewrite the last caption and delete the middle frame.
    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let middle = story["frames"][1]["id"].as_i64().unwrap();
    let last = story["frames"][2]["id"].as_i64().unwrap();
    let response = http()
        .patch(server.at(&format!("/api/stories/{story_id}/frames/{last}")))
        .json(&json!({"caption": "He lies down."}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let response = http()
        .delete(server.at(&format!("/api/stories/{story_id}/frames/{middle}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap().name, "completed", "{:?}", names(&rest));
    // The job drew its snapshot: the deleted frame's image went nowhere, and the edited
    // frame's image, drawn from the old caption, is stale.
    let discarded = rest
        .iter()
        .find(|e| e.name == "frame" && e.data["position"] == 1)
        .unwrap();
    assert!(discarded.data["image_url"].is_null());
    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let frames = story["frames"].as_array().unwrap();
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[0]["status"], "ready");
    assert_eq!(frames[1]["status"], "stale");
    assert_eq!(frames[1]["caption"], "He lies down.");
    get_png(&server, frames[1]["image_url"].as_str().unwrap()).await;

    // Deleting the story stops its running job; the worker goes on with the next one.
    let job = generate(&server, story_id, json!({"steps": 200})).await;
    let job_id = job["id"].as_i64().unwrap();
    let other = self::story(&server, &["Wilma smiles."]).await;
    let next = generate(&server, other, json!({"steps": 1})).await;
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    events.until("started").await;
    let response = http()
        .delete(server.at(&format!("/api/stories/{story_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let rest = events.rest().await;
    assert_eq!(rest.last().unwrap().name, "cancelled", "{:?}", names(&rest));
    let response = http()
        .get(server.at(&format!("/api/jobs/{job_id}")))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::NOT_FOUND, "not_found").await;
    wait_job(&server, next["id"].as_i64().unwrap(), "succeeded").await;
}

async fn without_a_bundle_the_service_makes_an_untrained_one_and_says_so(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on_with_default_bundle(backend, dir.path(), &[]);
    let ready = get_ok(&server, "/readyz").await;
    assert_eq!(ready["status"], "ok");
    assert_eq!(ready["model"]["trained"], false);
    let bundle = dir.path().join("bundles").join("toy-random");
    // /readyz names the bundle but keeps its path to the log (issue #18: no paths in public
    // answers).
    assert!(ready["model"].get("bundle").is_none(), "{ready}");
    assert!(
        !ready.to_string().contains(bundle.to_str().unwrap()),
        "{ready}"
    );
    assert!(server.log().contains("UNTRAINED"), "{}", server.log());
    assert!(
        server.log().contains(bundle.to_str().unwrap()),
        "{}",
        server.log()
    );
    // The next start reuses it.
    let made = std::fs::metadata(bundle.join("bundle.toml"))
        .and_then(|m| m.modified())
        .ok();
    assert!(server.terminate());
    let server = Server::start_on_with_default_bundle(backend, dir.path(), &[]);
    assert_eq!(get_ok(&server, "/readyz").await["model"]["trained"], false);
    assert_eq!(
        std::fs::metadata(bundle.join("bundle.toml"))
            .and_then(|m| m.modified())
            .ok(),
        made
    );

    // A bundle that is not there stops the start with what to do about it.
    let output = std::process::Command::new(common::binary())
        .args([
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--bundle",
            "/nonexistent/bundle",
            "--data-dir",
        ])
        .arg(dir.path().join("other"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/bundle") && stderr.contains("bundle random"),
        "{stderr}"
    );
}

/// Issue #15: the frame being drawn is previewed live every N steps (`--preview-every`): a
/// PNG of the frame's size on the event stream, not stored, so a replay does not resend it.
async fn previews_of_the_frame_being_drawn_are_streamed_live_only(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--preview-every", "2"]);
    let ready = get_ok(&server, "/readyz").await;
    let side = ready["model"]["width"].as_u64().unwrap() as u32;
    let story_id = story(&server, &["Fred opens the door.", "He waves."]).await;
    let mut live = Stream::open(&server, &format!("/api/stories/{story_id}/events"), None).await;
    let job = generate(&server, story_id, json!({"steps": 5, "seed": 3})).await;
    let seen = live.until("completed").await;
    let previews: Vec<&Event> = seen.iter().filter(|e| e.name == "preview").collect();
    // Steps 2 and 4 of each of the two frames (never after the last step).
    let steps: Vec<(i64, i64)> = previews
        .iter()
        .map(|e| {
            (
                e.data["position"].as_i64().unwrap(),
                e.data["step"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(steps, [(0, 2), (0, 4), (1, 2), (1, 4)]);
    for e in &previews {
        assert_eq!(e.id, None, "a preview is not stored");
        assert_eq!(e.data["job_id"], job["id"]);
        assert_eq!(e.data["steps"], 5);
        let url = e.data["image"].as_str().unwrap();
        let b64 = url
            .strip_prefix("data:image/png;base64,")
            .expect("a PNG data URL");
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let image = image::load_from_memory(&png).unwrap();
        assert_eq!((image.width(), image.height()), (side, side));
    }
    let replay = Stream::open(&server, &format!("/api/jobs/{}/events", job["id"]), None)
        .await
        .rest()
        .await;
    assert!(!names(&replay).contains(&"preview"), "{:?}", names(&replay));

    // Off: none.
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--preview-every", "0"]);
    let story_id = story(&server, &["Fred opens the door."]).await;
    let mut live = Stream::open(&server, &format!("/api/stories/{story_id}/events"), None).await;
    generate(&server, story_id, json!({"steps": 5})).await;
    let seen = live.until("completed").await;
    assert!(!names(&seen).contains(&"preview"));
}

/// The captions of a story, in order.
async fn captions_of(server: &Server, story: i64) -> Vec<String> {
    get_ok(server, &format!("/api/stories/{story}")).await["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["caption"].as_str().unwrap().to_string())
        .collect()
}

/// The stored images of a story, in order.
async fn images_of(server: &Server, story: i64) -> Vec<Vec<u8>> {
    let story = get_ok(server, &format!("/api/stories/{story}")).await;
    let mut out = Vec::new();
    for frame in story["frames"].as_array().unwrap() {
        assert_eq!(frame["status"], "ready", "{frame}");
        out.push(get_png(server, frame["image_url"].as_str().unwrap()).await);
    }
    out
}

async fn the_model_continues_a_story_and_a_crash_mid_way_writes_each_caption_once(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let server = start(backend, dir.path(), &["--lease-s", "2"]);
    let captions = ["Fred opens the door.", "He waves."];
    let story_id = story(&server, &captions).await;

    // Every frame needs its image before the model can read the story.
    let response = post_generate(&server, story_id, json!({"continue_frames": 2})).await;
    problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "missing_context",
    )
    .await;
    for (body, code) in [
        (json!({"continue_frames": 0}), "invalid_continue"),
        (json!({"continue_frames": 11}), "invalid_continue"),
        (json!({"frames": []}), "invalid_frames"),
        (json!({"width": 64}), "invalid_size"),
        (json!({"width": 96, "height": 64}), "invalid_size"),
    ] {
        let response = post_generate(&server, story_id, body.clone()).await;
        let doc = problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
        if code == "invalid_size" && body.get("height").is_some() {
            assert!(doc["detail"].as_str().unwrap().contains("64x64"), "{doc}");
        }
    }

    let drawn = generate(&server, story_id, json!({"steps": 2, "seed": 3})).await;
    wait_job(&server, drawn["id"].as_i64().unwrap(), "succeeded").await;
    let job = generate(
        &server,
        story_id,
        json!({"continue_frames": 3, "steps": 12, "seed": 20}),
    )
    .await;
    assert_eq!(job["frames"], json!([]), "only new frames are drawn");
    assert_eq!(job["continue_frames"], 3);
    let job_id = job["id"].as_i64().unwrap();
    let mut events = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None).await;
    let head = events.until("caption").await;
    let first = head.last().unwrap().data.clone();
    assert_eq!(
        (
            first["position"].clone(),
            first["story_position"].clone(),
            first["seed"].clone()
        ),
        (json!(2), json!(2), json!(22))
    );
    events.until("frame").await;
    events.until("caption").await;
    // The second new frame is being drawn: crash.
    events.until("progress").await;
    server.kill_hard();

    let server = start(backend, dir.path(), &["--lease-s", "2"]);
    let finished = wait_job(&server, job_id, "succeeded").await;
    assert_eq!(finished["attempts"], 2, "{finished}");
    assert_eq!(finished["continue_frames"], 0);
    let seeds: Vec<(i64, i64)> = finished["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["position"].as_i64().unwrap(), f["seed"].as_i64().unwrap()))
        .collect();
    assert_eq!(seeds, [(2, 22), (3, 23), (4, 24)]);
    let all = Stream::open(&server, &format!("/api/jobs/{job_id}/events"), None)
        .await
        .rest()
        .await;
    let written: Vec<String> = all
        .iter()
        .filter(|e| e.name == "caption")
        .map(|e| e.data["caption"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        written.len(),
        3,
        "each caption written once: {:?}",
        names(&all)
    );
    let mut positions: Vec<i64> = all
        .iter()
        .filter(|e| e.name == "frame")
        .map(|e| e.data["position"].as_i64().unwrap())
        .collect();
    positions.sort();
    assert_eq!(positions, [2, 3, 4], "each new frame drawn once");
    let story = captions_of(&server, story_id).await;
    assert_eq!(story[..2], captions);
    assert_eq!(story[2..], written);
    assert!(story.iter().all(|c| !c.trim().is_empty()));
    let stored = images_of(&server, story_id).await;

    // Captions are sampled with the new frames' seeds and the frames drawn with them, so an
    // uninterrupted run of the same request continues the same story the same way.
    let twin = self::story(&server, &captions).await;
    let job = generate(&server, twin, json!({"steps": 2, "seed": 3})).await;
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    let job = generate(
        &server,
        twin,
        json!({"continue_frames": 3, "steps": 12, "seed": 20}),
    )
    .await;
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    assert_eq!(captions_of(&server, twin).await, story);
    assert!(images_of(&server, twin).await == stored, "the same frames");
}

async fn a_bundle_that_offers_more_frame_sizes_draws_the_one_asked_for(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    for entry in std::fs::read_dir(common::shared_bundle()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "bundle.toml" {
            std::os::unix::fs::symlink(entry.path(), bundle.join(entry.file_name())).unwrap();
        }
    }
    let manifest = std::fs::read_to_string(common::shared_bundle().join("bundle.toml")).unwrap();
    assert!(
        manifest.trim_end().ends_with("scheduler = \"pndm\""),
        "[sampling] comes last"
    );
    std::fs::write(
        bundle.join("bundle.toml"),
        format!("{manifest}sizes = [[128, 64]]\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = start(backend, &data, &["--bundle", bundle.to_str().unwrap()]);
    let ready = get_ok(&server, "/readyz").await;
    assert_eq!(
        ready["model"]["sizes"],
        json!([{"width": 64, "height": 64}, {"width": 128, "height": 64}])
    );
    let story_id = story(&server, &["Fred opens the door.", "He waves."]).await;
    let job = generate(
        &server,
        story_id,
        json!({"steps": 2, "width": 128, "height": 64}),
    )
    .await;
    assert_eq!(
        (job["width"].clone(), job["height"].clone()),
        (json!(128), json!(64))
    );
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    for png in images_of(&server, story_id).await {
        let image = image::load_from_memory(&png).unwrap();
        assert_eq!((image.width(), image.height()), (128, 64));
    }
    let story = get_ok(&server, &format!("/api/stories/{story_id}")).await;
    let frame = story["frames"][0]["id"].as_i64().unwrap();
    let versions = get_ok(
        &server,
        &format!("/api/stories/{story_id}/frames/{frame}/versions"),
    )
    .await;
    assert_eq!(versions[0]["options"]["width"], 128);
    assert_eq!(versions[0]["options"]["height"], 64);
    // The panel offers the sizes.
    let panel = common::get_text(&server, &format!("/ui/stories/{story_id}/generate-panel")).await;
    assert!(
        panel.contains("<option value=\"128x64\">128x64</option>"),
        "{panel}"
    );

    // A manifest size that is not a multiple of 64 pixels is refused at start with its name.
    drop(server);
    std::fs::write(
        bundle.join("bundle.toml"),
        format!("{manifest}sizes = [[100, 64]]\n"),
    )
    .unwrap();
    let story_file = dir.path().join("story.json");
    std::fs::write(&story_file, r#"{"captions": ["Fred waves."]}"#).unwrap();
    let output = std::process::Command::new(common::binary())
        .args(["generate", "--bundle"])
        .arg(&bundle)
        .arg("--story")
        .arg(&story_file)
        .args(["--steps", "1", "--out"])
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("100x64") && stderr.contains("multiple of 64"),
        "{stderr}"
    );
}

on_both_stores!(
    a_story_is_drawn_frame_by_frame_with_its_progress_streamed,
    bad_requests_are_refused_and_idempotency_keys_make_retries_safe,
    cancelling_a_running_job_stops_it_and_keeps_the_frames_it_drew,
    a_full_queue_answers_429_with_retry_after_and_jobs_run_in_order,
    the_story_stream_follows_each_job_of_the_story_and_sends_heartbeats,
    after_kill_9_a_restart_requeues_the_job_and_draws_each_frame_once,
    a_clean_stop_puts_the_running_job_back_without_counting_an_attempt,
    a_job_interrupted_too_often_fails_with_a_reason_and_keeps_its_drawn_frames,
    editing_or_deleting_a_story_while_its_job_runs_corrupts_nothing,
    without_a_bundle_the_service_makes_an_untrained_one_and_says_so,
    previews_of_the_frame_being_drawn_are_streamed_live_only,
    the_model_continues_a_story_and_a_crash_mid_way_writes_each_caption_once,
    a_bundle_that_offers_more_frame_sizes_draws_the_one_asked_for,
);
