//! Issue #18, items 5 and 6: faults reported as what they are, and one error format per
//! surface. Every `/api` error (unknown route, 405, 413, 415, 421, 422, 5xx) is a problem
//! document and every other address's error is the studio's HTML page; names are NFC and
//! refused when they hold invisible or bidi-control characters; forms with invalid UTF-8 or a
//! repeated field are refused; `Last-Event-ID: -1` is refused; `/readyz` shows no path; the
//! `Host` allow-list refuses other hosts (421). A full database answers 507 `storage_full`
//! (and logs why) instead of a 404 or 500, and a read-only database stops the start with a
//! sentence saying what to do, not "500 Internal Server Error".

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use image::ImageFormat;
use serde_json::{json, Value};
use server::config::AllowedHosts;
use support::{
    encode, multipart, request_with, send_signal, spawn_server, start_server, ChildServer, Response,
};

/// A file in the data directory holding the child's `allowed_hosts` (comma separated).
const HOSTS_FILE: &str = "test-allowed-hosts";
/// A file in the data directory holding the child's database page limit.
const PAGE_LIMIT_FILE: &str = "test-db-page-limit";
/// A file in the data directory naming the bundle the child serves.
const BUNDLE_FILE: &str = "test-bundle";

#[test]
#[ignore = "the server process the other tests start (runs only as a child process)"]
fn child_server() {
    // Logs on stderr, as the CLI writes them, so the tests can look for the storage error.
    if std::env::var_os("STORYGPT_TEST_CHILD_SERVE_DIR").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    }
    support::child_server_main_with(|config| {
        let read = |name: &str| std::fs::read_to_string(config.data_dir.join(name)).ok();
        if let Some(text) = read(HOSTS_FILE) {
            let hosts: Vec<String> = text.trim().split(',').map(str::to_string).collect();
            config.allowed_hosts = AllowedHosts::parse(&hosts).unwrap();
        }
        if let Some(text) = read(PAGE_LIMIT_FILE) {
            config.database_page_limit = Some(text.trim().parse().unwrap());
        }
        if let Some(text) = read(BUNDLE_FILE) {
            config.bundle = Some(PathBuf::from(text.trim()));
        }
    });
}

fn header_is(response: &Response, name: &str, prefix: &str) -> bool {
    response
        .header(name)
        .is_some_and(|v| v.to_ascii_lowercase().starts_with(prefix))
}

/// Checks that this is the studio's HTML error page with this status; returns the page.
fn html_error(response: &Response, status: u16) -> String {
    let text = response.text();
    assert_eq!(response.status, status, "{text}");
    assert!(
        header_is(response, "content-type", "text/html"),
        "{:?}: {text}",
        response.headers
    );
    assert!(text.contains("id=\"error-detail\""), "{text}");
    assert!(text.contains("Back to the studio"), "{text}");
    text
}

fn form(server: &ChildServer, path: &str, body: &[u8]) -> Response {
    server.request(
        "POST",
        path,
        Some(("application/x-www-form-urlencoded", body)),
    )
}

fn character_multipart(name: &[u8], portrait: &[u8]) -> (String, Vec<u8>) {
    multipart(&[
        ("name", None, name),
        ("pronoun", None, b"he"),
        ("portrait", Some("p.png"), portrait),
    ])
}

fn post_multipart(server: &ChildServer, path: &str, (ct, body): (String, Vec<u8>)) -> Response {
    server.request("POST", path, Some((&ct, &body)))
}

