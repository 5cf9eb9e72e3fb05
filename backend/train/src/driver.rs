//! `storygpt-v train STAGE`: configuration, data, the loop, export into the bundle layout, the
//! stage's quality gate and `training.json`.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::Device;
use serde_json::json;

use crate::config::{self, StageFile};
use crate::stages::char_ldm::{self, CharLdmSection};
use crate::stages::classifier::{self, ClassifierSection};
use crate::stages::clip::{self, ClipSection};
use crate::stages::lm::{self, LmSection};
use crate::stages::stage2::{self, Stage2Section};
use crate::stages::vae::{self, VaeSection};
use crate::stages::vae_decoder::{self, VaeDecoderSection};
use crate::trainer::{self, Ending, RunOptions};

/// What the command line gives every stage.
#[derive(Debug, Clone)]
pub struct DriverArgs {
    /// The TOML configuration.
    pub config: PathBuf,
    /// The dataset (FlintstonesSV layout).
    pub data: PathBuf,
    /// The bundle directory the stage writes its part into (runs go under `runs/STAGE`).
    pub out: PathBuf,
    /// Continue the stage's run from its latest checkpoint.
    pub resume: bool,
    /// Overrides `run.max_steps`.
    pub max_steps: Option<u64>,
    /// Overrides `run.max_minutes`.
    pub max_minutes: Option<f64>,
    /// The device.
    pub device: Device,
    /// Set by SIGINT / SIGTERM.
    pub stop: Arc<AtomicBool>,
}

/// A stage's quality gate: the measured value, the target and whether it was met.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Gate {
    /// What is measured.
    pub metric: String,
    /// Measured value.
    pub value: f64,
    /// The target (`value >= target` passes).
    pub target: f64,
    /// Whether the target was met.
    pub passed: bool,
}

/// What one stage produced.
#[derive(Debug, Clone)]
pub struct StageReport {
    /// How the run ended.
    pub ending: Ending,
    /// Steps in total.
    pub steps: u64,
    /// The gates (only for a finished run).
    pub gates: Vec<Gate>,
}

fn apply_overrides<S>(file: &mut StageFile<S>, args: &DriverArgs) -> Result<()> {
    if let Some(n) = args.max_steps {
        file.run.max_steps = n;
    }
    if let Some(m) = args.max_minutes {
        file.run.max_minutes = Some(m);
    }
    file.run.validate()
}

/// The stage's configuration with the command line's overrides, after refusing an `--out`
/// that holds a run of `stage` without `--resume` (both before any data is read), and the
/// stage's run directory.
fn open_stage<S: crate::config::StageSection>(
    args: &DriverArgs,
    stage: &str,
) -> Result<(StageFile<S>, PathBuf)> {
    let mut file: StageFile<S> = config::load(&args.config)?;
    apply_overrides(&mut file, args)?;
    let run_dir = args.out.join("runs").join(stage);
    refuse_existing_run(&run_dir, args.resume)?;
    Ok((file, run_dir))
}

