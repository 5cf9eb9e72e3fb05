//! `StoryPipeline` on the random toy bundle: the real loader and generator end to end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use candle_core::Device;
use image::RgbImage;
use models::char_ldm::is_cancelled;
use models::pipeline::{
    CharacterInput, ConditionKind, Conditioning, Decoding, FrameOutput, FrameRequest,
    GenerateOptions, PipelineEvent, StoryInput, StoryPipeline,
};

struct Fixture {
    _dir: tempfile::TempDir,
    pipeline: StoryPipeline,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("toy");
        models::bundle::write_random("toy", &path, 0).unwrap();
        let pipeline = StoryPipeline::load(&path, &Device::Cpu).unwrap();
        Fixture {
            _dir: dir,
            pipeline,
        }
    })
}

// `StoryPipeline` is not `Sync` (candle's Var), so each test holds the pipeline behind a lock.
fn with_pipeline<T>(f: impl FnOnce(&StoryPipeline) -> T) -> T {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    f(&fixture().pipeline)
}

fn portrait(rgb: [u8; 3]) -> RgbImage {
    RgbImage::from_fn(48, 48, |x, y| {
        if (x as i32 - 24).pow(2) + (y as i32 - 24).pow(2) < 300 {
            image::Rgb(rgb)
        } else {
            image::Rgb([255, 255, 255])
        }
    })
}

fn story(captions: &[&str]) -> StoryInput {
    StoryInput {
        characters: vec![
            CharacterInput {
                name: "Tom".into(),
                pronoun: "he".into(),
                portrait: Some(portrait([200, 80, 20])),
            },
            CharacterInput {
                name: "Mia".into(),
                pronoun: "she".into(),
                portrait: Some(portrait([240, 220, 40])),
            },
        ],
        captions: captions.iter().map(|s| s.to_string()).collect(),
    }
}

const FOUR: [&str; 4] = [
    "Tom walks into the living room.",
    "He waves at Mia.",
    "Mia smiles at Tom in the kitchen.",
    "They laugh together.",
];

fn quick(p: &StoryPipeline) -> GenerateOptions {
    p.default_options().with_steps(3)
}

fn all(n: usize, seed: u64) -> Vec<FrameRequest> {
    (0..n)
        .map(|i| FrameRequest {
            index: i,
            seed: seed + i as u64,
        })
        .collect()
}