#[test]
fn every_error_has_its_surfaces_format_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let portrait = encode(32, 32, ImageFormat::Png);

    // --- The API: every error status is a problem document. ---
    // 405 (axum answered it with an empty body).
    let r = server.request("DELETE", "/api/characters", None);
    r.problem(405, "method_not_allowed");
    assert!(
        r.header("allow").is_some_and(|a| a.contains("GET")),
        "{r:?}"
    );
    // Unknown API route.
    server
        .request("GET", "/api/nothing/here", None)
        .problem(404, "no_route");
    // 413: JSON over 2 MiB.
    let big = json!({"title": "x".repeat(3 << 20), "captions": []}).to_string();
    server
        .request(
            "POST",
            "/api/stories",
            Some(("application/json", big.as_bytes())),
        )
        .problem(413, "payload_too_large");
    // 415.
    server
        .request("POST", "/api/stories", Some(("text/plain", b"{}")))
        .problem(415, "unsupported_media_type");

    // --- The studio: every error status is the HTML page. ---
    let page = html_error(&server.request("GET", "/no/such/page", None), 404);
    assert!(page.contains("Not Found"), "{page}");
    html_error(&server.request("DELETE", "/", None), 405);
    // Form routes answered 404 as JSON before.
    let page = html_error(&form(&server, "/ui/characters/999/rename", b"name=X"), 404);
    assert!(page.contains("Character 999 does not exist."), "{page}");
    html_error(
        &form(&server, "/ui/stories/999/frames/0/regenerate", b""),
        404,
    );
    html_error(&server.request("GET", "/stories/999", None), 404);
    // An over-2 MiB form: 413 as a page (it was plain text).
    let mut big_form = b"title=T&captions=".to_vec();
    big_form.extend(std::iter::repeat_n(b'a', 3 << 20));
    html_error(&form(&server, "/ui/stories", &big_form), 413);

    // --- Forms: repeated fields and invalid UTF-8 are refused, not guessed at. ---
    let page = html_error(
        &form(&server, "/ui/stories", b"title=A&title=B&captions=x"),
        422,
    );
    assert!(page.contains("title"), "{page}");
    let r = post_multipart(
        &server,
        "/api/characters",
        multipart(&[
            ("name", None, b"Al"),
            ("name", None, b"Bo"),
            ("pronoun", None, b"he"),
            ("portrait", Some("p.png"), &portrait),
        ]),
    );
    assert!(r.problem(422, "duplicate_field").contains("\"name\""));
    // Invalid UTF-8 in a name: through the API, the studio's upload form and its rename form.
    let r = post_multipart(
        &server,
        "/api/characters",
        character_multipart(b"Jo\xffe", &portrait),
    );
    r.problem(422, "invalid_name");
    let r = post_multipart(
        &server,
        "/ui/characters",
        character_multipart(b"Jo\xffe", &portrait),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("not valid UTF-8"), "{}", r.text());
    let fred = server.post_character("Fred", &portrait);
    assert_eq!(fred.status, 201, "{}", fred.text());
    let fred_id = fred.json()["id"].as_i64().unwrap();
    // Repeating the cast checkboxes is how the story form works.
    let body = format!("title=Fine&captions=x&character_id={fred_id}&character_id={fred_id}");
    let ok = form(&server, "/ui/stories", body.as_bytes());
    assert_eq!(ok.status, 303, "{}", ok.text());
    let page = html_error(
        &form(
            &server,
            &format!("/ui/characters/{fred_id}/rename"),
            b"name=Jo%FFe&pronoun=he",
        ),
        422,
    );
    assert!(page.contains("UTF-8"), "{page}");
    let names: Vec<Value> = server.get_json("/api/characters")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("Fred")], "nothing with U+FFFD was stored");

    // --- Names: invisible and bidi-control characters are refused; NFC is stored. ---
    for name in ["Fred\u{200B}", "Fred\u{202E}kcirt"] {
        let r = post_multipart(
            &server,
            "/api/characters",
            character_multipart(name.as_bytes(), &portrait),
        );
        let detail = r.problem(422, "invalid_name");
        assert!(detail.contains("U+20"), "{detail}");
    }
    server
        .post_json(
            "/api/stories",
            &json!({"title": "A\u{202E}B", "captions": []}),
        )
        .problem(422, "invalid_title");
    let zoe = server.post_character("Zoe\u{301}", &portrait);
    assert_eq!(zoe.status, 201, "{}", zoe.text());
    assert_eq!(zoe.json()["name"], "Zo\u{e9}");
    let zoe_id = zoe.json()["id"].as_i64().unwrap();
    assert_eq!(
        server.get_json(&format!("/api/characters/{zoe_id}"))["name"],
        "Zo\u{e9}"
    );
    // The precomposed spelling is the same name.
    server
        .post_character("Zo\u{e9}", &portrait)
        .problem(409, "name_taken");

    // --- Last-Event-ID must be a non-negative integer. ---
    let story = server.post_json("/api/stories", &json!({"title": "S", "captions": ["a"]}));
    assert_eq!(story.status, 201, "{}", story.text());
    let story_id = story.json()["id"].as_i64().unwrap();
    for bad in ["-1", "+3"] {
        request_with(
            &server.addr,
            "GET",
            &format!("/api/stories/{story_id}/events"),
            &[("Last-Event-ID", bad)],
            None,
        )
        .problem(400, "invalid_last_event_id");
    }

    // --- /readyz names the model, not where it lives. ---
    let ready = server.request("GET", "/readyz", None);
    assert_eq!(ready.status, 200, "{}", ready.text());
    let text = ready.text();
    assert!(ready.json()["model"]["name"].is_string(), "{text}");
    assert!(ready.json()["model"].get("bundle").is_none(), "{text}");
    let data_dir = dir.path().to_str().unwrap();
    assert!(
        !text.contains(data_dir) && !text.contains("/bundles/"),
        "{text}"
    );

    // --- Host: bound to 127.0.0.1, the server answers only to loopback names. ---
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let evil = request_with(
        &server.addr,
        "GET",
        "/api/characters",
        &[("Host", "evil.example")],
        None,
    );
    assert!(evil
        .problem(421, "misdirected_request")
        .contains("evil.example"));
    html_error(
        &request_with(
            &server.addr,
            "GET",
            "/",
            &[("Host", "evil.example:80")],
            None,
        ),
        421,
    );
    for host in [
        format!("localhost:{port}"),
        "127.0.0.1".into(),
        format!("[::1]:{port}"),
    ] {
        let r = request_with(
            &server.addr,
            "GET",
            "/api/characters",
            &[("Host", &host)],
            None,
        );
        assert_eq!(r.status, 200, "{host}: {}", r.text());
    }
}

