//! The hostile load of issue #18, shared by `examples/hostile_load.rs` (the 30 s measurement
//! in docs/SERVICE.md) and `tests/hostile_load.rs` (a short run in CI). Against a running
//! server, several client tasks send, in closed loops, the inputs the issue found harmful, at
//! their limits and just over them, while 50 connections send half a request head and stall;
//! meanwhile two probes GET `/healthz` every 20 ms, one on a fresh connection each time, one
//! on a kept-alive connection, each on its own thread so that the load's client tasks do not
//! delay them. The package has no HTTP client dependency: requests are written by hand over
//! tokio sockets. Each hostile request carries the status docs/SERVICE.md documents for it,
//! and answers that differ are counted apart ("not as documented").
//!
//! The including crate must declare `mod support;` (this module uses its form and PNG header
//! builders, which do not panic: the example runs them too).

#![allow(dead_code)] // the example and the test read different parts of the report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{multipart, png_header_claiming, try_encode as encode};

/// Caption length cap of the highlight form (`validate::MAX_CAPTION_CHARS`).
const CAPTION_CAP: usize = 1000;
/// `validate::MAX_CAST_IDS`.
const CAST_IDS_CAP: usize = 256;
/// Generate `frames` cap (`validate::MAX_CAPTIONS`).
const FRAMES_CAP: usize = 200;
/// `config::FORM_BODY_LIMIT`.
const FORM_BODY_LIMIT: usize = 2 * 1024 * 1024;
/// Longest a single hostile request may take before it counts as `timeout`.
const REQUEST_PATIENCE: Duration = Duration::from_secs(20);

/// Names of the request classes, as the table prints them (the slow clients are apart).
pub const HIGHLIGHT: &str = "highlight form, caption of 1000 / 1001 chars";
pub const CAST_IDS: &str = "character_ids of 256 / 257 (PATCH story)";
pub const FRAMES: &str = "generate frames of 200 / 201";
pub const UPLOADS: &str = "bomb PNGs (4096² 16-bit RGBA, 20000² RGBA) / truncated JPEGs";
pub const FORMS: &str = "2 MiB + 1 KiB form / duplicate-field forms";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the load runs.
    pub duration: Duration,
    /// Client tasks per request class.
    pub workers: usize,
    /// Connections that send half a request head and stall.
    pub slow_clients: usize,
    /// Interval between `/healthz` probes.
    pub probe_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            duration: Duration::from_secs(30),
            workers: 2,
            slow_clients: 50,
            probe_every: Duration::from_millis(20),
        }
    }
}

/// What one class of requests (or one probe) got.
#[derive(Debug, Default)]
pub struct Tally {
    pub name: String,
    /// Answers by status code, or `io error` / `timeout` / (slow clients) how they ended.
    pub outcomes: BTreeMap<String, u64>,
    /// Time of each request, from connecting to the end of the answer.
    pub latencies: Vec<Duration>,
    /// Answers whose status is not the one the server documents for that request, by
    /// `#INDEX STATUS (expected STATUS)`, INDEX the request's place in its class.
    pub unexpected: BTreeMap<String, u64>,
}

impl Tally {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Self::default()
        }
    }

    pub fn record(&mut self, outcome: impl Into<String>, took: Duration) {
        *self.outcomes.entry(outcome.into()).or_default() += 1;
        self.latencies.push(took);
    }

    /// Counts an answer to request `index` that was not the documented `expected` status.
    pub fn record_unexpected(&mut self, index: usize, status: u16, expected: u16) {
        *self
            .unexpected
            .entry(format!("#{index} {status} (expected {expected})"))
            .or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.outcomes {
            *self.outcomes.entry(k).or_default() += v;
        }
        for (k, v) in other.unexpected {
            *self.unexpected.entry(k).or_default() += v;
        }
        self.latencies.extend(other.latencies);
    }

    /// Requests (or connections) counted.
    pub fn count(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// How many answers had this outcome (`"422"`, `"io error"`, ...).
    pub fn outcome(&self, key: &str) -> u64 {
        self.outcomes.get(key).copied().unwrap_or(0)
    }

    /// Answers with a 5xx status.
    pub fn server_errors(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(k, _)| k.starts_with('5'))
            .map(|(_, v)| v)
            .sum()
    }

    /// Nearest-rank percentile (`p` in 0..=100) of the latencies.
    pub fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn outcomes_text(&self) -> String {
        map_text(&self.outcomes)
    }
}

