//! End-to-end tests of the service as a process: probes, configuration sources, the HTML
//! page and its forms, and restarts (clean and kill -9) that must keep every record.

mod common;

use std::process::Command;

use common::{
    binary, character_form, get_json, get_text, no_redirects, png, post_ui_character, Server,
};
use reqwest::{Client, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn first_start_creates_the_database_and_probes_answer() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("nested/data");
    let server = Server::start(&data);
    assert!(
        data.join("storygpt-v.db").exists(),
        "the database is created on first start"
    );
    let http = Client::new();
    let health: Value = get_json(&server, "/healthz").await;
    assert_eq!(health["status"], "ok");
    let ready = http.get(server.at("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert!(ready.headers().contains_key("x-request-id"));
    assert!(
        server.terminate(),
        "SIGTERM must end the server cleanly (exit 0)"
    );
}

async fn seed(server: &Server) -> (Value, Value) {
    let http = Client::new();
    let fred: Value = http
        .post(server.at("/api/characters"))
        .multipart(character_form("Fred", "he", png(9, 7), "f.png"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let story: Value = http
        .post(server.at("/api/stories"))
        .json(&json!({"title": "Kept", "captions": ["Fred sits.", "He sleeps."], "character_ids": [fred["id"]]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (fred, story)
}

async fn assert_intact(server: &Server, fred: &Value, story: &Value) {
    let http = Client::new();
    let got: Value = get_json(server, &format!("/api/characters/{}", fred["id"])).await;
    assert_eq!(&got, fred);
    let got: Value = get_json(server, &format!("/api/stories/{}", story["id"])).await;
    assert_eq!(&got, story);
    let portrait = http
        .get(server.at(fred["portrait"]["url"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(image::load_from_memory(&portrait).unwrap().width(), 9);
}

#[tokio::test]
async fn data_survives_a_clean_restart_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let (fred, story) = seed(&server).await;
    assert!(server.terminate());

    let server = Server::start(dir.path());
    assert_intact(&server, &fred, &story).await;
    // Write more, then crash without any chance to flush or checkpoint.
    let http = Client::new();
    let url = server.at(&format!("/api/stories/{}/frames", story["id"]));
    let story: Value = http
        .post(url)
        .json(&json!({"caption": "He wakes up."}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    server.kill_hard();

    let server = Server::start(dir.path());
    assert_intact(&server, &fred, &story).await;
    assert_eq!(story["frames"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn configuration_comes_from_flags_env_and_file_in_that_order() {
    let dir = tempfile::tempdir().unwrap();
    let from_file = dir.path().join("from-file");
    let from_env = dir.path().join("from-env");
    let config = dir.path().join("storygpt-v.toml");
    std::fs::write(
        &config,
        format!(
            "bind = \"127.0.0.1:0\"\ndata_dir = {:?}\n",
            from_file.display().to_string()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();

    // The file alone decides.
    let server = Server::start_with(
        &from_file,
        &[
            "--config",
            &config_arg,
            "--data-dir",
            from_file.to_str().unwrap(),
        ],
        &[],
    );
    drop(server);
    let server = Server::start_with(dir.path(), &[], &[("STORYGPT_CONFIG", &config_arg)]);
    assert!(server.terminate());
    assert!(from_file.join("storygpt-v.db").exists());

    // The environment beats the file.
    let server = Server::start_with(
        dir.path(),
        &[],
        &[
            ("STORYGPT_CONFIG", &config_arg),
            ("STORYGPT_DATA_DIR", from_env.to_str().unwrap()),
        ],
    );
    assert!(server.terminate());
    assert!(from_env.join("storygpt-v.db").exists());

    // A flag beats the environment.
    let from_flag = dir.path().join("from-flag");
    let server = Server::start_with(
        dir.path(),
        &["--data-dir", from_flag.to_str().unwrap()],
        &[
            ("STORYGPT_DATA_DIR", from_env.to_str().unwrap()),
            ("STORYGPT_BIND", "127.0.0.1:0"),
        ],
    );
    assert!(server.terminate());
    assert!(from_flag.join("storygpt-v.db").exists());

    // A bad config file is a clear error, not a silent default.
    std::fs::write(&config, "bind = 42\n").unwrap();
    let out = Command::new(binary())
        .args(["serve", "--config", &config_arg])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("invalid config file"), "{stderr}");
    let out = Command::new(binary())
        .args(["serve", "--bind", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid bind address"));
}

#[test]
fn help_explains_each_subcommand() {
    let out = Command::new(binary()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("serve"), "{text}");
    let out = Command::new(binary())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--bind",
        "--data-dir",
        "--config",
        "STORYGPT_BIND",
        "STORYGPT_DATA_DIR",
    ] {
        assert!(
            text.contains(flag),
            "serve --help must mention {flag}:\n{text}"
        );
    }
}

#[tokio::test]
async fn the_page_lists_and_its_forms_add_characters_and_stories() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = no_redirects();

    let page = http.get(server.at("/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("No characters yet."));
    assert!(html.contains("src=\"/static/htmx.min.js\""));
    let js = http
        .get(server.at("/static/htmx.min.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(js.headers()["content-type"], "text/javascript");
    assert!(js.text().await.unwrap().contains("htmx"));
    let css = http.get(server.at("/static/app.css")).send().await.unwrap();
    assert_eq!(css.headers()["content-type"], "text/css");

    // With HTMX: the characters section comes back as a fragment.
    let response = post_ui_character(
        &server,
        character_form("Pebbles", "she", png(4, 4), "p.png"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["hx-trigger"], "characters-changed");
    let fragment = response.text().await.unwrap();
    assert!(fragment.starts_with("<section id=\"characters\""));
    assert!(fragment.contains("Pebbles"));

    // A refused form keeps what was typed and says why, in place.
    let response = post_ui_character(
        &server,
        character_form("Bamm-Bamm", "he", b"not an image".to_vec(), "x.png"),
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let fragment = response.text().await.unwrap();
    assert!(fragment.contains("role=\"alert\""));
    assert!(fragment.contains("value=\"Bamm-Bamm\""));

    // Without JavaScript: post, then a redirect to the page.
    let pebbles: Value = get_json(&server, "/api/characters").await;
    let pebbles_id = pebbles["items"][0]["id"].as_i64().unwrap();
    let body = format!(
        "title=Playtime&captions=Pebbles+plays.%0D%0AShe+laughs.%0D%0A&character_id={pebbles_id}"
    );
    let response = http
        .post(server.at("/ui/stories"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let stories: Value = get_json(&server, "/api/stories").await;
    assert_eq!(stories["items"][0]["title"], "Playtime");
    assert_eq!(stories["items"][0]["frame_count"], 2);
    let html = get_text(&server, "/").await;
    assert!(html.contains("Playtime"));
    assert!(html.contains("2 captions"));

    // An empty title is refused on the page too.
    let response = http
        .post(server.at("/ui/stories"))
        .header("hx-request", "true")
        .header("content-type", "application/x-www-form-urlencoded")
        .body("title=&captions=x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(response.text().await.unwrap().contains("must not be empty"));

    // Deleting through the page.
    let story_id = stories["items"][0]["id"].as_i64().unwrap();
    let response = http
        .post(server.at(&format!("/ui/stories/{story_id}/delete")))
        .header("hx-request", "true")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.text().await.unwrap().contains("No stories yet."));
}
