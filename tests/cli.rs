//! End-to-end tests of the offline subcommands through the real binary: `component` on the
//! committed reference fixtures (every KIND, outputs compared with diffusers / transformers),
//! `data make-referential` and `toyworld generate`.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{Device, Tensor};
use common::binary;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models/tests/fixtures")
        .join(name)
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Max abs difference, relative to the reference's scale as the parity tests measure it.
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(candle_core::DType::F32).unwrap();
    let diff = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    assert!(
        diff <= 1e-4 * scale,
        "{what}: max abs error {diff} (scale {scale})"
    );
}

fn run_component(kind: &str, model: &Path, inputs: &Path) -> HashMap<String, Tensor> {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let status = Command::new(binary())
        .args(["component", kind, "--model"])
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "component {kind} failed: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    load(&out)
}

#[test]
fn component_matches_the_reference_for_every_kind() {
    let clip_text = fixture("clip_text_quick");
    let got = run_component(
        "clip-text",
        &clip_text,
        &clip_text.join("inputs.safetensors"),
    );
    let want = load(&clip_text.join("outputs.safetensors"));
    assert_close(
        &got["last_hidden_state"],
        &want["last_hidden_state"],
        "clip-text last_hidden_state",
    );
    assert_close(
        &got["pooler_output"],
        &want["pooler_output"],
        "clip-text pooler_output",
    );

    let clip_vision = fixture("clip_vision_quick");
    let got = run_component(
        "clip-vision",
        &clip_vision,
        &clip_vision.join("inputs.safetensors"),
    );
    let want = load(&clip_vision.join("outputs.safetensors"));
    for name in ["last_hidden_state", "pooler_output", "image_embeds"] {
        assert_close(&got[name], &want[name], &format!("clip-vision {name}"));
    }

    let unet = fixture("unet_a");
    let io = unet.join("io.safetensors");
    let got = run_component("unet", &unet, &io);
    assert_close(&got["sample"], &load(&io)["out_sample"], "unet sample");

    let vae = fixture("vae_a");
    let io = vae.join("io.safetensors");
    let reference = load(&io);
    let got = run_component("vae-encode", &vae, &io);
    assert_close(&got["mean"], &reference["mean"], "vae-encode mean");
    let got = run_component("vae-decode", &vae, &io);
    assert_close(&got["sample"], &reference["decoded"], "vae-decode sample");

    let llm = fixture("llm_llama");
    let reference = load(&llm.join("reference.safetensors"));
    let dir = tempfile::tempdir().unwrap();
    let inputs = dir.path().join("ids.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([("input_ids".to_string(), reference["input_ids"].clone())]),
        &inputs,
    )
    .unwrap();
    let got = run_component("llm", &llm, &inputs);
    assert_close(&got["logits"], &reference["logits"], "llm logits");
    assert_close(
        &got["last_hidden_state"],
        &reference["last_hidden_state"],
        "llm last_hidden_state",
    );
}

