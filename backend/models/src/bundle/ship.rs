//! `storygpt-v bundle ship`: a trained bundle directory made fit to commit or hand out: the
//! files the loader reads (plus the figures and `training.json` that say how it was made),
//! without the training runs, checkpoints and generated data, optionally with the weights
//! stored as f16 (the manifest's compute dtype is unchanged: the loader converts on load).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

/// Directories of a training output that a shipped bundle leaves out.
const LEFT_OUT: &[&str] = &["runs", "data"];

/// What [`ship`] wrote.
#[derive(Debug, Clone, Default)]
pub struct ShipReport {
    /// Files written.
    pub files: usize,
    /// Bytes written.
    pub bytes: u64,
    /// Tensors stored as f16.
    pub f16_tensors: usize,
}

/// Copies the bundle in `from` into `to` (which must be absent or empty), leaving out
/// [`LEFT_OUT`]; with `f16`, f32 tensors of every `.safetensors` file are stored as f16.
/// The copy is loaded once to check it before this returns.
pub fn ship(from: &Path, to: &Path, f16: bool) -> Result<ShipReport> {
    super::Bundle::open(from).with_context(|| format!("{} is not a bundle", from.display()))?;
    if to.exists()
        && std::fs::read_dir(to)
            .with_context(|| format!("reading {}", to.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty; choose a new directory",
            to.display()
        )
    }
    let mut report = ShipReport::default();
    copy(from, to, true, f16, &mut report)?;
    super::Bundle::open(to).with_context(|| format!("checking the copy in {}", to.display()))?;
    Ok(report)
}

fn copy(from: &Path, to: &Path, top: bool, f16: bool, report: &mut ShipReport) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .with_context(|| format!("reading {}", from.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = e.file_name();
        let name_s = name.to_string_lossy();
        if name_s.starts_with('.') || (top && LEFT_OUT.contains(&name_s.as_ref())) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type()?.is_dir() {
            copy(&src, &dst, false, f16, report)?;
        } else if f16 && name_s.ends_with(".safetensors") {
            let tensors = candle_core::safetensors::load(&src, &Device::Cpu)
                .with_context(|| format!("reading {}", src.display()))?;
            let mut out = std::collections::HashMap::with_capacity(tensors.len());
            for (k, t) in tensors {
                let t = if t.dtype() == DType::F32 {
                    report.f16_tensors += 1;
                    t.to_dtype(DType::F16)?
                } else {
                    t
                };
                out.insert(k, t);
            }
            candle_core::safetensors::save(&out, &dst)
                .with_context(|| format!("writing {}", dst.display()))?;
            report.files += 1;
            report.bytes += std::fs::metadata(&dst)?.len();
        } else {
            report.bytes +=
                std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
            report.files += 1;
        }
    }
    Ok(())
}