fn run(
    p: &StoryPipeline,
    s: &StoryInput,
    frames: &[FrameRequest],
    existing: &[Option<RgbImage>],
) -> Vec<FrameOutput> {
    p.generate(s, frames, existing, &quick(p), &mut |_| {}, &|| false)
        .unwrap()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn whole_story_frames_follow_the_method() {
    with_pipeline(|p| {
        let s = story(&FOUR);
        let out = run(p, &s, &all(4, 10), &[]);
        assert_eq!(out.len(), 4);
        for (i, o) in out.iter().enumerate() {
            assert_eq!(o.index, i);
            assert_eq!(o.seed, 10 + i as u64);
            assert_eq!(o.image.dimensions(), (64, 64));
        }
        // Frame 1: Char-LDM alone with the portraits fused; later frames: the LLM.
        assert_eq!(out[0].condition, ConditionKind::Fused);
        assert_eq!(out[0].prompt_tokens, 0);
        assert!(out[1..].iter().all(|o| o.condition == ConditionKind::Llm));
        // Delayed conditioning: pronoun frames merge at step 0, named frames at half.
        let half = quick(p).start_merge_step;
        assert!(half > 0);
        let merges: Vec<usize> = out.iter().map(|o| o.start_merge_step).collect();
        assert_eq!(merges, vec![half, 0, half, 0]);
        // The KV cache is reused: later frames compute only their new positions.
        for w in out[1..].windows(2) {
            assert!(w[1].prompt_tokens > w[0].prompt_tokens);
            assert!(
                w[1].llm_positions_computed < w[1].prompt_tokens,
                "frame {} recomputed its whole prompt",
                w[1].index + 1
            );
        }
        // Same seeds, same frames; another seed, another frame.
        let again = run(p, &s, &all(4, 10), &[]);
        for (a, b) in out.iter().zip(&again) {
            assert_eq!(a.image, b.image);
        }
        let other = run(p, &s, &all(1, 99), &[]);
        assert!(max_diff(&other[0].image, &out[0].image) > 10);
    })
}

#[test]
fn baseline_conditionings_draw_without_the_llm() {
    with_pipeline(|p| {
        let draw = |s: &StoryInput, c: Conditioning| {
            p.generate_with(s, &all(4, 10), &[], &quick(p), c, &mut |_| {}, &|| false)
                .unwrap()
        };
        let s = story(&FOUR);
        let (full, text, fused) = (
            draw(&s, Conditioning::StoryGptV),
            draw(&s, Conditioning::TextOnly),
            draw(&s, Conditioning::Fused),
        );
        assert!(text
            .iter()
            .all(|o| o.condition == ConditionKind::Text && o.prompt_tokens == 0));
        assert!(fused
            .iter()
            .all(|o| o.condition == ConditionKind::Fused && o.prompt_tokens == 0));
        // Without the LLM no frame merges early: pronouns mean nothing to the baselines.
        let half = quick(p).start_merge_step;
        assert!(fused.iter().all(|o| o.start_merge_step == half));
        // Frame 1 is the same Char-LDM draw in StoryGPT-V and Char-LDM; text alone differs.
        assert_eq!(full[0].image, fused[0].image);
        assert!(max_diff(&text[0].image, &fused[0].image) > 0);
        // A baseline frame depends on its own caption only: changing frame 1 leaves frame 3.
        let mut other = FOUR;
        other[0] = "Mia walks into the kitchen.";
        let changed = draw(&story(&other), Conditioning::Fused);
        assert!(max_diff(&changed[0].image, &fused[0].image) > 0);
        assert_eq!(changed[2].image, fused[2].image);
    })
}

#[test]
fn regenerating_one_frame_uses_the_others_as_context() {
    with_pipeline(|p| {
        let s = story(&FOUR);
        let out = run(p, &s, &all(4, 10), &[]);
        let existing: Vec<Option<RgbImage>> = out.iter().map(|o| Some(o.image.clone())).collect();
        // Same seed with the same context: the same frame (cached vs. fresh LLM pass may differ
        // by float rounding only).
        let again = run(p, &s, &[FrameRequest { index: 2, seed: 12 }], &existing);
        assert_eq!(again.len(), 1);
        assert!(max_diff(&again[0].image, &out[2].image) <= 2);
        // A new seed changes only that frame.
        let new = run(
            p,
            &s,
            &[FrameRequest {
                index: 2,
                seed: 500,
            }],
            &existing,
        );
        assert!(max_diff(&new[0].image, &out[2].image) > 10);
        // The context matters: other earlier frames give another LLM condition.
        let mut swapped = existing.clone();
        swapped.swap(0, 1);
        let ctx = run(p, &s, &[FrameRequest { index: 2, seed: 12 }], &swapped);
        assert!(max_diff(&ctx[0].image, &out[2].image) > 0);
    })
}

#[test]
fn missing_context_is_refused_before_drawing() {
    with_pipeline(|p| {
        let s = story(&FOUR);
        let mut events = 0;
        let err = p
            .generate(
                &s,
                &[FrameRequest { index: 3, seed: 1 }],
                &[None, None, None, None],
                &quick(p),
                &mut |_| events += 1,
                &|| false,
            )
            .unwrap_err();
        assert!(format!("{err:#}").contains("frame 1 is needed"), "{err:#}");
        assert_eq!(events, 0);
        let err = p
            .generate(&s, &all(5, 0), &[], &quick(p), &mut |_| {}, &|| false)
            .unwrap_err();
        assert!(format!("{err:#}").contains("4 captions"), "{err:#}");
    })
}

#[test]
fn progress_events_and_cancellation() {
    with_pipeline(|p| {
        let s = story(&FOUR[..3]);
        // A preview every 2 of the 3 steps: after step 2 only (never after the last).
        let opts = GenerateOptions {
            preview_every: 2,
            ..quick(p)
        };
        let mut log: Vec<String> = Vec::new();
        p.generate(
            &s,
            &all(3, 0),
            &[],
            &opts,
            &mut |e| {
                log.push(match e {
                    PipelineEvent::FrameStarted {
                        index,
                        ordinal,
                        count,
                        ..
                    } => {
                        format!("start {index} {ordinal}/{count}")
                    }
                    PipelineEvent::Preview {
                        index, step, image, ..
                    } => {
                        assert_eq!(
                            (image.width() as usize, image.height() as usize),
                            (opts.width, opts.height)
                        );
                        format!("preview {index} {step}")
                    }
                    PipelineEvent::Step {
                        index, step, steps, ..
                    } => {
                        format!("step {index} {step}/{steps}")
                    }
                    PipelineEvent::FrameFinished {
                        frame,
                        ordinal,
                        count,
                    } => {
                        format!("done {} {ordinal}/{count}", frame.index)
                    }
                })
            },
            &|| false,
        )
        .unwrap();
        // PNDM visits steps + 1 timesteps (PLMS warm-up), but progress counts the steps asked
        // for: a user who asked for 30 must not read "of 31".
        let n = opts.steps;
        let mut expected = Vec::new();
        for i in 0..3 {
            expected.push(format!("start {i} {}/3", i + 1));
            for k in 1..=n {
                expected.push(format!("step {i} {k}/{n}"));
                if k == 2 {
                    expected.push(format!("preview {i} 2"));
                }
            }
            expected.push(format!("done {i} {}/3", i + 1));
        }
        assert_eq!(log, expected);

        // Cancel during the second frame: the first frame was reported, then the error.
        let polls = AtomicUsize::new(0);
        let mut finished = Vec::new();
        let err = p
            .generate(
                &s,
                &all(3, 0),
                &[],
                &opts,
                &mut |e| {
                    if let PipelineEvent::FrameFinished { frame, .. } = e {
                        finished.push(frame.index)
                    }
                },
                &|| polls.fetch_add(1, Ordering::SeqCst) > n + 4,
            )
            .unwrap_err();
        assert!(is_cancelled(&err), "{err:#}");
        assert_eq!(finished, vec![0]);
    })
}

#[test]
fn long_stories_keep_the_prompt_within_budget() {
    with_pipeline(|p| {
        let captions: Vec<String> = (0..24)
            .map(|i| match i % 3 {
                0 => "Tom walks to the park with Mia.".to_string(),
                1 => "He waves at her.".to_string(),
                _ => "They sit down on a bench and laugh.".to_string(),
            })
            .collect();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let s = story(&refs);
        let opts = p.default_options().with_steps(1);
        let out = p
            .generate(&s, &all(24, 0), &[], &opts, &mut |_| {}, &|| false)
            .unwrap();
        let tokens: Vec<usize> = out.iter().map(|o| o.prompt_tokens).collect();
        assert!(tokens.iter().all(|&t| t <= 160), "{tokens:?}");
        // The budget is reached, then older frames are dropped: the length plateaus.
        assert!(tokens[20..].iter().all(|&t| t > 120), "{tokens:?}");
    })
}

#[test]
fn continuation_writes_a_caption_deterministically() {
    with_pipeline(|p| {
        let s = story(&FOUR[..2]);
        let out = run(p, &s, &all(2, 0), &[]);
        let frames: Vec<RgbImage> = out.iter().map(|o| o.image.clone()).collect();
        let greedy = p.next_caption(&s, &frames, Decoding::Greedy, 12).unwrap();
        assert_eq!(
            greedy,
            p.next_caption(&s, &frames, Decoding::Greedy, 12).unwrap()
        );
        let top_p = |seed| Decoding::TopP {
            p: 0.9,
            temperature: 1.0,
            seed,
        };
        let a = p.next_caption(&s, &frames, top_p(1), 12).unwrap();
        assert_eq!(a, p.next_caption(&s, &frames, top_p(1), 12).unwrap());
        assert!(!a.contains("Image:") && !a.contains('\n'));
        let err = p
            .next_caption(&s, &frames[..1], Decoding::Greedy, 12)
            .unwrap_err();
        assert!(format!("{err:#}").contains("2 captions but 1 frames"));
    })
}

#[test]
fn random_bundles_are_reproducible() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    models::bundle::write_random("toy", a.path(), 5).unwrap();
    models::bundle::write_random("toy", b.path(), 5).unwrap();
    for f in [
        "bundle.toml",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "llm/tokenizer.json",
        "storygpt-v/stage2.safetensors",
    ] {
        let x = std::fs::read(a.path().join(f)).unwrap();
        let y = std::fs::read(b.path().join(f)).unwrap();
        assert!(x == y, "{f} differs between two runs with the same seed");
    }
    let err = models::bundle::write_random("toy", a.path(), 5).unwrap_err();
    assert!(format!("{err:#}").contains("not empty"));
    let err = models::bundle::write_random("huge", &a.path().join("x"), 5).unwrap_err();
    assert!(format!("{err:#}").contains("toy"));
}