fn map_text(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".to_string();
    }
    map.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything a run measured.
#[derive(Debug)]
pub struct Report {
    pub duration: Duration,
    /// The hostile request classes.
    pub classes: Vec<Tally>,
    /// The slow clients: how each of their connections ended.
    pub slow: Tally,
    /// The `/healthz` probes: fresh connections, kept-alive connection.
    pub probes: Vec<Tally>,
}

impl Report {
    /// The class of this name (`HIGHLIGHT`, ...).
    pub fn class(&self, name: &str) -> Option<&Tally> {
        self.classes.iter().find(|c| c.name == name)
    }

    /// The worst p99 of the probes; `None` when there are no probes, or one has no
    /// measurement, so that a run that probed nothing never looks quick.
    pub fn healthz_p99(&self) -> Option<Duration> {
        if self.probes.is_empty() || self.probes.iter().any(|p| p.latencies.is_empty()) {
            return None;
        }
        self.probes.iter().map(|p| p.percentile(99.0)).max()
    }

    /// Whether every probe answered 200, and at least once.
    pub fn probes_all_ok(&self) -> bool {
        !self.probes.is_empty()
            && self
                .probes
                .iter()
                .all(|p| p.count() > 0 && p.outcome("200") == p.count())
    }

    /// The two tables the tool prints (Markdown).
    pub fn table(&self) -> String {
        let ms = |d: Duration| format!("{:.1}", d.as_secs_f64() * 1000.0);
        let mut out = format!(
            "Hostile load for {:.0} s\n\n| class | requests | outcomes | not as documented | p50 ms | max ms |\n|---|---|---|---|---|---|\n",
            self.duration.as_secs_f64()
        );
        for c in self.classes.iter().chain([&self.slow]) {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                c.name,
                c.count(),
                c.outcomes_text(),
                map_text(&c.unexpected),
                ms(c.percentile(50.0)),
                ms(c.percentile(100.0)),
            ));
        }
        out.push_str(
            "\n| /healthz probe | count | outcomes | p50 ms | p95 ms | p99 ms | max ms |\n|---|---|---|---|---|---|---|\n",
        );
        for p in &self.probes {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} |\n",
                p.name,
                p.count(),
                p.outcomes_text(),
                ms(p.percentile(50.0)),
                ms(p.percentile(95.0)),
                ms(p.percentile(99.0)),
                ms(p.percentile(100.0)),
            ));
        }
        out
    }
}

/// Sets up a few characters and stories on the server at `addr`, then runs the load; blocks
/// for `options.duration` plus the set-up.
pub fn run(addr: &str, options: &Options) -> anyhow::Result<Report> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let classes = runtime.block_on(prepare(addr))?;
    let deadline = Instant::now() + options.duration;
    let probes = [false, true].map(|keep_alive| {
        let (addr, every) = (addr.to_string(), options.probe_every);
        std::thread::spawn(move || -> std::io::Result<Tally> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(runtime.block_on(probe(&addr, keep_alive, every, deadline)))
        })
    });
    let (classes, slow) = runtime.block_on(async {
        let mut handles = Vec::new();
        for (index, class) in classes.iter().enumerate() {
            for _ in 0..options.workers {
                let (addr, class) = (addr.to_string(), Arc::clone(class));
                handles.push((index, tokio::spawn(hammer(addr, class, deadline))));
            }
        }
        let slow: Vec<_> = (0..options.slow_clients)
            .map(|_| tokio::spawn(slow_client(addr.to_string(), deadline)))
            .collect();
        let mut tallies: Vec<Tally> = classes.iter().map(|c| Tally::new(c.name)).collect();
        for (index, handle) in handles {
            tallies[index].merge(handle.await?);
        }
        let mut slow_tally = Tally::new(&format!(
            "{} slow clients (half a request head, then nothing)",
            options.slow_clients
        ));
        for handle in slow {
            slow_tally.merge(handle.await?);
        }
        anyhow::Ok((tallies, slow_tally))
    })?;
    let probes = probes
        .into_iter()
        .map(|p| {
            p.join()
                .map_err(|_| anyhow::anyhow!("a probe thread panicked"))?
                .map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Report {
        duration: options.duration,
        classes,
        slow,
        probes,
    })
}

