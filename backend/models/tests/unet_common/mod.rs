//! Shared helpers of the UNet / VAE / FuseModule / L_reg tests: fixture paths, reading
//! `io.safetensors`, the parity tolerance, and seeded parameter randomisation.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

/// `backend/models/tests/fixtures/<name>`.
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// All tensors of `fixtures/<name>/io.safetensors`.
pub fn io(name: &str) -> HashMap<String, Tensor> {
    let path = fixture(name).join("io.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Asserts `max |got - want| <= 1e-4 * max(1, max |want|)` (f32 parity rule).
pub fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let got = got.to_dtype(DType::F32).unwrap();
    let want = want.to_dtype(DType::F32).unwrap();
    let err = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let tol = 1e-4 * scale.max(1.0);
    assert!(
        err <= tol,
        "{what}: max abs error {err:e} > {tol:e} (max |ref| {scale})"
    );
}

/// Sets every variable of `varmap` to seeded values: norm weights near 1, everything else
/// uniform in `[-amp, amp]` (scaled down for wide layers), so that tests see all parameters.
pub fn randomize(varmap: &VarMap, seed: u64, amp: f64) {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let var = &data[name];
        let s = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let fan = var.dims().iter().skip(1).product::<usize>().max(1) as f64;
        let t = if name.contains("norm") && name.ends_with("weight") {
            nn::gradcheck::seeded_uniform(var.shape(), s, 0.7, 1.3, var.dtype(), var.device())
        } else {
            let a = amp / fan.sqrt().max(1.0) * 2.0;
            nn::gradcheck::seeded_uniform(var.shape(), s, -a, a, var.dtype(), var.device())
        }
        .unwrap();
        var.set(&t).unwrap();
    }
}
