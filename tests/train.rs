//! `storygpt-v train` through the real binary on a small toy-world dataset: a run killed with
//! SIGKILL and resumed ends with the same weights as an uninterrupted one; SIGTERM checkpoints;
//! the VAE stage learns (a fixed small set is overfitted); bad input is refused before any step.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{binary, repo, tiny_bundle};

/// A 32x32 toy-world dataset shared by the tests (made once).
fn dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("storygpt-train-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = Command::new(binary())
            .args([
                "toyworld",
                "generate",
                "--stories",
                "60",
                "--size",
                "32",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

const TINY: &str = r#"
[run]
seed = 5
batch_size = 4
max_steps = 40
val_every = 20
checkpoint_every = 4
log_every = 4

[optim]
lr = 2e-3
warmup_steps = 4
schedule = "cosine"
ema_decay = 0.9

[vae]
block_out_channels = [32, 32]
train_frames = 24
val_frames = 8
"#;

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn train(config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(binary());
    c.args(["train", "vae", "--config"])
        .arg(config)
        .arg("--data")
        .arg(dataset())
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .stdin(Stdio::null());
    c
}

fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "train failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn latest_step(out: &Path) -> Option<u64> {
    let root = out.join("runs/vae/checkpoints");
    let name = std::fs::read_to_string(root.join("latest")).ok()?;
    name.trim().strip_prefix("step-")?.parse().ok()
}

fn weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("sd/vae/diffusion_pytorch_model.safetensors")).unwrap()
}

fn train_losses(out: &Path) -> Vec<(u64, f64)> {
    stage_losses(out, "vae")
}

fn stage_losses(out: &Path, stage: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join(format!("runs/{stage}/metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "train")
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn a_run_killed_with_sigkill_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(tmp.path(), TINY);
    let whole = tmp.path().join("whole");
    run_ok(train(&config, &whole, &[]));

    let broken = tmp.path().join("broken");
    let mut child = train(&config, &broken, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while latest_step(&broken).unwrap_or(0) < 8 {
        assert!(Instant::now() < deadline, "no checkpoint at step 8");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to write anything more
    child.wait().unwrap();
    let killed_at = latest_step(&broken).unwrap();
    assert!(killed_at < 40, "killed too late to test a resume");
    assert!(
        !broken.join("sd/vae").exists(),
        "a killed run exports nothing"
    );

    // Without --resume the directory is refused; with it the run continues to the end.
    let refused = train(&config, &broken, &[]).output().unwrap();
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(
        msg.contains("already holds a vae run") && msg.contains("--resume"),
        "{msg}"
    );
    run_ok(train(&config, &broken, &["--resume"]));

    assert_eq!(
        weights(&whole),
        weights(&broken),
        "resumed weights differ from the uninterrupted run"
    );
    assert_eq!(
        train_losses(&whole),
        train_losses(&broken),
        "the resumed metrics log differs"
    );
}

#[test]
fn sigterm_writes_a_checkpoint_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &TINY.replace("checkpoint_every = 4", "checkpoint_every = 0"),
    );
    let out = tmp.path().join("out");
    let child = train(&config, &out, &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for training to be under way (the first metrics line), then ask it to stop.
    let metrics = out.join("runs/vae/metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::fs::read_to_string(&metrics)
        .map(|t| t.is_empty())
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "training did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let done = child.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(String::from_utf8_lossy(&done.stderr).contains("stopped on request"));
    let step = latest_step(&out).expect("SIGTERM wrote no checkpoint");
    assert!((4..40).contains(&step), "checkpoint at step {step}");
    run_ok(train(&config, &out, &["--resume"]));
    assert_eq!(latest_step(&out), Some(40));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["stages"]["vae"]["steps"], 40);
}

#[test]
fn the_vae_overfits_a_fixed_small_set() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        &TINY
            .replace("train_frames = 24", "train_frames = 4")
            .replace("max_steps = 40", "max_steps = 80")
            .replace("ema_decay = 0.9", "ema_decay = 0.5")
            // The characters' pixels weighted up: the weighted loss trains too.
            .replace("val_frames = 8", "val_frames = 8\ncharacter_weight = 5.0"),
    );
    let out = tmp.path().join("out");
    let res = run_ok(train(&config, &out, &[]));
    let losses = train_losses(&out);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    assert!(last < first / 4.0, "loss fell only from {first} to {last}");
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(stderr.contains("vae gate: validation PSNR"), "{stderr}");
    for f in [
        "sd/vae/config.json",
        "figures/vae-before.png",
        "figures/vae-after.png",
        "training.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sd/vae/config.json")).unwrap())
            .unwrap();
    let scale = cfg["scaling_factor"].as_f64().unwrap();
    assert!(
        scale.is_finite() && scale > 0.0 && scale != 1.0,
        "measured scaling factor {scale}"
    );
    // Every logged window says where its steps' time went, in milliseconds per step: the
    // phases fit inside the window's own time per step (1000 / it_s, which also holds the
    // checkpoints and validations of the window), and the model's passes take some of it.
    let phases = [
        "ms_batch",
        "ms_forward",
        "ms_backward",
        "ms_clip",
        "ms_optimizer",
        "ms_after",
    ];
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("runs/vae/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v["split"] == "train")
        .collect();
    assert_eq!(lines.len(), 20);
    for line in &lines {
        let ms: Vec<f64> = phases
            .iter()
            .map(|k| {
                line[*k]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no {k} in {line}"))
            })
            .collect();
        assert!(ms.iter().all(|&x| x >= 0.0), "{line}");
        let step_ms = 1e3 / line["it_s"].as_f64().unwrap();
        let sum: f64 = ms.iter().sum();
        assert!(
            sum <= step_ms * 1.001,
            "phases {sum} ms > step {step_ms} ms: {line}"
        );
        assert!(ms[1] > 0.0 && ms[2] > 0.0, "{line}");
    }
}

