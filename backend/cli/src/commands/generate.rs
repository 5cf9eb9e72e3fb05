//! `storygpt-v generate`: illustrate a story from a JSON file with a model bundle.
//!
//! STORY.json: `{"characters": [{"name": "Tom", "pronoun": "he", "portrait": "tom.png"}],
//! "captions": ["Tom opens the door.", "He waves."]}` (portrait paths relative to the file;
//! portraits optional). Writes `frame-01.png`, ... and `story.json` (captions, seeds,
//! timings, peak memory) into `--out`, with a progress bar on a terminal.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use models::limits;
use models::pipeline::{
    CharacterInput, Decoding, FrameRequest, PipelineEvent, StoryInput, StoryPipeline,
};
use serde::{Deserialize, Serialize};

/// Arguments of `storygpt-v generate`.
#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The model bundle directory (`storygpt-v bundle random --config toy --out DIR` makes one).
    #[arg(long)]
    pub bundle: PathBuf,
    /// The story file (JSON: characters with name, pronoun, portrait; captions).
    #[arg(long)]
    pub story: PathBuf,
    /// Output directory for frame-NN.png and story.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Base seed: frame i (1-based) uses seed + i - 1.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Denoising steps, 1..=200 (default: the bundle's). The delayed-conditioning step scales with it.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale, 1..=30 (default: the bundle's).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Sampler: pndm, ddim, ddpm or euler-a (default: the bundle's).
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Redraw only these frames (1-based, comma separated); the others are read from the
    /// frame-NN.png files already in --out and serve as context.
    #[arg(long, value_delimiter = ',')]
    pub frames: Vec<usize>,
    /// Let the LLM write this many more captions after the story's (story continuation), each
    /// drawn after it is written.
    #[arg(long = "continue", default_value_t = 0)]
    pub continue_frames: usize,
    /// Nucleus sampling for continuation captions (greedy when absent).
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Softmax temperature for --top-p.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoryFile {
    #[serde(default)]
    characters: Vec<CharacterFile>,
    captions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CharacterFile {
    name: String,
    pronoun: String,
    #[serde(default)]
    portrait: Option<PathBuf>,
}

/// One frame in the written story.json.
#[derive(Debug, Serialize)]
struct FrameRecord {
    file: String,
    caption: String,
    seed: u64,
    /// Whether this run drew the frame (false: read from --out as context).
    drawn: bool,
    /// Whether the LLM wrote the caption (story continuation).
    generated_caption: bool,
    duration_ms: Option<u128>,
    start_merge_step: Option<usize>,
    condition: Option<models::pipeline::ConditionKind>,
    prompt_tokens: Option<usize>,
    llm_positions_computed: Option<usize>,
}

#[derive(Debug, Serialize)]
struct StoryRecord {
    bundle: String,
    bundle_trained: bool,
    device: String,
    steps: usize,
    guidance_scale: f64,
    scheduler: String,
    width: usize,
    height: usize,
    frames: Vec<FrameRecord>,
    load_ms: u128,
    total_ms: u128,
    mean_frame_ms: Option<f64>,
    /// Peak resident memory of the process (Linux VmHWM), bytes.
    peak_rss_bytes: Option<u64>,
}

fn load_story(path: &Path) -> Result<StoryInput> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read story file {}", path.display()))?;
    let file: StoryFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid story file", path.display()))?;
    if file.captions.is_empty() {
        bail!("{}: `captions` is empty", path.display())
    }
    if let Some(i) = file.captions.iter().position(|c| c.trim().is_empty()) {
        bail!("{}: caption {} is empty", path.display(), i + 1)
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let characters = file
        .characters
        .into_iter()
        .map(|c| {
            let portrait = c
                .portrait
                .map(|p| {
                    let p = if p.is_absolute() { p } else { base.join(p) };
                    image::open(&p)
                        .with_context(|| {
                            format!("portrait of {}: cannot read {}", c.name, p.display())
                        })
                        .map(|i| i.to_rgb8())
                })
                .transpose()?;
            Ok(CharacterInput {
                name: c.name,
                pronoun: c.pronoun,
                portrait,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(StoryInput {
        characters,
        captions: file.captions,
    })
}

/// Peak resident set size (VmHWM) of this process, when the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn frame_file(i: usize) -> String {
    format!("frame-{:02}.png", i + 1)
}

/// Terminal progress: a redrawn bar on a terminal, one line per frame otherwise.
struct Progress {
    tty: bool,
    started: Instant,
}

impl Progress {
    fn event(&self, e: &PipelineEvent<'_>) {
        match e {
            PipelineEvent::Step {
                index,
                ordinal,
                count,
                step,
                steps,
            } if self.tty => {
                let width = 30;
                let done = ((ordinal - 1) * steps + step) * width / (count * steps).max(1);
                let elapsed = self.started.elapsed().as_secs_f64();
                let frac = ((ordinal - 1) * steps + step) as f64 / (count * steps) as f64;
                let eta = if frac > 0.0 {
                    elapsed / frac - elapsed
                } else {
                    0.0
                };
                eprint!(
                    "\r[{}{}] frame {ordinal}/{count} (#{}) step {step}/{steps}  {elapsed:.1} s, ETA {eta:.0} s   ",
                    "#".repeat(done),
                    ".".repeat(width - done),
                    index + 1
                );
                let _ = std::io::stderr().flush();
            }
            PipelineEvent::FrameFinished {
                ordinal,
                count,
                frame,
            } => {
                if self.tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!(
                    "frame {ordinal}/{count}: {} ({} ms, seed {})",
                    frame_file(frame.index),
                    frame.duration.as_millis(),
                    frame.seed
                );
            }
            _ => {}
        }
    }
}

/// Runs the command.
pub fn run(args: GenerateArgs) -> Result<()> {
    let mut story = load_story(&args.story)?;
    // Frame i uses seed + i - 1: the last frame's seed must be within the shared limit too.
    let last_seed = args
        .seed
        .saturating_add(story.captions.len().saturating_sub(1) as u64);
    limits::check_seed(last_seed)
        .map_err(|e| anyhow::anyhow!("--seed (of the last frame): {e}"))?;
    // Checked before the weights load, so a typo fails at once.
    if let Some(s) = args.steps {
        limits::check_steps(s).map_err(|e| anyhow::anyhow!("--{e}"))?;
    }
    if let Some(g) = args.guidance {
        limits::check_guidance(g).map_err(|e| anyhow::anyhow!("--{e}"))?;
    }
    let device = nn::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let t0 = Instant::now();
    let pipeline = StoryPipeline::load(&args.bundle, &device)
        .with_context(|| format!("loading the model bundle {}", args.bundle.display()))?;
    let load_ms = t0.elapsed().as_millis();
    if !pipeline.info().trained {
        eprintln!(
            "note: bundle `{}` is randomly initialised (UNTRAINED): frames will look like noise",
            pipeline.info().name
        );
    }
    let mut opts = pipeline.default_options();
    if let Some(s) = args.steps {
        opts = opts.with_steps(s);
    }
    if let Some(g) = args.guidance {
        opts.guidance_scale = g;
    }
    if let Some(s) = &args.scheduler {
        opts.scheduler = s.parse().map_err(anyhow::Error::msg)?;
    }
    let decoding = match args.top_p {
        None => Decoding::Greedy,
        Some(p) => Decoding::TopP {
            p,
            temperature: args.temperature,
            seed: args.seed,
        },
    };
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;

    let n = story.captions.len();
    let requested: Vec<usize> = if args.frames.is_empty() {
        (0..n).collect()
    } else {
        for &f in &args.frames {
            if f == 0 || f > n {
                bail!("--frames {f}: the story has frames 1..={n}")
            }
        }
        args.frames.iter().map(|f| f - 1).collect()
    };
    let mut existing: Vec<Option<image::RgbImage>> = vec![None; n];
    for (i, slot) in existing.iter_mut().enumerate() {
        if !requested.contains(&i) {
            let p = args.out.join(frame_file(i));
            if p.exists() {
                *slot = Some(
                    image::open(&p)
                        .with_context(|| format!("reading context frame {}", p.display()))?
                        .to_rgb8(),
                );
            }
        }
    }
    let requests: Vec<FrameRequest> = requested
        .iter()
        .map(|&i| FrameRequest {
            index: i,
            seed: args.seed.wrapping_add(i as u64),
        })
        .collect();
    let progress = Progress {
        tty: std::io::stderr().is_terminal(),
        started: Instant::now(),
    };
    let out_dir = args.out.clone();
    let mut write_error: Option<anyhow::Error> = None;
    let mut on_event = |e: PipelineEvent<'_>| {
        if let PipelineEvent::FrameFinished { frame, .. } = &e {
            // Written as soon as drawn, so an interrupted run keeps its frames.
            let p = out_dir.join(frame_file(frame.index));
            if let Err(err) = frame.image.save(&p) {
                write_error.get_or_insert(anyhow::anyhow!("writing {}: {err}", p.display()));
            }
        }
        progress.event(&e);
    };
    let started = Instant::now();
    let mut outputs =
        pipeline.generate(&story, &requests, &existing, &opts, &mut on_event, &|| {
            false
        })?;
    let mut generated_captions = Vec::new();
    for k in 0..args.continue_frames {
        let frames: Vec<image::RgbImage> = (0..story.captions.len())
            .map(|i| {
                outputs
                    .iter()
                    .rev()
                    .find(|o| o.index == i)
                    .map(|o| o.image.clone())
                    .or_else(|| existing.get(i).cloned().flatten())
                    .context("a frame of the story is missing")
            })
            .collect::<Result<_>>()?;
        let caption = pipeline.next_caption(&story, &frames, decoding, 32)?;
        let caption = if caption.is_empty() {
            // An untrained LLM may stop at once; keep the story going with a marker caption.
            format!("(continuation {} was empty)", k + 1)
        } else {
            caption
        };
        eprintln!(
            "continuation caption {}: {caption}",
            story.captions.len() + 1
        );
        story.captions.push(caption);
        generated_captions.push(story.captions.len() - 1);
        existing.resize(story.captions.len(), None);
        for o in &outputs {
            existing[o.index] = Some(o.image.clone());
        }
        let i = story.captions.len() - 1;
        let req = [FrameRequest {
            index: i,
            seed: args.seed.wrapping_add(i as u64),
        }];
        outputs.extend(pipeline.generate(
            &story,
            &req,
            &existing,
            &opts,
            &mut on_event,
            &|| false,
        )?);
    }
    if let Some(e) = write_error {
        return Err(e);
    }
    let total_ms = started.elapsed().as_millis();
    let frames: Vec<FrameRecord> = story
        .captions
        .iter()
        .enumerate()
        .map(|(i, caption)| {
            let o = outputs.iter().find(|o| o.index == i);
            FrameRecord {
                file: frame_file(i),
                caption: caption.clone(),
                seed: args.seed.wrapping_add(i as u64),
                drawn: o.is_some(),
                generated_caption: generated_captions.contains(&i),
                duration_ms: o.map(|o| o.duration.as_millis()),
                start_merge_step: o.map(|o| o.start_merge_step),
                condition: o.map(|o| o.condition),
                prompt_tokens: o.map(|o| o.prompt_tokens),
                llm_positions_computed: o.map(|o| o.llm_positions_computed),
            }
        })
        .collect();
    let drawn: Vec<f64> = outputs
        .iter()
        .map(|o| o.duration.as_secs_f64() * 1e3)
        .collect();
    let record = StoryRecord {
        bundle: pipeline.info().name.clone(),
        bundle_trained: pipeline.info().trained,
        device: args.device.clone(),
        steps: opts.steps,
        guidance_scale: opts.guidance_scale,
        scheduler: format!("{:?}", opts.scheduler),
        width: opts.width,
        height: opts.height,
        frames,
        load_ms,
        total_ms,
        mean_frame_ms: (!drawn.is_empty()).then(|| drawn.iter().sum::<f64>() / drawn.len() as f64),
        peak_rss_bytes: peak_rss_bytes(),
    };
    let path = args.out.join("story.json");
    std::fs::write(&path, serde_json::to_string_pretty(&record)?)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!(
        "wrote {} frames and {} in {:.1} s",
        outputs.len(),
        path.display(),
        total_ms as f64 / 1e3
    );
    Ok(())
}
