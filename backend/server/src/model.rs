//! Which model bundle the service serves, and what it reports about it.
//!
//! Without `--bundle` the service uses `models/toy` under the current directory (the trained
//! toy bundle the project ships) when it exists, else a random, UNTRAINED toy bundle it makes
//! once under the data directory, so `serve` always starts, even on a fresh clone.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Serialize;
use utoipa::ToSchema;

/// Where the project's shipped toy bundle lives, relative to the working directory.
pub const SHIPPED_BUNDLE: &str = "models/toy";

/// What `/readyz` and the logs say about the loaded model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelInfo {
    /// Bundle name from its manifest.
    pub name: String,
    /// Bundle description.
    pub description: String,
    /// Whether the weights were trained (an untrained bundle draws noise-like frames).
    pub trained: bool,
    /// Device the model runs on (`cpu`, `cuda:0`).
    pub device: String,
    /// Frame height in pixels.
    pub height: usize,
    /// Frame width in pixels.
    pub width: usize,
    /// Every frame size a request may ask for (`width`, `height`), the default first.
    pub sizes: Vec<FrameSize>,
    /// The language model.
    pub llm: String,
    /// The bundle directory, for the log. Not sent: `/readyz` is public, and a filesystem
    /// path tells a visitor about the machine (the bundle's `name` identifies it).
    #[serde(skip_serializing)]
    pub bundle: String,
    /// Denoising steps used when a request names none.
    pub default_steps: u32,
    /// Guidance scale used when a request names none.
    pub default_guidance: f64,
    /// Sampler used when a request names none.
    pub default_scheduler: String,
}

/// A frame size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub struct FrameSize {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Picks the bundle directory: the configured one (which must exist), else the shipped toy
/// bundle, else a random toy bundle under `data_dir` (made on first use).
pub fn resolve_bundle(configured: Option<&Path>, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(dir) = configured {
        if !dir.is_dir() {
            bail!(
                "model bundle {} does not exist. Make a (random, untrained) one with \
                 `storygpt-v bundle random --config toy --out {}`, or leave out --bundle \
                 (STORYGPT_BUNDLE, `bundle` in the config file) to use the default",
                dir.display(),
                dir.display()
            );
        }
        return Ok(dir.to_path_buf());
    }
    let shipped = Path::new(SHIPPED_BUNDLE);
    if shipped.is_dir() {
        tracing::info!(bundle = %shipped.display(), "using the shipped toy bundle");
        return Ok(shipped.to_path_buf());
    }
    let random = data_dir.join("bundles").join("toy-random");
    if !random.is_dir() {
        // Written under a temporary name and renamed into place, so an interrupted start never
        // leaves a half-written bundle that a later start would try to load.
        let parent = data_dir.join("bundles");
        std::fs::create_dir_all(&parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let partial = parent.join(format!(".toy-random.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&partial);
        let _report = models::bundle::write_random("toy", &partial, 0).with_context(|| {
            format!("cannot write a random toy bundle to {}", partial.display())
        })?;
        std::fs::rename(&partial, &random).with_context(|| {
            format!("cannot move the random toy bundle to {}", random.display())
        })?;
    }
    tracing::warn!(
        bundle = %random.display(),
        "no model bundle configured and no {SHIPPED_BUNDLE} here: serving a RANDOM, UNTRAINED toy \
         bundle whose frames are noise. Pass --bundle DIR (or STORYGPT_BUNDLE) with a trained bundle"
    );
    Ok(random)
}