#[test]
fn bad_input_is_refused_before_any_step() {
    let tmp = tempfile::tempdir().unwrap();
    let expect_err = |config_text: &str, data: &Path, needle: &str| {
        let config = write_config(tmp.path(), config_text);
        let out = tmp.path().join("bad-out");
        let res = Command::new(binary())
            .args(["train", "vae", "--config"])
            .arg(&config)
            .arg("--data")
            .arg(data)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let msg = String::from_utf8_lossy(&res.stderr).into_owned();
        assert!(!res.status.success(), "accepted: {config_text}");
        assert!(msg.contains(needle), "expected `{needle}` in: {msg}");
        assert!(!out.join("runs/vae/checkpoints").exists(), "a step ran");
    };
    expect_err(
        &TINY.replace("batch_size", "batch_sise"),
        dataset(),
        "batch_sise",
    );
    expect_err(&TINY.replace("lr = 2e-3", "lr = \"fast\""), dataset(), "lr");
    expect_err(&format!("{TINY}\n[vea]\nx = 1\n"), dataset(), "vea");
    expect_err(&TINY.replace("[32, 32]", "[30, 30]"), dataset(), "groups");
    expect_err(TINY, &tmp.path().join("no-such-dataset"), "no-such-dataset");

    // A corrupt frame file and a dataset whose training split is empty.
    let broken = tmp.path().join("broken-data");
    copy_dir(dataset(), &broken);
    let frames = broken.join("video_frames_sampled_4x");
    for entry in std::fs::read_dir(&frames).unwrap() {
        std::fs::write(entry.unwrap().path(), b"not a numpy file").unwrap();
    }
    expect_err(TINY, &broken, "npy");
    let empty = tmp.path().join("empty-split");
    copy_dir(dataset(), &empty);
    let split_path = empty.join("split.json");
    let mut split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&split_path).unwrap()).unwrap();
    split["train"] = serde_json::json!([]);
    std::fs::write(&split_path, split.to_string()).unwrap();
    expect_err(TINY, &empty, "no stories");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

#[test]
fn the_lm_overfits_a_few_stories_and_exports_a_loadable_model() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("lm.toml");
    std::fs::write(
        &config,
        r#"
[run]
batch_size = 8
max_steps = 80
val_every = 40
checkpoint_every = 40
log_every = 10
[optim]
lr = 3e-3
warmup_steps = 5
[lm]
hidden_size = 64
layers = 2
heads = 4
ffn_dim = 128
bpe_merges = 300
train_stories = 4
val_stories = 10
"#,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let stderr = overfit("lm", &std::fs::read_to_string(&config).unwrap(), &out);
    assert!(
        stderr.contains("lm gate: validation pronoun cloze accuracy"),
        "{stderr}"
    );
    // The export is a transformers directory the service's loader reads.
    let lm = models::llm::CausalLm::load(
        out.join("llm"),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tok = models::llm::LlmTokenizer::from_dir(out.join("llm"), 0).unwrap();
    assert_eq!(lm.vocab_size(), tok.inner().get_vocab_size(true));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["stages"]["lm"]["steps"], 80);
    assert!(record["stages"]["lm"]["validation"]["perplexity"]
        .as_f64()
        .unwrap()
        .is_finite());
}

#[test]
fn clip_overfits_a_small_set_and_exports_loadable_towers() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("clip.toml");
    std::fs::write(
        &config,
        r#"
[run]
batch_size = 8
max_steps = 60
val_every = 30
checkpoint_every = 30
log_every = 10
[optim]
lr = 2e-3
warmup_steps = 5
[clip]
text_hidden = 64
text_layers = 2
vision_hidden = 64
vision_layers = 2
bpe_merges = 200
train_frames = 8
val_frames = 16
"#,
    )
    .unwrap();
    let out = tmp.path().join("out");
    let stderr = overfit("clip", &std::fs::read_to_string(&config).unwrap(), &out);
    assert!(
        stderr.contains("clip gate: validation portrait->name accuracy"),
        "{stderr}"
    );
    let dev = candle_core::Device::Cpu;
    models::clip::ClipTextModel::load(&out.join("sd/text_encoder"), candle_core::DType::F32, &dev)
        .unwrap();
    let vision = models::clip::ClipVisionModel::load(
        &out.join("clip-vision"),
        candle_core::DType::F32,
        &dev,
    )
    .unwrap();
    let px = candle_core::Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &dev).unwrap();
    assert!(
        vision.forward(&px).unwrap().image_embeds.is_some(),
        "the projection was not exported"
    );
    models::clip::ClipTokenizer::from_dir(&out.join("sd/tokenizer")).unwrap();
}

/// Trains `stage` with `config_text` into `out` and returns stderr (asserting success and that
/// the loss fell more than 4x: a small fixed set is overfitted).
fn overfit(stage: &str, config_text: &str, out: &Path) -> String {
    let config = out.with_extension("toml");
    std::fs::write(&config, config_text).unwrap();
    let res = Command::new(binary())
        .args(["train", stage, "--config"])
        .arg(&config)
        .arg("--data")
        .arg(dataset())
        .arg("--out")
        .arg(out)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{stderr}");
    let losses = stage_losses(out, stage);
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    assert!(
        last < first / 4.0,
        "{stage}: loss fell only from {first} to {last}"
    );
    stderr
}

