//! End-to-end tests of the story studio against the real binary: live caption highlights and
//! their JSON twin `/api/mentions`, the character library's rename and upload messages,
//! caption editing and reordering through the HTML forms (with and without HTMX), the frames
//! strip, the ZIP / GIF / PDF exports, and the generate panel's forms.
//!
//! The export tests put frame images into the database straight into the `frames` row,
//! through SQL, so that they control the exact bytes; the generate-panel test runs the worker.

#[macro_use]
mod common;

use std::io::{Cursor, Read};

use common::{
    character_form, create_character_id, create_story, get_json, get_text, no_redirects, png,
    png_claiming, post_form, post_ui_character, test_image, wait_job, Backend, Server,
};
use reqwest::StatusCode;
use serde_json::{json, Value};

fn captions_of(story: &Value) -> Vec<String> {
    story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["caption"].as_str().unwrap().to_string())
        .collect()
}

/// The text inside the element with this id (up to its first closing tag), unescaped
/// enough for the messages the tests look for.
fn element_text(html: &str, id: &str) -> String {
    let marker = format!("id=\"{id}\"");
    let at = html
        .find(&marker)
        .unwrap_or_else(|| panic!("no element #{id} in:\n{html}"));
    let open_end = at + html[at..].find('>').unwrap() + 1;
    let close = open_end + html[open_end..].find("</").unwrap();
    html[open_end..close]
        .replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

async fn captions_are_highlighted_with_resolved_pronouns_and_unknown_names(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let fred = create_character_id(&server, "Fred", "he").await;
    let wilma = create_character_id(&server, "Wilma", "she").await;
    create_character_id(&server, "Betty", "she").await; // in the library, not in the cast
    let story = create_story(
        &server,
        "At the door",
        &["Fred opens the door.", "He waves at Wilma."],
        &[fred, wilma],
    )
    .await;
    let id = story["id"].as_i64().unwrap();
    let second = story["frames"][1]["id"].as_i64().unwrap().to_string();

    // A new caption at the end: "They" is the two characters of the caption before.
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/highlight"),
        &[
            ("caption", "They laugh while Barney watches Betty."),
            ("position", ""),
        ],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert!(html.contains("class=\"mention pronoun group\""), "{html}");
    assert!(html.contains("“They” refers to Fred and Wilma."), "{html}");
    assert!(html.contains("“Barney”: unknown character."), "{html}");
    assert!(
        html.contains("“Betty”: unknown character in this story. It is in your library"),
        "{html}"
    );
    assert!(html.contains("<mark class=\"mention unknown\" title=\"unknown character\">Barney"));

    // Editing the second caption: its pronoun resolves to the first caption's Fred, and
    // Wilma carries her cast colour (second in the cast: c1).
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/highlight"),
        &[
            ("caption", "He waves at Wilma and her dog."),
            ("frame_id", &second),
        ],
        true,
    )
    .await;
    let html = response.text().await.unwrap();
    assert!(html.contains("“He” refers to Fred."), "{html}");
    assert!(html.contains("“her” refers to Wilma."), "{html}");
    assert!(html.contains("class=\"mention character c1\""), "{html}");
    // Inserted before the first caption, nobody comes before "He".
    let html = post_form(
        &server,
        &format!("/ui/stories/{id}/highlight"),
        &[("caption", "He sleeps."), ("position", "0")],
        true,
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(
        html.contains("“He”: no character before it goes by he."),
        "{html}"
    );

    // The story page shows the same highlights without JavaScript, inside live regions.
    let page = get_text(&server, &format!("/stories/{id}")).await;
    assert!(page.contains(&format!("id=\"highlight-{second}\" aria-live=\"polite\"")));
    assert!(page.contains("“He” refers to Fred."));
    assert!(page.contains("hx-trigger=\"input changed delay:300ms, keyup changed delay:300ms\""));

    // The JSON twin.
    let response = no_redirects()
        .post(server.at("/api/mentions"))
        .json(&json!({
            "captions": ["Fred opens the door.", "He waves at Wilma.", "They laugh with Barney."],
            "cast": [{"name": "Fred", "pronoun": "he"}, {"name": "Wilma", "pronoun": "she"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["captions"][0]["mentions"],
        json!([{"start": 0, "end": 4, "byte_start": 0, "byte_end": 4, "text": "Fred",
                "kind": "character", "character": "Fred", "cast_index": 0, "possessive": false}])
    );
    assert_eq!(
        body["captions"][1]["mentions"][0],
        json!({"start": 0, "end": 2, "byte_start": 0, "byte_end": 2, "text": "He",
               "kind": "pronoun", "pronoun": "he", "case": "subject",
               "refers_to": ["Fred"], "ambiguous": false})
    );
    let third = &body["captions"][2]["mentions"];
    assert_eq!(third[0]["refers_to"], json!(["Fred", "Wilma"]));
    assert_eq!(third[1]["kind"], "unknown");
    assert_eq!(third[1]["text"], "Barney");
    assert_eq!(
        (third[1]["start"].as_i64(), third[1]["end"].as_i64()),
        (Some(16), Some(22))
    );

    // Bad requests are refused with stable codes.
    for (body, status, code) in [
        (
            json!({"captions": ["x"], "cast": [{"name": "Fred", "pronoun": "he"}, {"name": "FRED", "pronoun": "he"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_cast",
        ),
        (
            json!({"captions": ["x".repeat(1001)]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_caption",
        ),
        (
            json!({"captions": [], "cast": [{"name": "Fred", "pronoun": "xe"}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({"captions": vec!["a"; 201]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "too_many_captions",
        ),
    ] {
        let response = no_redirects()
            .post(server.at("/api/mentions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], code, "{problem}");
    }
    let response = no_redirects()
        .post(server.at("/api/mentions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let doc = get_json(&server, "/openapi.json").await;
    for path in [
        "/api/mentions",
        "/api/stories/{id}/export.zip",
        "/api/stories/{id}/export.gif",
        "/api/stories/{id}/export.pdf",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from OpenAPI"
        );
    }
    assert!(doc["components"]["schemas"]["MentionsResponse"].is_object());
}

async fn the_character_library_renames_deletes_and_explains_refused_uploads(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = no_redirects();

    let response =
        post_ui_character(&server, character_form("Fred", "he", png(4, 4), "fred.png")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert_eq!(element_text(&html, "characters-status"), "Added Fred.");
    let fred = get_json(&server, "/api/characters").await["items"][0]["id"]
        .as_i64()
        .unwrap();
    let wilma = create_character_id(&server, "Wilma", "she").await;

    // Rename inline with HTMX: the section comes back, saying what happened.
    let response = post_form(
        &server,
        &format!("/ui/characters/{fred}/rename"),
        &[("name", "Frederick"), ("pronoun", "they")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["hx-trigger"], "characters-changed");
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<section id=\"characters\""));
    assert_eq!(
        element_text(&html, "characters-status"),
        "Renamed Fred to Frederick (they)."
    );
    let got = get_json(&server, &format!("/api/characters/{fred}")).await;
    assert_eq!(
        (got["name"].as_str(), got["pronoun"].as_str()),
        (Some("Frederick"), Some("they"))
    );

    // Without JavaScript: 303 back to the character on the page.
    let response = post_form(
        &server,
        &format!("/ui/characters/{fred}/rename"),
        &[("name", "Fred"), ("pronoun", "he")],
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()["location"],
        format!("/#character-{fred}")
    );

    // A duplicate name (any case) is refused next to that card's name field, keeping the
    // typing, with the form open.
    let response = post_form(
        &server,
        &format!("/ui/characters/{wilma}/rename"),
        &[("name", "FRED"), ("pronoun", "she")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    assert!(element_text(&html, &format!("rename-name-{wilma}-error")).contains("already exists"));
    assert!(html.contains(&format!(
        "id=\"rename-name-{wilma}\" name=\"name\" value=\"FRED\""
    )));
    assert!(html.contains("<details class=\"inline-edit\" open>"));
    let response = post_form(
        &server,
        &format!("/ui/characters/{wilma}/rename"),
        &[("name", "Wilma"), ("pronoun", "xe")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(element_text(
        &response.text().await.unwrap(),
        &format!("rename-pronoun-{wilma}-error")
    )
    .contains("he, she, they, it"));
    assert_eq!(
        get_json(&server, &format!("/api/characters/{wilma}")).await["name"],
        "Wilma"
    );

    // Refused uploads: each message sits next to the field it is about.
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "Barney",
            b"hello, not an image".to_vec(),
            "character-portrait-error",
            "must be a PNG, JPEG or WebP image",
        ),
        (
            "Barney",
            png_claiming(5000, 5000),
            "character-portrait-error",
            "at most 4096 px a side",
        ),
        (
            "Barney",
            {
                // A real PNG header, then 11 MiB: too large whatever it holds.
                let mut big = png(2, 2);
                big.resize(11 * 1024 * 1024, 0);
                big
            },
            "character-portrait-error",
            "larger than 10 MiB",
        ),
        ("fred", png(4, 4), "character-name-error", "already exists"),
        ("", png(4, 4), "character-name-error", "must not be empty"),
    ];
    for (name, bytes, field, message) in cases {
        let response =
            post_ui_character(&server, character_form(name, "he", bytes, "upload.png")).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{field} {message}"
        );
        let html = response.text().await.unwrap();
        let text = element_text(&html, field);
        assert!(
            text.contains(message),
            "{field}: {text:?} lacks {message:?}"
        );
        assert!(
            html.contains(&format!("value=\"{name}\"")),
            "the typed name is kept"
        );
        // A good portrait survives an HTMX swap (hx-preserve); a refused one is cleared.
        assert_eq!(
            html.contains("hx-preserve=\"true\""),
            field != "character-portrait-error",
            "{field}"
        );
    }
    // Several problems at once are all reported, and without JavaScript the whole page comes
    // back with the messages in place.
    let response = http
        .post(server.at("/ui/characters"))
        .multipart(character_form("Wilma", "it", b"GIF89a".to_vec(), "w.gif"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<!doctype html>"));
    assert!(element_text(&html, "character-name-error").contains("already exists"));
    assert!(element_text(&html, "character-portrait-error").contains("PNG, JPEG or WebP"));
    assert!(html.contains("aria-describedby=\"character-portrait-hint character-portrait-error\""));
    assert_eq!(
        get_json(&server, "/api/characters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Delete asks first (a <details> step, no script needed), then removes.
    let page = get_text(&server, "/").await;
    assert!(page.contains(&format!("id=\"delete-confirm-{wilma}\"")));
    let response = post_form(
        &server,
        &format!("/ui/characters/{wilma}/delete"),
        &[],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        element_text(&response.text().await.unwrap(), "characters-status"),
        "Deleted Wilma."
    );
    let response = no_redirects()
        .get(server.at(&format!("/api/characters/{wilma}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

async fn captions_are_edited_and_reordered_through_the_page(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let fred = create_character_id(&server, "Fred", "he").await;
    let story = create_story(&server, "Order", &["A one.", "B two.", "C three."], &[fred]).await;
    let id = story["id"].as_i64().unwrap();
    let ids: Vec<i64> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_i64().unwrap())
        .collect();
    let story_path = format!("/api/stories/{id}");

    // The page: editor with keyboard-reachable move buttons, the strip, the generate panel.
    let page = no_redirects()
        .get(server.at(&format!("/stories/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("<section id=\"generate-panel\""));
    assert!(html.contains("<section id=\"frames-strip\""));
    for (position, frame) in ids.iter().enumerate() {
        assert!(html.contains(&format!(
            "id=\"frame-{position}\" data-frame-id=\"{frame}\""
        )));
        assert!(html.contains(&format!(
            "<button type=\"submit\" name=\"direction\" value=\"up\" id=\"move-up-{frame}\""
        )));
    }
    assert!(html.contains("aria-label=\"Move caption 1 up\" aria-disabled=\"true\""));
    assert!(html.contains("aria-label=\"Move caption 3 down\" aria-disabled=\"true\""));
    assert!(html.contains(&format!(
        "<label for=\"caption-text-{}\">Caption 1</label>",
        ids[0]
    )));

    // The moves below post the same form, and check the stored order after each.
    let move_caption = |frame: i64, direction: &'static str, htmx: bool| {
        let path = format!("/ui/stories/{id}/frames/{frame}/move");
        let server = &server;
        async move { post_form(server, &path, &[("direction", direction)], htmx).await }
    };
    let captions = || async { captions_of(&get_json(&server, &story_path).await) };

    // Move C up with HTMX: the editor comes back and the strip is told to refresh.
    let response = move_caption(ids[2], "up", true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["hx-trigger"], "frames-changed");
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<section id=\"captions-editor\""));
    assert_eq!(
        element_text(&html, "captions-status"),
        "Moved “C three.” up to place 2 of 3."
    );
    assert_eq!(captions().await, ["A one.", "C three.", "B two."]);

    // Move A down without JavaScript: a 303 back to the caption.
    let response = move_caption(ids[0], "down", false).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(
        response.headers()["location"],
        format!("/stories/{id}#caption-{}", ids[0])
    );
    assert_eq!(captions().await, ["C three.", "A one.", "B two."]);

    // The first caption cannot go further up: said, nothing changes.
    let response = move_caption(ids[2], "up", true).await;
    assert_eq!(
        element_text(&response.text().await.unwrap(), "captions-status"),
        "Caption 1 is already first."
    );
    assert_eq!(captions().await, ["C three.", "A one.", "B two."]);

    // Edit, refuse an empty edit (message next to that caption, typing kept), add, delete.
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/frames/{}", ids[1]),
        &[("caption", "Fred two."), ("frame_id", &ids[1].to_string())],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/frames/{}", ids[0]),
        &[("caption", "   ")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    assert_eq!(
        element_text(&html, &format!("caption-error-{}", ids[0])),
        "The caption must not be empty."
    );
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/frames"),
        &[("caption", "Zero, first of all."), ("position", "0")],
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/frames/{}/delete", ids[2]),
        &[],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        element_text(&response.text().await.unwrap(), "captions-status")
            .starts_with("Deleted caption 2")
    );
    assert_eq!(
        captions().await,
        ["Zero, first of all.", "A one.", "Fred two."]
    );

    // The strip on its own, as HTMX refreshes it.
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    assert!(strip.starts_with("<section id=\"frames-strip\""));
    assert!(strip.contains("hx-trigger=\"frames-changed from:body\""));
    assert!(strip.contains(&format!("id=\"frame-2\" data-frame-id=\"{}\"", ids[1])));
    assert!(strip.contains("Not generated"));

    // Title and cast: an empty title is refused in place.
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/details"),
        &[("title", "")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    assert!(html.starts_with("<div id=\"story\""));
    assert_eq!(
        element_text(&html, "story-title-error"),
        "The title must not be empty."
    );
    let fred_text = fred.to_string();
    let response = post_form(
        &server,
        &format!("/ui/stories/{id}/details"),
        &[("title", "New order"), ("character_id", &fred_text)],
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(get_json(&server, &story_path).await["title"], "New order");

    // A story that does not exist is an HTML 404 page for the browser.
    let response = no_redirects()
        .get(server.at("/stories/999"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let html = response.text().await.unwrap();
    assert_eq!(
        element_text(&html, "error-detail"),
        "Story 999 does not exist."
    );
}

/// Stores an image in a frame the way the generation worker does.
async fn store_frame_image(
    server: &Server,
    frame_id: i64,
    image: &[u8],
    seed: i64,
    duration_ms: i64,
    status: &str,
) {
    let mut conn = server.db().await;
    let done = sqlx::query(
        "UPDATE frames SET image = $1, image_mime = 'image/png', seed = $2, duration_ms = $3,
                status = $4 WHERE id = $5",
    )
    .bind(image)
    .bind(seed)
    .bind(duration_ms)
    .bind(status)
    .bind(frame_id)
    .execute(&mut conn)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

/// The archive's file names in central-directory order.
fn names_in_order(archive: &mut zip::ZipArchive<Cursor<Vec<u8>>>) -> Vec<String> {
    (0..archive.len())
        .map(|i| archive.by_index(i).unwrap().name().unwrap().to_string())
        .collect()
}

fn colour_png(width: u32, height: u32, rgb: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(width, height, image::Rgb(rgb));
    common::encode(&img, image::ImageFormat::Png)
}

/// Checks a PDF's structure and returns (page count, image XObject count).
fn check_pdf(pdf: &[u8]) -> (usize, usize) {
    assert!(pdf.starts_with(b"%PDF-1."), "header");
    assert!(pdf.ends_with(b"%%EOF\n"), "trailer end");
    let tail_at = pdf
        .windows(10)
        .rposition(|w| w == b"startxref\n")
        .expect("startxref");
    let tail = std::str::from_utf8(&pdf[tail_at..]).unwrap();
    let xref: usize = tail.lines().nth(1).unwrap().parse().unwrap();
    let table = std::str::from_utf8(&pdf[xref..tail_at]).expect("ASCII xref table");
    let mut lines = table.lines();
    assert_eq!(lines.next(), Some("xref"));
    let header: Vec<usize> = lines
        .next()
        .unwrap()
        .split(' ')
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(header[0], 0);
    let entries: Vec<&str> = lines.by_ref().take(header[1]).collect();
    assert_eq!(entries[0], "0000000000 65535 f ");
    for (number, entry) in entries.iter().enumerate().skip(1) {
        assert!(entry.ends_with(" 00000 n "), "entry {number}: {entry:?}");
        let offset: usize = entry[..10].parse().unwrap();
        assert!(
            pdf[offset..].starts_with(format!("{number} 0 obj").as_bytes()),
            "xref offset of object {number} does not point at it"
        );
    }
    let trailer: String = lines.collect::<Vec<_>>().join(" ");
    assert!(trailer.starts_with("trailer << /Size "), "{trailer}");
    assert!(trailer.contains(&format!("/Size {}", header[1])));
    let text = String::from_utf8_lossy(pdf);
    let images = text.matches("/Subtype /Image").count();
    assert_eq!(images, text.matches("/Filter /DCTDecode").count());
    let pages = text.matches("/Type /Page ").count();
    assert!(text.contains("/Type /Pages /Kids ["));
    assert!(text.contains(&format!("/Count {pages} >>")));
    (pages, images)
}

/// `qpdf --check` or `pdfinfo` on the file when either is installed.
fn validate_with_tools(pdf: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("story.pdf");
    std::fs::write(&path, pdf).unwrap();
    let mut checked = false;
    for (tool, args) in [("qpdf", vec!["--check"]), ("pdfinfo", vec![])] {
        match std::process::Command::new(tool)
            .args(&args)
            .arg(&path)
            .output()
        {
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "{tool} refused the PDF:\n{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                checked = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("cannot run {tool}: {e}"),
        }
    }
    if !checked {
        eprintln!(
            "note: neither qpdf nor pdfinfo is installed; the PDF was checked structurally only"
        );
    }
}

async fn stories_export_as_zip_gif_and_pdf(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let http = no_redirects();
    let fred = create_character_id(&server, "Fred", "he").await;
    let wilma = create_character_id(&server, "Wilma", "she").await;
    let story = create_story(
        &server,
        "Fred & Wilma: (a day) \\ out",
        &[
            "Fred opens the door.",
            "He waves at Wilma.",
            "They laugh — “happily” 😀.",
        ],
        &[fred, wilma],
    )
    .await;
    let id = story["id"].as_i64().unwrap();
    let frames: Vec<i64> = story["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_i64().unwrap())
        .collect();
    let base = format!("/api/stories/{id}");

    // Nothing generated: GIF and PDF say so; the ZIP holds story.json alone.
    for ext in ["gif", "pdf"] {
        let response = http
            .get(server.at(&format!("{base}/export.{ext}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert_eq!(problem["code"], "story_not_generated");
    }
    let zip = http
        .get(server.at(&format!("{base}/export.zip")))
        .send()
        .await
        .unwrap();
    assert_eq!(zip.status(), StatusCode::OK);
    let mut archive =
        zip::ZipArchive::new(Cursor::new(zip.bytes().await.unwrap().to_vec())).unwrap();
    assert_eq!(
        names_in_order(&mut archive),
        [
            "story.json",
            "portraits/01-fred.png",
            "portraits/02-wilma.png"
        ]
    );
    let mut text = String::new();
    archive
        .by_name("story.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["frames"][0]["image"], Value::Null);
    let response = http
        .get(server.at("/api/stories/999/export.zip"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    // Frames 1 and 3 generated; frame 2 still pending.
    let first = colour_png(16, 12, [200, 30, 30]);
    let third = colour_png(16, 12, [30, 30, 200]);
    store_frame_image(&server, frames[0], &first, 11, 1500, "ready").await;
    store_frame_image(&server, frames[2], &third, 33, 2750, "ready").await;

    // ZIP: story.json, then the exact stored PNG bytes, named by story position.
    let response = http
        .get(server.at(&format!("{base}/export.zip")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/zip");
    assert_eq!(
        response.headers()["content-disposition"],
        format!("attachment; filename=\"story-{id}-fred-wilma-a-day-out.zip\"")
    );
    let mut archive =
        zip::ZipArchive::new(Cursor::new(response.bytes().await.unwrap().to_vec())).unwrap();
    assert_eq!(
        names_in_order(&mut archive),
        [
            "story.json",
            "portraits/01-fred.png",
            "portraits/02-wilma.png",
            "frame-01.png",
            "frame-03.png"
        ]
    );
    for (name, expected) in [("frame-01.png", &first), ("frame-03.png", &third)] {
        let mut bytes = Vec::new();
        archive
            .by_name(name)
            .unwrap()
            .read_to_end(&mut bytes)
            .unwrap();
        assert_eq!(&bytes, expected, "{name} must be the stored bytes");
    }
    let mut text = String::new();
    archive
        .by_name("story.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["title"], "Fred & Wilma: (a day) \\ out");
    assert_eq!(json["captions"][1], "He waves at Wilma.");
    assert_eq!(json["version"], 2);
    assert_eq!(
        json["characters"],
        json!([{"id": fred, "name": "Fred", "pronoun": "he", "portrait": "portraits/01-fred.png"},
               {"id": wilma, "name": "Wilma", "pronoun": "she", "portrait": "portraits/02-wilma.png"}])
    );
    // Stored here straight through SQL, not by a job: how it was drawn is not known.
    assert_eq!(
        json["frames"][0],
        json!({"position": 1, "caption": "Fred opens the door.", "status": "ready", "seed": 11,
               "duration_ms": 1500, "image": "frame-01.png", "steps": null,
               "guidance_scale": null, "scheduler": null, "bundle": null,
               "negative_prompt": null, "width": null, "height": null})
    );
    assert_eq!(json["frames"][1]["status"], "pending");
    assert_eq!(json["frames"][1]["image"], Value::Null);
    assert_eq!(json["frames"][2]["seed"], 33);

    // GIF: the two ready frames, 16x12 enlarged 16 times (nearest neighbour) to 256x192,
    // 1.5 s each, looping forever.
    let response = http
        .get(server.at(&format!("{base}/export.gif")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/gif");
    let gif = response.bytes().await.unwrap();
    let loop_forever = b"NETSCAPE2.0\x03\x01\x00\x00";
    assert!(gif.windows(loop_forever.len()).any(|w| w == loop_forever));
    use image::AnimationDecoder;
    let decoded = image::codecs::gif::GifDecoder::new(Cursor::new(gif.to_vec()))
        .unwrap()
        .into_frames()
        .collect_frames()
        .unwrap();
    assert_eq!(decoded.len(), 2);
    for (frame, rgb) in decoded.iter().zip([[200u8, 30, 30], [30, 30, 200]]) {
        assert_eq!(frame.buffer().dimensions(), (256, 192));
        assert_eq!(frame.delay().numer_denom_ms(), (1500, 1));
        let pixel = frame.buffer().get_pixel(128, 96).0;
        for c in 0..3 {
            assert!(
                (pixel[c] as i32 - rgb[c] as i32).abs() <= 8,
                "{pixel:?} vs {rgb:?}"
            );
        }
    }

    // PDF: one page, two image XObjects; the pending frame is an empty panel.
    let response = http
        .get(server.at(&format!("{base}/export.pdf")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/pdf");
    let pdf = response.bytes().await.unwrap();
    assert_eq!(check_pdf(&pdf), (1, 2));
    let text = String::from_utf8_lossy(&pdf);
    assert!(text.contains("(Frame 2: not generated yet)"));
    // The caption's dash and curly quotes are WinAnsi codes; the emoji becomes "?".
    assert!(
        text.contains(r"(They laugh \227 \223happily\224 ?.)"),
        "caption not WinAnsi-encoded as expected"
    );
    validate_with_tools(&pdf);

    // Seven ready frames make two pages.
    let captions: Vec<String> = (1..=7).map(|i| format!("Panel {i}.")).collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let long = create_story(&server, "Seven", &refs, &[]).await;
    for (i, frame) in long["frames"].as_array().unwrap().iter().enumerate() {
        let img = common::encode(&test_image(6, 6), image::ImageFormat::Png);
        store_frame_image(
            &server,
            frame["id"].as_i64().unwrap(),
            &img,
            i as i64,
            100,
            "ready",
        )
        .await;
    }
    let pdf = http
        .get(server.at(&format!("/api/stories/{}/export.pdf", long["id"])))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(check_pdf(&pdf), (2, 7));
    validate_with_tools(&pdf);

    // The strip shows the generated frames with their facts and links the exports.
    let strip = get_text(&server, &format!("/ui/stories/{id}/frames")).await;
    assert!(strip.contains(&format!(
        "src=\"/api/stories/{id}/frames/{}/image?v=11\"",
        frames[0]
    )));
    assert!(strip.contains("<dd class=\"frame-seed\">33</dd>"));
    assert!(strip.contains("<dd class=\"frame-time\">2.8 s</dd>"));
    assert!(strip.contains(&format!(
        "id=\"export-pdf\" href=\"/api/stories/{id}/export.pdf\""
    )));
}

async fn the_generate_panel_starts_and_cancels_jobs_with_and_without_htmx(backend: Backend) {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, data.path(), &[]);
    let tom = create_character_id(&server, "Tom", "he").await;
    let story = create_story(&server, "Panel", &["Tom waves.", "He sits."], &[tom]).await;
    let id = story["id"].as_i64().unwrap();
    let page = get_text(&server, &format!("/stories/{id}")).await;
    assert!(
        page.contains("id=\"generate-story\""),
        "the panel offers generation"
    );
    assert!(
        page.contains("untrained"),
        "an untrained model is said to be one"
    );

    // Without HTMX: a plain form post queues the job and comes back to the page.
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[("steps", "2"), ("seed", "5")],
        false,
    )
    .await;
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    let jobs = get_json(&server, &format!("/api/jobs?story_id={id}")).await;
    let job = jobs["items"][0]["id"].as_i64().unwrap();
    let done = wait_job(&server, job, "succeeded").await;
    assert_eq!(done["steps"], 2);
    // The model's defaults for what the form left alone: the random bundle's PNDM.
    assert_eq!(done["scheduler"], "pndm");
    let story = get_json(&server, &format!("/api/stories/{id}")).await;
    assert_eq!(story["frames"][1]["seed"], 6, "seed + position");
    let pndm_frame =
        common::get_png(&server, story["frames"][1]["image_url"].as_str().unwrap()).await;

    // Every sampling option of the panel reaches the job; another sampler draws another frame
    // from the same seed.
    for field in ["guidance_scale", "scheduler"] {
        assert!(
            page.contains(&format!("name=\"{field}\"")),
            "the panel offers {field}"
        );
    }
    assert!(page.contains("<option value=\"euler-a\""));
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[
            ("steps", "2"),
            ("seed", "5"),
            ("guidance_scale", "7.5"),
            ("scheduler", "ddim"),
        ],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(element_text(&r.text().await.unwrap(), "generate-status")
        .contains("2 ddim steps each, guidance 7.5"));
    let jobs = get_json(&server, &format!("/api/jobs?story_id={id}")).await;
    let job = jobs["items"].as_array().unwrap().last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let done = wait_job(&server, job, "succeeded").await;
    assert_eq!(
        (done["scheduler"].as_str(), done["guidance_scale"].as_f64()),
        (Some("ddim"), Some(7.5))
    );
    let story = get_json(&server, &format!("/api/stories/{id}")).await;
    assert_eq!(story["frames"][1]["seed"], 6);
    let ddim_frame =
        common::get_png(&server, story["frames"][1]["image_url"].as_str().unwrap()).await;
    assert_ne!(pndm_frame, ddim_frame, "the sampler is used");
    // A negative prompt steers guidance away from it: the same seed and options draw another
    // frame, and the job records it.
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[
            ("steps", "2"),
            ("seed", "5"),
            ("guidance_scale", "7.5"),
            ("scheduler", "ddim"),
            ("negative_prompt", "a dark forest at night"),
        ],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let jobs = get_json(&server, &format!("/api/jobs?story_id={id}")).await;
    let job = jobs["items"].as_array().unwrap().last().unwrap()["id"]
        .as_i64()
        .unwrap();
    let done = wait_job(&server, job, "succeeded").await;
    assert_eq!(done["negative_prompt"], "a dark forest at night");
    let story = get_json(&server, &format!("/api/stories/{id}")).await;
    let negative_frame =
        common::get_png(&server, story["frames"][1]["image_url"].as_str().unwrap()).await;
    assert_ne!(ddim_frame, negative_frame, "the negative prompt is used");
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[("negative_prompt", &"x".repeat(1001))],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(element_text(&r.text().await.unwrap(), "generate-status").contains("negative prompt"));

    // Refused: the panel says why (422 so HTMX swaps it in), and nothing is queued.
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[("steps", "0")],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = r.text().await.unwrap();
    assert!(
        element_text(&html, "generate-status").contains("between 1 and 200"),
        "{html}"
    );
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[("seed", "x")],
        false,
    )
    .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.text().await.unwrap().contains("whole number"));
    let jobs = get_json(&server, &format!("/api/jobs?story_id={id}")).await;
    assert_eq!(
        jobs["items"].as_array().unwrap().len(),
        3,
        "the three above, nothing more"
    );

    // With HTMX: the panel comes back showing the running job, with a cancel button that works.
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/generate"),
        &[("steps", "200")],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["hx-trigger"], "frames-changed");
    let html = r.text().await.unwrap();
    assert!(html.contains("id=\"cancel-job\""), "{html}");
    assert!(element_text(&html, "generate-status").contains("2 frames with 200 pndm steps"));
    let jobs = get_json(
        &server,
        &format!("/api/jobs?story_id={id}&status=queued,running"),
    )
    .await;
    let job = jobs["items"][0]["id"].as_i64().unwrap();
    wait_job(&server, job, "running").await;
    // While it runs: the time left, from the step time measured on the jobs before.
    let panel = get_text(&server, &format!("/ui/stories/{id}/generate-panel")).await;
    assert!(
        element_text(&panel, "job-eta").starts_with("Done in "),
        "{panel}"
    );
    assert!(panel.contains("data-step-ms=\"") && !panel.contains("data-step-ms=\"\""));
    // Another story's job waits behind it, and its panel says so, with the wait in all.
    let other = create_story(&server, "Behind", &["Tom sits."], &[tom]).await;
    let other_id = other["id"].as_i64().unwrap();
    let r = post_form(
        &server,
        &format!("/ui/stories/{other_id}/generate"),
        &[("steps", "2")],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    let html = r.text().await.unwrap();
    assert_eq!(element_text(&html, "job-queue"), "Waiting behind 1 job.");
    assert!(
        element_text(&html, "job-eta").ends_with("in all."),
        "{html}"
    );
    // Another story's address cannot cancel it.
    let r = post_form(
        &server,
        &format!("/ui/stories/{}/jobs/{job}/cancel", id + 1000),
        &[],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = post_form(
        &server,
        &format!("/ui/stories/{id}/jobs/{job}/cancel"),
        &[],
        true,
    )
    .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("Stopping job"));
    wait_job(&server, job, "cancelled").await;
    let panel = get_text(&server, &format!("/ui/stories/{id}/generate-panel")).await;
    assert!(panel.contains("id=\"generate-story\"") && !panel.contains("cancel-job"));
}

/// The cast a trained bundle lists: three of the toy world's characters, each portrait its
/// own colour and size so the stored copies can be told apart.
fn toy_cast() -> (String, Vec<(&'static str, Vec<u8>)>) {
    let json = json!([
        {"name": "Tom", "pronoun": "he", "description": "a boy with short brown hair", "portrait": "tom.png"},
        {"name": "Mia", "pronoun": "she", "description": "a woman with long yellow hair", "portrait": "mia.png"},
        {"name": "Bob", "pronoun": "he", "description": "a man with a green hat", "portrait": "bob.png"},
    ]);
    let portraits = vec![
        ("tom.png", colour_png(6, 5, [200, 40, 40])),
        ("mia.png", colour_png(7, 5, [240, 220, 40])),
        ("bob.png", colour_png(8, 5, [40, 160, 40])),
    ];
    (json.to_string(), portraits)
}

fn names_of(characters: &Value) -> Vec<String> {
    characters["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

async fn the_models_starter_cast_is_offered_added_once_and_makes_an_example_story(
    backend: Backend,
) {
    let dir = tempfile::tempdir().unwrap();
    let (cast, portraits) = toy_cast();
    let bundle = common::bundle_with_cast(dir.path(), &cast, &portraits);
    let data = dir.path().join("data");
    let server = Server::start_on(backend, &data, &["--bundle", bundle.to_str().unwrap()]);

    // The studio shows the panel, and the add form says what a portrait of someone else does.
    let page = get_text(&server, "/").await;
    assert_eq!(
        element_text(&page, "starter-cast-heading"),
        "This model was trained on 3 characters"
    );
    for name in ["Tom", "Mia", "Bob"] {
        assert!(
            page.contains(&format!("> {name} <span class=\"pronoun\">")),
            "{page}"
        );
    }
    assert!(page.contains("id=\"add-starter-cast\"") && page.contains("id=\"add-starter-story\""));
    assert!(element_text(&page, "character-known-note")
        .contains("only knows the 3 characters it was trained on"));
    assert!(page.contains("aria-describedby=\"character-portrait-hint character-portrait-error character-known-note\""));

    // The same cast through the API, with the portraits the model learned from.
    let listed = get_json(&server, "/api/model/cast").await;
    assert_eq!(listed.as_array().unwrap().len(), 3, "{listed}");
    assert_eq!(listed[1]["name"], "Mia");
    assert_eq!(listed[1]["pronoun"], "she");
    assert_eq!(listed[1]["description"], "a woman with long yellow hair");
    let png = common::get_png(&server, listed[1]["portrait_url"].as_str().unwrap()).await;
    assert_eq!(
        image::load_from_memory(&png)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (7, 5)
    );
    let none = no_redirects()
        .get(server.at("/api/model/cast/3/portrait"))
        .send()
        .await
        .unwrap();
    common::problem(none, StatusCode::NOT_FOUND, "not_found").await;

    // One click (HTMX) adds all three as ordinary characters with their portraits.
    let response = post_form(&server, "/ui/characters/starter-cast", &[], true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["hx-trigger"], "characters-changed");
    let html = response.text().await.unwrap();
    assert_eq!(
        element_text(&html, "characters-status"),
        "Added 3 characters."
    );
    assert_eq!(
        element_text(&html, "starter-cast-hint"),
        "All of them are in your library already."
    );
    let characters = get_json(&server, "/api/characters").await;
    assert_eq!(names_of(&characters), ["Tom", "Mia", "Bob"]);
    for (character, (_, original)) in characters["items"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&portraits)
    {
        assert!(html.contains(&format!(
            "Portrait of {}",
            character["name"].as_str().unwrap()
        )));
        let stored = common::get_png(&server, character["portrait"]["url"].as_str().unwrap()).await;
        assert_eq!(
            image::load_from_memory(&stored).unwrap().to_rgb8(),
            image::load_from_memory(original).unwrap().to_rgb8()
        );
    }
    assert_eq!(characters["items"][1]["pronoun"], "she");

    // A second click adds nothing and says so.
    let html = post_form(&server, "/ui/characters/starter-cast", &[], true)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        element_text(&html, "characters-status"),
        "Nothing added: all 3 characters of the starter cast were already there."
    );
    assert_eq!(
        get_json(&server, "/api/characters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    // They are ordinary characters: renamed or deleted, the cast fills in only what is missing,
    // matching names in any case.
    let ids: Vec<i64> = characters["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    let renamed = no_redirects()
        .patch(server.at(&format!("/api/characters/{}", ids[0])))
        .json(&json!({"name": "TOM"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    let deleted = no_redirects()
        .delete(server.at(&format!("/api/characters/{}", ids[1])))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let html = post_form(&server, "/ui/characters/starter-cast", &[], true)
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(
        element_text(&html, "characters-status"),
        "Added 1 character; Tom, Bob were already there."
    );
    let characters = get_json(&server, "/api/characters").await;
    assert_eq!(names_of(&characters), ["TOM", "Bob", "Mia"]);
    let mia = characters["items"][2]["id"].as_i64().unwrap();

    // The API twin, and the form without JavaScript (a redirect back to the list).
    let deleted = no_redirects()
        .delete(server.at(&format!("/api/characters/{}", ids[2])))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let added: Value = no_redirects()
        .post(server.at("/api/characters/starter-cast"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(added["added"].as_array().unwrap().len(), 1, "{added}");
    assert_eq!(added["added"][0]["name"], "Bob");
    assert_eq!(added["skipped"], json!(["Tom", "Mia"]));
    let bob = added["added"][0]["id"].as_i64().unwrap();
    assert_eq!(added["character_ids"], json!([ids[0], mia, bob]));
    let response = post_form(&server, "/ui/characters/starter-cast", &[], false).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/#characters");

    // The example story: the starter cast as its cast, four captions, and the studio goes to it.
    let response = post_form(&server, "/ui/characters/starter-cast/story", &[], true).await;
    assert_eq!(response.status(), StatusCode::OK);
    let location = response.headers()["hx-redirect"]
        .to_str()
        .unwrap()
        .to_string();
    let story_id: i64 = location.strip_prefix("/stories/").unwrap().parse().unwrap();
    let story = get_json(&server, &format!("/api/stories/{story_id}")).await;
    assert_eq!(
        captions_of(&story),
        [
            "Mia walks in the forest.",
            "She waves at Bob.",
            "Bob and Mia laugh at the beach.",
            "They look at a red ball."
        ]
    );
    assert_eq!(story["character_ids"], json!([ids[0], mia, bob]));
    let story_page = get_text(&server, &location).await;
    assert!(story_page.contains("She waves at Bob."));
    let response = post_form(&server, "/ui/characters/starter-cast/story", &[], false).await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let second = response.headers()["location"].to_str().unwrap().to_string();
    assert!(
        second.starts_with("/stories/") && second != location,
        "{second}"
    );
    assert_eq!(
        get_json(&server, "/api/characters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );

    let doc = get_json(&server, "/openapi.json").await;
    assert!(doc["paths"]["/api/model/cast"]["get"].is_object());
    assert!(doc["paths"]["/api/model/cast/{k}/portrait"]["get"].is_object());
    assert!(doc["paths"]["/api/characters/starter-cast"]["post"].is_object());
    assert!(get_text(&server, "/docs")
        .await
        .contains("/api/characters/starter-cast"));
}

async fn without_a_usable_starter_cast_the_studio_offers_none(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    // A random bundle has no cast/ at all.
    let server = Server::start_on(backend, &dir.path().join("plain"), &[]);
    let page = get_text(&server, "/").await;
    assert!(!page.contains("starter-cast") && !page.contains("character-known-note"));
    assert_eq!(get_json(&server, "/api/model/cast").await, json!([]));
    let refused = no_redirects()
        .post(server.at("/api/characters/starter-cast"))
        .send()
        .await
        .unwrap();
    common::problem(refused, StatusCode::NOT_FOUND, "no_starter_cast").await;
    let refused = post_form(&server, "/ui/characters/starter-cast", &[], true).await;
    assert_eq!(refused.status(), StatusCode::NOT_FOUND);
    drop(server);

    // A broken cast: the server still starts, says why in its log, and offers nothing.
    let (_, portraits) = toy_cast();
    let missing_portrait = json!([
        {"name": "Tom", "pronoun": "he", "description": "", "portrait": "tom.png"},
        {"name": "Rex", "pronoun": "it", "description": "a dog", "portrait": "rex.png"},
    ])
    .to_string();
    for (label, cast, reason) in [
        ("malformed", "[{\"name\": \"Tom\",", "not a JSON list"),
        ("missing", missing_portrait.as_str(), "rex.png"),
    ] {
        let root = dir.path().join(label);
        let bundle = common::bundle_with_cast(&root, cast, &portraits);
        let server = Server::start_on(
            backend,
            &root.join("data"),
            &["--bundle", bundle.to_str().unwrap()],
        );
        let page = get_text(&server, "/").await;
        assert!(
            !page.contains("starter-cast") && !page.contains("character-known-note"),
            "{label}"
        );
        assert_eq!(
            get_json(&server, "/api/model/cast").await,
            json!([]),
            "{label}"
        );
        let log = server.log();
        assert!(
            log.contains("starter cast is not offered") && log.contains(reason),
            "{label}: {log}"
        );
    }
}

/// Issue #15's defects of the story form: a story is not created without a cast silently,
/// the characters its captions name are offered ticked, and the limits are shown while typing.
async fn a_new_story_is_offered_the_cast_its_captions_name_and_shows_its_limits(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let mia = create_character_id(&server, "Mia", "she").await;
    let bob = create_character_id(&server, "Bob", "he").await;
    let rex = create_character_id(&server, "Rex", "he").await;
    let captions = "Mia walks in the forest.\nShe waves at Bob.";

    // Nothing ticked: not created; Mia and Bob come back ticked, with what that means.
    for htmx in [true, false] {
        let response = post_form(
            &server,
            "/ui/stories",
            &[("title", "Walk"), ("captions", captions)],
            htmx,
        )
        .await;
        assert_eq!(response.status(), StatusCode::OK, "htmx {htmx}");
        let html = response.text().await.unwrap();
        let notice = element_text(&html, "story-cast-notice");
        assert!(notice.contains("The captions name Mia, Bob"), "{notice}");
        assert!(html.contains(&format!("value=\"{mia}\"\n        checked")));
        assert!(html.contains(&format!("value=\"{bob}\"\n        checked")));
        assert!(html.contains("name=\"cast_confirmed\" value=\"1\""));
    }
    assert_eq!(get_json(&server, "/api/stories").await["items"], json!([]));
    // Confirmed as offered: created with that cast.
    let response = post_form(
        &server,
        "/ui/stories",
        &[
            ("title", "Walk"),
            ("captions", captions),
            ("character_id", &mia.to_string()),
            ("character_id", &bob.to_string()),
            ("cast_confirmed", "1"),
        ],
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let stories = get_json(&server, "/api/stories").await;
    let id = stories["items"][0]["id"].as_i64().unwrap();
    assert_eq!(
        get_json(&server, &format!("/api/stories/{id}")).await["character_ids"],
        json!([mia, bob])
    );
    // Captions naming nobody: said before creating; a second press creates it without a cast.
    let html = post_form(
        &server,
        "/ui/stories",
        &[("title", "Cat"), ("captions", "A cat sleeps.")],
        true,
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(element_text(&html, "story-cast-notice").contains("No character is cast"));
    let response = post_form(
        &server,
        "/ui/stories",
        &[
            ("title", "Cat"),
            ("captions", "A cat sleeps."),
            ("cast_confirmed", "1"),
        ],
        false,
    )
    .await;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    // Its page says what a story without a cast means.
    let cat = get_json(&server, "/api/stories").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["title"] == "Cat")
        .unwrap()["id"]
        .as_i64()
        .unwrap();
    let page = get_text(&server, &format!("/stories/{cat}")).await;
    assert!(element_text(&page, "cast-legend").contains("No cast"));
    // A page with a cast shows its portraits.
    let page = get_text(&server, &format!("/stories/{id}")).await;
    assert!(page.contains(&format!(
        "<img class=\"cast-portrait\" src=\"/api/characters/{mia}/portrait\" alt=\"Portrait of Mia\""
    )));

    // While typing: the names found (for the script to tick) and the limits, per caption.
    let long = "x".repeat(1001);
    let wordy = "Mia waves ".repeat(60);
    let draft = post_form(
        &server,
        "/ui/stories/draft",
        &[("captions", &format!("Rex runs.\n{long}\n{wordy}"))],
        true,
    )
    .await;
    assert_eq!(draft.status(), StatusCode::OK);
    let html = draft.text().await.unwrap();
    assert!(
        html.contains(&format!("data-named-ids=\"{mia},{rex}\"")),
        "{html}"
    );
    assert!(html.contains("Caption 2: The caption is 1001 characters long; at most 1000"));
    assert!(html.contains("Caption 3: "), "{html}");
    assert!(
        html.contains("tokens: the model reads only the first 77"),
        "{html}"
    );
    assert!(html.contains("Named in the captions: Mia, Rex."));
    // A caption over the limit is refused, never cut.
    let response = post_form(
        &server,
        "/ui/stories",
        &[
            ("title", "Long"),
            ("captions", &long),
            ("character_id", &mia.to_string()),
        ],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        response.text().await.unwrap().contains(&long),
        "the text is kept"
    );
}

/// Renaming a character can carry the new name into its stories' captions; its portrait can
/// be replaced; the caption editor counts characters and tokens and has no cutting maxlength.
async fn renames_reach_the_captions_and_portraits_can_be_replaced(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let fred = create_character_id(&server, "Fred", "he").await;
    let wilma = create_character_id(&server, "Wilma", "she").await;
    let cast_in = create_story(
        &server,
        "Quarry",
        &["Fred waves at Wilma.", "Freddy naps; Fred's hat falls."],
        &[fred, wilma],
    )
    .await;
    let not_cast = create_story(&server, "Other", &["Fred is not cast here."], &[wilma]).await;

    // Unticked box: the name changes, the captions do not.
    let response = post_form(
        &server,
        &format!("/ui/characters/{fred}/rename"),
        &[("name", "Fredo"), ("pronoun", "he")],
        true,
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    let story = get_json(&server, &format!("/api/stories/{}", cast_in["id"])).await;
    assert_eq!(captions_of(&story)[0], "Fred waves at Wilma.");
    // The form offers the rewrite, ticked.
    let home = get_text(&server, "/").await;
    assert!(home.contains(&format!(
        "id=\"rename-captions-{fred}\" name=\"rewrite_captions\" value=\"1\" checked"
    )));
    // Back to Fred, then to Frederick with the box ticked: the cast story's captions follow.
    post_form(
        &server,
        &format!("/ui/characters/{fred}/rename"),
        &[("name", "Fred"), ("pronoun", "he")],
        true,
    )
    .await;
    let html = post_form(
        &server,
        &format!("/ui/characters/{fred}/rename"),
        &[
            ("name", "Frederick"),
            ("pronoun", "he"),
            ("rewrite_captions", "1"),
        ],
        true,
    )
    .await
    .text()
    .await
    .unwrap();
    assert_eq!(
        element_text(&html, "characters-status"),
        "Renamed Fred to Frederick (he). 2 captions in 1 story now say Frederick."
    );
    let story = get_json(&server, &format!("/api/stories/{}", cast_in["id"])).await;
    assert_eq!(
        captions_of(&story),
        [
            "Frederick waves at Wilma.",
            "Freddy naps; Frederick's hat falls."
        ]
    );
    let other = get_json(&server, &format!("/api/stories/{}", not_cast["id"])).await;
    assert_eq!(
        captions_of(&other),
        ["Fred is not cast here."],
        "not cast, not touched"
    );
    // The API does the same on request.
    let response = common::http()
        .patch(server.at(&format!("/api/characters/{fred}")))
        .json(&json!({"name": "Fred", "rewrite_captions": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let story = get_json(&server, &format!("/api/stories/{}", cast_in["id"])).await;
    assert_eq!(captions_of(&story)[0], "Fred waves at Wilma.");

    // A new portrait through the page; a broken one is refused on the card, in plain words.
    let before = get_json(&server, &format!("/api/characters/{fred}")).await;
    let form = reqwest::multipart::Form::new().part(
        "portrait",
        reqwest::multipart::Part::bytes(png(24, 24))
            .file_name("new.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let response = no_redirects()
        .post(server.at(&format!("/ui/characters/{fred}/portrait")))
        .header("hx-request", "true")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert_eq!(
        element_text(&html, "characters-status"),
        "Replaced the portrait of Fred."
    );
    let after = get_json(&server, &format!("/api/characters/{fred}")).await;
    assert_eq!(after["portrait"]["width"], 24);
    assert_ne!(before["portrait"]["width"], after["portrait"]["width"]);
    let mut broken = png(24, 24);
    broken.truncate(40);
    let form = reqwest::multipart::Form::new().part(
        "portrait",
        reqwest::multipart::Part::bytes(broken)
            .file_name("broken.png")
            .mime_str("image/png")
            .unwrap(),
    );
    let response = no_redirects()
        .post(server.at(&format!("/ui/characters/{fred}/portrait")))
        .header("hx-request", "true")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    let message = element_text(&html, &format!("portrait-file-{fred}-error"));
    assert!(message.contains("damaged or incomplete"), "{message}");
    assert_eq!(
        get_json(&server, &format!("/api/characters/{fred}")).await["portrait"]["width"],
        24
    );

    // The caption editor: no maxlength that would cut a paste; a meter and a token warning.
    let story_id = cast_in["id"].as_i64().unwrap();
    let page = get_text(&server, &format!("/stories/{story_id}")).await;
    assert!(!page.contains("maxlength=\"1000\""));
    assert!(page.contains("characters, "), "a meter under each caption");
    let html = post_form(
        &server,
        &format!("/ui/stories/{story_id}/highlight"),
        &[("caption", &"Fred waves. ".repeat(40))],
        true,
    )
    .await
    .text()
    .await
    .unwrap();
    assert!(html.contains("note-truncated"), "{html}");
    assert!(html.contains("the model reads only the first 77"), "{html}");
}

async fn unknown_pages_answer_the_studios_error_page(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    for path in ["/no/such/page", "/stories/999999", "/stories/abc"] {
        let response = common::http().get(server.at(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        let html = response.text().await.unwrap();
        assert!(
            html.contains("/static/app.css"),
            "in the studio's style: {path}"
        );
        assert!(html.contains("href=\"/\">Back to the studio"), "{path}");
        assert!(!element_text(&html, "error-detail").is_empty(), "{path}");
    }
}

async fn export_zip(server: &Server, story: i64) -> Vec<u8> {
    let response = common::http()
        .get(server.at(&format!("/api/stories/{story}/export.zip")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.bytes().await.unwrap().to_vec()
}

async fn import_zip(server: &Server, bytes: Vec<u8>) -> reqwest::Response {
    common::http()
        .post(server.at("/api/stories/import"))
        .header("content-type", "application/zip")
        .body(bytes)
        .send()
        .await
        .unwrap()
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write;
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        writer
            .start_file(*name, zip::write::SimpleFileOptions::default())
            .unwrap();
        writer.write_all(bytes).unwrap();
    }
    writer.finish().unwrap().into_inner()
}

fn pixels(png: &[u8]) -> image::RgbImage {
    image::load_from_memory(png).unwrap().to_rgb8()
}

/// Issue #15: the ZIP carries what is needed to draw the story again (cast with portraits,
/// seeds, steps, guidance, sampler, bundle) and imports back as a new story, here or on
/// another server; a broken archive is refused whole.
async fn a_story_zip_reproduces_the_story_and_imports_back(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_on(backend, dir.path(), &[]);
    let tom = create_character_id(&server, "Tom", "he").await;
    let mia = create_character_id(&server, "Mia", "she").await;
    let story = create_story(
        &server,
        "Garden",
        &["Tom walks in.", "He waves at Mia.", "They laugh."],
        &[tom, mia],
    )
    .await;
    let id = story["id"].as_i64().unwrap();
    let job: Value = common::http()
        .post(server.at(&format!("/api/stories/{id}/generate")))
        .json(&json!({"steps": 3, "seed": 40, "guidance_scale": 6.0, "scheduler": "ddim"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    wait_job(&server, job["id"].as_i64().unwrap(), "succeeded").await;
    let drawn = get_json(&server, &format!("/api/stories/{id}")).await;
    let zip = export_zip(&server, id).await;
    let mut archive = zip::ZipArchive::new(Cursor::new(zip.clone())).unwrap();
    let mut text = String::new();
    archive
        .by_name("story.json")
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let bundle = get_json(&server, "/readyz").await["model"]["name"].clone();
    for (i, frame) in json["frames"].as_array().unwrap().iter().enumerate() {
        assert_eq!(frame["seed"], 40 + i as i64);
        assert_eq!(frame["steps"], 3);
        assert_eq!(frame["guidance_scale"], 6.0);
        assert_eq!(frame["scheduler"], "ddim");
        assert_eq!(frame["bundle"], bundle, "{frame}");
    }

    // On another server, with an empty library: the cast comes from the archive's portraits,
    // the frames with their images and seeds, ready.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Server::start_on(backend, other_dir.path(), &[]);
    let response = import_zip(&other, zip.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let imported: Value = response.json().await.unwrap();
    assert_eq!(imported["title"], "Garden");
    assert_eq!(captions_of(&imported), captions_of(&drawn));
    let library = get_json(&other, "/api/characters").await;
    let names: Vec<&str> = library["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Tom", "Mia"]);
    for (a, b) in [(tom, 0usize), (mia, 1)] {
        let original = common::get_png(&server, &format!("/api/characters/{a}/portrait")).await;
        let copy_id = library["items"][b]["id"].as_i64().unwrap();
        let copy = common::get_png(&other, &format!("/api/characters/{copy_id}/portrait")).await;
        assert_eq!(
            pixels(&original),
            pixels(&copy),
            "the portrait of {}",
            names[b]
        );
    }
    for (before, after) in drawn["frames"]
        .as_array()
        .unwrap()
        .iter()
        .zip(imported["frames"].as_array().unwrap())
    {
        assert_eq!(after["status"], "ready");
        assert_eq!(after["seed"], before["seed"]);
        let a = common::get_png(&server, before["image_url"].as_str().unwrap()).await;
        let b = common::get_png(&other, after["image_url"].as_str().unwrap()).await;
        assert_eq!(pixels(&a), pixels(&b));
        // Each image is its frame's first version, with how it was drawn, in context.
        assert_eq!(after["versions"], 1);
        assert_eq!(after["older_context"], false);
        let versions = get_json(
            &other,
            &format!(
                "/api/stories/{}/frames/{}/versions",
                imported["id"], after["id"]
            ),
        )
        .await;
        assert_eq!(versions[0]["options"]["steps"], 3);
        assert_eq!(versions[0]["options"]["scheduler"], "ddim");
        assert_eq!(versions[0]["seed"], before["seed"]);
    }
    // Redrawn there with the archive's seeds and options (the same bundle), the frames come
    // out the same: the archive is enough to reproduce the story.
    let again: Value = common::http()
        .post(other.at(&format!("/api/stories/{}/generate", imported["id"])))
        .json(&json!({"steps": 3, "guidance_scale": 6.0, "scheduler": "ddim", "keep_seeds": true}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    wait_job(&other, again["id"].as_i64().unwrap(), "succeeded").await;
    let redrawn = get_json(&other, &format!("/api/stories/{}", imported["id"])).await;
    for (before, after) in drawn["frames"]
        .as_array()
        .unwrap()
        .iter()
        .zip(redrawn["frames"].as_array().unwrap())
    {
        assert_eq!(after["seed"], before["seed"]);
        let a = common::get_png(&server, before["image_url"].as_str().unwrap()).await;
        let b = common::get_png(&other, after["image_url"].as_str().unwrap()).await;
        assert_eq!(
            pixels(&a),
            pixels(&b),
            "frame {} drawn again",
            before["position"]
        );
    }

    // Here: the library's Tom and Mia are used, not copied.
    let response = import_zip(&server, zip.clone()).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let second: Value = response.json().await.unwrap();
    assert_eq!(second["character_ids"], json!([tom, mia]));
    assert_eq!(
        get_json(&server, "/api/characters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Refused whole, with the reason: nothing is added.
    let stories_before = get_json(&other, "/api/stories").await["items"]
        .as_array()
        .unwrap()
        .len();
    let story_json = text.clone();
    let cases: Vec<(Vec<u8>, &str, &str)> = vec![
        (
            b"not a zip".to_vec(),
            "invalid_archive",
            "not a ZIP archive",
        ),
        (
            zip_of(&[("readme.txt", b"hi")]),
            "invalid_archive",
            "no story.json",
        ),
        (
            zip_of(&[(
                "story.json",
                br#"{"format": "something else", "version": 1, "title": "x", "frames": []}"#,
            )]),
            "invalid_archive",
            "not \"storygpt-v story export\"",
        ),
        (
            zip_of(&[(
                "story.json",
                story_json
                    .replace("\"version\": 2", "\"version\": 9")
                    .as_bytes(),
            )]),
            "invalid_archive",
            "version 9",
        ),
        // story.json names portraits and frames the archive lacks.
        (
            zip_of(&[("story.json", story_json.as_bytes())]),
            "invalid_archive",
            "portraits/01-tom.png",
        ),
        // A frame that is no image (after a valid portrait was read: still nothing is stored).
        (
            {
                let mut entries: Vec<(String, Vec<u8>)> = Vec::new();
                for i in 0..archive.len() {
                    let mut f = archive.by_index(i).unwrap();
                    let mut b = Vec::new();
                    f.read_to_end(&mut b).unwrap();
                    let name = f.name().unwrap().to_string();
                    if name == "frame-02.png" {
                        b = b"garbage".to_vec();
                    }
                    entries.push((name, b));
                }
                let refs: Vec<(&str, &[u8])> = entries
                    .iter()
                    .map(|(n, b)| (n.as_str(), b.as_slice()))
                    .collect();
                zip_of(&refs)
            },
            "unsupported_image_type",
            "the image of frame 2",
        ),
    ];
    for (bytes, code, words) in cases {
        let response = import_zip(&other, bytes).await;
        let problem = common::problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.contains(words), "{code}: {detail}");
    }
    // A small archive that would inflate past the limit is stopped while reading.
    let bomb = {
        use std::io::Write;
        let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let deflate = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .large_file(true);
        writer.start_file("story.json", deflate).unwrap();
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..8 {
            writer.write_all(&zeros).unwrap();
        }
        writer.finish().unwrap().into_inner()
    };
    assert!(bomb.len() < 64 * 1024, "{} bytes", bomb.len());
    let problem = common::problem(
        import_zip(&other, bomb).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_archive",
    )
    .await;
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("larger than 2 MiB"));
    let response = common::http()
        .post(other.at("/api/stories/import"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(
        get_json(&other, "/api/stories").await["items"]
            .as_array()
            .unwrap()
            .len(),
        stories_before
    );
    assert_eq!(
        get_json(&other, "/api/characters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // The studio's import form.
    let form = reqwest::multipart::Form::new().part(
        "archive",
        reqwest::multipart::Part::bytes(zip)
            .file_name("garden.zip")
            .mime_str("application/zip")
            .unwrap(),
    );
    let response = no_redirects()
        .post(other.at("/ui/stories/import"))
        .header("hx-request", "true")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let html = response.text().await.unwrap();
    assert_eq!(
        element_text(&html, "import-status"),
        "Imported \u{201c}Garden\u{201d} (3 captions)."
    );
    let form = reqwest::multipart::Form::new().part(
        "archive",
        reqwest::multipart::Part::bytes(b"nope".to_vec()).file_name("x.zip"),
    );
    let response = no_redirects()
        .post(other.at("/ui/stories/import"))
        .header("hx-request", "true")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let html = response.text().await.unwrap();
    assert!(
        element_text(&html, "import-archive-error").contains("Not a ZIP archive")
            || element_text(&html, "import-archive-error").contains("not a ZIP archive")
    );
}

on_both_stores!(
    captions_are_edited_and_reordered_through_the_page,
    captions_are_highlighted_with_resolved_pronouns_and_unknown_names,
    the_character_library_renames_deletes_and_explains_refused_uploads,
    stories_export_as_zip_gif_and_pdf,
    the_generate_panel_starts_and_cancels_jobs_with_and_without_htmx,
    the_models_starter_cast_is_offered_added_once_and_makes_an_example_story,
    without_a_usable_starter_cast_the_studio_offers_none,
    a_new_story_is_offered_the_cast_its_captions_name_and_shows_its_limits,
    renames_reach_the_captions_and_portraits_can_be_replaced,
    unknown_pages_answer_the_studios_error_page,
    a_story_zip_reproduces_the_story_and_imports_back,
);
