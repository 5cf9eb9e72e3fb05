//! Issue #18, item 4: two servers on one data directory. The second must stop before it
//! changes anything (no crash recovery of the live server's running job, no second worker),
//! at once, with a message naming the directory and the server that holds it.

mod support;

use std::time::Duration;

use image::ImageFormat;
use serde_json::json;
use support::{encode, spawn_server, start_server};

#[test]
#[ignore = "the server process the other tests start (runs only as a child process)"]
fn child_server() {
    support::child_server_main();
}

/// Polls a job until `check` holds (within two minutes); returns it.
fn wait_job(
    server: &support::ChildServer,
    job: i64,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let current = server.get_json(&format!("/api/jobs/{job}"));
        if check(&current) {
            return current;
        }
        assert!(std::time::Instant::now() < deadline, "job {job}: {current}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The job's `worker` column, read straight from the database.
fn job_worker(data_dir: &std::path::Path, job: i64) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::ConnectOptions;
        let mut db = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(data_dir.join("storygpt-v.db"))
            .read_only(true)
            .busy_timeout(Duration::from_secs(10))
            .connect()
            .await
            .unwrap();
        sqlx::query_scalar("SELECT worker FROM jobs WHERE id = ?")
            .bind(job)
            .fetch_one(&mut db)
            .await
            .unwrap()
    })
}

#[test]
fn a_second_server_on_the_same_data_directory_exits_at_once_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let first = start_server(dir.path());

    // A job that runs for a long while on the first server's worker (the toy model draws a
    // 200-step frame in a few seconds; this story has 24 of them). It is cancelled below.
    let fred = first.post_character("Fred", &encode(24, 24, ImageFormat::Png));
    assert_eq!(fred.status, 201, "{}", fred.text());
    let captions: Vec<String> = (0..24)
        .map(|i| format!("Fred opens door number {i}."))
        .collect();
    let story = first.post_json(
        "/api/stories",
        &json!({
            "title": "Long",
            "captions": captions,
            "character_ids": [fred.json()["id"]],
        }),
    );
    assert_eq!(story.status, 201, "{}", story.text());
    let story_id = story.json()["id"].as_i64().unwrap();
    let job = first.post_json(
        &format!("/api/stories/{story_id}/generate"),
        &json!({"steps": 200, "seed": 3}),
    );
    assert_eq!(job.status, 202, "{}", job.text());
    let job_id = job.json()["id"].as_i64().unwrap();
    let running = wait_job(&first, job_id, |j| j["status"] == "running");
    assert_eq!(running["attempts"], 1, "{running}");
    let worker = job_worker(dir.path(), job_id).expect("a running job has a worker");
    assert!(worker.contains(&format!("/{}/", first.pid())), "{worker}");

    // The second server, on another (ephemeral) port, same directory.
    let mut second = spawn_server(dir.path());
    let outcome = second.wait_output(Duration::from_secs(30));
    let listening = second.listening_within(Duration::ZERO);
    let Some((status, stderr)) = outcome else {
        panic!(
            "the second server is still running (listening on {listening:?}); the job is now {}",
            first.get_json(&format!("/api/jobs/{job_id}"))
        );
    };
    println!("the second server: {status}; its stderr: {stderr}");
    assert!(!status.success(), "{status:?}: {stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        listening.is_none(),
        "the second server listened on {listening:?}"
    );
    assert!(
        stderr.contains("is in use by another storygpt-v server"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("(pid {})", first.pid())),
        "{stderr}"
    );

    // Nothing changed: the job is still the first server's, running its first attempt, and
    // it keeps drawing.
    let job = first.get_json(&format!("/api/jobs/{job_id}"));
    assert_eq!(job["status"], "running", "{job}");
    assert_eq!(job["attempts"], 1, "{job}");
    assert_eq!(job_worker(dir.path(), job_id), Some(worker), "{job}");
    let step_of = |j: &serde_json::Value| {
        let p = &j["progress"];
        (
            p["frame"].as_u64().unwrap_or(0),
            p["step"].as_u64().unwrap_or(0),
        )
    };
    let before = step_of(&job);
    wait_job(&first, job_id, |j| {
        step_of(j) > before || j["status"] != "running"
    });
    let health = first.request("GET", "/healthz", None);
    assert_eq!(health.status, 200, "{}", health.text());

    // The lock goes with its process, however it ends (here kill -9): the next server starts.
    let cancel = first.request("POST", &format!("/api/jobs/{job_id}/cancel"), None);
    assert!(cancel.status < 300, "{}", cancel.text());
    wait_job(&first, job_id, |j| j["status"] == "cancelled");
    drop(first);
    let third = start_server(dir.path());
    let health = third.request("GET", "/healthz", None);
    assert_eq!(health.status, 200, "{}", health.text());
}