/// A copy of the miniature bundle without `stage`'s run, to train that stage again.
fn bundle_without(stage: &str, into: &Path) {
    copy_dir(tiny_bundle(), into);
    std::fs::remove_dir_all(into.join("runs").join(stage)).unwrap();
}

/// `key` of every training line of `stage`'s metrics.
fn stage_part(out: &Path, stage: &str, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join(format!("runs/{stage}/metrics.jsonl")))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v[key].as_f64())
        .collect()
}

fn train_stage(stage: &str, config_text: &str, out: &Path) -> String {
    let config = out.with_extension("toml");
    std::fs::write(&config, config_text).unwrap();
    let res = Command::new(binary())
        .args(["train", stage, "--config"])
        .arg(&config)
        .arg("--data")
        .arg(out.join("data"))
        .arg("--out")
        .arg(out)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr).into_owned();
    assert!(res.status.success(), "{stderr}");
    stderr
}

/// Runs `train STAGE` on `out`'s data, expecting a refusal; returns its stderr.
fn train_stage_refused(stage: &str, config: &Path, out: &Path) -> String {
    let res = Command::new(binary())
        .args(["train", stage, "--config"])
        .arg(config)
        .arg("--data")
        .arg(out.join("data"))
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(!res.status.success(), "train {stage} was not refused");
    String::from_utf8_lossy(&res.stderr).into_owned()
}

#[test]
fn train_all_makes_a_complete_bundle_that_draws_a_story() {
    let bundle = tiny_bundle();
    let manifest = std::fs::read_to_string(bundle.join("bundle.toml")).unwrap();
    assert!(manifest.contains("trained = true"), "{manifest}");
    // The plan's [sampling] defaults are the bundle's.
    assert!(manifest.contains("guidance_scale = 3.0"), "{manifest}");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("training.json")).unwrap())
            .unwrap();
    for stage in ["vae", "vae-decoder", "clip", "lm", "char-ldm", "stage2"] {
        let r = &record["stages"][stage];
        assert!(r["steps"].as_u64() == Some(6), "{stage}: {r}");
        assert!(r["wall_time_s"].as_f64().unwrap() > 0.0, "{stage}: {r}");
        assert!(
            r["gates"].as_array().is_some_and(|g| !g.is_empty()),
            "{stage}: {r}"
        );
    }
    // The service's loader reads it, and `generate` draws the example story from it.
    models::pipeline::StoryPipeline::load(bundle, &candle_core::Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let frames = tmp.path().join("frames");
    let story = repo("examples/story/story.json");
    let res = Command::new(binary())
        .args(["generate", "--bundle"])
        .arg(bundle)
        .arg("--story")
        .arg(&story)
        .arg("--out")
        .arg(&frames)
        .args(["--seed", "1", "--steps", "3"])
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    for i in 1..=4 {
        let img = image::open(frames.join(format!("frame-{i:02}.png"))).unwrap();
        assert_eq!((img.width(), img.height()), (32, 32));
    }
    // A finished plan is not silently retrained; --resume skips the finished stages.
    let again = Command::new(binary())
        .args(["train", "all", "--config"])
        .arg(repo("configs/tiny/toy.toml"))
        .arg("--out")
        .arg(bundle)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already holds trained stages"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// Every weight file of a bundle, by its path inside it (runs and data left out).
fn bundle_weights(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if p.is_dir() && name != "runs" && name != "data" {
                dirs.push(p);
            } else if name.ends_with(".safetensors") {
                let bytes = std::fs::read(&p).unwrap();
                files.push((p.strip_prefix(dir).unwrap().to_path_buf(), bytes));
            }
        }
    }
    files.sort();
    files
}

fn train_all_command(out: &Path, extra: &[&str]) -> Output {
    Command::new(binary())
        .args(["train", "all", "--config"])
        .arg(repo("configs/tiny/toy.toml"))
        .arg("--data")
        .arg(tiny_bundle().join("data"))
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap()
}