/// One class of hostile requests: the clients of a class send its requests in turn.
struct Class {
    name: &'static str,
    /// Each request, whole, with the status the server documents for it.
    requests: Vec<(Vec<u8>, u16)>,
}

/// Creates what the requests need (two characters; a story with them as cast and three
/// captions) and builds every request once.
async fn prepare(addr: &str) -> anyhow::Result<Vec<Arc<Class>>> {
    let mut cast = Vec::new();
    for name in ["Fred", "Barney"] {
        let (content_type, body) = multipart(&[
            ("name", None, name.as_bytes()),
            ("pronoun", None, b"he"),
            (
                "portrait",
                Some("p.png"),
                &encode(64, 48, image::ImageFormat::Png)?,
            ),
        ]);
        let answer = call(addr, "POST", "/api/characters", &content_type, &body).await?;
        cast.push(answer["id"].as_i64().unwrap_or_default());
    }
    let story = call(
        addr,
        "POST",
        "/api/stories",
        "application/json",
        &serde_json::to_vec(&json!({
            "title": "Hostile load",
            "captions": ["Fred opens the door.", "Barney waves at him.", "They laugh."],
            "character_ids": cast,
        }))?,
    )
    .await?;
    let story = story["id"].as_i64().unwrap_or_default();

    let req = |method: &str, path: &str, content_type: &str, body: &[u8]| {
        request(addr, method, path, Some((content_type, body)), false)
    };
    let form = "application/x-www-form-urlencoded";
    let json_type = "application/json";
    let caption = |len: usize| {
        let text: String = "Fred waves at Barney, and he laughs. "
            .chars()
            .cycle()
            .take(len)
            .collect();
        form_urlencoded::Serializer::new(String::new())
            .append_pair("caption", &text)
            .finish()
    };
    let highlight = format!("/ui/stories/{story}/highlight");
    let story_path = format!("/api/stories/{story}");
    let generate = format!("/api/stories/{story}/generate");
    // Repeats of the cast: accepted at the cap (they are dropped), refused one over it.
    let ids = |n: usize| -> Vec<u8> {
        let list: Vec<i64> = cast.iter().copied().cycle().take(n).collect();
        serde_json::to_vec(&json!({ "character_ids": list })).unwrap_or_default()
    };
    // 0..n on a three-frame story: refused either way (no position 3; too many), without a job.
    let frames = |n: usize| -> Vec<u8> {
        serde_json::to_vec(&json!({ "frames": (0..n).collect::<Vec<_>>() })).unwrap_or_default()
    };
    let upload = |bytes: &[u8]| {
        let (content_type, body) = multipart(&[
            ("name", None, b"Bomb"),
            ("pronoun", None, b"he"),
            ("portrait", Some("p.bin"), bytes),
        ]);
        req("POST", "/api/characters", &content_type, &body)
    };
    let jpeg = encode(200, 150, image::ImageFormat::Jpeg)?;
    let (dup_type, dup_body) = multipart(&[
        ("name", None, b"Twice"),
        ("name", None, b"Again"),
        ("pronoun", None, b"he"),
        (
            "portrait",
            Some("p.png"),
            &encode(8, 8, image::ImageFormat::Png)?,
        ),
    ]);
    let big_form = format!("caption={}", "a".repeat(FORM_BODY_LIMIT + 1024));

    // The statuses are those docs/SERVICE.md documents: a caption of 1000 characters is
    // analysed, 1001 refused; 256 ids (repeats of two) are accepted, 257 refused; positions
    // 0..200 name positions a three-frame story does not have, 0..201 are too many; every
    // upload is a bomb (over 64 MiB of pixels, over 4096 px a side) or cut short; a studio
    // form over 2 MiB is too large; a field sent twice is refused.
    Ok(vec![
        Class {
            name: HIGHLIGHT,
            requests: vec![
                (
                    req("POST", &highlight, form, caption(CAPTION_CAP).as_bytes()),
                    200,
                ),
                (
                    req(
                        "POST",
                        &highlight,
                        form,
                        caption(CAPTION_CAP + 1).as_bytes(),
                    ),
                    422,
                ),
            ],
        },
        Class {
            name: CAST_IDS,
            requests: vec![
                (
                    req("PATCH", &story_path, json_type, &ids(CAST_IDS_CAP)),
                    200,
                ),
                (
                    req("PATCH", &story_path, json_type, &ids(CAST_IDS_CAP + 1)),
                    422,
                ),
            ],
        },
        Class {
            name: FRAMES,
            requests: vec![
                (req("POST", &generate, json_type, &frames(FRAMES_CAP)), 422),
                (
                    req("POST", &generate, json_type, &frames(FRAMES_CAP + 1)),
                    422,
                ),
            ],
        },
        Class {
            name: UPLOADS,
            requests: vec![
                (upload(&png_header_claiming(4096, 4096, 16, 6)), 422),
                (upload(&png_header_claiming(20_000, 20_000, 8, 6)), 422),
                (upload(&jpeg[..jpeg.len() / 2]), 422),
                (upload(&jpeg[..jpeg.len() - 2]), 422),
            ],
        },
        Class {
            name: FORMS,
            requests: vec![
                (req("POST", &highlight, form, big_form.as_bytes()), 413),
                (
                    req("POST", "/ui/stories", form, b"title=One&title=Two"),
                    422,
                ),
                (req("POST", "/ui/characters", &dup_type, &dup_body), 422),
            ],
        },
    ]
    .into_iter()
    .map(Arc::new)
    .collect())
}

