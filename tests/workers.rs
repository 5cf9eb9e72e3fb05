//! Workers as separate processes sharing one PostgreSQL queue (issue #17), against the real
//! binary and a real PostgreSQL: an API-only server (`serve --workers 0`) and `storygpt-v
//! worker` processes. Three workers share the queue and no job is drawn twice; a worker killed
//! with SIGKILL mid-job loses its lease and another finishes the story; an API process
//! restarted while workers run loses no event of the job stream.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::sse::{stored_ids, Stream};
use common::{
    character_form, create_character_from, create_story, generate_job, get_ok, get_text, png,
    shared_bundle, wait_job, Backend, Server, PATIENCE,
};
use serde_json::{json, Value};

/// The lease the tests run with: short, so a killed worker's job comes back quickly.
const LEASE_S: &str = "2";

/// A `storygpt-v worker` process; killed when dropped.
struct Worker {
    child: Child,
    id: String,
    log: std::path::PathBuf,
}

impl Worker {
    fn start(database: &str) -> Worker {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log =
            std::env::temp_dir().join(format!("storygpt-v-worker-{}-{n}.log", std::process::id()));
        let mut child = Command::new(common::binary())
            .args(["worker", "--database", database, "--bundle"])
            .arg(shared_bundle())
            .args(["--lease-s", LEASE_S, "--preview-every", "0"])
            .env_remove("STORYGPT_DATABASE")
            .env_remove("STORYGPT_BUNDLE")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start storygpt-v worker");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(id) = line.strip_prefix("storygpt-v worker ready: ") {
                    let _ = tx.send(id.trim().to_string());
                }
            }
        });
        let id = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "the worker did not start; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        Worker { child, id, log }
    }

    fn kill_hard(mut self) {
        self.child.kill().unwrap();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// An API-only server on the PostgreSQL database of `dir`.
fn api(dir: &Path) -> Server {
    Server::start_on(
        Backend::Postgres,
        dir,
        &["--workers", "0", "--lease-s", LEASE_S],
    )
}

async fn cast(server: &Server) -> i64 {
    let form = character_form("Fred", "he", png(24, 24), "fred.png");
    create_character_from(server, form).await["id"]
        .as_i64()
        .unwrap()
}

/// `(job id, attempts)` of every job, and how many `started` events each has with which
/// worker, straight from the database.
async fn started_by(server: &Server) -> Vec<(i64, i64, Vec<String>)> {
    let mut db = server.db().await;
    let jobs: Vec<(i64, i64)> = sqlx::query_as("SELECT id, attempts FROM jobs ORDER BY id")
        .fetch_all(&mut db)
        .await
        .unwrap();
    let mut out = Vec::new();
    for (job, attempts) in jobs {
        let data: Vec<String> = sqlx::query_scalar(
            "SELECT data FROM job_events WHERE job_id = $1 AND kind = 'started' ORDER BY id",
        )
        .bind(job)
        .fetch_all(&mut db)
        .await
        .unwrap();
        let workers = data
            .iter()
            .map(|d| {
                serde_json::from_str::<Value>(d).unwrap()["worker"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        out.push((job, attempts, workers));
    }
    out
}

#[tokio::test]
async fn three_workers_share_one_queue_and_no_job_is_drawn_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = api(dir.path());
    let database = server.database.clone().unwrap();
    let workers: Vec<Worker> = (0..3).map(|_| Worker::start(&database)).collect();
    // Every worker announced itself; an API-only server is ready and counts them.
    let listed = get_ok(&server, "/api/workers").await;
    let alive: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["alive"] == true)
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    for worker in &workers {
        assert!(alive.contains(&worker.id.as_str()), "{listed}");
    }
    let ready = get_ok(&server, "/readyz").await;
    assert_eq!(ready["queue"]["workers"], 3, "{ready}");
    // The studio shows them too (auth is off: everyone is the operator).
    let page = get_text(&server, "/account").await;
    for worker in &workers {
        assert!(
            page.contains(&worker.id),
            "the account page lists {}",
            worker.id
        );
    }
    assert_eq!(
        page.matches(">running<").count(),
        3,
        "three running workers"
    );

    let fred = cast(&server).await;
    let mut stories = Vec::new();
    for i in 0..3 {
        let captions = [&format!("Fred walks {i}.")[..], "He waves."];
        stories.push(
            create_story(&server, "Shared", &captions, &[fred]).await["id"]
                .as_i64()
                .unwrap(),
        );
    }
    // The story streams of the API process: what the workers draw reaches them live.
    let mut streams = Vec::new();
    for &story in &stories {
        streams.push(Stream::open(&server, &format!("/api/stories/{story}/events"), None).await);
    }
    let mut jobs = Vec::new();
    for round in 0..2 {
        for &story in &stories {
            jobs.push(generate_job(&server, story, json!({"steps": 6, "seed": round})).await);
        }
    }
    for &job in &jobs {
        wait_job(&server, job, "succeeded").await;
    }
    let started = started_by(&server).await;
    assert_eq!(started.len(), jobs.len());
    let mut used = std::collections::BTreeSet::new();
    for (job, attempts, by) in &started {
        // A job may start more than once: between frames it hands its turn to another
        // story's waiting job (not counted as an attempt), and perhaps resumes on another
        // worker. A crash or a double claim would count.
        assert_eq!(*attempts, 1, "job {job} was interrupted: {started:?}");
        used.extend(by.iter().cloned());
    }
    assert!(used.len() >= 2, "the queue was shared: {started:?}");
    // Each job drew each of its two frames once: one version per frame per job.
    let mut db = server.db().await;
    for &job in &jobs {
        let versions: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM frame_versions WHERE job_id = $1")
                .bind(job)
                .fetch_one(&mut db)
                .await
                .unwrap();
        assert_eq!(versions, 2, "job {job}");
    }
    // Every job's events reached the API's streams, the live-only progress ticks included
    // (those travel only by NOTIFY).
    // Heartbeats keep a stream busy, so the whole wait has its own deadline.
    for (stream, &story) in streams.iter_mut().zip(&stories) {
        let mut completed = 0;
        let mut live_ticks = 0;
        let read = async {
            while completed < 2 {
                let event = stream.next().await.expect("the story stream ended");
                completed += usize::from(event.name == "completed");
                live_ticks += usize::from(event.id.is_none() && event.name == "progress");
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .unwrap_or_else(|_| {
                panic!("story {story}: the workers' events did not reach the API's stream")
            });
        assert!(
            live_ticks > 0,
            "story {story}: no live progress crossed the processes"
        );
    }
    drop(workers);
}

#[tokio::test]
async fn a_worker_killed_mid_job_loses_its_lease_and_another_finishes_the_story() {
    let dir = tempfile::tempdir().unwrap();
    let server = api(dir.path());
    let database = server.database.clone().unwrap();
    let first = Worker::start(&database);
    let fred = cast(&server).await;
    let captions = ["Fred walks.", "He waves.", "He runs.", "He sits."];
    let story = create_story(&server, "Killed", &captions, &[fred]).await["id"]
        .as_i64()
        .unwrap();
    let job = generate_job(&server, story, json!({"steps": 40, "seed": 3})).await;
    // Running, and past its first frame, on the first worker.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = get_ok(&server, &format!("/api/jobs/{job}")).await;
        if current["progress"]["frames_done"].as_i64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the job never got going: {current}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_id = first.id.clone();
    first.kill_hard();
    let second = Worker::start(&database);
    let done = wait_job(&server, job, "succeeded").await;
    assert_eq!(done["attempts"], 2, "{done}");
    let started = started_by(&server).await;
    assert_eq!(
        started[0].2,
        vec![first_id.clone(), second.id.clone()],
        "{started:?}"
    );
    // The requeue says why, and the killed worker no longer counts as running.
    let mut db = server.db().await;
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT data FROM job_events WHERE job_id = $1 AND kind = 'queued' ORDER BY id",
    )
    .bind(job)
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert!(
        reasons.iter().any(|r| r.contains("lease")),
        "the requeue names the lease: {reasons:?}"
    );
    // No frame was drawn twice: the frames the killed worker stored were kept as context.
    let versions: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT frame_id, COUNT(*) FROM frame_versions GROUP BY frame_id ORDER BY frame_id",
    )
    .fetch_all(&mut db)
    .await
    .unwrap();
    assert_eq!(versions.len(), 4, "{versions:?}");
    assert!(versions.iter().all(|(_, n)| *n == 1), "{versions:?}");
    let story_now = get_ok(&server, &format!("/api/stories/{story}")).await;
    assert!(
        story_now["frames"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["status"] == "ready"),
        "{story_now}"
    );
    let listed = get_ok(&server, "/api/workers").await;
    let killed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == first_id.as_str())
        .expect("the killed worker is listed");
    assert_eq!(killed["alive"], false, "{killed}");
}

#[tokio::test]
async fn an_api_process_restarted_while_workers_run_loses_no_event() {
    let dir = tempfile::tempdir().unwrap();
    let server = api(dir.path());
    let database = server.database.clone().unwrap();
    let _worker = Worker::start(&database);
    let fred = cast(&server).await;
    let captions = ["Fred walks.", "He waves.", "He runs.", "He sits."];
    let story = create_story(&server, "Restart", &captions, &[fred]).await["id"]
        .as_i64()
        .unwrap();
    let job = generate_job(&server, story, json!({"steps": 30, "seed": 5})).await;
    let path = format!("/api/jobs/{job}/events");
    let mut stream = Stream::open(&server, &path, None).await;
    // Heartbeats keep a stream busy, so each wait has its own deadline.
    let seen = tokio::time::timeout(PATIENCE, stream.until("frame"))
        .await
        .expect("the worker's events did not reach the API's stream");
    let mut ids = stored_ids(&seen);
    let last = *ids.last().unwrap();
    drop(stream);
    server.kill_hard();
    // A new API process on the same database (the worker kept drawing meanwhile).
    let server = api(dir.path());
    let mut stream = Stream::open(&server, &path, Some(last)).await;
    let rest = tokio::time::timeout(PATIENCE, stream.rest())
        .await
        .expect("the new API process's stream did not reach the job's end");
    assert_eq!(
        rest.last().map(|e| e.name.as_str()),
        Some("completed"),
        "{rest:?}"
    );
    ids.extend(stored_ids(&rest));
    let mut db = server.db().await;
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT id FROM job_events WHERE job_id = $1 ORDER BY id")
            .bind(job)
            .fetch_all(&mut db)
            .await
            .unwrap();
    assert_eq!(
        ids, stored,
        "every stored event once, in order, across the restart"
    );
}