#[test]
fn the_allowed_hosts_setting_replaces_the_loopback_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(HOSTS_FILE), "evil.example").unwrap();
    let get = |server: &ChildServer, host: &str| {
        request_with(
            &server.addr,
            "GET",
            "/api/characters",
            &[("Host", host)],
            None,
        )
    };
    {
        let server = start_server(dir.path());
        assert_eq!(get(&server, "evil.example:8080").status, 200);
        get(&server, "localhost").problem(421, "misdirected_request");
    }
    std::fs::write(dir.path().join(HOSTS_FILE), "*").unwrap();
    let server = start_server(dir.path());
    assert_eq!(get(&server, "evil.example").status, 200);
    assert_eq!(get(&server, "anything.else:1").status, 200);
}

/// Stops a server with SIGTERM and returns what it logged.
fn stop(mut server: ChildServer) -> String {
    send_signal(server.pid(), "TERM");
    let (status, log) = server
        .wait_output(Duration::from_secs(60))
        .expect("the server stops");
    assert!(status.success(), "{status:?}: {log}");
    log
}

fn id_of(response: &Response) -> i64 {
    assert_eq!(response.status, 201, "{}", response.text());
    response.json()["id"].as_i64().unwrap()
}

/// A story with 200 long captions: queuing it stores its captions with the job, about 180 KB,
/// which a full database has no room for.
fn long_story(server: &ChildServer, character: i64) -> i64 {
    let captions: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "Fred walks on, step {i}. {}",
                "Then he looks around. ".repeat(40)
            )
        })
        .collect();
    id_of(&server.post_json(
        "/api/stories",
        &json!({"title": "Long", "captions": captions, "character_ids": [character]}),
    ))
}

/// Checks a server whose storage is full: creating answers 507 `storage_full` (API) or the
/// 507 page (studio), queuing a job too, reading still works; and the log says why.
fn check_full(server: ChildServer, story: i64) {
    let portrait = encode(256, 256, ImageFormat::Png);
    let detail = server
        .post_character("Barney", &portrait)
        .problem(507, "storage_full");
    assert!(detail.contains("disk is full"), "{detail}");
    let page = html_error(
        &post_multipart(
            &server,
            "/ui/characters",
            character_multipart(b"Betty", &portrait),
        ),
        507,
    );
    assert!(page.contains("Insufficient Storage"), "{page}");
    server
        .post_json(&format!("/api/stories/{story}/generate"), &json!({}))
        .problem(507, "storage_full");
    let names: Vec<Value> = server.get_json("/api/characters")["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("Fred")]);
    let log = stop(server);
    let line = log
        .lines()
        .find(|l| l.contains("storage failure"))
        .unwrap_or_else(|| panic!("no storage failure logged: {log}"));
    assert!(
        line.contains("storage_full") && line.contains("full"),
        "{line}"
    );
}

#[test]
fn a_full_database_answers_507_and_logs_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let fred = id_of(&server.post_character("Fred", &encode(32, 32, ImageFormat::Png)));
    let story = long_story(&server, fred);
    stop(server);
    // From now on the database may not grow (SQLite keeps max_page_count at its size).
    std::fs::write(dir.path().join(PAGE_LIMIT_FILE), "1").unwrap();
    check_full(start_server(dir.path()), story);
}

