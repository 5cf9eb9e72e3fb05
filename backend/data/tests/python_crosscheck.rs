//! Cross-checks with CPython + numpy (tools/data/crosscheck.py): Python reads a toy dataset
//! the Rust writer made, and the Rust reader reads a dataset Python wrote. Skipped (passes
//! with a note) when `python3` with numpy is not available.

use std::path::{Path, PathBuf};
use std::process::Command;

use data::dataset::{DatasetKind, DatasetReader, Split};
use data::toyworld::{self, ToyConfig};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/data/crosscheck.py")
}

fn python_with_numpy() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("python3 with numpy not found: skipping the Python cross-check");
    }
    ok
}

#[test]
fn python_reads_rust_output() {
    if !python_with_numpy() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    toyworld::generate(
        dir.path(),
        &ToyConfig {
            stories: 12,
            size: 32,
            seed: 3,
            story_len: 5,
            threads: 2,
        },
    )
    .unwrap();
    let out = Command::new("python3")
        .arg(script())
        .arg("read")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 60 frames"));
}

#[test]
fn rust_reads_python_output() {
    if !python_with_numpy() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("python3")
        .arg(script())
        .arg("write")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    let reader = DatasetReader::open(dir.path(), DatasetKind::Flintstones, 4).unwrap();
    assert_eq!(
        reader.story_ids(Split::Val),
        vec![expected["story"].as_str().unwrap().to_string()]
    );
    let story = reader
        .load_story(expected["story"].as_str().unwrap(), 1)
        .unwrap();
    for (k, f) in story.frames.iter().enumerate() {
        assert_eq!(f.id, expected["frames"][k]);
        assert_eq!(f.caption, expected["captions"][k]);
        assert_eq!(f.referential, expected["referential"][k]);
        assert_eq!(serde_json::json!(f.characters), expected["characters"][k]);
        assert_eq!(f.background.as_deref(), expected["settings"][k].as_str());
        assert_eq!(
            serde_json::json!(f.image.as_ref().unwrap().as_raw()[0]),
            expected["pixel0"][k]
        );
        let boxes: Vec<[u32; 4]> = f.masks.iter().map(|m| m.bbox).collect();
        assert_eq!(serde_json::json!(boxes), expected["boxes"][k]);
        assert_eq!(
            f.char_labels.iter().sum::<f32>() as usize,
            f.characters.len()
        );
        assert_eq!(f.bg_labels.len(), 2);
    }
}
