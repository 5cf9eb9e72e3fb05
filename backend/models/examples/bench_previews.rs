//! What live previews cost: a story drawn with and without a preview every N steps, on the
//! same bundle, seeds and options, alternating so that both see the same machine.
//!
//! `cargo run --release -p models --example bench_previews -- [BUNDLE] [EVERY] [ROUNDS]`
//! (defaults: models/toy, 5, 3) prints one JSON line: median seconds per story without and
//! with previews, their ratio and the number of previews made. The server's default
//! (`--preview-every 10`) must keep the ratio under 1.10 (issue #15; docs/BENCHMARKS.md).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use models::pipeline::{CharacterInput, FrameRequest, PipelineEvent, StoryInput, StoryPipeline};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bundle = PathBuf::from(args.first().map_or("models/toy", String::as_str));
    let every: usize = args.get(1).map_or(Ok(5), |s| s.parse())?;
    let rounds: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let pipeline = StoryPipeline::load(&bundle, &Device::Cpu)
        .with_context(|| format!("loading {}", bundle.display()))?;
    let portrait = |name: &str| -> Result<Option<image::RgbImage>> {
        let path = bundle.join("cast").join(format!("{name}.png"));
        Ok(Some(
            image::open(&path)
                .with_context(|| path.display().to_string())?
                .to_rgb8(),
        ))
    };
    let story = StoryInput {
        captions: [
            "Mia walks in the forest.",
            "She waves at Bob.",
            "Bob and Mia laugh at the beach.",
            "They look at a red ball.",
        ]
        .map(String::from)
        .to_vec(),
        characters: vec![
            CharacterInput {
                name: "Mia".into(),
                pronoun: "she".into(),
                portrait: portrait("mia")?,
            },
            CharacterInput {
                name: "Bob".into(),
                pronoun: "he".into(),
                portrait: portrait("bob")?,
            },
        ],
    };
    let frames: Vec<FrameRequest> = (0..story.captions.len())
        .map(|index| FrameRequest {
            index,
            seed: 7 + index as u64,
        })
        .collect();
    let existing = vec![None; story.captions.len()];
    let base = pipeline.default_options();
    let run = |preview_every: usize| -> Result<(f64, usize)> {
        let opts = models::pipeline::GenerateOptions {
            preview_every,
            ..base.clone()
        };
        let mut previews = 0;
        let t = Instant::now();
        pipeline.generate(
            &story,
            &frames,
            &existing,
            &opts,
            &mut |e| {
                if matches!(e, PipelineEvent::Preview { .. }) {
                    previews += 1;
                }
            },
            &|| false,
        )?;
        Ok((t.elapsed().as_secs_f64(), previews))
    };
    run(0)?; // warm-up
    let (mut off, mut on, mut made) = (Vec::new(), Vec::new(), 0);
    for _ in 0..rounds {
        off.push(run(0)?.0);
        let (seconds, previews) = run(every)?;
        on.push(seconds);
        made = previews;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (off, on) = (median(&mut off), median(&mut on));
    println!(
        "{}",
        serde_json::json!({
            "bundle": bundle.display().to_string(),
            "frames": story.captions.len(),
            "steps": base.steps,
            "preview_every": every,
            "previews": made,
            "seconds_without": off,
            "seconds_with": on,
            "ratio": on / off,
            "rounds": rounds,
        })
    );
    Ok(())
}
