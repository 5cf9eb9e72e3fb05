//! Shared test helpers: gradient-checking whole modules, closeness asserts, and a writer for
//! tiny zip-format torch checkpoints (the format `torch.save` has used since torch 1.6).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};

pub const GRAD_TOL: f64 = 1e-5;

/// A `VarMap` and an f64 CPU `VarBuilder` on it.
pub fn f64_varmap() -> (VarMap, VarBuilder<'static>) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    (vm, vb)
}

/// A trainable f64 input in `[-1.5, 1.5)`.
pub fn input_var<S: Into<candle_core::Shape>>(shape: S, seed: u64) -> Var {
    let t = seeded_uniform(shape, seed, -1.5, 1.5, DType::F64, &Device::Cpu).unwrap();
    Var::from_tensor(&t).unwrap()
}

/// Overwrites every variable with seeded values in `[0.5, 1.5)` (keeps scales away from 0 and
/// makes parameters that are initialised to constants non-trivial).
pub fn randomize(vm: &VarMap, seed: u64) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for (i, n) in names.iter().enumerate() {
        let v = &data[n];
        let t =
            seeded_uniform(v.shape(), seed + i as u64, 0.5, 1.5, v.dtype(), v.device()).unwrap();
        v.set(&t).unwrap();
    }
}

/// Gradient-checks `forward` w.r.t. every variable of `vm` and the `inputs`, asserting that
/// each gets an autograd gradient matching finite differences.
pub fn check_module(vm: &VarMap, inputs: &[(&str, &Var)], forward: impl Fn() -> Result<Tensor>) {
    check_module_tol(vm, inputs, forward, GRAD_TOL)
}

/// [`check_module`] with an explicit relative tolerance.
pub fn check_module_tol(
    vm: &VarMap,
    inputs: &[(&str, &Var)],
    forward: impl Fn() -> Result<Tensor>,
    tol: f64,
) {
    let params: Vec<(String, Var)> = {
        let data = vm.data().lock().unwrap();
        let mut p: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        p.sort_by(|a, b| a.0.cmp(&b.0));
        p
    };
    let mut vars: Vec<(&str, &Var)> = params.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.extend_from_slice(inputs);
    let report = gradcheck(
        &vars,
        || weighted_sum_loss(&forward()?, 99),
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(report.checked > 0);
    assert!(report.passed(tol), "{report}");
}

/// Max absolute difference between two tensors (compared in f64).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    a.to_dtype(DType::F64)
        .unwrap()
        .sub(&b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64) {
    let d = max_diff(a, b);
    assert!(d <= tol, "max abs difference {d:e} > {tol:e}\n{a}\n{b}");
}

/// One tensor of a torch checkpoint: name, storage class (`FloatStorage`, `HalfStorage`, ...),
/// storage key, storage offset (elements), shape and stride.
pub struct PthEntry<'a> {
    pub name: &'a str,
    pub storage_class: &'a str,
    pub storage_key: &'a str,
    pub offset: usize,
    pub shape: &'a [usize],
    pub stride: &'a [usize],
}

/// A minimal pickle (protocol 2) writer, covering what `torch.save` emits for a state dict.
pub struct Pickle(pub Vec<u8>);

impl Pickle {
    pub fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    pub fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }
    pub fn string(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub fn int(&mut self, v: usize) {
        if v < 256 {
            self.0.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.0.push(b'M');
            self.0.extend_from_slice(&(v as u16).to_le_bytes());
        } else {
            self.0.push(b'J');
            self.0.extend_from_slice(&(v as i32).to_le_bytes());
        }
    }
    pub fn mark(&mut self) {
        self.0.push(b'(');
    }
    pub fn tuple(&mut self) {
        self.0.push(b't');
    }
    pub fn int_tuple(&mut self, vs: &[usize]) {
        self.mark();
        for v in vs {
            self.int(*v);
        }
        self.tuple();
    }
    /// `collections.OrderedDict()` (an empty dict on the stack).
    pub fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.push(b')');
        self.0.push(b'R');
    }
    pub fn set_items(&mut self) {
        self.0.push(b'u');
    }
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
    /// with storage `('storage', torch.<class>, key, 'cpu', numel)` as persistent id.
    pub fn tensor(&mut self, e: &PthEntry, storage_numel: usize) {
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.mark();
        self.mark();
        self.string("storage");
        self.global("torch", e.storage_class);
        self.string(e.storage_key);
        self.string("cpu");
        self.int(storage_numel);
        self.tuple();
        self.0.push(b'Q');
        self.int(e.offset);
        self.int_tuple(e.shape);
        self.int_tuple(e.stride);
        self.0.push(0x89);
        self.ordered_dict();
        self.tuple();
        self.0.push(b'R');
    }
    pub fn stop(&mut self) {
        self.0.push(b'.');
    }
}

/// Writes a zip-format torch checkpoint: `archive/data.pkl`, `archive/data/<key>` storages and
/// `archive/version`. `nest_under` wraps the state dict as `{"epoch": 3, key: state_dict}`
/// (as training scripts save `.pth.tar` files).
pub fn write_torch_zip(
    path: &Path,
    entries: &[PthEntry],
    storages: &[(&str, Vec<u8>, usize)],
    nest_under: Option<&str>,
) {
    let numel = |key: &str| storages.iter().find(|s| s.0 == key).unwrap().2;
    let mut p = Pickle::new();
    if let Some(key) = nest_under {
        p.0.push(b'}');
        p.mark();
        p.string("epoch");
        p.int(3);
        p.string(key);
    }
    p.ordered_dict();
    p.mark();
    for e in entries {
        p.string(e.name);
        p.tensor(e, numel(e.storage_key));
    }
    p.set_items();
    if nest_under.is_some() {
        p.set_items();
    }
    p.stop();

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&p.0).unwrap();
    for (key, bytes, _) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
