//! Harness of the server package's own end-to-end tests: each server runs in a child process
//! (this very test binary, started again to run only its `child_server` test, which calls
//! `server::serve` as `storygpt-v serve` does), so that a test can read the server's memory
//! use from /proc, see its exit status and stderr, and run two servers side by side. Requests
//! go over plain HTTP/1.1 on a TCP socket: the package has no HTTP client dependency.
//!
//! A test file using it declares the child entry point:
//!
//! ```ignore
//! #[test]
//! #[ignore = "the server process the other tests start"]
//! fn child_server() {
//!     support::child_server_main();
//! }
//! ```

#![allow(dead_code)] // each test file uses a different part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use server::config::Overrides;
use server::{FileConfig, ServeConfig};

/// Set (to the data directory) in a child process that is to run a server.
const CHILD_ENV: &str = "STORYGPT_TEST_CHILD_SERVE_DIR";
/// What the child prints once it listens, as `storygpt-v serve` does.
const LISTENING: &str = "storygpt-v listening on http://";
/// Longest a server start (a random toy bundle written and loaded) may take.
pub const START_PATIENCE: Duration = Duration::from_secs(180);

/// The body of the `child_server` test: serves the directory named by the environment, on
/// an ephemeral port, and exits 1 with `error: ...` on stderr when serving fails, as the CLI
/// does. A no-op when the test runs without that environment (e.g. `-- --ignored`).
pub fn child_server_main() {
    child_server_main_with(|_| {});
}

/// A server in a child process; killed (SIGKILL) when dropped.
pub struct ChildServer {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    listening: std::sync::Mutex<mpsc::Receiver<String>>,
}

/// Starts a server process on `data_dir` without waiting for it to listen.
pub fn spawn_server(data_dir: &Path) -> ChildServer {
    let mut child = Command::new(std::env::current_exe().expect("the test binary"))
        .args(["child_server", "--exact", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_ENV, data_dir)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the server process");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // The test harness prints "test child_server ... " before it, on the same line.
            if let Some(at) = line.find(LISTENING) {
                let _ = tx.send(line[at + LISTENING.len()..].trim().to_string());
            }
        }
    });
    ChildServer {
        child,
        addr: String::new(),
        data_dir: data_dir.to_path_buf(),
        listening: std::sync::Mutex::new(rx),
    }
}

/// Starts a server process on `data_dir` and waits until it listens.
pub fn start_server(data_dir: &Path) -> ChildServer {
    let mut server = spawn_server(data_dir);
    let heard = server.listening_within(START_PATIENCE);
    match heard {
        Some(addr) => server.addr = addr,
        None => {
            let _ = server.child.kill();
            let output = server.wait_output(Duration::from_secs(5));
            panic!("the server did not start: {output:?}");
        }
    }
    server
}

impl ChildServer {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The address it listens on, once it says so within `limit`.
    pub fn listening_within(&self, limit: Duration) -> Option<String> {
        let listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        listening.recv_timeout(limit).ok()
    }

    /// Waits up to `limit` for the process to exit; returns its status and what it wrote on
    /// stderr (everything, once it exited). `None` when it is still running.
    pub fn wait_output(&mut self, limit: Duration) -> Option<(ExitStatus, String)> {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = self.child.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Some((status, stderr));
            }
            if start.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A value in kB from /proc/PID/status (`VmRSS`, `VmHWM`).
    pub fn proc_status_kb(&self, key: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
    }

    /// Sends a request and reads the whole answer.
    pub fn request(&self, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Response {
        request(&self.addr, method, path, body)
    }

    /// GETs a path and reads the answer as JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let response = self.request("GET", path, None);
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        response.json()
    }