/// Runs a command; whether it succeeded.
fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// A mount made by a test, unmounted when dropped (after the server using it is gone).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let path = self.0.to_str().unwrap();
        if !run("umount", [path].as_slice()) {
            run("umount", ["-l", path].as_slice());
        }
    }
}

#[test]
fn a_full_disk_answers_507_not_404() {
    let scratch = tempfile::tempdir().unwrap();
    let mount = scratch.path().join("disk");
    std::fs::create_dir(&mount).unwrap();
    if !run(
        "mount",
        [
            "-t",
            "tmpfs",
            "-o",
            "size=8m",
            "tmpfs",
            mount.to_str().unwrap(),
        ]
        .as_slice(),
    ) {
        println!("SKIPPED: cannot mount a small tmpfs here (needs root); the page-limit test covers SQLITE_FULL");
        return;
    }
    let mounted = Mounted(mount.clone());
    // The model bundle lives outside the small disk.
    let bundle = scratch.path().join("bundle");
    models::bundle::write_random("toy", &bundle, 0).unwrap();
    let data = mount.join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join(BUNDLE_FILE), bundle.to_str().unwrap()).unwrap();
    let server = start_server(&data);
    let fred = id_of(&server.post_character("Fred", &encode(32, 32, ImageFormat::Png)));
    let story = long_story(&server, fred);
    // Fill the disk.
    let mut filler = std::fs::File::create(mount.join("filler")).unwrap();
    let block = vec![7u8; 64 * 1024];
    while std::io::Write::write_all(&mut filler, &block).is_ok() {}
    drop(filler);
    check_full(server, story);
    drop(mounted);
}

/// Makes `path` read-only even for root: by permissions where they apply, else by a
/// read-only bind mount; `None` when neither is possible here.
fn make_read_only(path: &Path) -> Option<Option<Mounted>> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if path.is_dir() { 0o555 } else { 0o444 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    let probe_writes = || {
        if path.is_dir() {
            let probe = path.join(".probe");
            let ok = std::fs::write(&probe, b"x").is_ok();
            let _ = std::fs::remove_file(probe);
            ok
        } else {
            std::fs::OpenOptions::new().append(true).open(path).is_ok()
        }
    };
    if !probe_writes() {
        return Some(None);
    }
    // Root ignores permissions: use a read-only bind mount instead.
    let text = path.to_str().unwrap();
    if run("mount", ["--bind", text, text].as_slice()) {
        let mounted = Mounted(path.to_path_buf());
        if run("mount", ["-o", "remount,bind,ro", text].as_slice()) && !probe_writes() {
            return Some(Some(mounted));
        }
    }
    None
}

#[test]
fn a_read_only_database_or_directory_stops_the_start_with_a_sentence() {
    // A database made by an earlier start.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let db = data.join("storygpt-v.db");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = server::db::open(&db).await.unwrap();
        pool.close().await;
    });

    let Some(guard) = make_read_only(&db) else {
        println!("SKIPPED: cannot make a file read-only here (root without mount)");
        return;
    };
    let mut server = spawn_server(&data);
    let (status, stderr) = server
        .wait_output(Duration::from_secs(120))
        .expect("the start fails at once");
    assert_eq!(status.code(), Some(1), "{stderr}");
    let sentence = format!(
        "error: cannot write the database at {}: the file or its directory is read-only; make \
         it writable or choose another --data-dir",
        db.display()
    );
    assert!(stderr.contains(&sentence), "{stderr}");
    assert!(!stderr.contains("500 Internal Server Error"), "{stderr}");
    drop(guard);

    // The whole data directory read-only: the first write, the lock file, says so.
    std::fs::remove_file(data.join("storygpt-v.lock")).unwrap();
    let Some(guard) = make_read_only(&data) else {
        println!("SKIPPED: cannot make a directory read-only here");
        return;
    };
    let mut server = spawn_server(&data);
    let (status, stderr) = server
        .wait_output(Duration::from_secs(120))
        .expect("the start fails at once");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "error: cannot write in the data directory {}",
            data.display()
        )) && stderr.contains("make it writable or choose another --data-dir"),
        "{stderr}"
    );
    drop(guard);
    // Writable again, so the temporary directory can be removed.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
}