#[test]
fn train_all_in_one_lane_or_two_or_stopped_and_resumed_makes_the_same_bundle() {
    // tiny_bundle() trained clip and lm in a second process beside the VAE (the default).
    let lanes = bundle_weights(tiny_bundle());
    assert_eq!(
        lanes.len(),
        7,
        "{:?}",
        lanes.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let log = std::fs::read_to_string(tiny_bundle().join("training.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&log).unwrap();
    for stage in ["vae", "vae-decoder", "clip", "lm"] {
        assert_eq!(record["stages"][stage]["steps"], 6, "{stage}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let one = tmp.path().join("one-lane");
    let res = train_all_command(&one, &["--one-lane"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(!stderr.contains("second process"), "{stderr}");
    assert!(
        bundle_weights(&one) == lanes,
        "one lane trained other weights than two"
    );

    // Out of time at once: the stages keep a checkpoint, the lane that did not run out is
    // stopped, the run says how to go on, and --resume finishes both lanes with the weights of
    // an uninterrupted run.
    let cut = tmp.path().join("cut");
    let res = train_all_command(&cut, &["--max-minutes", "0.000001"]);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(stderr.contains("continue with --resume"), "{stderr}");
    assert!(stderr.contains("second process"), "{stderr}");
    assert!(
        train::checkpoint::latest(&cut.join("runs/vae"))
            .unwrap()
            .is_some(),
        "vae left no checkpoint: {stderr}"
    );
    let res = train_all_command(&cut, &["--resume"]);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        bundle_weights(&cut) == lanes,
        "the resumed run trained other weights"
    );
}

#[test]
fn every_committed_plan_loads_with_all_its_stage_files() {
    let mut plans = Vec::new();
    let mut dirs = vec![repo("configs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.file_name().is_some_and(|n| n == "toy.toml") {
                plans.push(p);
            }
        }
    }
    assert!(plans.len() >= 2, "{plans:?}");
    for plan in plans {
        if let Err(e) = train::all::Plan::load(&plan) {
            panic!("{}: {e:#}", plan.display());
        }
    }
}

#[test]
fn train_all_refuses_a_bad_stage_file_before_the_first_stage_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let plan_dir = tmp.path().join("plan");
    std::fs::create_dir(&plan_dir).unwrap();
    for e in std::fs::read_dir(repo("configs/tiny")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, plan_dir.join(p.file_name().unwrap())).unwrap();
    }
    // A misspelt key in the last stage's section: before the check, the run found it only
    // after every earlier stage had trained.
    let stage2 = plan_dir.join("stage2.toml");
    let text = std::fs::read_to_string(&stage2).unwrap();
    assert!(text.contains("[stage2]"), "{text}");
    std::fs::write(
        &stage2,
        text.replace("[stage2]\n", "[stage2]\ndiffusion_weigth = 4.0\n"),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let res = Command::new(binary())
        .args(["train", "all", "--config"])
        .arg(plan_dir.join("toy.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success(), "{stderr}");
    assert!(
        stderr.contains("diffusion_weigth") && stderr.contains("stage2.toml"),
        "{stderr}"
    );
    for made in ["data", "runs", "training.json"] {
        assert!(!out.join(made).exists(), "{made} was written: {stderr}");
    }
}

#[test]
fn char_ldm_learns_to_denoise_and_to_attend_to_each_character() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    bundle_without("char-ldm", &out);
    // L_reg weighted up so that its effect shows within a short run; empty captions off so
    // every step has characters to attend to.
    let stderr = train_stage(
        "char-ldm",
        r#"
[run]
batch_size = 8
max_steps = 120
val_every = 60
checkpoint_every = 60
log_every = 10
[optim]
lr = 2e-3
warmup_steps = 5
[char_ldm]
block_out_channels = [32, 32]
norm_num_groups = 8
attention_head_dim = 4
lreg_weight = 1.0
empty_prob = 0.0
train_frames = 8
val_frames = 8
sample_frames = 2
sample_steps = 2
"#,
        &out,
    );
    assert!(stderr.contains("char-ldm gate:"), "{stderr}");
    let eps = stage_part(&out, "char-ldm", "eps_mse");
    let lreg = stage_part(&out, "char-ldm", "lreg");
    let (first, last) = (eps[0], *eps.last().unwrap());
    assert!(
        last < first / 2.0,
        "eps MSE fell only from {first} to {last}"
    );
    // A+ above A-: the characters' tokens attend inside their masks.
    assert!(
        lreg[0] > -0.1 && *lreg.last().unwrap() < -0.2,
        "L_reg did not fall: {lreg:?}"
    );
    assert!(out.join("figures/char-ldm-samples.png").exists());
    let w = nn::Weights::open(out.join("storygpt-v/stage1.safetensors")).unwrap();
    assert!(!w.keys_with_prefix("postfuse_module.").is_empty());
    assert!(!w.keys_with_prefix("image_encoder.").is_empty());
}

#[test]
fn char_ldm_v_prediction_on_a_zero_terminal_snr_schedule_trains_and_samples() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    bundle_without("char-ldm", &out);
    let config = |extra: &str| {
        format!(
            r#"
[run]
batch_size = 8
max_steps = 80
val_every = 0
checkpoint_every = 0
log_every = 10
[optim]
lr = 2e-3
warmup_steps = 5
[char_ldm]
block_out_channels = [32, 32]
norm_num_groups = 8
attention_head_dim = 4
train_frames = 8
val_frames = 8
sample_frames = 2
sample_steps = 2
{extra}
"#
        )
    };
    // Zero terminal SNR with an epsilon model is refused before any step: at zero SNR the
    // noise is the input, so the model would learn nothing where sampling starts.
    let config_path = write_config(tmp.path(), &config("zero_terminal_snr = true"));
    let msg = train_stage_refused("char-ldm", &config_path, &out);
    assert!(msg.contains("zero_terminal_snr needs"), "{msg}");

    train_stage(
        "char-ldm",
        &config("prediction_type = \"v_prediction\"\nzero_terminal_snr = true\nsnr_gamma = 5.0"),
        &out,
    );
    let mse = stage_part(&out, "char-ldm", "eps_mse");
    let weighted = stage_part(&out, "char-ldm", "weighted_mse");
    assert_eq!(weighted.len(), mse.len(), "Min-SNR weighting is logged");
    assert!(
        weighted.iter().zip(&mse).all(|(w, m)| w <= m),
        "Min-SNR weights are at most 1: {weighted:?} vs {mse:?}"
    );
    let (first, last) = (mse[0], *mse.last().unwrap());
    // v has a larger irreducible error than epsilon at the noisiest steps: a 1.25x fall in 80
    // steps is learning (an untrained UNet stays flat).
    assert!(
        last < first / 1.25,
        "v MSE fell only from {first} to {last}"
    );
    // The bundle says how its UNet was trained, and sampling reads it, also through t = 999
    // where alpha is 0 (500 PNDM steps visit it).
    let sched: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("sd/scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(sched["prediction_type"], "v_prediction");
    assert_eq!(sched["rescale_betas_zero_snr"], true);
    let p = models::pipeline::StoryPipeline::load(&out, &candle_core::Device::Cpu).unwrap();
    let ldm = p.char_ldm();
    assert_eq!(
        ldm.scheduler_config.prediction_type,
        models::schedulers::PredictionType::VPrediction
    );
    let text = ldm.text_condition("Mia walks in the forest.").unwrap();
    let negative = ldm.negative_condition().unwrap();
    for steps in [3, 500] {
        let opts = models::char_ldm::SampleOptions {
            steps,
            guidance_scale: 3.0,
            start_merge_step: 0,
            seed: 1,
            height: 32,
            width: 32,
            scheduler: models::schedulers::SchedulerKind::Pndm,
        };
        let img = ldm
            .sample(&text, None, &negative, &opts, &mut |_, _| {}, &|| false)
            .unwrap();
        let px = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            px.iter().all(|v| v.is_finite()),
            "{steps} steps: not finite"
        );
    }
}

#[test]
fn stage2_overfits_a_few_stories_and_completes_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    bundle_without("stage2", &out);
    std::fs::remove_file(out.join("bundle.toml")).unwrap();
    let stderr = train_stage(
        "stage2",
        r#"
[run]
batch_size = 8
max_steps = 150
val_every = 75
checkpoint_every = 75
log_every = 10
[optim]
lr = 3e-3
warmup_steps = 5
weight_decay = 0.0
[stage2]
d_model = 32
heads = 2
encoder_layers = 1
decoder_layers = 1
ff_dim = 64
train_stories = 2
val_stories = 10
"#,
        &out,
    );
    assert!(
        stderr.contains("stage2 gate: validation pronoun frames"),
        "{stderr}"
    );
    let align = stage_part(&out, "stage2", "l_align");
    let (first, last) = (align[0], *align.last().unwrap());
    assert!(
        last < first / 3.0,
        "L_align fell only from {first} to {last}"
    );
    assert!(out.join("bundle.toml").exists());
    models::pipeline::StoryPipeline::load(&out, &candle_core::Device::Cpu).unwrap();
}

/// The tensors of a safetensors file, as f32 values by name.
fn tensors(path: &Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let v = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, v)
        })
        .collect()
}