/// Sends a class's requests in turn until the deadline.
async fn hammer(addr: String, class: Arc<Class>, deadline: Instant) -> Tally {
    let mut tally = Tally::new(class.name);
    for (index, (request, expected)) in class.requests.iter().enumerate().cycle() {
        if Instant::now() >= deadline {
            break;
        }
        let started = Instant::now();
        let outcome = match tokio::time::timeout(REQUEST_PATIENCE, exchange(&addr, request)).await {
            Ok(Ok((status, _))) => {
                if status != *expected {
                    tally.record_unexpected(index, status, *expected);
                }
                status.to_string()
            }
            Ok(Err(_)) => "io error".to_string(),
            Err(_) => "timeout".to_string(),
        };
        tally.record(outcome, started.elapsed());
    }
    tally
}

/// Opens a connection, sends half a request head and waits; reconnects whenever the server
/// closes it, until the deadline. Outcomes: how each connection ended.
async fn slow_client(addr: String, deadline: Instant) -> Tally {
    let mut tally = Tally::new("slow");
    let half = format!("POST /api/stories HTTP/1.1\r\nHost: {addr}\r\nContent-Ty");
    while Instant::now() < deadline {
        let started = Instant::now();
        let mut stream = match TcpStream::connect(&addr).await {
            Ok(s) => s,
            Err(_) => {
                tally.record("connect error", started.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if stream.write_all(half.as_bytes()).await.is_err() {
            tally.record("io error", started.elapsed());
            continue;
        }
        let mut raw = Vec::new();
        let read = tokio::time::timeout_at(deadline.into(), stream.read_to_end(&mut raw)).await;
        let outcome = match read {
            Err(_) => "still open at the end".to_string(),
            Ok(_) => match parse_status(&raw) {
                Some(status) => format!("closed by the server with {status}"),
                None => "closed by the server".to_string(),
            },
        };
        tally.record(outcome, started.elapsed());
    }
    tally
}

/// GETs `/healthz` every `every` until the deadline.
async fn probe(addr: &str, keep_alive: bool, every: Duration, deadline: Instant) -> Tally {
    let mut tally = Tally::new(if keep_alive {
        "kept-alive connection"
    } else {
        "fresh connection each time"
    });
    let get = request(addr, "GET", "/healthz", None, keep_alive);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kept: Option<TcpStream> = None;
    while Instant::now() < deadline {
        ticks.tick().await;
        let started = Instant::now();
        let answer = if keep_alive {
            tokio::time::timeout(REQUEST_PATIENCE, keep_alive_get(addr, &mut kept, &get)).await
        } else {
            tokio::time::timeout(REQUEST_PATIENCE, exchange(addr, &get)).await
        };
        let took = started.elapsed();
        match answer {
            Ok(Ok((status, _))) => tally.record(status.to_string(), took),
            Ok(Err(_)) => {
                kept = None;
                tally.record("io error", took)
            }
            Err(_) => {
                kept = None;
                tally.record("timeout", took)
            }
        }
    }
    tally
}

/// One request on the kept connection (opened again if there is none).
async fn keep_alive_get(
    addr: &str,
    kept: &mut Option<TcpStream>,
    request: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    if kept.is_none() {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        *kept = Some(stream);
    }
    let Some(stream) = kept.as_mut() else {
        return Err(std::io::ErrorKind::NotConnected.into());
    };
    stream.write_all(request).await?;
    // Read the head, then as much body as Content-Length says.
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = head_end(&raw) {
            let length = content_length(&raw[..end]).unwrap_or(0);
            if raw.len() >= end + length {
                let status = parse_status(&raw).ok_or(std::io::ErrorKind::InvalidData)?;
                return Ok((status, raw[end..end + length].to_vec()));
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        raw.extend_from_slice(&buf[..n]);
    }
}

/// One request on a fresh connection (`Connection: close`): its status and body.
async fn exchange(addr: &str, request: &[u8]) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    // A server may answer and close before reading a refused body to its end: read the answer
    // even when writing failed.
    let wrote = stream.write_all(request).await;
    let mut raw = Vec::new();
    let read = stream.read_to_end(&mut raw).await;
    match (parse_status(&raw), head_end(&raw)) {
        (Some(status), Some(end)) => Ok((status, raw[end..].to_vec())),
        _ => Err(wrote
            .err()
            .or(read.err())
            .unwrap_or_else(|| std::io::ErrorKind::UnexpectedEof.into())),
    }
}

/// A set-up request that must succeed; its JSON answer.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> anyhow::Result<Value> {
    let raw = request(addr, method, path, Some((content_type, body)), false);
    let (status, body) = exchange(addr, &raw).await?;
    anyhow::ensure!(
        (200..300).contains(&status),
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&body)
    );
    Ok(serde_json::from_slice(&body)?)
}

/// An HTTP/1.1 request, whole.
fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
    keep_alive: bool,
) -> Vec<u8> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut out =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {connection}\r\n");
    if let Some((content_type, bytes)) = body {
        out.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    if let Some((_, bytes)) = body {
        out.extend_from_slice(bytes);
    }
    out
}

/// Offset of the body (just past the blank line), once the head is complete.
fn head_end(raw: &[u8]) -> Option<usize> {
    raw.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|at| at + 4)
}

fn parse_status(raw: &[u8]) -> Option<u16> {
    let line = raw.split(|&b| b == b'\n').next()?;
    std::str::from_utf8(line)
        .ok()?
        .split(' ')
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

fn content_length(head: &[u8]) -> Option<usize> {
    String::from_utf8_lossy(head).lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse().ok())?
    })
}
