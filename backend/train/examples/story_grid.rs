//! Draws stories with a bundle for the docs: validation stories of a dataset (their referential
//! captions, ground-truth frames above the generated ones) and, optionally, a story written as a
//! user would. Example:
//!
//! ```sh
//! cargo run --release -p train --example story_grid -- models/toy /tmp/toy 3 docs/img/training/stories.png
//! ```
//!
//! Arguments: BUNDLE DATA N_STORIES OUT.png [SEED]. Stories come from the validation split (the
//! test split is for evaluation only). A second image `OUT-custom.png` shows the story
//! "Mia walks in the forest. / She waves at Bob. / Bob and Mia laugh at the beach. / They look
//! at a red ball." and its cross-attention heatmaps of each mention.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use data::dataset::{DatasetKind, DatasetReader, Split};
use image::{Rgb, RgbImage};
use models::pipeline::{CharacterInput, FrameRequest, StoryInput, StoryPipeline};

fn cast(data: &Path) -> Result<Vec<CharacterInput>> {
    let chars: Vec<data::dataset::CharacterInfo> =
        serde_json::from_str(&std::fs::read_to_string(data.join("characters.json"))?)?;
    chars
        .into_iter()
        .map(|c| {
            Ok(CharacterInput {
                name: c.name,
                pronoun: serde_json::to_value(c.pronoun)?
                    .as_str()
                    .context("pronoun")?
                    .to_owned(),
                portrait: Some(image::open(data.join(&c.portrait))?.to_rgb8()),
            })
        })
        .collect()
}

fn draw(
    p: &StoryPipeline,
    story: &StoryInput,
    seed: u64,
    attention: bool,
) -> Result<Vec<(RgbImage, Vec<RgbImage>)>> {
    let frames: Vec<FrameRequest> = (0..story.captions.len())
        .map(|i| FrameRequest {
            index: i,
            seed: seed + i as u64,
        })
        .collect();
    let mut opts = p.default_options();
    opts.capture_attention = attention;
    let out = p.generate(story, &frames, &[], &opts, &mut |_| {}, &|| false)?;
    out.into_iter()
        .map(|f| {
            // Each mention's heatmap, in grey at the frame's size.
            let maps = f
                .attention
                .iter()
                .map(|a| image::DynamicImage::ImageLuma8(a.heatmap.clone()).to_rgb8())
                .collect();
            Ok((f.image, maps))
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: story_grid BUNDLE DATA N_STORIES OUT.png [SEED]"
    );
    let (bundle, data) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let n: usize = args[2].parse()?;
    let out = PathBuf::from(&args[3]);
    let seed: u64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let p = StoryPipeline::load(&bundle, &Device::Cpu)?;
    let characters = cast(&data)?;
    let reader = DatasetReader::open(&data, DatasetKind::Auto, 4)?;
    let mut tiles = Vec::new();
    let mut cols = 0;
    for id in reader.story_ids(Split::Val).into_iter().take(n) {
        let s = reader.load_story(&id, 0)?;
        let story = StoryInput {
            characters: characters.clone(),
            captions: s.frames.iter().map(|f| f.referential.clone()).collect(),
        };
        for (i, f) in s.frames.iter().enumerate() {
            eprintln!("{id} frame {}: {}", i + 1, f.referential);
        }
        cols = s.frames.len();
        tiles.extend(
            s.frames
                .iter()
                .map(|f| f.image.clone().expect("images requested")),
        );
        tiles.extend(
            draw(&p, &story, seed, false)?
                .into_iter()
                .map(|(img, _)| img),
        );
    }
    train::stages::grid(&upscale(&tiles, 2), cols)
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))?;

    let custom = StoryInput {
        characters,
        captions: [
            "Mia walks in the forest.",
            "She waves at Bob.",
            "Bob and Mia laugh at the beach.",
            "They look at a red ball.",
        ]
        .map(String::from)
        .to_vec(),
    };
    let drawn = draw(&p, &custom, seed, true)?;
    let mut rows: Vec<RgbImage> = drawn.iter().map(|(img, _)| img.clone()).collect();
    let most = drawn.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    for k in 0..most {
        for (img, maps) in &drawn {
            rows.push(maps.get(k).cloned().unwrap_or_else(|| {
                RgbImage::from_pixel(img.width(), img.height(), Rgb([255, 255, 255]))
            }));
        }
    }
    let custom_out = out.with_file_name(format!(
        "{}-custom.png",
        out.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("stories")
    ));
    train::stages::grid(&upscale(&rows, 2), drawn.len()).save(&custom_out)?;
    eprintln!("wrote {} and {}", out.display(), custom_out.display());
    Ok(())
}

fn upscale(images: &[RgbImage], k: u32) -> Vec<RgbImage> {
    images
        .iter()
        .map(|i| {
            image::imageops::resize(
                i,
                i.width() * k,
                i.height() * k,
                image::imageops::FilterType::Nearest,
            )
        })
        .collect()
}