#[test]
fn the_vae_decoder_stage_sharpens_the_decoder_and_leaves_the_latent_space_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    bundle_without("vae-decoder", &out);
    let vae = out.join("sd/vae");
    let weights = vae.join("diffusion_pytorch_model.safetensors");
    let (before, config_before) = (
        tensors(&weights),
        std::fs::read(vae.join("config.json")).unwrap(),
    );
    // Four frames, many steps: the decoder alone must fit them far better.
    let stderr = train_stage(
        "vae-decoder",
        r#"
[run]
batch_size = 4
max_steps = 60
val_every = 30
checkpoint_every = 0
log_every = 5
val_examples = 4
[optim]
lr = 2e-3
[vae_decoder]
train_frames = 4
val_frames = 4
story_len = 4
sample_posterior = false
"#,
        &out,
    );
    assert!(
        stderr.contains("vae-decoder gate: validation PSNR"),
        "{stderr}"
    );
    let losses = stage_losses(&out, "vae-decoder");
    let (first, last) = (losses[0].1, losses.last().unwrap().1);
    assert!(last < first / 2.0, "loss fell only from {first} to {last}");
    let after = tensors(&weights);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let mut decoder_moved = false;
    for (name, b) in &before {
        let decoding = name.starts_with("decoder.") || name.starts_with("post_quant_conv.");
        if decoding {
            decoder_moved |= b != &after[name];
        } else {
            // The encoder is frozen bit for bit: every latent, and so every model trained on
            // them, stays valid.
            assert!(b == &after[name], "{name} changed");
        }
    }
    assert!(decoder_moved, "no decoder weight moved");
    assert_eq!(
        std::fs::read(vae.join("config.json")).unwrap(),
        config_before,
        "the VAE's config (and its scale factor) must not change"
    );
    assert!(out.join("figures/vae-decoder-after.png").is_file());
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    assert_eq!(record["stages"]["vae-decoder"]["steps"], 60);

    // Without a trained VAE in --out there is nothing to fine-tune: a clear refusal.
    std::fs::remove_dir_all(&vae).unwrap();
    std::fs::remove_dir_all(out.join("runs/vae-decoder")).unwrap();
    let config = out.with_extension("toml");
    let refused = train_stage_refused("vae-decoder", &config, &out);
    assert!(refused.contains("holds no trained VAE"), "{refused}");
}

#[test]
fn the_shipped_toy_bundle_loads_as_trained_with_its_cast() {
    let dir = repo("models/toy");
    let p = models::pipeline::StoryPipeline::load(&dir, &candle_core::Device::Cpu).unwrap();
    assert!(p.info().trained, "models/toy is not marked trained");
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("training.json")).unwrap()).unwrap();
    for stage in ["vae", "vae-decoder", "clip", "lm", "char-ldm", "stage2"] {
        assert!(
            record["stages"][stage]["steps"].as_u64().unwrap() > 0,
            "{stage}"
        );
    }
    let cast: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cast/cast.json")).unwrap())
            .unwrap();
    assert_eq!(cast.len(), 7);
    for c in &cast {
        image::open(dir.join("cast").join(c["portrait"].as_str().unwrap())).unwrap();
    }
    // Committed size limit of the shipped bundle.
    fn size(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                if e.file_type().unwrap().is_dir() {
                    size(&e.path())
                } else {
                    e.metadata().unwrap().len()
                }
            })
            .sum()
    }
    assert!(size(&dir) <= 40 << 20, "models/toy is {} bytes", size(&dir));
}

