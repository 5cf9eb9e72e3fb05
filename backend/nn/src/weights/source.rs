//! Checkpoint sources (mmapped safetensors, torch pickles, in-memory maps) and the
//! weight-loading error type.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

use super::legacy::LegacyTensors;

/// Keys under which training scripts nest the state dict of a pickled checkpoint, tried in
/// order when the top level holds no tensors (`state_dict` is the StoryGPT-V `.pth.tar` one).
pub const NESTED_STATE_DICT_KEYS: [&str; 3] = ["state_dict", "model", "module"];

/// A weight-loading error; every variant names the file(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or parsed.
    #[error("cannot open weights {path}: {msg}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        msg: String,
    },
    /// No tensor of that name.
    #[error("tensor `{name}` not found in {location}{hint}")]
    Missing {
        /// Full tensor name.
        name: String,
        /// The file or file set searched.
        location: String,
        /// A "did you mean" suffix, possibly empty.
        hint: String,
    },
    /// The tensor exists with another shape.
    #[error("tensor `{name}` has shape {got:?} in {path}, expected {expected:?}")]
    Shape {
        /// Full tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// Shape in the file.
        got: Vec<usize>,
        /// Shape the model asked for.
        expected: Vec<usize>,
    },
    /// Reading / converting the tensor data failed.
    #[error("cannot load tensor `{name}` from {path}: {source}")]
    Load {
        /// Full tensor name.
        name: String,
        /// The file holding it.
        path: PathBuf,
        /// The candle error.
        source: Box<candle_core::Error>,
    },
}

impl From<WeightsError> for candle_core::Error {
    fn from(e: WeightsError) -> Self {
        candle_core::Error::wrap(e)
    }
}

pub(crate) type WResult<T> = std::result::Result<T, WeightsError>;

pub(crate) enum Store {
    Safetensors(MmapedSafetensors),
    Pickle(PthTensors),
    Legacy(LegacyTensors),
    Memory(HashMap<String, Tensor>),
}

pub(crate) struct Source {
    pub(crate) path: PathBuf,
    pub(crate) store: Store,
}

impl Source {
    pub(crate) fn shape(&self, name: &str) -> Option<Vec<usize>> {
        match &self.store {
            Store::Safetensors(st) => st.get(name).ok().map(|v| v.shape().to_vec()),
            Store::Pickle(p) => p.tensor_infos().get(name).map(|i| i.layout.dims().to_vec()),
            Store::Legacy(p) => p.shape(name),
            Store::Memory(m) => m.get(name).map(|t| t.dims().to_vec()),
        }
    }

    pub(crate) fn names(&self) -> Vec<String> {
        match &self.store {
            Store::Safetensors(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Store::Pickle(p) => p.tensor_infos().keys().cloned().collect(),
            Store::Legacy(p) => p.names(),
            Store::Memory(m) => m.keys().cloned().collect(),
        }
    }

    pub(crate) fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        match &self.store {
            Store::Safetensors(st) => {
                use candle_core::safetensors::Load;
                let view = st.get(name)?;
                let t = view.load(device)?;
                // The tensor now lives in its own storage (host memory or the GPU): let the
                // process drop the mapped file pages it read, so that a 13 GB LLM is not
                // counted twice (mapped pages + the copy) while a bundle loads.
                release_mapped_pages(view.data());
                Ok(t)
            }
            Store::Pickle(p) => match p.get(name)? {
                Some(t) => t.to_device(device),
                None => candle_core::bail!("tensor vanished from the pickle"),
            },
            Store::Legacy(p) => p.get(name)?.to_device(device),
            Store::Memory(m) => match m.get(name) {
                Some(t) => t.to_device(device),
                None => candle_core::bail!("tensor vanished from memory"),
            },
        }
    }
}

