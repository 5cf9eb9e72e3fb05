//! Gradient checks: autograd against central finite differences, and "every parameter gets a
//! non-zero gradient" (the check that catches candle's silently gradient-free fused ops).
//!
//! Typical use (f64 on CPU for precision):
//! ```
//! use candle_core::{DType, Device, Var};
//! use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&seeded_uniform((2, 3), 1, -1.0, 1.0, DType::F64, &dev).unwrap()).unwrap();
//! let report = gradcheck(&[("x", &x)], || weighted_sum_loss(&nn::softmax_last_dim(x.as_tensor())?, 7),
//!     &GradCheckOptions::default()).unwrap();
//! assert!(report.max_rel_error < 1e-6, "{report}");
//! ```

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::VarMap;

/// Settings for [`gradcheck`].
#[derive(Debug, Clone)]
pub struct GradCheckOptions {
    /// Finite-difference step (central differences).
    pub eps: f64,
    /// At most this many elements per variable are perturbed (evenly strided).
    pub max_elements_per_var: usize,
    /// Floor of the denominator of the relative error, so near-zero gradients compare
    /// absolutely: `|a - n| / max(|a|, |n|, floor)`.
    pub denom_floor: f64,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            max_elements_per_var: 64,
            denom_floor: 1e-3,
        }
    }
}

/// The worst mismatch found by [`gradcheck`].
#[derive(Debug, Clone, PartialEq)]
pub struct GradMismatch {
    /// Name of the variable.
    pub var: String,
    /// Flat element index inside the variable.
    pub index: usize,
    /// Autograd gradient.
    pub analytic: f64,
    /// Finite-difference gradient.
    pub numeric: f64,
}

/// What [`gradcheck`] found.
#[derive(Debug, Clone)]
pub struct GradCheckReport {
    /// Largest `|a - n| / max(|a|, |n|, floor)` over all checked elements.
    pub max_rel_error: f64,
    /// Largest `|a - n|`.
    pub max_abs_error: f64,
    /// Number of elements compared.
    pub checked: usize,
    /// Variables autograd gave no gradient at all (a silent-backward op in the graph, or the
    /// variable is unused), though finite differences may say it matters.
    pub missing: Vec<String>,
    /// Where the largest relative error occurred.
    pub worst: Option<GradMismatch>,
}

impl GradCheckReport {
    /// True when every variable had a gradient and `max_rel_error <= tol`.
    pub fn passed(&self, tol: f64) -> bool {
        self.missing.is_empty() && self.max_rel_error <= tol
    }
}

impl std::fmt::Display for GradCheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gradcheck: max rel error {:.3e}, max abs error {:.3e} over {} elements",
            self.max_rel_error, self.max_abs_error, self.checked
        )?;
        if let Some(w) = &self.worst {
            write!(
                f,
                "; worst `{}`[{}]: autograd {:.6e} vs finite diff {:.6e}",
                w.var, w.index, w.analytic, w.numeric
            )?;
        }
        if !self.missing.is_empty() {
            write!(f, "; NO autograd gradient for {:?}", self.missing)?;
        }
        Ok(())
    }
}