    /// POSTs a JSON body.
    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        let bytes = serde_json::to_vec(body).unwrap();
        self.request("POST", path, Some(("application/json", &bytes)))
    }

    /// POSTs a character to the API with this portrait.
    pub fn post_character(&self, name: &str, portrait: &[u8]) -> Response {
        self.post_character_to("/api/characters", name, portrait)
    }

    /// POSTs a character form (name, pronoun "he", portrait) to a route.
    pub fn post_character_to(&self, path: &str, name: &str, portrait: &[u8]) -> Response {
        let (content_type, body) = multipart(&[
            ("name", None, name.as_bytes()),
            ("pronoun", None, b"he"),
            ("portrait", Some("portrait.bin"), portrait),
        ]);
        self.request("POST", path, Some((&content_type, &body)))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Checks that this is a problem document with this status and code; returns its detail.
    pub fn problem(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text());
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json")
        );
        let body = self.json();
        assert_eq!(body["code"], code, "{body}");
        body["detail"].as_str().unwrap_or_default().to_string()
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn request(addr: &str, method: &str, path: &str, body: Option<(&str, &[u8])>) -> Response {
    request_with(addr, method, path, &[], body)
}

/// [`request`] with extra header lines; a `Host` among them replaces the server's address.
pub fn request_with(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, &[u8])>,
) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect to the server");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let host = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("host"))
        .map_or(addr, |(_, v)| *v);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (name, value) in headers
        .iter()
        .filter(|(k, _)| !k.eq_ignore_ascii_case("host"))
    {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let payload = match body {
        Some((content_type, bytes)) => {
            head.push_str(&format!(
                "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
                bytes.len()
            ));
            bytes
        }
        None => &[][..],
    };
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(payload).unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read the answer");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP header in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(end) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = String::from_utf8_lossy(&data[..end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        let start = end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
}

/// A multipart/form-data body of (name, file name, bytes) fields; returns its content type.
pub fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "----storygpt-v-test-boundary-7d1f";
    let mut body = Vec::new();
    for (name, file_name, bytes) in fields {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file_name {
            Some(file) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(
                format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes(),
            ),
        }
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Encodes an RGB image of this size whose pixels vary (so it is not trivially compressible).
pub fn encode(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    try_encode(width, height, format).expect("encode a test image")
}

/// [`encode`] returning the encoder's error (examples/hostile_load.rs shares this module).
#[allow(dead_code)]
pub fn try_encode(
    width: u32,
    height: u32,
    format: image::ImageFormat,
) -> image::ImageResult<Vec<u8>> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 7) as u8, (y * 3) as u8, ((x ^ y) * 5) as u8])
    });
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), format)?;
    Ok(out)
}

fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[4..]);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

/// A PNG made of a header declaring this size and colour (`color_type` 6 is RGBA, 2 RGB), an
/// empty compressed stream and the end chunk: a few dozen bytes that claim any size.
pub fn png_header_claiming(width: u32, height: u32, bit_depth: u8, color_type: u8) -> Vec<u8> {
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[bit_depth, color_type, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend(chunk(b"IHDR", &ihdr));
    // zlib stream of zero bytes.
    out.extend(chunk(
        b"IDAT",
        &[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    ));
    out.extend(chunk(b"IEND", &[]));
    out
}

/// [`child_server_main`] with the resolved configuration changed by `configure` first (e.g. a
/// short header read timeout), for a test file whose `child_server` calls it.
pub fn child_server_main_with(configure: impl FnOnce(&mut ServeConfig)) {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let explicit = Overrides {
        bind: Some("127.0.0.1:0".into()),
        data_dir: Some(PathBuf::from(dir)),
        ..Overrides::default()
    };
    let mut config = ServeConfig::resolve_with(explicit, FileConfig::default()).unwrap();
    configure(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(server::serve(config, |addr| {
        println!("{LISTENING}{addr}");
        let _ = std::io::stdout().flush();
    }));
    match result {
        Ok(()) => std::process::exit(0),
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::exit(1)
        }
    }
}

/// Sends a signal (`TERM`, `INT`, ...) to a process with the `kill` command.
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// Sends one request (`Connection: close`) and returns the answer and how long it took.
pub fn timed_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<(&str, &[u8])>,
) -> (Response, Duration) {
    let started = Instant::now();
    let response = request(addr, method, path, body);
    (response, started.elapsed())
}