/// Drops the whole pages of `bytes`, a slice of a read-only file mapping, from this process's
/// resident set (`madvise(MADV_DONTNEED)`). The file's pages stay in the page cache, where the
/// kernel can reclaim them, and a later read of the slice faults them back in from the file, so
/// this never changes what the mapping reads. A no-op outside Linux.
pub(crate) fn release_mapped_pages(bytes: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let Ok(page) = usize::try_from(page) else {
            return;
        };
        if page == 0 {
            return;
        }
        let start = bytes.as_ptr() as usize;
        // Whole pages inside the slice only: a neighbouring tensor's partial page stays.
        let first = start.div_ceil(page) * page;
        let end = (start + bytes.len()) / page * page;
        if end > first {
            // SAFETY: [first, end) lies inside a live read-only file mapping (the slice borrows
            // it); MADV_DONTNEED on a file mapping that was never written only discards this
            // process's page table entries, and later accesses re-read the file. Nothing is
            // written and no anonymous memory is involved.
            unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bytes;
}

pub(crate) fn open_err(path: &Path, msg: impl std::fmt::Display) -> WeightsError {
    WeightsError::Open {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

fn is_pickle(path: &Path) -> bool {
    let n = path.to_string_lossy();
    [".bin", ".pth", ".pt", ".ckpt", ".tar"]
        .iter()
        .any(|e| n.ends_with(e))
}

fn open_safetensors(path: &Path) -> WResult<Source> {
    // SAFETY: the file is mapped read-only; as with every mmap-based loader (candle's
    // `from_mmaped_safetensors`), it must not be truncated while the weights are alive.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| open_err(path, e))?;
    Ok(Source {
        path: path.to_path_buf(),
        store: Store::Safetensors(st),
    })
}

pub(crate) fn open_pickle_source(path: &Path, key: Option<&str>) -> WResult<Source> {
    if !path.is_file() {
        return Err(open_err(path, "no such file"));
    }
    if !is_zip(path) {
        // The legacy (non-zip) serialisation of torch < 1.6 / `_use_new_zipfile_serialization=False`.
        let legacy = |key: Option<&str>| {
            LegacyTensors::new(path, key).map(|p| Source {
                path: path.to_path_buf(),
                store: Store::Legacy(p),
            })
        };
        let wrap = |e: String| {
            open_err(
                path,
                format!("{e} (not a zip archive, so read as a legacy torch pickle)"),
            )
        };
        if key.is_some() {
            return legacy(key).map_err(wrap);
        }
        let top = legacy(None).map_err(wrap)?;
        if !top.names().is_empty() {
            return Ok(top);
        }
        for k in NESTED_STATE_DICT_KEYS {
            if let Ok(p) = legacy(Some(k)) {
                if !p.names().is_empty() {
                    return Ok(p);
                }
            }
        }
        return Ok(top);
    }
    let wrap = |e: candle_core::Error| {
        open_err(
            path,
            format!("{e} (a zip-format torch checkpoint, torch >= 1.6)"),
        )
    };
    let mk = |p: PthTensors| Source {
        path: path.to_path_buf(),
        store: Store::Pickle(p),
    };
    if key.is_some() {
        return PthTensors::new(path, key).map(mk).map_err(wrap);
    }
    let top = PthTensors::new(path, None).map_err(wrap)?;
    if !top.tensor_infos().is_empty() {
        return Ok(mk(top));
    }
    for k in NESTED_STATE_DICT_KEYS {
        if let Ok(p) = PthTensors::new(path, Some(k)) {
            if !p.tensor_infos().is_empty() {
                return Ok(mk(p));
            }
        }
    }
    Ok(mk(top))
}

/// Whether `path` starts with a zip local-file header (`PK\x03\x04`).
fn is_zip(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head == *b"PK\x03\x04"
}

pub(crate) fn open_file(path: &Path) -> WResult<Source> {
    if is_pickle(path) {
        open_pickle_source(path, None)
    } else {
        open_safetensors(path)
    }
}
