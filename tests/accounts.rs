//! Accounts end to end against the real binary (issue #16): `storygpt-v user`, signing in and
//! out, API tokens (made, used, revoked), per-user data (another user's story, character or
//! job is 404; lists show one's own; admins see the queue), the cross-site check, the
//! security headers, login throttling, the public-bind refusal, and the data made before
//! accounts going to the first admin.

#[macro_use]
mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{binary, character_form, http, no_redirects, png, wait_job, Backend, Server};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// `storygpt-v user add NAME --password-stdin` on a data directory; panics on failure.
fn add_user(backend: Backend, data_dir: &std::path::Path, name: &str, password: &str) -> String {
    let mut child = Command::new(binary())
        .args(["user", "add", name, "--password-stdin", "--data-dir"])
        .arg(data_dir)
        .envs(
            backend
                .database_url(data_dir)
                .map(|url| ("STORYGPT_DATABASE", url)),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `storygpt-v user token NAME`: a fresh API token's secret.
fn cli_token(backend: Backend, data_dir: &std::path::Path, name: &str) -> String {
    let out = Command::new(binary())
        .args(["user", "token", name, "--data-dir"])
        .arg(data_dir)
        .envs(
            backend
                .database_url(data_dir)
                .map(|url| ("STORYGPT_DATABASE", url)),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    h
}

/// Signs in through the login form; returns the session cookie (`name=value`).
async fn login(server: &Server, name: &str, password: &str) -> reqwest::Response {
    no_redirects()
        .post(server.at("/login"))
        .header("origin", server.url.clone())
        .form(&[
            ("name", name),
            ("password", password),
            ("next", "/stories/1"),
        ])
        .send()
        .await
        .unwrap()
}

fn session_cookie(response: &reqwest::Response) -> String {
    let set = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );
    set.split(';').next().unwrap().to_string()
}

async fn make_story(server: &Server, token: &str, title: &str, cast: &[i64]) -> i64 {
    let response = http()
        .post(server.at("/api/stories"))
        .headers(bearer(token))
        .json(&json!({"title": title, "captions": ["Fred waves.", "He laughs."], "character_ids": cast}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap()
}

async fn make_character(server: &Server, token: &str, name: &str) -> reqwest::Response {
    http()
        .post(server.at("/api/characters"))
        .headers(bearer(token))
        .multipart(character_form(name, "he", png(24, 24), "p.png"))
        .send()
        .await
        .unwrap()
}

async fn status_of(
    server: &Server,
    token: &str,
    method: reqwest::Method,
    path: &str,
) -> StatusCode {
    http()
        .request(method, server.at(path))
        .headers(bearer(token))
        .send()
        .await
        .unwrap()
        .status()
}

async fn users_sign_in_use_tokens_and_see_only_their_own_data(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let made = add_user(backend, dir.path(), "alice", "alice's long password");
    assert!(
        made.contains("made admin alice"),
        "the first user is an admin: {made}"
    );
    let made = add_user(backend, dir.path(), "bob", "bob's long password!");
    assert!(made.contains("made user bob"), "{made}");
    let server = Server::start_on(backend, dir.path(), &["--auth", "on"]);

    // Anonymous: the API says 401 with a Bearer challenge, the studio sends to the login page,
    // probes and the login page answer.
    let response = http().get(server.at("/api/stories")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Bearer"));
    let response = no_redirects()
        .get(server.at("/stories/3?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()["location"],
        "/login?next=%2Fstories%2F3%3Fx%3D1"
    );
    for path in ["/healthz", "/login", "/static/app.css", "/docs"] {
        let response = http().get(server.at(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }

    // Every answer carries the security headers.
    let response = http().get(server.at("/login")).send().await.unwrap();
    let h = response.headers();
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["referrer-policy"], "same-origin");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );

    // A wrong password says so without saying which half was wrong; a right one sets an
    // HttpOnly, SameSite=Lax session cookie and goes where the user was headed.
    let wrong = login(&server, "alice", "not her password").await;
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("do not match an account"));
    let right = login(&server, "Alice", "alice's long password").await;
    assert_eq!(right.status(), StatusCode::SEE_OTHER);
    assert_eq!(right.headers()["location"], "/stories/1");
    let alice_cookie = session_cookie(&right);
    let page = http()
        .get(server.at("/account"))
        .header("cookie", &alice_cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Signed in as <strong id=\"account-name\">alice</strong> (admin)"));

    // A token made from the session (the browser's Origin) is shown once, then listed by its
    // prefix only; bob's comes from the command line.
    let response = http()
        .post(server.at("/api/tokens"))
        .header("cookie", &alice_cookie)
        .header("origin", server.url.clone())
        .json(&json!({"name": "script"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let alice = created["secret"].as_str().unwrap().to_string();
    assert!(alice.starts_with("sgv_"));
    let listed = http()
        .get(server.at("/api/tokens"))
        .headers(bearer(&alice))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!listed.contains(&alice), "a secret is never shown again");
    let bob = cli_token(backend, dir.path(), "bob");
    let me: Value = http()
        .get(server.at("/api/me"))
        .headers(bearer(&bob))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (me["name"].clone(), me["is_admin"].clone()),
        (json!("bob"), json!(false))
    );

    // Each user has their own library: both may have a Fred.
    let response = make_character(&server, &alice, "Fred").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let alice_fred = response.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let response = make_character(&server, &bob, "Fred").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let bob_fred = response.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let story = make_story(&server, &alice, "Alice's", &[alice_fred]).await;
    let job: Value = http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .headers(bearer(&alice))
        .json(&json!({"steps": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = job["id"].as_i64().unwrap();

    // Another user's things are 404, as if they did not exist; lists show one's own.
    use reqwest::Method;
    for (method, path) in [
        (Method::GET, format!("/api/stories/{story}")),
        (Method::DELETE, format!("/api/stories/{story}")),
        (Method::GET, format!("/api/stories/{story}/export.zip")),
        (Method::GET, format!("/api/stories/{story}/events")),
        (Method::POST, format!("/api/stories/{story}/generate")),
        (Method::GET, format!("/api/characters/{alice_fred}")),
        (
            Method::GET,
            format!("/api/characters/{alice_fred}/portrait"),
        ),
        (Method::GET, format!("/api/jobs/{job}")),
        (Method::POST, format!("/api/jobs/{job}/cancel")),
        (Method::GET, format!("/stories/{story}")),
        (Method::POST, format!("/ui/stories/{story}/delete")),
    ] {
        assert_eq!(
            status_of(&server, &bob, method.clone(), &path).await,
            StatusCode::NOT_FOUND,
            "{method} {path}"
        );
    }
    let listed: Value = http()
        .get(server.at("/api/stories"))
        .headers(bearer(&bob))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"], json!([]));
    let listed: Value = http()
        .get(server.at("/api/characters"))
        .headers(bearer(&bob))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 1);
    assert_eq!(listed["items"][0]["id"], bob_fred);
    // Bob cannot cast Alice's character into his story.
    let response = http()
        .post(server.at("/api/stories"))
        .headers(bearer(&bob))
        .json(
            &json!({"title": "Bob's", "captions": ["Fred waves."], "character_ids": [alice_fred]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bob_story = make_story(&server, &bob, "Bob's", &[bob_fred]).await;
    let bob_job: Value = http()
        .post(server.at(&format!("/api/stories/{bob_story}/generate")))
        .headers(bearer(&bob))
        .json(&json!({"steps": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    wait_job_as(&server, &alice, job).await;
    wait_job_as(&server, &bob, bob_job["id"].as_i64().unwrap()).await;
    // The admin sees the whole queue; a user, their own jobs.
    let jobs = |token: String| {
        let server = &server;
        async move {
            let page: Value = http()
                .get(server.at("/api/jobs"))
                .headers(bearer(&token))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            page["items"].as_array().unwrap().len()
        }
    };
    assert_eq!(jobs(alice.clone()).await, 2);
    assert_eq!(jobs(bob.clone()).await, 1);

    // Cross-site: a form post with the session cookie from another site's page, or with no
    // Origin or Referer at all, is refused; the same with a token is a program's request.
    for origin in [Some("http://evil.example"), None] {
        let mut request = no_redirects()
            .post(server.at("/ui/stories"))
            .header("cookie", &alice_cookie)
            .form(&[("title", "Injected"), ("captions", "Fred waves.")]);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::FORBIDDEN,
            "origin {origin:?}"
        );
    }
    let stories: Value = http()
        .get(server.at("/api/stories"))
        .headers(bearer(&alice))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        stories["items"].as_array().unwrap().len(),
        1,
        "nothing was made"
    );

    // A revoked token authenticates nothing; signing out ends the session.
    let id = created["id"].as_i64().unwrap();
    let response = http()
        .delete(server.at(&format!("/api/tokens/{id}")))
        .headers(bearer(&alice))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        status_of(&server, &alice, Method::GET, "/api/stories").await,
        StatusCode::UNAUTHORIZED
    );
    let response = no_redirects()
        .post(server.at("/logout"))
        .header("cookie", &alice_cookie)
        .header("origin", server.url.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let response = no_redirects()
        .get(server.at("/account"))
        .header("cookie", &alice_cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SEE_OTHER,
        "the session is gone"
    );

    // Guessing is throttled: after 5 failures for an account, even the right password waits.
    for _ in 0..5 {
        assert_eq!(
            login(&server, "bob", "guess guess guess").await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let throttled = login(&server, "bob", "bob's long password!").await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(throttled.headers().contains_key("retry-after"));
}

async fn wait_job_as(server: &Server, token: &str, job: i64) {
    for _ in 0..600 {
        let status: Value = http()
            .get(server.at(&format!("/api/jobs/{job}")))
            .headers(bearer(token))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if status["status"] == "succeeded" {
            return;
        }
        assert!(status["status"] != "failed", "{status}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("job {job} did not finish");
}

async fn auth_off_refuses_a_public_address_unless_told(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args(["serve", "--bind", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path())
        .env_remove("STORYGPT_AUTH")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0:0 with auth off")
            && stderr.contains("--allow-public-without-auth"),
        "{stderr}"
    );
    let server = Server::start_on(
        backend,
        dir.path(),
        &["--bind", "0.0.0.0:0", "--allow-public-without-auth"],
    );
    let port = server.url.rsplit(':').next().unwrap().to_string();
    let response = http()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

async fn data_made_before_accounts_goes_to_the_first_admin(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let fred = common::create_character_id(&server, "Fred", "he").await;
    let story = common::create_story(&server, "Before", &["Fred waves."], &[fred]).await;
    let story = story["id"].as_i64().unwrap();
    let job: Value = http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .json(&json!({"steps": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    assert!(server.terminate());

    add_user(backend, dir.path(), "root", "a long admin password");
    add_user(backend, dir.path(), "guest", "a long guest password");
    let server = Server::start_on(backend, dir.path(), &["--auth", "on"]);
    let root = cli_token(backend, dir.path(), "root");
    let guest = cli_token(backend, dir.path(), "guest");
    assert_eq!(
        status_of(
            &server,
            &root,
            reqwest::Method::GET,
            &format!("/api/stories/{story}")
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(
            &server,
            &root,
            reqwest::Method::GET,
            &format!("/api/stories/{story}/frames/1/image")
        )
        .await,
        StatusCode::OK
    );
    assert_eq!(
        status_of(
            &server,
            &guest,
            reqwest::Method::GET,
            &format!("/api/stories/{story}")
        )
        .await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(
            &server,
            &guest,
            reqwest::Method::GET,
            &format!("/api/characters/{fred}")
        )
        .await,
        StatusCode::NOT_FOUND
    );
}

/// A PNG of noise, which compresses to about its raw size.
fn noise_png(side: u32) -> Vec<u8> {
    let mut state = 12345u32;
    let image = image::RgbImage::from_fn(side, side, |_, _| {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let b = state.to_le_bytes();
        image::Rgb([b[1], b[2], b[3]])
    });
    common::encode(&image, image::ImageFormat::Png)
}

async fn each_user_has_limits_on_queued_jobs_and_stored_bytes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    add_user(backend, dir.path(), "carol", "carol's long password");
    add_user(backend, dir.path(), "dave", "dave's long password!");
    let server = Server::start_on(
        backend,
        dir.path(),
        &[
            "--auth",
            "on",
            "--user-max-queued-jobs",
            "1",
            "--user-max-storage-mb",
            "1",
        ],
    );
    let carol = cli_token(backend, dir.path(), "carol");
    let dave = cli_token(backend, dir.path(), "dave");

    // Portraits count against the owner's storage: the second large one does not fit in 1 MiB.
    let upload = |token: &str, name: &str| {
        let token = token.to_string();
        let name = name.to_string();
        let server = &server;
        async move {
            http()
                .post(server.at("/api/characters"))
                .headers(bearer(&token))
                .multipart(character_form(&name, "she", noise_png(512), "noise.png"))
                .send()
                .await
                .unwrap()
        }
    };
    assert_eq!(upload(&carol, "Ann").await.status(), StatusCode::CREATED);
    let refused = upload(&carol, "Bea").await;
    assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "storage_quota", "{body}");
    // Another user's quota is their own.
    assert_eq!(upload(&dave, "Bea").await.status(), StatusCode::CREATED);

    // One job at a time for carol; dave is not held up by her.
    let story = make_story(&server, &carol, "Busy", &[]).await;
    let first = http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .headers(bearer(&carol))
        .json(&json!({"steps": 200}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second = http()
        .post(server.at(&format!("/api/stories/{story}/generate")))
        .headers(bearer(&carol))
        .json(&json!({"steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    let body: Value = second.json().await.unwrap();
    assert_eq!(body["code"], "user_queue_full", "{body}");
    let dave_story = make_story(&server, &dave, "Free", &[]).await;
    let response = http()
        .post(server.at(&format!("/api/stories/{dave_story}/generate")))
        .headers(bearer(&dave))
        .json(&json!({"steps": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let response = http()
        .post(server.at(&format!("/api/jobs/{}/cancel", first["id"])))
        .headers(bearer(&carol))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
}

/// Every route of the service as `(method, path template)`, read from the router's source
/// (each `.route("PATH", ...)` in backend/server/src with the methods it names; those in
/// `api/` are nested under `/api`), so that a route added later is in the matrix below
/// without anyone remembering to add it.
fn routes() -> Vec<(reqwest::Method, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = common::repo("backend/server/src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut routes = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let nested = file.starts_with(src.join("api"));
        let mut rest = text.as_str();
        while let Some(at) = rest.find(".route(") {
            rest = &rest[at + ".route(".len()..];
            // The call's text up to its closing parenthesis.
            let mut depth = 1;
            let mut end = 0;
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = i;
                    break;
                }
            }
            let call = &rest[..end];
            let Some(open) = call.find('"') else { continue };
            let Some(close) = call[open + 1..].find('"') else {
                continue;
            };
            let path = &call[open + 1..open + 1 + close];
            let path = if nested {
                format!("/api{path}")
            } else {
                path.to_string()
            };
            let after = &call[open + 1 + close..];
            for (name, method) in [
                ("get", reqwest::Method::GET),
                ("post", reqwest::Method::POST),
                ("put", reqwest::Method::PUT),
                ("patch", reqwest::Method::PATCH),
                ("delete", reqwest::Method::DELETE),
            ] {
                let named = after.match_indices(&format!("{name}(")).any(|(i, _)| {
                    i == 0 || !after[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if named {
                    routes.push((method, path.clone()));
                }
            }
        }
    }
    routes.sort_by(|a, b| (a.1.as_str(), a.0.as_str()).cmp(&(b.1.as_str(), b.0.as_str())));
    routes.dedup();
    routes
}

fn is_public(path: &str) -> bool {
    matches!(
        path,
        "/login" | "/logout" | "/healthz" | "/readyz" | "/openapi.json" | "/docs"
    ) || path.starts_with("/static/")
}

async fn the_authorisation_matrix_covers_every_route(backend: Backend) {
    let routes = routes();
    assert!(routes.len() > 60, "found only {} routes", routes.len());
    for must in [
        "/api/stories/{id}/generate",
        "/ui/stories/{story}/jobs/{job}/cancel",
        "/account",
    ] {
        assert!(
            routes.iter().any(|(_, p)| p == must),
            "{must} not found in {routes:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    add_user(backend, dir.path(), "root", "the admin's long password");
    add_user(backend, dir.path(), "alice", "alice's long password");
    add_user(backend, dir.path(), "bob", "bob's long password!");
    let server = Server::start_on(backend, dir.path(), &["--auth", "on"]);
    let root = cli_token(backend, dir.path(), "root");
    let alice = cli_token(backend, dir.path(), "alice");
    let bob = cli_token(backend, dir.path(), "bob");
    let revoked = cli_token(backend, dir.path(), "alice");

    // Alice's things: a character, a story drawn once and a frame redrawn (two versions).
    let response = make_character(&server, &alice, "Fred").await;
    let character = response.json::<Value>().await.unwrap()["id"]
        .as_i64()
        .unwrap();
    let story = make_story(&server, &alice, "Alice's", &[character]).await;
    let mut job = 0;
    for body in [json!({"steps": 1}), json!({"steps": 1, "frames": [0]})] {
        let queued: Value = http()
            .post(server.at(&format!("/api/stories/{story}/generate")))
            .headers(bearer(&alice))
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        job = queued["id"].as_i64().unwrap();
        wait_job_as(&server, &alice, job).await;
    }
    let frames: Value = http()
        .get(server.at(&format!("/api/stories/{story}")))
        .headers(bearer(&alice))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let frame = frames["frames"][0]["id"].as_i64().unwrap();
    let version = frames["frames"][0]["version_id"].as_i64().unwrap();
    let tokens: Value = http()
        .get(server.at("/api/tokens"))
        .headers(bearer(&revoked))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let revoked_id = tokens[0]["id"].as_i64().unwrap();
    let response = http()
        .delete(server.at(&format!("/api/tokens/{revoked_id}")))
        .headers(bearer(&revoked))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    let fill = |template: &str| -> (String, bool) {
        let mut owned = false;
        let segments: Vec<String> = template
            .split('/')
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1].to_string())
            .collect();
        let mut previous = "";
        let mut out = String::new();
        for segment in &segments {
            let value = match (previous, segment.as_str()) {
                ("stories", "{id}") | (_, "{story}") => {
                    owned = true;
                    story.to_string()
                }
                ("characters", "{id}") => {
                    owned = true;
                    character.to_string()
                }
                ("jobs", "{id}") | (_, "{job}") => {
                    owned = true;
                    job.to_string()
                }
                ("tokens", "{id}") => {
                    owned = true;
                    revoked_id.to_string()
                }
                (_, "{frame_id}") => {
                    if template.ends_with("/regenerate") || template.ends_with("/redraw-rest") {
                        "0".to_string()
                    } else {
                        frame.to_string()
                    }
                }
                (_, "{version_id}") => version.to_string(),
                (_, "{k}") => "0".to_string(),
                (_, other) => {
                    assert!(
                        !other.starts_with('{'),
                        "an unknown parameter in {template}"
                    );
                    other.to_string()
                }
            };
            out.push('/');
            out.push_str(&value);
            previous = segment.as_str();
        }
        (if out.is_empty() { "/".into() } else { out }, owned)
    };

    let send = |method: reqwest::Method, path: String, token: Option<String>| {
        let server = &server;
        async move {
            let mut request = no_redirects().request(method, server.at(&path));
            if let Some(token) = token {
                request = request.headers(bearer(&token));
            }
            request.send().await.unwrap().status()
        }
    };
    let mut checked = 0;
    for (method, template) in &routes {
        if is_public(template) {
            continue;
        }
        let (path, owned) = fill(template);
        let api = path.starts_with("/api/");
        let signed_out = if api {
            StatusCode::UNAUTHORIZED
        } else {
            StatusCode::SEE_OTHER
        };
        for (who, token) in [
            ("anonymous", None),
            ("a revoked token", Some(revoked.clone())),
        ] {
            let status = send(method.clone(), path.clone(), token).await;
            assert_eq!(status, signed_out, "{who}: {method} {path}");
        }
        if owned {
            let status = send(method.clone(), path.clone(), Some(bob.clone())).await;
            assert_eq!(
                status,
                StatusCode::NOT_FOUND,
                "another user: {method} {path}"
            );
            // The admin sees every job, and nothing else of another user's.
            let admin_sees = template.contains("/jobs/");
            let status = send(method.clone(), path.clone(), Some(root.clone())).await;
            if admin_sees && *method == reqwest::Method::GET {
                assert_eq!(status, StatusCode::OK, "the admin: {method} {path}");
            } else if !admin_sees {
                assert_eq!(status, StatusCode::NOT_FOUND, "the admin: {method} {path}");
            }
        }
        if *method == reqwest::Method::GET {
            let status = send(method.clone(), path.clone(), Some(alice.clone())).await;
            assert!(
                status != StatusCode::UNAUTHORIZED
                    && status != StatusCode::FORBIDDEN
                    && !(owned && status == StatusCode::NOT_FOUND),
                "the owner: {method} {path} -> {status}"
            );
        }
        checked += 1;
    }
    println!("checked {checked} routes");
}

on_both_stores!(
    users_sign_in_use_tokens_and_see_only_their_own_data,
    auth_off_refuses_a_public_address_unless_told,
    data_made_before_accounts_goes_to_the_first_admin,
    each_user_has_limits_on_queued_jobs_and_stored_bytes,
    the_authorisation_matrix_covers_every_route,
);