/// Merges this stage's record into `OUT/training.json` (other stages' records are kept).
/// Stages that run side by side in two processes (`train all`'s lanes) both merge into the one
/// file, so the read-merge-write holds an exclusive lock on `OUT/runs/training.lock` (beside
/// the runs, which are not part of a shipped bundle).
pub fn record_stage(out: &Path, stage: &str, record: serde_json::Value) -> Result<()> {
    let runs = out.join("runs");
    std::fs::create_dir_all(&runs).with_context(|| format!("creating {}", runs.display()))?;
    let lock_path = runs.join("training.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    fs2::FileExt::lock_exclusive(&lock)
        .with_context(|| format!("locking {}", lock_path.display()))?;
    let path = out.join("training.json");
    let mut all = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("parsing {}", path.display()))?,
        Err(_) => json!({"stages": {}}),
    };
    all["stages"][stage] = record;
    let tmp = out.join(format!(".training.json.{}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string_pretty(&all)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Runs a prepared stage to the end (or a stop) and, when it finished, lets `finish` export it
/// and name its gates and extra record fields; then draws its curves (`curve`: validation key
/// and label), merges its record into `training.json` and prints the gates.
#[allow(clippy::too_many_arguments)]
fn run_stage<S, D, C>(
    args: &DriverArgs,
    name: &'static str,
    file: &StageFile<C>,
    stage: &mut S,
    source: Arc<D>,
    fingerprint: String,
    curve: (&str, &str),
    finish: impl FnOnce(&mut S, &trainer::RunSummary) -> Result<(Vec<Gate>, serde_json::Value)>,
) -> Result<StageReport>
where
    S: trainer::Stage,
    D: crate::loader::BatchSource<Batch = S::Batch>,
    C: serde::Serialize,
{
    let run_dir = args.out.join("runs").join(name);
    let mut config_json = json!({"stage": name, "run": file.run, "optim": file.optim});
    config_json[name] = serde_json::to_value(&file.stage)?;
    let summary = trainer::run(
        stage,
        source,
        &file.run,
        &file.optim,
        RunOptions {
            run_dir: run_dir.clone(),
            resume: args.resume,
            config: config_json.clone(),
            data_fingerprint: fingerprint.clone(),
            stop: args.stop.clone(),
            on_validation: None,
        },
    )?;
    if summary.ending != Ending::Finished {
        return Ok(StageReport {
            ending: summary.ending,
            steps: summary.steps,
            gates: vec![],
        });
    }
    let (gates, extra) = finish(stage, &summary)?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    crate::plot::training_curves(
        &run_dir.join("metrics.jsonl"),
        &figures.join(format!("{name}-curves.svg")),
        name,
        curve.0,
        curve.1,
    )?;
    let mut record = json!({
        "config": config_json,
        "data_fingerprint": fingerprint,
        "steps": summary.steps,
        "wall_time_s": summary.elapsed_s,
        "final_train_loss": summary.last_loss,
        "validation": summary.validation,
        "gates": gates,
    });
    if let (Some(r), Some(e)) = (record.as_object_mut(), extra.as_object()) {
        r.extend(e.clone());
    }
    record_stage(&args.out, name, record)?;
    print_gates(name, &gates);
    Ok(StageReport {
        ending: Ending::Finished,
        steps: summary.steps,
        gates,
    })
}

/// A `value >= target` gate on validation metric `key`.
fn gate_on(summary: &trainer::RunSummary, key: &str, metric: String, target: f64) -> Gate {
    let value = summary.validation.get(key).copied().unwrap_or(f64::NAN);
    Gate {
        metric,
        value,
        target,
        passed: value >= target,
    }
}

/// Trains the VAE stage and writes `OUT/sd/vae`, `OUT/figures/vae-*` and its record.
pub fn train_vae(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<VaeSection>(args, "vae")?;
    let (mut stage, source, fingerprint) =
        vae::prepare(&file.stage, &args.data, file.run.seed, &args.device)?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    if !args.resume {
        stage
            .reconstruction_grid(8)?
            .save(figures.join("vae-before.png"))
            .context("writing vae-before.png")?;
    }
    let out = args.out.clone();
    let frames = source.clone();
    run_stage(
        args,
        "vae",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("psnr_db", "validation PSNR (dB)"),
        |stage, summary| {
            let scale = stage.measure_scaling_factor(&frames)?;
            stage.export(&out.join("sd").join("vae"), scale)?;
            stage
                .reconstruction_grid(8)?
                .save(figures.join("vae-after.png"))
                .context("writing vae-after.png")?;
            let gates = vec![gate_on(
                summary,
                "psnr_db",
                "validation PSNR (dB)".into(),
                30.0,
            )];
            let extra = json!({"latent_size": stage.latent_size(), "scaling_factor": scale});
            Ok((gates, extra))
        },
    )
}

/// Fine-tunes the decoder of the VAE in `OUT/sd/vae` with its encoder frozen and rewrites its
/// weights there (latent space and scale factor unchanged), with `OUT/figures/vae-decoder-*`
/// and its record.
pub fn train_vae_decoder(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<VaeDecoderSection>(args, "vae-decoder")?;
    let (mut stage, source, fingerprint) = vae_decoder::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    let figures = args.out.join("figures");
    std::fs::create_dir_all(&figures)?;
    if !args.resume {
        stage
            .reconstruction_grid(8)?
            .save(figures.join("vae-decoder-before.png"))
            .context("writing vae-decoder-before.png")?;
    }
    run_stage(
        args,
        "vae-decoder",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("psnr_db", "validation PSNR (dB)"),
        |stage, summary| {
            stage.export()?;
            stage
                .reconstruction_grid(8)?
                .save(figures.join("vae-decoder-after.png"))
                .context("writing vae-decoder-after.png")?;
            let gates = vec![gate_on(
                summary,
                "psnr_db",
                "validation PSNR (dB), encoder of stage vae, decoder fine-tuned".into(),
                30.0,
            )];
            let extra = json!({"scaling_factor": stage.config_json()["scaling_factor"]});
            Ok((gates, extra))
        },
    )
}

/// Trains the evaluation classifier and writes `OUT/classifier/{config.json,model.safetensors}`,
/// `OUT/figures/classifier-curves.svg` and its record.
pub fn train_classifier(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<ClassifierSection>(args, "classifier")?;
    let (mut stage, source, fingerprint) = classifier::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "classifier",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("char_exact", "validation character exact match"),
        |stage, summary| {
            let dir = stage.export()?;
            let n = stage.val_count();
            let mut gates = vec![gate_on(
                summary,
                "char_exact",
                format!("validation character exact match ({n} frames)"),
                0.99,
            )];
            if summary.validation.contains_key("bg_acc") {
                gates.push(gate_on(
                    summary,
                    "bg_acc",
                    format!("validation background accuracy ({n} frames)"),
                    0.99,
                ));
            }
            Ok((gates, json!({"exported": dir})))
        },
    )
}

/// Trains the LM stage and writes `OUT/llm`, `OUT/figures/lm-curves.svg` and its record.
pub fn train_lm(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<LmSection>(args, "lm")?;
    let (mut stage, source, fingerprint) = lm::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "lm",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("pronoun_cloze", "validation pronoun cloze"),
        |stage, summary| {
            stage.export()?;
            let metric = format!(
                "validation pronoun cloze accuracy ({} questions)",
                stage.cloze_count()
            );
            Ok((
                vec![gate_on(summary, "pronoun_cloze", metric, 0.95)],
                json!({}),
            ))
        },
    )
}

