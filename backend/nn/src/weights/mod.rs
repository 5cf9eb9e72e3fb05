//! Weight loading: safetensors (single or sharded via `*.safetensors.index.json`, mmapped) and
//! torch pickles (`.bin`, `.pth`, `.pt`, `.ckpt`, `.pth.tar`; zip or legacy format), presented
//! as a `candle_nn::VarBuilder` backend with dtype conversion and device placement.
//!
//! Errors name the tensor and the file: "tensor `a.weight` has shape [320, 320, 1, 1] in
//! /x/diffusion_pytorch_model.safetensors, expected [320, 320]".
//!
//! * [`Weights::var_builder`]: frozen weights (plain tensors) for inference.
//! * [`Weights::trainable_var_builder`]: the same constructors, but every tensor requested is
//!   loaded into a `Var` registered in a `VarMap`, so an optimiser can fine-tune it.

mod backend;
mod legacy;
mod source;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{VarBuilder, VarMap};

use source::{open_err, open_file, open_pickle_source, Source, Store, WResult};
pub use source::{WeightsError, NESTED_STATE_DICT_KEYS};

struct Inner {
    sources: Vec<Source>,
    /// Full tensor name -> index in `sources` (later sources win).
    routing: BTreeMap<String, usize>,
    /// What was opened, for error messages.
    description: String,
    /// Names an index.json promised in a file that does not contain them.
    broken_index: HashMap<String, PathBuf>,
}

/// A set of named tensors in one or more checkpoint files, optionally viewed under a prefix.
///
/// Cheap to clone (shared). Tensors are read lazily on request, converted to the requested
/// dtype and placed on the requested device.
#[derive(Clone)]
pub struct Weights {
    inner: Arc<Inner>,
    prefix: String,
    /// Set on a [`Weights::probe`] view: the full names requested so far.
    probe: Option<Arc<Mutex<BTreeSet<String>>>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("source", &self.inner.description)
            .field("prefix", &self.prefix)
            .field("tensors", &self.len())
            .finish()
    }
}

/// Directory entries tried by [`Weights::open`] on a directory, in order.
const DIR_CANDIDATES: [&str; 8] = [
    "model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "diffusion_pytorch_model.bin",
    "model.pth",
];

impl Weights {
    fn build(sources: Vec<Source>, description: String) -> Self {
        let mut routing = BTreeMap::new();
        for (i, s) in sources.iter().enumerate() {
            for n in s.names() {
                routing.insert(n, i);
            }
        }
        Self {
            inner: Arc::new(Inner {
                sources,
                routing,
                description,
                broken_index: HashMap::new(),
            }),
            prefix: String::new(),
            probe: None,
        }
    }

