//! Runs stage 2's validation on a trained stage 2 (a bundle's `storygpt-v/stage2.safetensors`,
//! f32 or f16) with the checks of the current code, e.g. the slot-by-slot check added after a
//! bundle was trained. Prints the metrics as JSON. Example:
//!
//! ```sh
//! cp -r models/toy /tmp/shipped       # stage 2 reads stage 1, the LM and CLIP from its --out
//! cargo run --release -p train --example stage2_validate -- configs/stage2.toml /tmp/toy10 /tmp/shipped
//! ```
//!
//! Arguments: CONFIG DATA BUNDLE. DATA is the stage's training data (the validation stories
//! come from it); CONFIG must describe the trained mapper's sizes.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::Device;
use train::stages::stage2::{self, Stage2Section};
use train::Stage;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(args.len() == 3, "usage: stage2_validate CONFIG DATA BUNDLE");
    let file = train::config::load::<Stage2Section>(&PathBuf::from(&args[0]))?;
    let (data, bundle) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]));
    let (mut stage, _, _) =
        stage2::prepare(&file.stage, &data, &bundle, file.run.seed, &Device::Cpu)?;
    stage.load_trained(&bundle.join("storygpt-v/stage2.safetensors"))?;
    let metrics = stage.validate(0)?;
    println!("{}", serde_json::to_string_pretty(&metrics)?);
    Ok(())
}
