//! Shared harness for the end-to-end tests: starts the real `storygpt-v` binary on an
//! ephemeral port with its own data directory, and makes test images.

#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Cursor};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use image::{ImageFormat, Rgb, RgbImage};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

pub mod postgres;
pub mod sse;
pub use postgres::Backend;

/// Makes each named `async fn NAME(backend: Backend)` of a test file two tests, `NAME::sqlite`
/// and `NAME::postgres`: the same test on the embedded SQLite store and on PostgreSQL.
#[allow(unused_macros)] // not every test file runs tests on both stores
macro_rules! on_both_stores {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[tokio::test]
            async fn sqlite() {
                super::$test(super::Backend::Sqlite).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$test(super::Backend::Postgres).await
            }
        }
    )*};
}

/// Longest any single wait in these tests may take before the test fails.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// A running server process; killed when dropped.
pub struct Server {
    child: Child,
    /// Base URL such as `http://127.0.0.1:41234`.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its `--database` URL (PostgreSQL); `None`: the SQLite file in the data directory.
    pub database: Option<String>,
    stderr_log: PathBuf,
}

/// Path of the binary under test (built by cargo for this test target).
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_storygpt-v")
}

impl Server {
    /// Starts `storygpt-v serve` on port 0 in `data_dir`.
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, &[], &[])
    }

    /// Starts the server with extra arguments and environment variables. Unless they name a
    /// bundle, the server gets the [`shared_bundle`], so that each start does not spend
    /// seconds making its own.
    pub fn start_with(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        let names_bundle =
            args.contains(&"--bundle") || envs.iter().any(|(k, _)| *k == "STORYGPT_BUNDLE");
        if names_bundle {
            return Self::launch(data_dir, args, envs);
        }
        let bundle = shared_bundle().to_str().expect("UTF-8 path").to_string();
        let mut all = vec!["--bundle", bundle.as_str()];
        all.extend_from_slice(args);
        Self::launch(data_dir, &all, envs)
    }

    /// Starts the server exactly as told: without `--bundle` it falls back to its default
    /// bundle (and makes a random one in its data directory, which takes seconds).
    pub fn start_with_default_bundle(data_dir: &Path, args: &[&str]) -> Server {
        Self::launch(data_dir, args, &[])
    }

    /// [`Server::start_with`] keeping its records in `backend`: with PostgreSQL, in a database
    /// of the test cluster named after `data_dir`, so a restart on the same directory finds
    /// the same database.
    pub fn start_on(backend: Backend, data_dir: &Path, args: &[&str]) -> Server {
        let url = backend.database_url(data_dir);
        let mut all: Vec<&str> = args.to_vec();
        if let Some(url) = &url {
            all.extend(["--database", url.as_str()]);
        }
        Self::start_with(data_dir, &all, &[])
    }

    /// [`Server::start_with_default_bundle`] keeping its records in `backend`.
    pub fn start_on_with_default_bundle(
        backend: Backend,
        data_dir: &Path,
        args: &[&str],
    ) -> Server {
        let url = backend.database_url(data_dir);
        let mut all: Vec<&str> = args.to_vec();
        if let Some(url) = &url {
            all.extend(["--database", url.as_str()]);
        }
        Self::launch(data_dir, &all, &[])
    }

    fn launch(data_dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Server {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let stderr_log =
            std::env::temp_dir().join(format!("storygpt-v-test-{}-{n}.log", std::process::id()));
        let log = std::fs::File::create(&stderr_log).expect("create log file");
        let mut command = Command::new(binary());
        command.arg("serve");
        if !args.contains(&"--bind") && !envs.iter().any(|(k, _)| *k == "STORYGPT_BIND") {
            command.args(["--bind", "127.0.0.1:0"]);
        }
        if !args.contains(&"--data-dir") && !envs.iter().any(|(k, _)| *k == "STORYGPT_DATA_DIR") {
            command.arg("--data-dir").arg(data_dir);
        }
        command
            .args(args)
            .env_remove("STORYGPT_BIND")
            .env_remove("STORYGPT_DATA_DIR")
            .env_remove("STORYGPT_CONFIG")
            .env_remove("STORYGPT_BUNDLE")
            .env_remove("STORYGPT_DEVICE")
            .env_remove("STORYGPT_DATABASE")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = command.spawn().expect("start storygpt-v");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("storygpt-v listening on ") {
                    let _ = tx.send(url.trim().to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; its log:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        let database = args
            .iter()
            .position(|arg| *arg == "--database")
            .and_then(|i| args.get(i + 1))
            .map(|url| url.to_string());
        Server {
            child,
            url,
            data_dir: data_dir.to_path_buf(),
            database,
            stderr_log,
        }
    }

    /// Absolute URL for a path.
    pub fn at(&self, path: &str) -> String {
        format!("{}{}", self.url, path)
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status success.
    pub fn terminate(mut self) -> bool {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill -TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(20));
        status.is_some_and(|s| s.success())
    }

    /// Kills the process with SIGKILL (a crash), without any chance to clean up.
    pub fn kill_hard(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// A connection to the server's database (SQLite or PostgreSQL), for tests that look at
    /// or set rows directly; write SQL with `$N` parameters, which both accept. On SQLite the
    /// busy timeout lets it wait for the server's own writes.
    pub async fn db(&self) -> sqlx::AnyConnection {
        use sqlx::{Connection, Executor};
        sqlx::any::install_default_drivers();
        let url = match &self.database {
            Some(url) => url.clone(),
            None => format!("sqlite://{}", self.data_dir.join("storygpt-v.db").display()),
        };
        let mut conn = sqlx::AnyConnection::connect(&url).await.unwrap();
        if self.database.is_none() {
            conn.execute("PRAGMA busy_timeout = 10000").await.unwrap();
        }
        conn
    }

    /// What the server wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    None
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr_log);
    }
}

/// A random toy model bundle (`storygpt-v bundle random --config toy`) shared by every test
/// server. Making one takes seconds, so it is made once per build of the binary and kept in
/// cargo's scratch directory for test binaries; its name carries the binary's modification
/// time, so a rebuilt binary (which may write bundles differently) gets a fresh one.
pub fn shared_bundle() -> &'static Path {
    static BUNDLE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUNDLE.get_or_init(|| {
        let stamp = std::fs::metadata(binary())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let dir = root.join(format!("toy-bundle-{stamp}"));
        if dir.is_dir() {
            return dir;
        }
        // Made under a private name and renamed into place, so test binaries running side by
        // side never see a half-written bundle; the first rename wins.
        let partial = root.join(format!("toy-bundle-{stamp}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        let output = Command::new(binary())
            .args(["bundle", "random", "--config", "toy", "--out"])
            .arg(&partial)
            .output()
            .expect("run storygpt-v bundle random");
        assert!(
            output.status.success(),
            "storygpt-v bundle random failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        if std::fs::rename(&partial, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&partial);
        }
        assert!(dir.is_dir(), "no bundle at {}", dir.display());
        // Bundles of earlier builds are of no more use.
        if let Ok(entries) = std::fs::read_dir(&root) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.starts_with("toy-bundle-")
                    && entry.path() != dir
                    && !name.contains(".partial-")
                {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        dir
    })
}

/// A model bundle in `root/bundle` that is the [`shared_bundle`] plus a `cast/` directory
/// holding `cast_json` as `cast.json` and these portrait files, as a trained bundle has. The
/// shared bundle's files are linked, not copied, so making one costs nothing.
pub fn bundle_with_cast(root: &Path, cast_json: &str, portraits: &[(&str, Vec<u8>)]) -> PathBuf {
    let dir = root.join("bundle");
    std::fs::create_dir_all(dir.join("cast")).expect("create the bundle's cast directory");
    for entry in std::fs::read_dir(shared_bundle()).expect("read the shared bundle") {
        let entry = entry.expect("shared bundle entry");
        let target = dir.join(entry.file_name());
        #[cfg(unix)]
        std::os::unix::fs::symlink(entry.path(), &target).expect("link a bundle file");
        #[cfg(not(unix))]
        copy_tree(&entry.path(), &target);
    }
    std::fs::write(dir.join("cast").join("cast.json"), cast_json).expect("write cast.json");
    for (name, bytes) in portraits {
        std::fs::write(dir.join("cast").join(name), bytes).expect("write a cast portrait");
    }
    dir
}

#[cfg(not(unix))]
fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).expect("create a directory");
        for entry in std::fs::read_dir(from).expect("read a directory").flatten() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        }
    } else {
        std::fs::copy(from, to).expect("copy a bundle file");
    }
}