/// Refuses an `--out` whose stage run exists unless `--resume` (checked before loading data).
fn refuse_existing_run(run_dir: &Path, resume: bool) -> Result<()> {
    if !resume {
        if let Some(dir) = crate::checkpoint::latest(run_dir)? {
            let st = crate::checkpoint::read_state(&dir)?;
            anyhow::bail!(
                "{} already holds a {} run at step {}; pass --resume to continue it, or choose another --out",
                run_dir.display(),
                st.stage,
                st.step
            )
        }
    }
    Ok(())
}

/// Trains the CLIP stage and writes `OUT/sd/tokenizer`, `OUT/sd/text_encoder`,
/// `OUT/clip-vision`, `OUT/figures/clip-curves.svg` and its record.
pub fn train_clip(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<ClipSection>(args, "clip")?;
    let (mut stage, source, fingerprint) = clip::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "clip",
        &file,
        &mut stage,
        source,
        fingerprint,
        ("caption_to_frame_r5", "validation caption->frame R@5"),
        |stage, summary| {
            stage.export()?;
            let gates = vec![
                gate_on(
                    summary,
                    "portrait_to_name",
                    format!(
                        "validation portrait->name accuracy ({} characters)",
                        stage.cast().len()
                    ),
                    1.0,
                ),
                gate_on(
                    summary,
                    "caption_to_frame_r5",
                    "validation caption->frame recall@5".into(),
                    0.5,
                ),
            ];
            Ok((gates, json!({})))
        },
    )
}

/// Trains stage 1 (Char-LDM) on the base models in `OUT` and writes `OUT/sd/unet`,
/// `OUT/sd/scheduler`, `OUT/storygpt-v/stage1.safetensors`, sample grids and its record.
pub fn train_char_ldm(args: &DriverArgs) -> Result<StageReport> {
    let (file, run_dir) = open_stage::<CharLdmSection>(args, "char-ldm")?;
    let (mut stage, source, fingerprint) = char_ldm::prepare(
        &file.stage,
        &args.data,
        &args.out,
        &run_dir,
        file.run.seed,
        &args.device,
    )?;
    run_stage(
        args,
        "char-ldm",
        &file,
        &mut stage,
        source,
        fingerprint,
        (
            "condition_gain",
            "validation condition gain (1 - fused / empty loss)",
        ),
        |stage, summary| {
            stage.export()?;
            let gates = vec![gate_on(
                summary,
                "condition_gain",
                "validation denoising loss, caption + portraits vs empty caption (1 - fused / empty)"
                    .into(),
                0.05,
            )];
            let extra = json!({
                "val_loss_fused": summary.validation.get("val_loss_fused"),
                "val_loss_text": summary.validation.get("val_loss_text"),
                "val_loss_empty": summary.validation.get("val_loss_empty"),
            });
            Ok((gates, extra))
        },
    )
}