#[test]
fn attention_heatmaps_of_character_mentions() {
    with_pipeline(|p| {
        let s = story(&FOUR);
        let mut opts = quick(p);
        opts.capture_attention = true;
        let out = p
            .generate(&s, &all(4, 3), &[], &opts, &mut |_| {}, &|| false)
            .unwrap();
        let first: Vec<(&str, Vec<String>)> = out[0]
            .attention
            .iter()
            .map(|a| (a.text.as_str(), a.characters.clone()))
            .collect();
        assert_eq!(first, vec![("Tom", vec!["Tom".to_string()])]);
        let second: Vec<(&str, Vec<String>)> = out[1]
            .attention
            .iter()
            .map(|a| (a.text.as_str(), a.characters.clone()))
            .collect();
        // "He" resolves to Tom, the character of the previous caption.
        assert_eq!(
            second,
            vec![
                ("He", vec!["Tom".to_string()]),
                ("Mia", vec!["Mia".to_string()])
            ]
        );
        // "They" in an LLM-conditioned frame: one map per character, each at that
        // character's name slot of the resolved caption ("Mia and Tom laugh together.").
        let mut fourth: Vec<(String, Vec<String>)> = out[3]
            .attention
            .iter()
            .map(|a| (a.text.clone(), a.characters.clone()))
            .collect();
        fourth.sort();
        assert_eq!(
            fourth,
            vec![
                ("They (Mia)".to_string(), vec!["Mia".to_string()]),
                ("They (Tom)".to_string(), vec!["Tom".to_string()])
            ]
        );
        assert_ne!(out[3].attention[0].heatmap, out[3].attention[1].heatmap);
        for a in out.iter().flat_map(|o| &o.attention) {
            assert_eq!(a.heatmap.dimensions(), (64, 64));
            // Scaled to a peak of 1 before the bilinear resize, which softens it slightly.
            let max = *a.heatmap.as_raw().iter().max().unwrap();
            let min = *a.heatmap.as_raw().iter().min().unwrap();
            assert!(max >= 200 && min < max, "{min}..{max}");
        }
        // Capturing attention does not change the frames.
        let plain = run(p, &s, &all(4, 3), &[]);
        for (a, b) in plain.iter().zip(&out) {
            assert_eq!(a.image, b.image);
            assert!(a.attention.is_empty());
        }
    })
}

#[test]
fn the_llama_family_loads_through_the_same_bundle_format() {
    let dir = tempfile::tempdir().unwrap();
    models::bundle::write_random("toy-llama", dir.path(), 1).unwrap();
    let p = StoryPipeline::load(dir.path(), &Device::Cpu).unwrap();
    assert!(p.info().llm.starts_with("llama"), "{}", p.info().llm);
    let s = story(&FOUR[..3]);
    let opts = p.default_options().with_steps(1);
    let out = p
        .generate(&s, &all(3, 0), &[], &opts, &mut |_| {}, &|| false)
        .unwrap();
    assert_eq!(out[2].condition, ConditionKind::Llm);
    assert!(out[2].llm_positions_computed < out[2].prompt_tokens);
}
