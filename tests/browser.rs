//! The studio in a real browser: tests/browser/studio.mjs (playwright-core from npm driving the
//! system's headless Chromium) against the real server with the random toy bundle.
//!
//! CI installs Debian's `chromium` (see .ci/run). Elsewhere the test is skipped, with a note,
//! when no Chromium is found; set CHROMIUM to use another binary. Under CI=true a missing
//! browser or missing node_modules is a failure, so the flow cannot silently stop being tested.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::Server;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn studio_flow_in_headless_chromium() {
    let in_ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Some(browser) = chromium() else {
        assert!(
            !in_ci,
            "CI must have Chromium installed (.ci/run installs Debian's chromium)"
        );
        eprintln!("skipped: no Chromium found (install `chromium` or set CHROMIUM)");
        return;
    };
    assert!(
        root.join("node_modules/playwright-core").is_dir(),
        "node_modules/playwright-core is missing: run `npm ci` first"
    );
    let data = tempfile::tempdir().unwrap();
    // With accounts on, as a shared server runs: the flow signs in first.
    let password = "the browser's long password";
    let mut add = Command::new(common::binary())
        .args(["user", "add", "tester", "--password-stdin", "--data-dir"])
        .arg(data.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run storygpt-v user add");
    {
        use std::io::Write;
        let mut stdin = add.stdin.take().expect("stdin");
        writeln!(stdin, "{password}").expect("write the password");
    }
    assert!(add.wait().expect("user add").success());
    let server = Server::start_with(data.path(), &["--auth", "on"], &[]);
    let shot = data.path().join("failure.png");
    let out = Command::new("node")
        .arg(root.join("tests/browser/studio.mjs"))
        .arg(&server.url)
        .current_dir(&root)
        .env("CHROMIUM", &browser)
        .env("PORTRAITS", root.join("examples/story/portraits"))
        .env("SCREENSHOT", &shot)
        .env("STUDIO_USER", "tester")
        .env("STUDIO_PASSWORD", password)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    if !out.status.success() {
        let kept = std::env::temp_dir().join("storygpt-v-browser-failure.png");
        let _ = std::fs::copy(&shot, &kept);
        panic!(
            "the browser flow failed (screenshot: {})\n{stdout}\n{stderr}",
            kept.display()
        );
    }
    assert!(stdout.contains("browser flow passed"));
}