/// Trains stage 2 (the LLM alignment) on the LLM and stage 1 in `OUT`, writes
/// `OUT/storygpt-v/stage2.safetensors`, its record and the bundle manifest `OUT/bundle.toml`
/// (`trained = true`): after this stage `OUT` is a complete bundle.
pub fn train_stage2(args: &DriverArgs) -> Result<StageReport> {
    let (file, _) = open_stage::<Stage2Section>(args, "stage2")?;
    let (mut stage, source, fingerprint) = stage2::prepare(
        &file.stage,
        &args.data,
        &args.out,
        file.run.seed,
        &args.device,
    )?;
    let out = args.out.clone();
    let data = args.data.clone();
    run_stage(
        args,
        "stage2",
        &file,
        &mut stage,
        source,
        fingerprint,
        (
            "pronoun_right_character",
            "validation pronoun frames, right character",
        ),
        |stage, summary| {
            stage.export()?;
            write_cast(&out, &data)?;
            write_manifest(&out, stage.section())?;
            let gates = vec![gate_on(
                summary,
                "pronoun_right_character",
                format!(
                    "validation pronoun frames whose Mapper_LDM output is nearest the right character's fused embedding ({} frames)",
                    stage.pronoun_count()
                ),
                0.9,
            )];
            let extra = json!({
                "val_l_align": summary.validation.get("val_l_align"),
                "val_l_gen": summary.validation.get("val_l_gen"),
            });
            Ok((gates, extra))
        },
    )
}

/// Copies the cast the bundle was trained on (names, pronouns, descriptions, portraits) into
/// `OUT/cast/cast.json` and `OUT/cast/*.png`: the characters this model knows, which the studio
/// offers as a starter cast.
pub fn write_cast(out: &Path, data: &Path) -> Result<()> {
    let cast = crate::stages::load_cast(data, "stage2")?;
    let dir = out.join("cast");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut entries = Vec::new();
    for (c, img) in &cast {
        let file = format!("{}.png", c.label.replace(' ', "-"));
        img.save(dir.join(&file))
            .with_context(|| format!("writing the portrait of {}", c.name))?;
        entries.push(json!({
            "name": c.name,
            "pronoun": c.pronoun,
            "description": c.description,
            "portrait": file,
        }));
    }
    std::fs::write(
        dir.join("cast.json"),
        serde_json::to_string_pretty(&entries)?,
    )?;
    Ok(())
}

/// Writes `OUT/bundle.toml` for a bundle trained by these stages (frame size from the VAE).
pub fn write_manifest(out: &Path, s2: &Stage2Section) -> Result<()> {
    use models::bundle::{self as b, Manifest};
    let vae: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("sd/vae/config.json"))
            .context("reading sd/vae/config.json")?,
    )?;
    let size = vae["sample_size"]
        .as_u64()
        .context("sd/vae/config.json has no sample_size")? as usize;
    let mut manifest = Manifest::toy_layout(
        "toy".into(),
        format!(
            "The toy world's StoryGPT-V, trained from scratch in Rust by `storygpt-v train` \
             ({size}x{size} frames; it knows the toy cast only). See docs/TRAINING.md."
        ),
        true,
        b::MapperLdmDims {
            d_model: s2.d_model,
            heads: s2.heads,
            encoder_layers: s2.encoder_layers,
            decoder_layers: s2.decoder_layers,
            ff_dim: s2.ff_dim,
        },
        size,
    );
    manifest.llm.num_img_tokens = s2.num_img_tokens;
    manifest.llm.visual_tokens = s2.visual_tokens;
    manifest.llm.max_prompt_len = s2.max_prompt_len;
    manifest.llm.caption_only = s2.caption_only;
    manifest.write(out)?;
    Ok(())
}

fn print_gates(stage: &str, gates: &[Gate]) {
    for g in gates {
        eprintln!(
            "{stage} gate: {} = {:.3} (target >= {}) {}",
            g.metric,
            g.value,
            g.target,
            if g.passed { "PASS" } else { "MISS" }
        );
    }
}
