//! Checkpoints written atomically: a complete directory appears under its final name or not at
//! all, and the `latest` pointer moves only after it is on disk, so a failed or killed write
//! leaves the previous checkpoint as the one a resume picks up.
//!
//! Layout: `OUT/checkpoints/step-00000123/{model,optimizer,ema}.safetensors` + `state.json`,
//! and `OUT/checkpoints/latest` holding the directory name.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

/// What a checkpoint says about its run, besides the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The stage that wrote it (`vae`, `clip`, ...).
    pub stage: String,
    /// Optimiser steps completed (the next batch is batch `step`).
    pub step: u64,
    /// The run's configuration, as JSON (a resume with another configuration is refused).
    pub config: serde_json::Value,
    /// Fingerprint of the training data (a resume on other data is refused).
    pub data_fingerprint: String,
    /// Wall time spent training so far, over all processes of the run.
    pub elapsed_s: f64,
}

/// One checkpoint's tensors, by group.
#[derive(Debug, Default)]
pub struct CheckpointTensors {
    /// Trainable weights by name.
    pub model: HashMap<String, Tensor>,
    /// Optimiser state by name.
    pub optimizer: HashMap<String, Tensor>,
    /// EMA shadow weights by name (empty without EMA).
    pub ema: HashMap<String, Tensor>,
}

/// The checkpoint directory of a run output directory.
pub fn dir_of(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

fn sync_dir(dir: &Path) {
    // Best effort: makes the rename durable on filesystems that need it.
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

fn save_group(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let path = dir.join(format!("{name}.safetensors"));
    candle_core::safetensors::save(tensors, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    fs::File::open(&path)?.sync_all()?;
    Ok(())
}

/// Writes a checkpoint and makes it the latest; keeps the newest `keep` checkpoints.
pub fn save(
    out: &Path,
    state: &CheckpointState,
    tensors: &CheckpointTensors,
    keep: usize,
) -> Result<PathBuf> {
    let root = dir_of(out);
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = step_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = (|| -> Result<()> {
        save_group(&tmp, "model", &tensors.model)?;
        save_group(&tmp, "optimizer", &tensors.optimizer)?;
        if !tensors.ema.is_empty() {
            save_group(&tmp, "ema", &tensors.ema)?;
        }
        let mut f = fs::File::create(tmp.join("state.json"))?;
        f.write_all(serde_json::to_string_pretty(state)?.as_bytes())?;
        f.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {name}; the previous checkpoint is kept"
        )));
    }
    let final_dir = root.join(&name);
    if final_dir.is_dir() {
        // Same step written again (a stop right after a periodic checkpoint): replace it.
        fs::remove_dir_all(&final_dir)?;
    }
    if let Err(e) = fs::rename(&tmp, &final_dir) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(anyhow::Error::new(e).context(format!(
            "moving checkpoint into {}; the previous checkpoint is kept",
            final_dir.display()
        )));
    }
    sync_dir(&root);
    let pointer_tmp = root.join(format!(".latest-{}", std::process::id()));
    fs::write(&pointer_tmp, &name)?;
    fs::File::open(&pointer_tmp)?.sync_all()?;
    fs::rename(&pointer_tmp, root.join("latest"))?;
    sync_dir(&root);
    prune(&root, keep)?;
    Ok(final_dir)
}

/// Removes all but the newest `keep` step directories (and stale temporary ones).
fn prune(root: &Path, keep: usize) -> Result<()> {
    let mut steps = Vec::new();
    for entry in fs::read_dir(root)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            steps.push((n, entry.path()));
        } else if name.starts_with(".tmp-") && !name.ends_with(&format!("-{}", std::process::id()))
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(excess) {
        fs::remove_dir_all(&path)
            .with_context(|| format!("removing old checkpoint {}", path.display()))?;
    }
    Ok(())
}

/// The latest checkpoint's directory, if the run has one.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let root = dir_of(out);
    let pointer = root.join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name =
        fs::read_to_string(&pointer).with_context(|| format!("reading {}", pointer.display()))?;
    let dir = root.join(name.trim());
    anyhow::ensure!(
        dir.join("state.json").is_file(),
        "{} points at {}, which is not a complete checkpoint",
        pointer.display(),
        dir.display()
    );
    Ok(Some(dir))
}

/// Reads a checkpoint's state.
pub fn read_state(dir: &Path) -> Result<CheckpointState> {
    let path = dir.join("state.json");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Reads a checkpoint's tensors onto `device`.
pub fn read_tensors(dir: &Path, device: &Device) -> Result<CheckpointTensors> {
    let group = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(format!("{name}.safetensors"));
        if !path.exists() {
            return Ok(HashMap::new());
        }
        candle_core::safetensors::load(&path, device)
            .with_context(|| format!("reading {}", path.display()))
    };
    Ok(CheckpointTensors {
        model: group("model")?,
        optimizer: group("optimizer")?,
        ema: group("ema")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            stage: "demo".into(),
            step,
            config: serde_json::json!({"lr": 1}),
            data_fingerprint: "abc".into(),
            elapsed_s: 1.0,
        }
    }

    fn tensors(v: f32) -> CheckpointTensors {
        let mut t = CheckpointTensors::default();
        t.model
            .insert("w".into(), Tensor::new(&[v, v], &Device::Cpu).unwrap());
        t.optimizer
            .insert("w.m".into(), Tensor::new(&[0f32], &Device::Cpu).unwrap());
        t
    }

    #[test]
    fn latest_moves_and_old_checkpoints_are_pruned() {
        let out = tempfile::tempdir().unwrap();
        assert!(latest(out.path()).unwrap().is_none());
        for step in [10, 20, 30] {
            save(out.path(), &state(step), &tensors(step as f32), 2).unwrap();
        }
        let dir = latest(out.path()).unwrap().unwrap();
        assert_eq!(read_state(&dir).unwrap().step, 30);
        let t = read_tensors(&dir, &Device::Cpu).unwrap();
        assert_eq!(t.model["w"].to_vec1::<f32>().unwrap(), vec![30.0, 30.0]);
        assert!(t.ema.is_empty());
        assert!(!dir_of(out.path()).join("step-00000010").exists());
        assert!(dir_of(out.path()).join("step-00000020").exists());
    }

    #[test]
    fn a_failed_write_keeps_the_previous_checkpoint() {
        let out = tempfile::tempdir().unwrap();
        save(out.path(), &state(10), &tensors(1.0), 2).unwrap();
        // A file where the next checkpoint's directory would go makes the final rename fail.
        fs::write(dir_of(out.path()).join("step-00000020"), "in the way").unwrap();
        let err = save(out.path(), &state(20), &tensors(2.0), 2).unwrap_err();
        assert!(
            format!("{err:#}").contains("previous checkpoint is kept"),
            "{err:#}"
        );
        let dir = latest(out.path()).unwrap().unwrap();
        assert_eq!(read_state(&dir).unwrap().step, 10);
        let leftovers: Vec<_> = fs::read_dir(dir_of(out.path()))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "temporary directory left behind");
    }
}