/// A small RGB test image whose pixels encode their coordinates.
pub fn test_image(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 40) as u8, (y * 40) as u8, 200])
    })
}

/// Encodes an image in the given format.
pub fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut out), format)
        .expect("encode test image");
    out
}

/// A PNG of the given size.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    encode(&test_image(width, height), ImageFormat::Png)
}

/// A JPEG carrying an EXIF block with the given orientation tag (6 = rotate 90° clockwise)
/// and a camera-model string that normalisation must strip.
pub fn jpeg_with_exif_orientation(width: u32, height: u32, orientation: u16) -> Vec<u8> {
    let jpeg = encode(&test_image(width, height), ImageFormat::Jpeg);
    // Big-endian TIFF with two IFD entries: Orientation (SHORT) and Model (ASCII, offset).
    let model = b"SecretCam\0";
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"MM\0\x2a\0\0\0\x08");
    tiff.extend_from_slice(&2u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&orientation.to_be_bytes());
    tiff.extend_from_slice(&[0, 0]);
    let model_offset = 8 + 2 + 2 * 12 + 4;
    tiff.extend_from_slice(&0x0110u16.to_be_bytes());
    tiff.extend_from_slice(&2u16.to_be_bytes());
    tiff.extend_from_slice(&(model.len() as u32).to_be_bytes());
    tiff.extend_from_slice(&(model_offset as u32).to_be_bytes());
    tiff.extend_from_slice(&0u32.to_be_bytes());
    tiff.extend_from_slice(model);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec(); // SOI
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A PNG whose header claims `width` x `height` pixels but which carries almost no data:
/// what a decompression bomb or a lying header looks like.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut real = png(1, 1);
    // IHDR data starts at byte 16: width, height (big-endian); fix the chunk CRC after.
    real[16..20].copy_from_slice(&width.to_be_bytes());
    real[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32fast::hash(&real[12..29]);
    real[29..33].copy_from_slice(&crc.to_be_bytes());
    real
}

