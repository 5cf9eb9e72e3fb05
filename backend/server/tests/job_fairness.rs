//! Issue #18, item 7: stories take turns on the worker. A one-frame job of one story used to
//! wait for the whole of another story's long job (22 s behind 25 frames); now the long job
//! hands its turn back after the frame it is drawing when another story's job waits, and
//! resumes after it from its stored frames, drawing what an uninterrupted run draws.

mod support;

use std::time::{Duration, Instant};

use image::ImageFormat;
use serde_json::{json, Value};
use support::{encode, start_server, ChildServer};

#[test]
#[ignore = "the server process the other tests start (runs only as a child process)"]
fn child_server() {
    support::child_server_main();
}

/// Longest a job of these tests may take on a busy 2-core machine.
const PATIENCE: Duration = Duration::from_secs(300);
/// Denoising steps per frame: enough that a frame takes a noticeable while (so the short job
/// is queued while the long job's first frame is drawn), few enough to keep the test short.
const STEPS: u32 = 12;

const LONG: [&str; 8] = [
    "Fred opens the door.",
    "He walks into the garden.",
    "Fred waters the flowers.",
    "He sits on the bench.",
    "Fred reads a book.",
    "He falls asleep.",
    "Fred wakes up at night.",
    "He goes back inside.",
];

fn create_story(server: &ChildServer, title: &str, captions: &[&str], cast: &[i64]) -> i64 {
    let story = server.post_json(
        "/api/stories",
        &json!({"title": title, "captions": captions, "character_ids": cast}),
    );
    assert_eq!(story.status, 201, "{}", story.text());
    story.json()["id"].as_i64().unwrap()
}

fn generate(server: &ChildServer, story: i64, body: &Value) -> i64 {
    let job = server.post_json(&format!("/api/stories/{story}/generate"), body);
    assert_eq!(job.status, 202, "{}", job.text());
    job.json()["id"].as_i64().unwrap()
}

/// Polls a job until `check` holds; returns it.
fn wait_job(server: &ChildServer, job: i64, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let current = server.get_json(&format!("/api/jobs/{job}"));
        if check(&current) {
            return current;
        }
        assert!(
            current["status"] != "failed" && current["status"] != "cancelled",
            "job {job}: {current}"
        );
        assert!(Instant::now() < deadline, "job {job}: {current}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The stored events of a finished job as (name, data), from its event stream (which ends
/// after the final event).
fn events(server: &ChildServer, job: i64) -> Vec<(String, Value)> {
    let response = server.request("GET", &format!("/api/jobs/{job}/events"), None);
    assert_eq!(response.status, 200, "{}", response.text());
    let mut out = Vec::new();
    for block in response.text().split("\n\n") {
        let mut name = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(rest) = line.strip_prefix("event:") {
                name = Some(rest.trim().to_string());
            } else if let Some(rest) = line.strip_prefix("data:") {
                data = Some(serde_json::from_str::<Value>(rest.trim()).unwrap());
            }
        }
        if let (Some(name), Some(data)) = (name, data) {
            out.push((name, data));
        }
    }
    out
}

/// The stored images of a story's frames, in story order.
fn images(server: &ChildServer, story: i64) -> Vec<Vec<u8>> {
    let story = server.get_json(&format!("/api/stories/{story}"));
    story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|frame| {
            assert_eq!(frame["status"], "ready", "{frame}");
            let image = server.request("GET", frame["image_url"].as_str().unwrap(), None);
            assert_eq!(image.status, 200);
            image.body
        })
        .collect()
}

fn text(value: &Value) -> &str {
    value.as_str().unwrap_or_default()
}