#[test]
fn component_errors_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let missing = Command::new(binary())
        .args(["component", "unet", "--model"])
        .arg(dir.path().join("nowhere"))
        .args(["--inputs", "in.safetensors", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nowhere"));
    let bad_kind = Command::new(binary())
        .args([
            "component",
            "teapot",
            "--model",
            ".",
            "--inputs",
            "a",
            "--out",
            "b",
        ])
        .output()
        .unwrap();
    assert!(!bad_kind.status.success());
    assert!(String::from_utf8_lossy(&bad_kind.stderr).contains("teapot"));
    assert!(!out.exists(), "a failed run writes no output");
}

#[test]
fn make_referential_rewrites_json_lines() {
    let mut child = Command::new(binary())
        .args(["data", "make-referential", "--dataset", "flintstones"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let story = r#"{"frames": [{"caption": "Wilma and Betty sit.", "characters": ["wilma", "betty"]}, {"caption": "Betty and Wilma laugh at Mr. Slate.", "characters": ["betty", "wilma"]}]}"#;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{story}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["frames"][0]["referential"], "Wilma and Betty sit.");
    assert_eq!(line["frames"][1]["referential"], "They laugh at Mr. Slate.");

    let bad = Command::new(binary())
        .args(["data", "make-referential", "--dataset", "flintstones"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut bad_child = bad;
    bad_child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{not json\n")
        .unwrap();
    let out = bad_child.wait_with_output().unwrap();
    assert!(!out.status.success(), "malformed input must fail");
}

#[test]
fn toyworld_generate_writes_the_dataset_layout() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(binary())
        .args([
            "toyworld",
            "generate",
            "--stories",
            "6",
            "--size",
            "64",
            "--seed",
            "3",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "split.json",
        "following_cache3.pkl",
        "cleaned_annotations.json",
        "labels.pkl",
        "labels_bg.pkl",
        "characters.json",
    ] {
        assert!(dir.path().join(file).is_file(), "{file} missing");
    }
    assert!(dir.path().join("video_frames_sampled_4x").is_dir());
    assert!(dir.path().join("seg_mask_4x_comb").is_dir());
    let stats = Command::new(binary())
        .args(["data", "stats", "--frames", "5", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let table = String::from_utf8_lossy(&stats.stdout);
    assert!(table.contains("| Dataset | 6 | 30 |"), "{table}");
    assert!(table.contains("| Extended Dataset | 6 | 30 |"), "{table}");
}

fn run_ok(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(binary()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn run_err(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(binary()).args(args).output().unwrap();
    assert!(!out.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// The arguments of `generate` with its bundle, story and output folder; each call adds its
/// own flags after them.
fn generate_args<'a>(bundle: &'a Path, story: &'a Path, out: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        os("generate"),
        os("--bundle"),
        bundle.as_os_str(),
        os("--story"),
        story.as_os_str(),
        os("--out"),
        out.as_os_str(),
    ]
}

#[test]
fn generate_illustrates_a_story_with_a_random_toy_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("toy");
    let log = run_ok(&[
        os("bundle"),
        os("random"),
        os("--config"),
        os("toy"),
        os("--out"),
        bundle.as_os_str(),
    ]);
    assert!(log.contains("UNTRAINED"), "{log}");
    let info = Command::new(binary())
        .args([os("bundle"), os("info"), bundle.as_os_str()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("trained:     false"));

    let story = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/story/story.json");
    let out = dir.path().join("frames");
    let gen = |extra: &[&str]| {
        let mut args = generate_args(&bundle, &story, &out);
        args.extend([os("--steps"), os("2")]);
        args.extend(extra.iter().map(|s| os(s)));
        run_ok(&args)
    };
    let log = gen(&["--seed", "7"]);
    assert!(log.contains("frame 4/4"), "{log}");
    let frames: Vec<Vec<u8>> = (1..=4)
        .map(|i| std::fs::read(out.join(format!("frame-{i:02}.png"))).unwrap())
        .collect();
    for f in &frames {
        let img = image::load_from_memory(f).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("story.json")).unwrap()).unwrap();
    let rec = &record["frames"];
    assert_eq!(rec.as_array().unwrap().len(), 4);
    assert_eq!(rec[1]["caption"], "He waves at Mia.");
    assert_eq!(rec[1]["seed"], 8);
    assert_eq!(
        rec[1]["start_merge_step"], 0,
        "pronoun frame merges at once"
    );
    assert_eq!(rec[0]["condition"], "fused");
    assert_eq!(rec[3]["condition"], "llm");
    assert!(record["peak_rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(record["bundle_trained"], false);

    // Redraw frame 3 with a new seed: frames 1, 2 and 4 stay byte for byte.
    gen(&["--seed", "100", "--frames", "3"]);
    for i in [0, 1, 3] {
        assert_eq!(
            std::fs::read(out.join(format!("frame-{:02}.png", i + 1))).unwrap(),
            frames[i]
        );
    }
    assert_ne!(std::fs::read(out.join("frame-03.png")).unwrap(), frames[2]);

    // Errors name the problem.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"captions": []}"#).unwrap();
    let err = run_err(&generate_args(&bundle, &bad, &out));
    assert!(err.contains("captions") && err.contains("empty"), "{err}");
    let err = run_err(&generate_args(dir.path(), &story, &out));
    assert!(err.contains("bundle.toml"), "{err}");
    let mut args = generate_args(&bundle, &story, &out);
    args.extend([os("--frames"), os("9")]);
    let err = run_err(&args);
    assert!(err.contains("frames 1..=4"), "{err}");
    // The same limits as the server's (models::limits), with the same words.
    for (flag, value, words) in [
        ("--steps", "201", "steps must be between 1 and 200; got 201"),
        ("--steps", "0", "steps must be between 1 and 200; got 0"),
        (
            "--guidance",
            "31",
            "guidance_scale must be between 1 and 30; got 31",
        ),
        (
            "--seed",
            "9007199254740991",
            "seeds go from 0 to 9007199254740991",
        ),
    ] {
        let mut args = generate_args(&bundle, &story, &out);
        args.extend([os(flag), os(value)]);
        let err = run_err(&args);
        assert!(err.contains(words), "{flag} {value}: {err}");
    }
}

#[test]
fn bundle_import_writes_a_bundle_that_info_and_generate_load() {
    let dir = tempfile::tempdir().unwrap();
    let f = fixture("import");
    let out = dir.path().join("imported");
    let (sd, clip, llm) = (f.join("sd"), f.join("clip-vit"), f.join("opt"));
    let (stage1, stage2) = (f.join("stage1/pytorch_model.bin"), f.join("stage2.zip"));
    let args = [
        os("bundle"),
        os("import"),
        os("--sd"),
        sd.as_os_str(),
        os("--clip"),
        clip.as_os_str(),
        os("--llm"),
        llm.as_os_str(),
        os("--stage1"),
        stage1.as_os_str(),
        os("--stage2"),
        stage2.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--f16"),
    ];
    let log = run_ok(&args);
    assert!(log.contains("R = 8, m = 4, prompt 160 tokens"), "{log}");
    assert!(log.contains("not used by StoryGPT-V inference"), "{log}");
    let info = Command::new(binary())
        .args([os("bundle"), os("info"), out.as_os_str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.status.success(),
        "{}",
        String::from_utf8_lossy(&info.stderr)
    );
    assert!(stdout.contains("trained:     true"), "{stdout}");
    assert!(stdout.contains("opt (2 layers, d=32)"), "{stdout}");

    // The imported (tiny, f16-stored) weights draw a whole story: frame 1 fused, the pronoun
    // frames through the LLM and Mapper_LDM.
    let story = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/story/story.json");
    let frames = dir.path().join("frames");
    let mut gen = generate_args(&out, &story, &frames);
    gen.extend([os("--steps"), os("2")]);
    let log = run_ok(&gen);
    assert!(log.contains("frame 4/4"), "{log}");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(frames.join("story.json")).unwrap()).unwrap();
    assert_eq!(record["frames"][0]["condition"], "fused");
    assert_eq!(record["frames"][3]["condition"], "llm");

    // A second import into the same (now full) directory is refused.
    let err = run_err(&args);
    assert!(err.contains("not empty"), "{err}");
}