/// Compares autograd gradients of the scalar `loss()` with central finite differences.
///
/// `vars` are the named variables the closure reads (use f64 for precision). The closure is
/// evaluated `1 + 2 * checked` times; each variable's values are restored afterwards. A
/// variable with no autograd gradient is compared as if its gradient were zero and is also
/// listed in [`GradCheckReport::missing`]. Non-scalar losses are an error: reduce them with
/// [`weighted_sum_loss`] (a plain sum hides errors, e.g. `sum(softmax(x))` is constant).
pub fn gradcheck<F>(
    vars: &[(&str, &Var)],
    loss: F,
    opts: &GradCheckOptions,
) -> Result<GradCheckReport>
where
    F: Fn() -> Result<Tensor>,
{
    let eval = || -> Result<f64> {
        let l = loss()?;
        if l.elem_count() != 1 {
            candle_core::bail!("gradcheck: loss must be a scalar, got shape {:?}", l.dims())
        }
        l.flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()
            .map(|v| v[0])
    };
    let l = loss()?;
    let grads = l.backward()?;
    let mut report = GradCheckReport {
        max_rel_error: 0.0,
        max_abs_error: 0.0,
        checked: 0,
        missing: vec![],
        worst: None,
    };
    for (name, var) in vars {
        let n = var.elem_count();
        let analytic: Vec<f64> = match grads.get(var.as_tensor()) {
            Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
            None => {
                report.missing.push(name.to_string());
                vec![0.0; n]
            }
        };
        let original = var.as_tensor().copy()?;
        let flat: Vec<f64> = original.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
        let stride = n.div_ceil(opts.max_elements_per_var.max(1)).max(1);
        for idx in (0..n).step_by(stride) {
            let mut perturbed = flat.clone();
            perturbed[idx] = flat[idx] + opts.eps;
            var.set(&from_f64(
                &perturbed,
                var.shape(),
                var.dtype(),
                var.device(),
            )?)?;
            let plus = eval()?;
            perturbed[idx] = flat[idx] - opts.eps;
            var.set(&from_f64(
                &perturbed,
                var.shape(),
                var.dtype(),
                var.device(),
            )?)?;
            let minus = eval()?;
            var.set(&original)?;
            let numeric = (plus - minus) / (2.0 * opts.eps);
            let a = analytic[idx];
            let abs = (a - numeric).abs();
            let rel = abs / a.abs().max(numeric.abs()).max(opts.denom_floor);
            report.checked += 1;
            report.max_abs_error = report.max_abs_error.max(abs);
            if rel > report.max_rel_error || report.worst.is_none() || rel.is_nan() {
                report.max_rel_error = if rel.is_nan() { f64::INFINITY } else { rel };
                report.worst = Some(GradMismatch {
                    var: name.to_string(),
                    index: idx,
                    analytic: a,
                    numeric,
                });
            }
        }
    }
    Ok(report)
}

fn from_f64(data: &[f64], shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::from_slice(data, shape, device)?.to_dtype(dtype)
}

/// Reduces any tensor to a scalar loss `sum(out * R)` with a fixed pseudo-random `R` in
/// `[-1, 1]` (seeded), so that every output element influences the gradient differently.
pub fn weighted_sum_loss(out: &Tensor, seed: u64) -> Result<Tensor> {
    let r = seeded_uniform(out.shape(), seed, -1.0, 1.0, out.dtype(), out.device())?;
    out.mul(&r)?.sum_all()
}

/// A deterministic uniform tensor in `[lo, hi)` from a splitmix64 stream (same values on every
/// platform and run), for test inputs and parameters.
pub fn seeded_uniform<S: Into<Shape>>(
    shape: S,
    seed: u64,
    lo: f64,
    hi: f64,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let shape = shape.into();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let data: Vec<f64> = (0..shape.elem_count())
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            lo + (hi - lo) * u
        })
        .collect();
    Tensor::from_vec(data, shape, device)?.to_dtype(dtype)
}

/// Names of the `vars` whose gradient in `grads` is absent or identically zero.
pub fn vars_without_gradient(grads: &GradStore, vars: &[(String, Var)]) -> Result<Vec<String>> {
    let mut out = vec![];
    for (name, var) in vars {
        let ok = match grads.get(var.as_tensor()) {
            None => false,
            Some(g) => {
                g.abs()?
                    .to_dtype(DType::F64)?
                    .sum_all()?
                    .to_scalar::<f64>()?
                    > 0.0
            }
        };
        if !ok {
            out.push(name.clone());
        }
    }
    out.sort();
    Ok(out)
}

/// Backpropagates `loss` and fails, naming them, if any variable of `varmap` gets no (or an
/// all-zero) gradient. Returns the gradients otherwise.
pub fn check_all_vars_get_gradient(loss: &Tensor, varmap: &VarMap) -> Result<GradStore> {
    let grads = loss.backward()?;
    let vars: Vec<(String, Var)> = {
        let data = varmap
            .data()
            .lock()
            .map_err(|e| candle_core::Error::msg(e.to_string()))?;
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let missing = vars_without_gradient(&grads, &vars)?;
    if !missing.is_empty() {
        candle_core::bail!(
            "{} of {} parameters get no gradient: {}",
            missing.len(),
            vars.len(),
            missing.join(", ")
        )
    }
    Ok(grads)
}

/// A snapshot of every variable of a `VarMap` (name -> detached copy), to compare before and
/// after an optimiser step.
pub fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|e| candle_core::Error::msg(e.to_string()))?;
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?.detach())))
        .collect()
}