/// Mapper_LDM's first layer after a 20-step stage-2 run whose `[stage2]` losses are `losses`
/// (L_gen off), and the diffusion loss it logged.
fn mapper_after_short_stage2(tmp: &Path, name: &str, losses: &str) -> (Vec<f32>, Vec<f64>) {
    let config = format!(
        r#"
[run]
batch_size = 8
max_steps = 20
val_every = 0
checkpoint_every = 0
log_every = 10
[optim]
lr = 3e-3
warmup_steps = 2
weight_decay = 0.0
[stage2]
d_model = 32
heads = 2
encoder_layers = 1
decoder_layers = 1
ff_dim = 64
lgen_weight = 0.0
train_stories = 2
val_stories = 10
{losses}
"#
    );
    let out = tmp.join(name);
    bundle_without("stage2", &out);
    train_stage("stage2", &config, &out);
    let diff = stage_part(&out, "stage2", "l_diffusion");
    let w = nn::Weights::open(out.join("storygpt-v/stage2.safetensors")).unwrap();
    let mut v = Vec::new();
    for k in w.keys_with_prefix("model.gen_text_hidden_fcs.0.") {
        let t = w
            .get(&k, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        v.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    (v, diff)
}

fn largest_change(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn stage2_diffusion_variant_trains_the_mappers_through_the_frozen_unet() {
    // Short runs from the same seeded start: with the diffusion loss as the only loss (the
    // paper's ablation, and the MSE L_align plus the diffusion term with L_align weighted 0),
    // and with every loss weighted 0. Mapper_LDM moves away from its start only if the
    // diffusion loss's gradient reaches it through the frozen UNet.
    let tmp = tempfile::tempdir().unwrap();
    let (still, none) = mapper_after_short_stage2(
        tmp.path(),
        "off",
        "align_loss = \"diffusion\"\nalign_weight = 0.0",
    );
    assert_eq!(
        none.len(),
        2,
        "the diffusion loss is logged even at weight 0: {none:?}"
    );
    for (name, losses) in [
        ("ablation", "align_loss = \"diffusion\"\nalign_weight = 1.0"),
        (
            "added",
            "align_loss = \"mse\"\nalign_weight = 0.0\ndiffusion_weight = 1.0",
        ),
    ] {
        let (trained, diff) = mapper_after_short_stage2(tmp.path(), name, losses);
        assert_eq!(diff.len(), 2, "{name}: {diff:?}");
        assert!(
            diff.iter().all(|x| x.is_finite() && *x > 0.0),
            "{name}: {diff:?}"
        );
        let moved = largest_change(&trained, &still);
        assert!(moved > 1e-3, "{name}: Mapper_LDM did not move: {moved}");
    }
}

#[test]
fn stage2_character_token_weight_changes_what_the_mappers_learn() {
    // The same seeded 20-step run with the plain L_align and with the character-name tokens
    // weighted 10 (and the "they" groups sorted): the weighting reaches the gradient.
    let tmp = tempfile::tempdir().unwrap();
    let (plain, _) = mapper_after_short_stage2(tmp.path(), "plain", "align_char_weight = 1.0");
    let (again, _) = mapper_after_short_stage2(tmp.path(), "again", "align_char_weight = 1.0");
    assert_eq!(
        largest_change(&plain, &again),
        0.0,
        "the run is not reproducible"
    );
    let (weighted, _) = mapper_after_short_stage2(
        tmp.path(),
        "weighted",
        "align_char_weight = 10.0\nsort_groups = true",
    );
    let moved = largest_change(&weighted, &plain);
    assert!(moved > 1e-4, "the weight changed nothing: {moved}");

    let out = tmp.path().join("zero");
    bundle_without("stage2", &out);
    let config = out.with_extension("toml");
    std::fs::write(
        &config,
        "[run]\nmax_steps = 1\n[stage2]\nalign_char_weight = 0.0\n",
    )
    .unwrap();
    let err = train_stage_refused("stage2", &config, &out);
    assert!(err.contains("align_char_weight"), "{err}");
}

#[test]
fn stage2_refuses_a_diffusion_weight_on_top_of_the_diffusion_ablation() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    bundle_without("stage2", &out);
    let config = out.with_extension("toml");
    std::fs::write(
        &config,
        "[run]\nmax_steps = 1\n[stage2]\nalign_loss = \"diffusion\"\ndiffusion_weight = 1.0\n",
    )
    .unwrap();
    let err = train_stage_refused("stage2", &config, &out);
    assert!(err.contains("diffusion_weight"), "{err}");
}

#[test]
fn stage2_lreg_on_the_diffusion_pass_changes_what_the_mappers_learn() {
    // The same seeded 20-step run with the diffusion term alone and with L_reg on its
    // cross-attention maps: L_reg is logged and its gradient reaches Mapper_LDM.
    let tmp = tempfile::tempdir().unwrap();
    let base = "diffusion_weight = 1.0\nsort_groups = true";
    let (plain, diff_plain) = mapper_after_short_stage2(tmp.path(), "plain", base);
    let out = tmp.path().join("plain");
    assert!(stage_part(&out, "stage2", "l_reg").is_empty());
    let (with_lreg, diff_lreg) =
        mapper_after_short_stage2(tmp.path(), "lreg", &format!("{base}\nlreg_weight = 1.0"));
    let out = tmp.path().join("lreg");
    let lreg = stage_part(&out, "stage2", "l_reg");
    assert_eq!(lreg.len(), 2, "l_reg is logged every log line: {lreg:?}");
    // L_reg is A- minus A+ of attention probabilities: bounded by 1 in size.
    assert!(
        lreg.iter()
            .all(|x| x.is_finite() && x.abs() < 1.0 && *x != 0.0),
        "{lreg:?}"
    );
    assert!(
        diff_lreg.len() == 2 && diff_plain.len() == 2,
        "{diff_lreg:?} {diff_plain:?}"
    );
    let moved = largest_change(&with_lreg, &plain);
    assert!(moved > 1e-4, "L_reg changed nothing: {moved}");
    // Off by default: the run's config does not name it.
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("plain/training.json")).unwrap(),
    )
    .unwrap();
    let cfg = &record["stages"]["stage2"]["config"]["stage2"];
    assert!(
        cfg.get("sort_groups").is_some() && cfg.get("lreg_weight").is_none(),
        "{cfg}"
    );
}