    /// Opens a checkpoint by path: a `.safetensors` file, a `*.index.json` shard index, a torch
    /// pickle (`.bin`, `.pth`, `.pt`, `.ckpt`, `.pth.tar`; a state dict nested under
    /// `state_dict` / `model` / `module` is found automatically), or a directory holding one
    /// of `model.safetensors.index.json`, `diffusion_pytorch_model.safetensors.index.json`,
    /// `model.safetensors`, `diffusion_pytorch_model.safetensors`,
    /// `pytorch_model.bin.index.json`, `pytorch_model.bin`, `diffusion_pytorch_model.bin`,
    /// `model.pth` (first found), or else a single `.safetensors` file.
    pub fn open(path: impl AsRef<Path>) -> WResult<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            for c in DIR_CANDIDATES {
                let p = path.join(c);
                if p.is_file() {
                    return Self::open(p);
                }
            }
            let st: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| open_err(path, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            return match st.as_slice() {
                [one] => Self::open(one),
                [] => Err(open_err(path, "directory holds no known weight file")),
                many => Err(open_err(
                    path,
                    format!(
                        "ambiguous: {} .safetensors files and no index.json",
                        many.len()
                    ),
                )),
            };
        }
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(path);
        }
        let src = open_file(path)?;
        Ok(Self::build(vec![src], path.display().to_string()))
    }

    /// Opens a torch pickle, taking the state dict under `key` (e.g. `Some("state_dict")`)
    /// or the top-level dict (`None`).
    pub fn open_pickle(path: impl AsRef<Path>, key: Option<&str>) -> WResult<Self> {
        let path = path.as_ref();
        let src = open_pickle_source(path, key)?;
        Ok(Self::build(vec![src], path.display().to_string()))
    }

    /// Opens a sharded checkpoint from its `*.index.json` (`{"weight_map": {name: file}}`,
    /// file names relative to the index). Shards may be safetensors or pickles.
    pub fn open_index(index: impl AsRef<Path>) -> WResult<Self> {
        let index = index.as_ref();
        let text = std::fs::read_to_string(index).map_err(|e| open_err(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| open_err(index, e))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| open_err(index, "no `weight_map` object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = vec![];
        let mut claims: Vec<(String, String)> = vec![];
        for (name, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| open_err(index, format!("weight_map[`{name}`] is not a string")))?;
            if !files.iter().any(|f| f == file) {
                files.push(file.to_string());
            }
            claims.push((name.clone(), file.to_string()));
        }
        files.sort();
        let sources = files
            .iter()
            .map(|f| open_file(&dir.join(f)))
            .collect::<WResult<Vec<_>>>()?;
        let mut w = Self::build(
            sources,
            format!("{} ({} files)", index.display(), files.len()),
        );
        let inner = Arc::get_mut(&mut w.inner).expect("fresh Arc is unique");
        for (name, file) in claims {
            if !inner.routing.contains_key(&name) {
                inner.broken_index.insert(name, dir.join(file));
            }
        }
        Ok(w)
    }

    /// Merges several checkpoint paths (each as for [`Weights::open`]); when a name occurs
    /// in several, the later path wins.
    pub fn open_many<P: AsRef<Path>>(paths: &[P]) -> WResult<Self> {
        let mut sources = vec![];
        let mut broken = HashMap::new();
        let mut desc = vec![];
        for p in paths {
            let w = Self::open(p)?;
            desc.push(w.inner.description.clone());
            let inner = Arc::try_unwrap(w.inner)
                .map_err(|_| open_err(p.as_ref(), "weights unexpectedly shared"))?;
            sources.extend(inner.sources);
            broken.extend(inner.broken_index);
        }
        let mut w = Self::build(sources, desc.join(" + "));
        Arc::get_mut(&mut w.inner)
            .expect("fresh Arc is unique")
            .broken_index = broken;
        Ok(w)
    }

    /// Wraps in-memory tensors (e.g. for tests or weights computed at start-up); `label` is
    /// used in error messages in place of a file name.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, label: &str) -> Self {
        let src = Source {
            path: PathBuf::from(label),
            store: Store::Memory(tensors),
        };
        Self::build(vec![src], label.to_string())
    }

    /// A view of the tensors under `prefix` (a trailing `.` is implied), with the prefix
    /// stripped from their names: `w.subset("model.visual_embeddings").keys()`.
    pub fn subset(&self, prefix: &str) -> Self {
        let mut p = self.prefix.clone();
        p.push_str(prefix);
        if !p.is_empty() && !p.ends_with('.') {
            p.push('.');
        }
        Self {
            inner: self.inner.clone(),
            prefix: p,
            probe: self.probe.clone(),
        }
    }

    /// A view for checking a checkpoint against a model configuration without reading any
    /// tensor data: requests are checked exactly as usual (missing names and wrong shapes are
    /// the usual errors, naming the tensor, the file and the expected shape), but answered with
    /// a broadcast zero of the requested shape (no allocation) and recorded. Build the model
    /// from `probe.var_builder(..)`, then [`Weights::probed`] lists what it needs. Views made
    /// from the probe ([`Weights::subset`]) record into the same list.
    pub fn probe(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            prefix: self.prefix.clone(),
            probe: Some(Arc::new(Mutex::new(BTreeSet::new()))),
        }
    }

    /// The full names (view prefix included) requested through this probe view so far, sorted;
    /// empty for a view that is not a probe.
    pub fn probed(&self) -> Vec<String> {
        self.probe
            .as_ref()
            .map(|p| {
                p.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    fn probe_answer(
        &self,
        full: String,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Option<WResult<Tensor>> {
        let probe = self.probe.as_ref()?;
        let path = self
            .inner
            .routing
            .get(&full)
            .map(|i| self.inner.sources[*i].path.clone())
            .unwrap_or_default();
        probe
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(full.clone());
        Some(
            Tensor::zeros((), dtype, device)
                .and_then(|z| z.broadcast_as(shape))
                .map_err(|source| WeightsError::Load {
                    name: full,
                    path,
                    source: Box::new(source),
                }),
        )
    }

    /// The prefix of this view (empty, or ending in `.`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The visible tensor names (prefix stripped), sorted.
    pub fn keys(&self) -> Vec<String> {
        self.inner
            .routing
            .range(self.prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&self.prefix))
            .map(|(k, _)| k[self.prefix.len()..].to_string())
            .collect()
    }

    /// The visible names starting with `prefix` (names returned without the view prefix).
    pub fn keys_with_prefix(&self, prefix: &str) -> Vec<String> {
        self.keys()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect()
    }

    /// The number of visible tensors.
    pub fn len(&self) -> usize {
        self.keys().len()
    }

    /// True when no tensor is visible.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `name` (relative to the view) exists.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.routing.contains_key(&self.full(name))
    }

    /// The file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        let i = self.inner.routing.get(&self.full(name))?;
        Some(self.inner.sources[*i].path.as_path())
    }

    /// Every distinct file of this set.
    pub fn files(&self) -> Vec<&Path> {
        self.inner
            .sources
            .iter()
            .map(|s| s.path.as_path())
            .collect()
    }

    fn missing(&self, full: &str) -> WeightsError {
        if let Some(file) = self.inner.broken_index.get(full) {
            return WeightsError::Missing {
                name: full.to_string(),
                location: file.display().to_string(),
                hint: format!(" (the index {} lists it there)", self.inner.description),
            };
        }
        // Suggest the stored names sharing the longest leading part with the request.
        let common = |k: &str| {
            k.bytes()
                .zip(full.bytes())
                .take_while(|(a, b)| a == b)
                .count()
        };
        let best = self
            .inner
            .routing
            .keys()
            .map(|k| common(k))
            .max()
            .unwrap_or(0);
        let close: Vec<&str> = self
            .inner
            .routing
            .keys()
            .filter(|k| best > 0 && common(k) == best)
            .take(3)
            .map(|k| k.as_str())
            .collect();
        let hint = if close.is_empty() {
            String::new()
        } else {
            format!("; nearest names: {}", close.join(", "))
        };
        WeightsError::Missing {
            name: full.to_string(),
            location: self.inner.description.clone(),
            hint,
        }
    }

    fn source(&self, full: &str) -> WResult<&Source> {
        match self.inner.routing.get(full) {
            Some(i) => Ok(&self.inner.sources[*i]),
            None => Err(self.missing(full)),
        }
    }

    /// The stored shape of `name`, without reading its data.
    pub fn shape(&self, name: &str) -> WResult<Vec<usize>> {
        let full = self.full(name);
        let src = self.source(&full)?;
        src.shape(&full).ok_or_else(|| self.missing(&full))
    }

    /// Loads `name` converted to `dtype` on `device`, whatever its stored shape.
    pub fn get(&self, name: &str, dtype: DType, device: &Device) -> WResult<Tensor> {
        let full = self.full(name);
        let src = self.source(&full)?;
        if self.probe.is_some() {
            let shape = src.shape(&full).ok_or_else(|| self.missing(&full))?;
            if let Some(t) = self.probe_answer(full.clone(), &shape, dtype, device) {
                return t;
            }
        }
        src.load(&full, device)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|source| WeightsError::Load {
                name: full.clone(),
                path: src.path.clone(),
                source: Box::new(source),
            })
    }

    /// Loads `name` after checking that its stored shape is `expected`.
    pub fn get_with_shape(
        &self,
        name: &str,
        expected: &Shape,
        dtype: DType,
        device: &Device,
    ) -> WResult<Tensor> {
        let full = self.full(name);
        let src = self.source(&full)?;
        let got = src.shape(&full).ok_or_else(|| self.missing(&full))?;
        if got != expected.dims() {
            return Err(WeightsError::Shape {
                name: full,
                path: src.path.clone(),
                got,
                expected: expected.dims().to_vec(),
            });
        }
        if let Some(t) = self.probe_answer(full, expected.dims(), dtype, device) {
            return t;
        }
        self.get(name, dtype, device)
    }

    /// Loads every visible tensor (names relative to the view).
    pub fn load_all(&self, dtype: DType, device: &Device) -> WResult<HashMap<String, Tensor>> {
        self.keys()
            .into_iter()
            .map(|k| {
                let t = self.get(&k, dtype, device)?;
                Ok((k, t))
            })
            .collect()
    }

    /// A `VarBuilder` reading frozen tensors from these weights (shape-checked, converted to
    /// `dtype`, placed on `device`).
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// A `VarBuilder` that loads each requested tensor into a trainable `Var` registered in
    /// `varmap` under its (view-relative) name; names already in `varmap` are reused. Use it to
    /// fine-tune from a checkpoint with the same constructors as inference.
    pub fn trainable_var_builder(
        &self,
        varmap: &VarMap,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        let backend = backend::Trainable {
            weights: self.clone(),
            varmap: varmap.clone(),
        };
        VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
    }

    /// Sets every variable of `varmap` from the tensor of the same name; fails on the first
    /// missing or mis-shaped one.
    pub fn load_into_varmap(&self, varmap: &VarMap) -> WResult<()> {
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (name, var) in data.iter() {
            let t = self.get_with_shape(name, var.shape(), var.dtype(), var.device())?;
            var.set(&t).map_err(|source| WeightsError::Load {
                name: self.full(name),
                path: self
                    .file_of(name)
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
                source: Box::new(source),
            })?;
        }
        Ok(())
    }
}