#[test]
fn a_short_job_of_another_story_goes_before_the_rest_of_a_long_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let fred = server.post_character("Fred", &encode(24, 24, ImageFormat::Png));
    assert_eq!(fred.status, 201, "{}", fred.text());
    let fred = fred.json()["id"].as_i64().unwrap();
    let long_story = create_story(&server, "Long", &LONG, &[fred]);
    let short_story = create_story(&server, "Short", &["Fred waves."], &[fred]);

    // Story A's 8-frame job starts; story B queues a 1-frame job while A draws.
    let body = json!({"steps": STEPS, "seed": 11});
    let long = generate(&server, long_story, &body);
    wait_job(&server, long, |j| j["status"] == "running");
    let short = generate(&server, short_story, &json!({"steps": STEPS, "seed": 5}));
    // At least as many frames as A had stored when B was queued.
    let done_then = server.get_json(&format!("/api/jobs/{long}"))["progress"]["frames_done"]
        .as_u64()
        .unwrap_or(0) as usize;
    assert!(
        done_then < 7,
        "A ran too fast for this test: {done_then} frames done"
    );

    let short_job = wait_job(&server, short, |j| j["status"] == "succeeded");
    let long_job = wait_job(&server, long, |j| j["status"] == "succeeded");
    let seconds = |job: &Value, from: &str, to: &str| {
        let at = |key: &str| chrono::DateTime::parse_from_rfc3339(text(&job[key])).unwrap();
        (at(to) - at(from)).num_milliseconds() as f64 / 1000.0
    };
    println!(
        "B was queued for {:.2} s and took {:.2} s in all; A took {:.2} s",
        seconds(&short_job, "created_at", "started_at"),
        seconds(&short_job, "created_at", "finished_at"),
        seconds(&long_job, "created_at", "finished_at"),
    );
    assert!(
        text(&short_job["finished_at"]) < text(&long_job["finished_at"]),
        "B finished at {}, A at {}",
        short_job["finished_at"],
        long_job["finished_at"]
    );

    // Before B was done, A stored only the frame it was drawing when B was queued (none more
    // when B came between two frames), not all eight.
    let long_events = events(&server, long);
    let names: Vec<&str> = long_events
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| *n != "progress")
        .collect();
    println!("job A's events: {names:?}");
    let short_done = text(&short_job["finished_at"]);
    let frames_before = long_events
        .iter()
        .filter(|(n, d)| n == "frame" && text(&d["at"]) < short_done)
        .count();
    assert!(
        (1..=done_then + 1).contains(&frames_before) && frames_before < 8,
        "A drew {frames_before} frames before B finished ({done_then} when B was queued): \
         {names:?}"
    );

    // A went back to the queue once with its frames kept, and started again: a turn handed
    // back is neither an attempt nor an end.
    let handed_back: Vec<&Value> = long_events
        .iter()
        .filter(|(n, d)| n == "queued" && d["requeued"] == true)
        .map(|(_, d)| d)
        .collect();
    assert_eq!(handed_back.len(), 1, "{names:?}");
    assert!(
        text(&handed_back[0]["reason"]).contains("another story"),
        "{}",
        handed_back[0]
    );
    assert_eq!(
        handed_back[0]["frames_done"].as_u64(),
        Some(frames_before as u64)
    );
    assert_eq!(
        names.iter().filter(|n| **n == "started").count(),
        2,
        "{names:?}"
    );
    assert_eq!(names.last(), Some(&"completed"), "{names:?}");
    assert_eq!(long_job["attempts"], 1, "{long_job}");
    // Each frame stored once.
    let mut positions: Vec<i64> = long_events
        .iter()
        .filter(|(n, _)| n == "frame")
        .map(|(_, d)| d["position"].as_i64().unwrap())
        .collect();
    positions.sort_unstable();
    assert_eq!(positions, (0..8).collect::<Vec<i64>>());
    // B never waited behind anyone and never handed its turn back.
    let short_names: Vec<String> = events(&server, short)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n != "progress")
        .collect();
    assert_eq!(short_names, ["queued", "started", "frame", "completed"]);

    // The frames A drew in two turns are the frames an uninterrupted run of the same job
    // draws: the resumed turn rebuilt its context from the stored frames, with the seeds
    // fixed when the job was queued.
    let twin_story = create_story(&server, "Long again", &LONG, &[fred]);
    let twin = generate(&server, twin_story, &body);
    wait_job(&server, twin, |j| j["status"] == "succeeded");
    let twin_names: Vec<String> = events(&server, twin)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n == "queued" || n == "started")
        .collect();
    assert_eq!(twin_names, ["queued", "started"], "the twin ran alone");
    let (drawn, alone) = (images(&server, long_story), images(&server, twin_story));
    assert_eq!(drawn.len(), 8);
    for (position, (a, b)) in drawn.iter().zip(&alone).enumerate() {
        assert!(a == b, "frame {position} differs from an uninterrupted run");
    }
}

#[test]
fn a_frame_deleted_while_its_job_waits_for_its_turn_is_drawn_again_as_context() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let fred = server.post_character("Fred", &encode(24, 24, ImageFormat::Png));
    assert_eq!(fred.status, 201, "{}", fred.text());
    let fred = fred.json()["id"].as_i64().unwrap();
    let captions = &LONG[..4];
    let long_story = create_story(&server, "Long", captions, &[fred]);
    let short_story = create_story(&server, "Short", &["Fred waves."], &[fred]);
    let body = json!({"steps": STEPS, "seed": 21});
    let long = generate(&server, long_story, &body);
    wait_job(&server, long, |j| j["status"] == "running");
    // A long frame of B, so that A's first frame is deleted while A waits for its turn.
    let short = generate(&server, short_story, &json!({"steps": 150, "seed": 5}));
    let waiting = wait_job(&server, long, |j| {
        j["status"] == "queued" && j["progress"]["frames_done"].as_u64() >= Some(1)
    });
    let first = waiting["frames"][0]["frame_id"].as_i64().unwrap();
    assert_eq!(waiting["frames"][0]["status"], "done", "{waiting}");
    let deleted = server.request(
        "DELETE",
        &format!("/api/stories/{long_story}/frames/{first}"),
        None,
    );
    assert_eq!(deleted.status, 200, "{}", deleted.text());
    assert_eq!(
        server.get_json(&format!("/api/jobs/{short}"))["status"],
        "running",
        "B still runs: the frame was deleted while A waited"
    );

    // A resumes: the deleted frame, whose image the later frames look at, is drawn again as
    // context (not stored, not announced), and the job succeeds.
    let done = wait_job(&server, long, |j| j["status"] == "succeeded");
    assert_eq!(done["attempts"], 1, "{done}");
    let events = events(&server, long);
    let second_turn = events.iter().rposition(|(n, _)| n == "started").unwrap();
    let (name, data) = &events[second_turn + 1];
    assert_eq!(
        (name.as_str(), data["frame"].as_u64()),
        ("progress", Some(1)),
        "the second turn draws frame 1 again first: {data}"
    );
    let frames = events.iter().filter(|(n, _)| n == "frame").count();
    assert_eq!(frames, 4, "each frame of the job announced once");

    // The three frames left are those of an uninterrupted run.
    let twin_story = create_story(&server, "Twin", captions, &[fred]);
    let twin = generate(&server, twin_story, &body);
    wait_job(&server, twin, |j| j["status"] == "succeeded");
    let (drawn, alone) = (images(&server, long_story), images(&server, twin_story));
    assert_eq!(drawn.len(), 3);
    for (position, image) in drawn.iter().enumerate() {
        assert!(
            *image == alone[position + 1],
            "frame {} differs from an uninterrupted run",
            position + 1
        );
    }
}