#[test]
fn stage2_attention_match_is_logged_reaches_the_mappers_and_needs_the_diffusion_term() {
    // The same seeded 20-step run with the diffusion term alone and with the attention match on
    // its cross-attention maps (against the UNet's maps under the alignment target): the match
    // is logged, is a distance (positive while the mapper is untrained) and its gradient
    // reaches Mapper_LDM.
    let tmp = tempfile::tempdir().unwrap();
    let base = "diffusion_weight = 1.0\nsort_groups = true";
    let (plain, _) = mapper_after_short_stage2(tmp.path(), "plain", base);
    assert!(stage_part(&tmp.path().join("plain"), "stage2", "l_attention_match").is_empty());
    let (matched, _) = mapper_after_short_stage2(
        tmp.path(),
        "match",
        &format!("{base}\nattention_match_weight = 1.0"),
    );
    let m = stage_part(&tmp.path().join("match"), "stage2", "l_attention_match");
    assert_eq!(m.len(), 2, "logged every log line: {m:?}");
    // A mean squared difference of attention probabilities: in [0, 1], and not 0 for a
    // mapper that has not learnt the targets.
    assert!(
        m.iter().all(|x| x.is_finite() && *x > 0.0 && *x < 1.0),
        "{m:?}"
    );
    let moved = largest_change(&matched, &plain);
    assert!(moved > 1e-4, "the attention match changed nothing: {moved}");
    let record: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("plain/training.json")).unwrap(),
    )
    .unwrap();
    let cfg = &record["stages"]["stage2"]["config"]["stage2"];
    assert!(cfg.get("attention_match_weight").is_none(), "{cfg}");

    // Refused before any step without the diffusion term beside the MSE, or with a bad weight.
    let out = tmp.path().join("refused");
    bundle_without("stage2", &out);
    let config = out.with_extension("toml");
    for losses in [
        "attention_match_weight = 1.0",
        "align_loss = \"diffusion\"\nattention_match_weight = 1.0",
        "diffusion_weight = 1.0\nattention_match_weight = -1.0",
        "diffusion_weight = 1.0\nattention_match_weight = nan",
    ] {
        std::fs::write(
            &config,
            format!("[run]\nmax_steps = 1\n[stage2]\n{losses}\n"),
        )
        .unwrap();
        let err = train_stage_refused("stage2", &config, &out);
        assert!(err.contains("attention_match_weight"), "{losses}: {err}");
    }
}