/// A multipart form for creating a character.
pub fn character_form(
    name: &str,
    pronoun: &str,
    portrait: Vec<u8>,
    file_name: &str,
) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .text("name", name.to_string())
        .text("pronoun", pronoun.to_string())
        .part(
            "portrait",
            reqwest::multipart::Part::bytes(portrait).file_name(file_name.to_string()),
        )
}

/// An HTTP client that follows redirects (reqwest's default).
pub fn http() -> Client {
    Client::new()
}

/// A client that shows redirects instead of following them (as a browser's form post sees),
/// so that tests can assert them.
pub fn no_redirects() -> Client {
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// GETs a path and reads the answer as JSON, whatever its status.
pub async fn get_json(server: &Server, path: &str) -> Value {
    no_redirects()
        .get(server.at(path))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// GETs a path that must answer 200 and reads the answer as JSON.
pub async fn get_ok(server: &Server, path: &str) -> Value {
    let response = http().get(server.at(path)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {path}");
    response.json().await.unwrap()
}

/// GETs a page and reads it as text, whatever its status.
pub async fn get_text(server: &Server, path: &str) -> String {
    http()
        .get(server.at(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// GETs a PNG that must answer 200 and returns its bytes.
pub async fn get_png(server: &Server, url: &str) -> Vec<u8> {
    let response = http().get(server.at(url)).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "GET {url}");
    assert_eq!(response.headers()["content-type"], "image/png");
    response.bytes().await.unwrap().to_vec()
}

/// POSTs a URL-encoded form, as the page does with HTMX (`htmx`) or without JavaScript;
/// redirects are returned, not followed, so that they can be asserted.
pub async fn post_form(
    server: &Server,
    path: &str,
    form: &[(&str, &str)],
    htmx: bool,
) -> reqwest::Response {
    let mut request = no_redirects().post(server.at(path)).form(form);
    if htmx {
        request = request.header("hx-request", "true");
    }
    request.send().await.unwrap()
}

/// POSTs a character form to the page's route with HTMX, which answers with a fragment.
pub async fn post_ui_character(
    server: &Server,
    form: reqwest::multipart::Form,
) -> reqwest::Response {
    no_redirects()
        .post(server.at("/ui/characters"))
        .header("hx-request", "true")
        .multipart(form)
        .send()
        .await
        .unwrap()
}

/// Checks that an answer is a problem document with this status and code, and returns it.
pub async fn problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status, "unexpected status");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    body
}

/// Creates a character from this multipart form through the API; returns the record.
pub async fn create_character_from(server: &Server, form: reqwest::multipart::Form) -> Value {
    let response = http()
        .post(server.at("/api/characters"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

/// Creates a character with a small PNG portrait through the API; returns the record.
pub async fn create_character(server: &Server, name: &str, pronoun: &str) -> Value {
    create_character_from(server, character_form(name, pronoun, png(8, 6), "p.png")).await
}

/// Creates a character as [`create_character`] does; returns its id.
pub async fn create_character_id(server: &Server, name: &str, pronoun: &str) -> i64 {
    create_character(server, name, pronoun).await["id"]
        .as_i64()
        .unwrap()
}

/// Creates a story through the API; returns the record.
pub async fn create_story(server: &Server, title: &str, captions: &[&str], cast: &[i64]) -> Value {
    let response = http()
        .post(server.at("/api/stories"))
        .json(&json!({"title": title, "captions": captions, "character_ids": cast}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

/// Polls a job until it has this status (within [`PATIENCE`]); returns it.
pub async fn wait_job(server: &Server, job: i64, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = get_ok(server, &format!("/api/jobs/{job}")).await;
        if current["status"] == status {
            return current;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "job {job} never became {status}: {current}\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `POST /api/stories/{story}/generate` with `body`; asserts 202 and returns the job id.
pub async fn generate_job(server: &Server, story: i64, body: Value) -> i64 {
    let response = http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::ACCEPTED,
        "{}",
        response.text().await.unwrap()
    );
    response.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap()
}

/// A path in the repository (the tests run from the CLI package's directory).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

/// A miniature bundle made once by `train all --config configs/tiny/toy.toml` (every stage a
/// few steps on a generated 32x32 toy world).
pub fn tiny_bundle() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("storygpt-train-all-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let plan = repo("configs/tiny/toy.toml");
        let res = Command::new(binary())
            .args(["train", "all", "--config"])
            .arg(&plan)
            .arg("--out")
            .arg(&dir)
            .env("RAYON_NUM_THREADS", "2")
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        dir
    })
}
