//! `storygpt-v eval` end to end in miniature: the tiny bundle of `train all
//! --config configs/tiny/toy.toml`, a classifier from `configs/tiny/classifier.toml`, and a
//! quick evaluation of every system on a toy world of 6-frame stories at two story lengths.
//! The numbers of so small a model mean nothing; the test checks that every figure is
//! computed, lies in its range and lands in both reports, and that bad input is refused
//! before anything is drawn.

mod common;

use std::path::Path;
use std::process::Command;

use common::{binary, repo, tiny_bundle};
use serde_json::Value;

fn run(args: &[&str], paths: &[(&str, &Path)]) -> std::process::Output {
    let mut c = Command::new(binary());
    c.args(args).env("RAYON_NUM_THREADS", "2");
    for (flag, p) in paths {
        c.arg(flag).arg(p);
    }
    c.output().unwrap()
}

fn unit(v: &Value, what: &str) -> f64 {
    let x = v
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is missing: {v}"));
    assert!((0.0..=1.0).contains(&x), "{what} = {x}");
    x
}

#[test]
fn quick_eval_scores_every_system_at_every_length() {
    let bundle = tiny_bundle();
    let tmp = tempfile::tempdir().unwrap();
    let cls = tmp.path().join("cls");
    let res = run(
        &["train", "classifier"],
        &[
            ("--config", &repo("configs/tiny/classifier.toml")),
            ("--data", &bundle.join("data")),
            ("--out", &cls),
        ],
    );
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    // 6-frame stories of the same cast: 2 of the 20 are in the test split.
    let long = tmp.path().join("long");
    let res = run(
        &[
            "toyworld",
            "generate",
            "--stories",
            "20",
            "--size",
            "32",
            "--frames",
            "6",
        ],
        &[("--out", &long)],
    );
    assert!(res.status.success());
    let out = tmp.path().join("eval");
    let args = [
        "eval",
        "--quick",
        "--frames",
        "3,6",
        "--seed",
        "1",
        "--system",
        "ldm-text",
        "--system",
        "char-ldm-names",
        "--system",
        "storygpt-v",
    ];
    let paths: [(&str, &Path); 4] = [
        ("--bundle", bundle),
        ("--data", &long),
        ("--classifier", &cls),
        ("--out", &out),
    ];
    let res = run(&args, &paths);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    // The progress line counts every frame: 2 stories x (3 + 6) frames x 3 systems.
    assert!(stderr.contains("eval frame 54/54"), "{stderr}");

    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["steps"], 5);
    let lengths = r["lengths"].as_array().unwrap();
    assert_eq!(lengths.len(), 2);
    for (l, len) in lengths.iter().zip([3usize, 6]) {
        assert_eq!(l["frames"], len);
        assert_eq!(l["stories"], 2);
        let systems = l["systems"].as_array().unwrap();
        let names: Vec<&str> = systems
            .iter()
            .map(|s| s["system"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["ground-truth", "ldm-text", "char-ldm-names", "storygpt-v"]
        );
        for s in systems {
            let name = s["system"].as_str().unwrap();
            let all = &s["all"];
            assert_eq!(all["frames"], 2 * len, "{name}");
            for k in ["char_acc", "char_f1", "bg_acc", "bg_f1"] {
                unit(&all[k], &format!("{len} frames, {name}: {k}"));
            }
            let t = all["clip_text_image"].as_f64().unwrap();
            assert!((-1.0..=1.0).contains(&t), "{name}: CLIP-T {t}");
            let pronoun = s["pronoun"]["frames"].as_u64().unwrap();
            assert!(pronoun < 2 * len as u64, "{name}: {pronoun} pronoun frames");
            if name == "ground-truth" {
                assert!(all["fid_classifier"].is_null());
                continue;
            }
            assert!(all["fid_classifier"].as_f64().unwrap() >= 0.0, "{name}");
            let i = all["clip_image_image"].as_f64().unwrap();
            assert!((-1.0..=1.0).contains(&i), "{name}: CLIP-I {i}");
            assert!(s["seconds_per_frame"].as_f64().unwrap() > 0.0, "{name}");
        }
        assert!(l["peak_rss_mib"].as_f64().unwrap() > 0.0);
        let grid = image::open(out.join(format!("grids/{len}-frames.png"))).unwrap();
        // Ground truth above the three systems, one column per frame (32 px and 2 px gaps).
        assert_eq!(
            (grid.width(), grid.height()),
            (len as u32 * 34 + 2, 4 * 34 + 2)
        );
    }
    // Pronoun frames exist in 6-frame stories and are scored on their own.
    let six = &lengths[1]["systems"][3]["pronoun"];
    assert!(six["frames"].as_u64().unwrap() > 0, "{six}");
    unit(&six["char_acc"], "pronoun Char-Acc");

    let md = std::fs::read_to_string(out.join("results.md")).unwrap();
    for needle in [
        "## 3-frame stories",
        "## 6-frame stories",
        "| system | frames | Char-Acc | Char-F1 | BG-Acc | BG-F1 | FID (classifier) |",
        "| storygpt-v (pronoun frames) |",
        "| ldm-text |",
        "| char-ldm-names |",
        "## Char-Acc by story length",
    ] {
        assert!(md.contains(needle), "{needle} missing from:\n{md}");
    }

    // A length the dataset does not have is refused before anything is drawn.
    let res = run(
        &["eval", "--quick", "--frames", "4,7"],
        &[
            ("--bundle", bundle),
            ("--data", &long),
            ("--classifier", &cls),
            ("--out", &tmp.path().join("bad")),
        ],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("no stories of 7 frames"), "{stderr}");
    assert!(!stderr.contains("eval frame"), "{stderr}");

    // So is a classifier of another cast (the truth is looked up by name).
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(
        cls.join("classifier/model.safetensors"),
        other.join("model.safetensors"),
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(cls.join("classifier/config.json")).unwrap())
            .unwrap();
    config["characters"][0] = "Fred".into();
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    let res = run(
        &["eval", "--quick"],
        &[
            ("--bundle", bundle),
            ("--data", &long),
            ("--classifier", &other),
            ("--out", &tmp.path().join("bad")),
        ],
    );
    assert!(!res.status.success());
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("train a classifier on this dataset"),
        "{stderr}"
    );
}