/// A 2-step stage-2 run of a small mapper into `out` (a copy of the miniature bundle), with
/// `val_stories` validation stories and the `[stage2]` lines `losses`, validated once at its end:
/// that validation line.
fn validated_short_stage2(out: &Path, val_stories: usize, losses: &str) -> serde_json::Value {
    bundle_without("stage2", out);
    let config = format!(
        r#"
[run]
batch_size = 4
max_steps = 2
val_every = 0
checkpoint_every = 0
log_every = 1
[stage2]
d_model = 32
heads = 2
encoder_layers = 1
decoder_layers = 1
ff_dim = 64
train_stories = 2
val_stories = {val_stories}
{losses}
"#
    );
    train_stage("stage2", &config, out);
    let mut val: Vec<serde_json::Value> =
        std::fs::read_to_string(out.join("runs/stage2/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["split"] == "val")
            .collect();
    assert_eq!(val.len(), 1, "{val:?}");
    val.remove(0)
}

#[test]
fn stage2_validation_checks_each_name_slot_of_two_character_frames() {
    // The heatmaps of a frame drawn through the LLM read each name slot of Mapper_LDM's output:
    // validation measures, for the first and the second slot of frames naming two characters,
    // whether the slot holds the right character (nearest fused token among the cast) and how
    // the frozen UNet's attention at it falls on that character's pixels (L_reg, lower is
    // better), for the mapper and for stage 1's own fused condition (the ceiling).
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let v = validated_short_stage2(&out, 10, "diffusion_weight = 1.0");
    for key in ["slot1_right_character", "slot2_right_character"] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!((0.0..=1.0).contains(&x), "{key}: {v}");
    }
    for key in [
        "val_l_reg",
        "val_l_reg_slot1",
        "val_l_reg_slot2",
        "val_l_reg_target",
        "val_l_reg_slot1_target",
        "val_l_reg_slot2_target",
    ] {
        let x = v[key].as_f64().unwrap_or(f64::NAN);
        assert!(x.is_finite() && x.abs() < 1.0, "{key}: {v}");
    }
    // Stage 1's fused condition and an untrained mapper's output are different conditions:
    // the two measurements do not read the same maps.
    assert_ne!(v["val_l_reg_slot2"], v["val_l_reg_slot2_target"], "{v}");
}

#[test]
fn stage2_lreg_is_validated_and_refused_without_the_diffusion_term() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // Validation reports L_reg on the validation frames.
    let v = validated_short_stage2(&out, 4, "align_loss = \"diffusion\"\nlreg_weight = 0.5");
    let reg = v["val_l_reg"].as_f64().unwrap_or(f64::NAN);
    assert!(reg.is_finite() && reg.abs() < 1.0, "{v}");

    std::fs::remove_dir_all(out.join("runs/stage2")).unwrap();
    let config = out.with_extension("toml");
    for (losses, key) in [
        ("lreg_weight = 1.0", "lreg_weight"),
        ("lreg_weight = 1.0\ndiffusion_weight = 0.0", "lreg_weight"),
        ("diffusion_weight = 1.0\nlreg_weight = -1.0", "lreg_weight"),
    ] {
        std::fs::write(
            &config,
            format!("[run]\nmax_steps = 1\n[stage2]\nalign_loss = \"mse\"\n{losses}\n"),
        )
        .unwrap();
        let err = train_stage_refused("stage2", &config, &out);
        assert!(err.contains(key), "{losses}: {err}");
    }
    std::fs::write(
        &config,
        "[run]\nmax_steps = 1\n[stage2]\nlreg_weight = 1.0\n",
    )
    .unwrap();
    let err = train_stage_refused("stage2", &config, &out);
    assert!(err.contains("needs the diffusion term"), "{err}");
}

#[test]
fn the_classifier_learns_characters_and_backgrounds_well_above_chance() {
    // A 300-story 32x32 world (60 stories are too few to generalise from); the score is on
    // validation frames the network never trained on.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let gen = Command::new(binary())
        .args(["toyworld", "generate", "--stories", "300", "--size", "32"])
        .args(["--seed", "4", "--threads", "1", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(gen.status.success());
    let out = tmp.path().join("out");
    let config = tmp.path().join("classifier.toml");
    std::fs::write(
        &config,
        r#"
[run]
seed = 1
batch_size = 16
max_steps = 400
val_every = 200
checkpoint_every = 200
log_every = 50
[optim]
lr = 3e-3
warmup_steps = 10
schedule = "cosine"
weight_decay = 0.0
[classifier]
channels = [32, 64, 64]
norm_groups = 8
train_frames = 1200
val_frames = 60
"#,
    )
    .unwrap();
    let res = Command::new(binary())
        .args(["train", "classifier", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "{stderr}");
    assert!(
        stderr.contains("classifier gate: validation character exact match (60 frames)"),
        "{stderr}"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("training.json")).unwrap()).unwrap();
    let v = &record["stages"]["classifier"]["validation"];
    let (chars, bg) = (
        v["char_exact"].as_f64().unwrap(),
        v["bg_acc"].as_f64().unwrap(),
    );

    // The validation frames again (the first 60 distinct frames of the val stories).
    use data::dataset::{DatasetKind, DatasetReader, Split};
    let reader = DatasetReader::open(&data, DatasetKind::Auto, 4).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut frames = Vec::new();
    for id in reader.story_ids(Split::Val) {
        for f in reader.load_story(&id, 0).unwrap().frames {
            if frames.len() < 60 && seen.insert(f.id.clone()) {
                frames.push(f);
            }
        }
    }
    // Chance: always answering the most common character set / background.
    let top = |keys: Vec<String>| {
        let mut m = std::collections::BTreeMap::<String, usize>::new();
        for k in keys {
            *m.entry(k).or_default() += 1;
        }
        *m.values().max().unwrap() as f64 / frames.len() as f64
    };
    let chance_chars = top(frames
        .iter()
        .map(|f| format!("{:?}", f.char_labels))
        .collect());
    let chance_bg = top(frames
        .iter()
        .map(|f| f.background.clone().unwrap())
        .collect());
    assert!(
        chars >= chance_chars + 0.3,
        "character exact match {chars} vs chance {chance_chars}"
    );
    assert!(
        bg >= 0.9 && bg >= chance_bg + 0.5,
        "background accuracy {bg} vs chance {chance_bg}"
    );
    // The exported network loads and scores those frames exactly as the run's last validation.
    let c = train::classifier::Classifier::load(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(c.config().characters.len(), 7);
    assert_eq!(c.config().backgrounds.len(), 10);
    let images: Vec<image::RgbImage> = frames.iter().map(|f| f.image.clone().unwrap()).collect();
    let pred: Vec<Vec<bool>> = c
        .classify(&images)
        .unwrap()
        .iter()
        .map(|p| p.characters())
        .collect();
    let truth: Vec<Vec<bool>> = frames
        .iter()
        .map(|f| f.char_labels.iter().map(|&x| x > 0.5).collect())
        .collect();
    let again = train::metrics::exact_match(&pred, &truth);
    // One frame of slack: this process may run another thread count than the training run.
    assert!(
        (again - chars).abs() <= 1.0 / 60.0 + 1e-12,
        "{again} vs {chars}"
    );
}
