//! Training-loop helpers that update parameters in place: [`AdamW`], [`clip_grad_norm`] and
//! an [`Ema`] of the weights.
//!
//! `candle_nn::AdamW` builds about ten new tensors per parameter per step (moments, bias
//! corrections, the update) and then copies the result into the `Var`. On the CPU these types
//! instead run one fused loop per parameter through candle's in-place op API
//! ([`Tensor::inplace_op2`]), writing straight into the `Var`'s storage; the moments are plain
//! `Vec<f32>`. On other devices (CUDA) they fall back to tensor ops plus [`Var::set`], which is
//! also selectable on the CPU ([`Backend::TensorOps`]) so both paths are tested against each other.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, DType, Device, InplaceOp2, Layout, Result, Tensor, Var};
use candle_nn::ParamsAdamW;
use rayon::prelude::*;

/// Parameters with at least this many elements are updated by rayon over chunks; smaller ones
/// in one loop (spawning costs more than the work).
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 14;

/// How an optimiser updates its parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// In place on the CPU (f32 moments in `Vec`s), tensor ops on other devices.
    Auto,
    /// Tensor ops and `Var::set` everywhere (what non-CPU devices use).
    TensorOps,
}

fn check_float(name: &str, t: &Tensor, what: &str) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 => Ok(()),
        dt => bail!(
            "{what}: parameter `{name}` is {dt:?}; only f32 and f64 parameters are supported \
             (keep an f32 master copy of half-precision weights)"
        ),
    }
}

/// The `(start, end)` of a contiguous layout, or an error naming `what`.
fn contiguous_range(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("{what}: the tensor is not contiguous"),
    }
}

// ---------------------------------------------------------------------------------------------
// AdamW
// ---------------------------------------------------------------------------------------------

/// The first / second moments of one parameter.
#[derive(Debug)]
enum Moments {
    /// CPU, in-place path.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Tensor path: f32 tensors on the parameter's device.
    Device { m: Tensor, v: Tensor },
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
    /// Steps taken by this parameter (PyTorch keeps one per parameter: a parameter without a
    /// gradient in some step is skipped and its bias correction does not advance).
    step: u64,
    moments: Moments,
}

/// The scalars of one AdamW step, shared by both paths.
#[derive(Debug, Clone, Copy)]
struct StepScalars {
    beta1: f64,
    beta2: f64,
    /// `1 - lr * weight_decay` (1 when the parameter is not decayed).
    decay_factor: f64,
    /// `lr / (1 - beta1^t)`.
    step_size: f64,
    /// `sqrt(1 - beta2^t)`.
    bc2_sqrt: f64,
    eps: f64,
}

impl StepScalars {
    fn new(p: &ParamsAdamW, step: u64, decay: bool) -> Self {
        let t = step as i32;
        let wd = if decay { p.weight_decay } else { 0.0 };
        Self {
            beta1: p.beta1,
            beta2: p.beta2,
            decay_factor: 1.0 - p.lr * wd,
            step_size: p.lr / (1.0 - p.beta1.powi(t)),
            bc2_sqrt: (1.0 - p.beta2.powi(t)).sqrt(),
            eps: p.eps,
        }
    }
}

/// One fused AdamW update of a contiguous slice (PyTorch's `_single_tensor_adamw`, no amsgrad).
fn adamw_f32(s: &StepScalars, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
    let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
    let (c1, c2) = (1.0 - b1, 1.0 - b2);
    let (df, ss, bc2, eps) = (
        s.decay_factor as f32,
        s.step_size as f32,
        s.bc2_sqrt as f32,
        s.eps as f32,
    );
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mi = b1 * *m + c1 * g;
        let vi = b2 * *v + c2 * g * g;
        *m = mi;
        *v = vi;
        *p = *p * df - ss * mi / (vi.sqrt() / bc2 + eps);
    }
}

/// f64 parameters: the arithmetic runs in f64, the moments are stored in f32.
fn adamw_f64(s: &StepScalars, p: &mut [f64], g: &[f64], m: &mut [f32], v: &mut [f32]) {
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let mi = s.beta1 * *m as f64 + (1.0 - s.beta1) * g;
        let vi = s.beta2 * *v as f64 + (1.0 - s.beta2) * g * g;
        *m = mi as f32;
        *v = vi as f32;
        *p = *p * s.decay_factor - s.step_size * mi / (vi.sqrt() / s.bc2_sqrt + s.eps);
    }
}

/// Runs `f` over matching chunks of the four slices, in parallel for large parameters.
fn chunked<T: Send + Sync>(
    p: &mut [T],
    g: &[T],
    m: &mut [f32],
    v: &mut [f32],
    f: impl Fn(&mut [T], &[T], &mut [f32], &mut [f32]) + Sync,
) {
    if p.len() < PAR_MIN {
        f(p, g, m, v);
        return;
    }
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| f(p, g, m, v));
}

/// The in-place op: borrows the moments of one parameter for the duration of one call
/// (`cpu_fwd` takes `&self`, hence the `RefCell`).
struct AdamWKernel<'a> {
    s: StepScalars,
    mv: RefCell<(&'a mut [f32], &'a mut [f32])>,
}

// candle 0.11 does not export `InplaceOpN`; `InplaceOp2` gets `InplaceOpN<1>` (what
// `Tensor::inplace_op2` takes) from its blanket impl.
impl InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "nn-adamw"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let (ds, de) = contiguous_range(dst_l, "adamw param")?;
        let (gs, ge) = contiguous_range(g_l, "adamw grad")?;
        let mut mv = self.mv.borrow_mut();
        let (m, v) = &mut *mv;
        if de - ds != m.len() || ge - gs != m.len() {
            bail!(
                "adamw: parameter has {} elements, gradient {}, state {}",
                de - ds,
                ge - gs,
                m.len()
            )
        }
        let s = self.s;
        match (dst, g) {
            (CpuStorage::F32(p), CpuStorage::F32(g)) => {
                chunked(&mut p[ds..de], &g[gs..ge], m, v, |p, g, m, v| {
                    adamw_f32(&s, p, g, m, v)
                })
            }
            (CpuStorage::F64(p), CpuStorage::F64(g)) => {
                chunked(&mut p[ds..de], &g[gs..ge], m, v, |p, g, m, v| {
                    adamw_f64(&s, p, g, m, v)
                })
            }
            (p, g) => bail!(
                "adamw: unsupported parameter / gradient dtypes {:?} / {:?}",
                p.dtype(),
                g.dtype()
            ),
        }
        Ok(())
    }
}

/// AdamW with PyTorch `torch.optim.AdamW` semantics (decoupled weight decay
/// `p *= 1 - lr * wd`, bias-corrected moments, `eps` added outside the square root, one step
/// counter per parameter), updating each parameter in place.
///
/// Parameters are named (e.g. from `VarMap::data()`) so that [`AdamW::to_tensors`] /
/// [`AdamW::load_tensors`] can checkpoint and resume the optimiser exactly.
#[derive(Debug)]
pub struct AdamW {
    params: ParamsAdamW,
    entries: Vec<Param>,
}

impl AdamW {
    /// An optimiser over `vars` with hyper-parameters `params` ([`Backend::Auto`]).
    pub fn new(vars: Vec<(String, Var)>, params: ParamsAdamW) -> Result<Self> {
        Self::with_backend(vars, params, Backend::Auto)
    }

    /// As [`AdamW::new`] for every var of a `VarMap` (sorted by name, so the order does not
    /// depend on the hash map).
    pub fn from_varmap(varmap: &candle_nn::VarMap, params: ParamsAdamW) -> Result<Self> {
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Self::new(vars, params)
    }

    /// As [`AdamW::new`], choosing how parameters are updated.
    pub fn with_backend(
        vars: Vec<(String, Var)>,
        params: ParamsAdamW,
        backend: Backend,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            check_float(&name, var.as_tensor(), "AdamW")?;
            if entries.iter().any(|e: &Param| e.name == name) {
                bail!("AdamW: parameter name `{name}` given twice")
            }
            let n = var.elem_count();
            let moments = if backend == Backend::Auto && var.device().is_cpu() {
                Moments::Host {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                }
            } else {
                let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                Moments::Device { m: z.clone(), v: z }
            };
            entries.push(Param {
                name,
                var,
                decay: true,
                step: 0,
                moments,
            });
        }
        Ok(Self { params, entries })
    }

    /// The hyper-parameters.
    pub fn params(&self) -> &ParamsAdamW {
        &self.params
    }

    /// Replaces the hyper-parameters (e.g. for a schedule on betas); the state is kept.
    pub fn set_params(&mut self, params: ParamsAdamW) {
        self.params = params;
    }

    /// The learning rate of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    /// Sets the learning rate of the next step (schedulers call this every step).
    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Turns weight decay off for every parameter whose name matches (the usual "no decay for
    /// biases and norms" group); returns how many matched.
    pub fn exclude_from_weight_decay(&mut self, matches: impl Fn(&str) -> bool) -> usize {
        let mut n = 0;
        for e in self.entries.iter_mut().filter(|e| matches(&e.name)) {
            e.decay = false;
            n += 1;
        }
        n
    }

    /// The parameters, in construction order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|e| (e.name.as_str(), &e.var))
    }

    /// The steps taken by parameter `name` (`None` if unknown).
    pub fn step_count(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|e| e.name == name).map(|e| e.step)
    }

    /// One AdamW step for every parameter that has a gradient in `grads` (others are skipped,
    /// as PyTorch skips parameters whose `.grad` is `None`).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let hp = self.params.clone();
        for e in self.entries.iter_mut() {
            let Some(g) = grads.get(e.var.as_tensor()) else {
                continue;
            };
            if g.dims() != e.var.dims() {
                bail!(
                    "AdamW: gradient of `{}` has shape {:?}, the parameter {:?}",
                    e.name,
                    g.dims(),
                    e.var.dims()
                )
            }
            e.step += 1;
            let s = StepScalars::new(&hp, e.step, e.decay);
            match &mut e.moments {
                Moments::Host { m, v } => {
                    let g = g.to_dtype(e.var.dtype())?.contiguous()?;
                    let kernel = AdamWKernel {
                        s,
                        mv: RefCell::new((m.as_mut_slice(), v.as_mut_slice())),
                    };
                    e.var.as_tensor().inplace_op2(&g, &kernel)?;
                }
                Moments::Device { m, v } => {
                    // As the in-place path: f64 parameters compute in f64, moments stay f32.
                    let cdt = e.var.dtype();
                    let g = g.to_dtype(cdt)?;
                    let m_new = ((m.to_dtype(cdt)? * s.beta1)? + (&g * (1.0 - s.beta1))?)?;
                    let v_new = ((v.to_dtype(cdt)? * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
                    let denom = ((v_new.sqrt()? / s.bc2_sqrt)? + s.eps)?;
                    let p = e.var.as_tensor().detach();
                    let p_new = ((p * s.decay_factor)? - ((&m_new * s.step_size)? / denom)?)?;
                    e.var.set(&p_new)?;
                    *m = m_new.to_dtype(DType::F32)?;
                    *v = v_new.to_dtype(DType::F32)?;
                }
            }
        }
        Ok(())
    }

    /// `loss.backward()` then [`AdamW::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The optimiser state as CPU tensors: `{name}.exp_avg` and `{name}.exp_avg_sq` (f32, the
    /// parameter's shape) and `{name}.step` (f64 scalar), PyTorch's per-parameter state names. Save with `candle_core::safetensors::save`.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(3 * self.entries.len());
        for e in &self.entries {
            let (m, v) = match &e.moments {
                Moments::Host { m, v } => (
                    Tensor::from_slice(m, e.var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, e.var.shape(), &Device::Cpu)?,
                ),
                Moments::Device { m, v } => {
                    (m.to_device(&Device::Cpu)?, v.to_device(&Device::Cpu)?)
                }
            };
            out.insert(format!("{}.exp_avg", e.name), m);
            out.insert(format!("{}.exp_avg_sq", e.name), v);
            out.insert(
                format!("{}.step", e.name),
                Tensor::new(e.step as f64, &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Restores a state saved by [`AdamW::to_tensors`]. Every parameter's three entries must be
    /// present with matching shapes (the error names the first one that is not); extra entries
    /// are ignored. Nothing is changed when it fails.
    pub fn load_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let get = |key: String, shape: &[usize]| -> Result<Tensor> {
            let Some(t) = state.get(&key) else {
                bail!("AdamW state: `{key}` is missing")
            };
            if t.dims() != shape {
                bail!(
                    "AdamW state: `{key}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )
            }
            Ok(t.clone())
        };
        let mut loaded = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let m = get(format!("{}.exp_avg", e.name), e.var.dims())?.to_dtype(DType::F32)?;
            let v = get(format!("{}.exp_avg_sq", e.name), e.var.dims())?.to_dtype(DType::F32)?;
            let step = get(format!("{}.step", e.name), &[])?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            if !(step >= 0.0 && step.fract() == 0.0) {
                bail!("AdamW state: `{}.step` is {step}, not a step count", e.name)
            }
            loaded.push((m, v, step as u64));
        }
        for (e, (m, v, step)) in self.entries.iter_mut().zip(loaded) {
            e.step = step;
            e.moments = match &e.moments {
                Moments::Host { .. } => Moments::Host {
                    m: m.flatten_all()?.to_vec1::<f32>()?,
                    v: v.flatten_all()?.to_vec1::<f32>()?,
                },
                Moments::Device { .. } => Moments::Device {
                    m: m.to_device(e.var.device())?,
                    v: v.to_device(e.var.device())?,
                },
            };
        }
        Ok(())
    }
}

/// Drop-in for code written against candle's trait; parameters are named `param.{i}`.
impl candle_nn::Optimizer for AdamW {
    type Config = ParamsAdamW;

    fn new(vars: Vec<Var>, config: ParamsAdamW) -> Result<Self> {
        let vars = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param.{i}"), v))
            .collect();
        AdamW::new(vars, config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        AdamW::step(self, grads)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping
// ---------------------------------------------------------------------------------------------

/// Sum of squares of a tensor, in f64; on the CPU read straight from the storage.
fn sum_sq(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() {
        let (st, l) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(cpu), Some((s, e))) = (&*st, l.contiguous_offsets()) {
            let ss = match cpu {
                CpuStorage::F32(x) => x[s..e].iter().map(|&x| (x as f64) * (x as f64)).sum(),
                CpuStorage::F64(x) => x[s..e].iter().map(|&x| x * x).sum(),
                _ => return t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>(),
            };
            return Ok(ss);
        }
    }
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Identifies a tensor's storage (candle's `same_storage` is crate-private): the address of
/// the `Storage` behind its lock. The guard is dropped before returning.
fn storage_key(t: &Tensor) -> usize {
    let (st, _) = t.storage_and_layout();
    &*st as *const candle_core::Storage as usize
}

/// Multiplies a contiguous CPU f32 / f64 tensor by a scalar in place.
struct ScaleInPlace(f64);

impl candle_core::InplaceOp1 for ScaleInPlace {
    fn name(&self) -> &'static str {
        "nn-scale-inplace"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let (s, e) = contiguous_range(layout, "scale")?;
        match storage {
            CpuStorage::F32(x) => x[s..e].iter_mut().for_each(|x| *x *= self.0 as f32),
            CpuStorage::F64(x) => x[s..e].iter_mut().for_each(|x| *x *= self.0),
            x => bail!("scale: unsupported dtype {:?}", x.dtype()),
        }
        Ok(())
    }
}

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (L2, `error_if_nonfinite=False`): the
/// global norm of the gradients of `vars` (those that have one), and when
/// `max_norm / (norm + 1e-6) < 1` every gradient is multiplied by that factor. Returns the norm
/// before clipping.
///
/// On the CPU the norm is read and the gradients scaled in place, without temporaries; a
/// gradient that is not a plain contiguous f32/f64 CPU tensor, or whose storage is shared with
/// another gradient of the set (scaling it in place would scale both), is replaced by a scaled
/// copy instead.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f32> {
    // Each gradient once, even if a var is listed twice (tensor clones share the storage).
    let mut ids = Vec::with_capacity(vars.len());
    let mut gs: Vec<Tensor> = Vec::with_capacity(vars.len());
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            if !ids.contains(&v.id()) {
                ids.push(v.id());
                gs.push(g.clone());
            }
        }
    }
    // CPU gradients: each one's sum on its own, in parallel (a serial f64 chain costs about 4
    // cycles an element), then added in order: the same bits as one after the other.
    // Gradients on an accelerator are summed there and read back once: a read per tensor
    // would wait for the device hundreds of times a step.
    let cpu_sums = gs
        .par_iter()
        .map(|g| {
            if g.device().is_cpu() {
                sum_sq(g)
            } else {
                Ok(0.0)
            }
        })
        .collect::<Result<Vec<f64>>>()?;
    let mut total = 0f64;
    let mut on_device: Option<Tensor> = None;
    for (g, cpu_sum) in gs.iter().zip(cpu_sums) {
        if g.device().is_cpu() {
            total += cpu_sum;
            continue;
        }
        // Half-precision squares overflow; f32 and f64 gradients keep their own precision.
        let g = match g.dtype() {
            DType::F16 | DType::BF16 => g.to_dtype(DType::F32)?,
            _ => g.clone(),
        };
        let ss = g.sqr()?.sum_all()?.to_dtype(DType::F64)?;
        on_device = Some(match on_device {
            Some(acc) if acc.device().same_device(ss.device()) => (acc + ss)?,
            Some(acc) => {
                total += acc.to_scalar::<f64>()?;
                ss
            }
            None => ss,
        });
    }
    if let Some(acc) = on_device {
        total += acc.to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    // torch multiplies by clamp(coef, max=1); a factor of exactly 1 changes nothing. NaN norms
    // propagate into the gradients as in torch.
    if coef < 1.0 || coef.is_nan() {
        let keys: Vec<usize> = gs.iter().map(storage_key).collect();
        for (i, &id) in ids.iter().enumerate() {
            let g = &gs[i];
            let shared = keys
                .iter()
                .enumerate()
                .any(|(j, &k)| j != i && k == keys[i]);
            let plain = g.device().is_cpu()
                && matches!(g.dtype(), DType::F32 | DType::F64)
                && g.is_contiguous();
            if plain && !shared {
                g.inplace_op1(&ScaleInPlace(coef))?;
            } else {
                let scaled = (g * coef)?;
                grads.insert_id(id, scaled);
            }
        }
    }
    Ok(norm as f32)
}

// ---------------------------------------------------------------------------------------------
// EMA
// ---------------------------------------------------------------------------------------------

/// `shadow = decay * shadow + (1 - decay) * p`, in place on the shadow.
struct EmaKernel(f64);

impl InplaceOp2 for EmaKernel {
    fn name(&self) -> &'static str {
        "nn-ema"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        p: &CpuStorage,
        p_l: &Layout,
    ) -> Result<()> {
        let (ds, de) = contiguous_range(dst_l, "ema shadow")?;
        let (ps, pe) = contiguous_range(p_l, "ema param")?;
        if de - ds != pe - ps {
            bail!(
                "ema: shadow has {} elements, parameter {}",
                de - ds,
                pe - ps
            )
        }
        let d = self.0;
        match (dst, p) {
            (CpuStorage::F32(s), CpuStorage::F32(p)) => {
                let (d, c) = (d as f32, (1.0 - d) as f32);
                s[ds..de]
                    .iter_mut()
                    .zip(&p[ps..pe])
                    .for_each(|(s, &p)| *s = d * *s + c * p);
            }
            (CpuStorage::F64(s), CpuStorage::F64(p)) => s[ds..de]
                .iter_mut()
                .zip(&p[ps..pe])
                .for_each(|(s, &p)| *s = d * *s + (1.0 - d) * p),
            (s, p) => bail!("ema: unsupported dtypes {:?} / {:?}", s.dtype(), p.dtype()),
        }
        Ok(())
    }
}

/// Exponential moving average of the weights, for sampling with the averaged model
/// (diffusers' `EMAModel` with `update_after_step = 0`, `min_decay = 0`).
///
/// The shadow weights are tensors of the parameters' dtype on their device; on the CPU
/// [`Ema::update`] writes them in place.
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    warmup: bool,
    /// Updates done so far (diffusers' `optimization_step`).
    step: u64,
    entries: Vec<(String, Var, Tensor)>,
    backend: Backend,
}

impl Ema {
    /// Shadows initialised to copies of `vars`, with a fixed `decay`.
    pub fn new(vars: Vec<(String, Var)>, decay: f64) -> Result<Self> {
        Self::with_backend(vars, decay, Backend::Auto)
    }

    /// As [`Ema::new`], choosing how shadows are updated.
    pub fn with_backend(vars: Vec<(String, Var)>, decay: f64, backend: Backend) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            bail!("Ema: decay {decay} is not in [0, 1]")
        }
        let mut entries = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            check_float(&name, var.as_tensor(), "Ema")?;
            // `copy` gives the shadow its own storage.
            let shadow = var.as_tensor().detach().copy()?;
            entries.push((name, var, shadow));
        }
        Ok(Self {
            decay,
            warmup: false,
            step: 0,
            entries,
            backend,
        })
    }

    /// Uses diffusers' default decay schedule: the first update copies the weights, the `n`-th
    /// (n >= 1 earlier updates) uses `min(decay, (1 + n) / (10 + n))`.
    pub fn with_warmup(mut self) -> Self {
        self.warmup = true;
        self
    }

    /// The decay the next [`Ema::update`] will use.
    pub fn next_decay(&self) -> f64 {
        if !self.warmup {
            return self.decay;
        }
        // diffusers: step = optimization_step - 1 after incrementing, 0 -> decay 0.
        let n = self.step as f64;
        if self.step == 0 {
            0.0
        } else {
            self.decay.min((1.0 + n) / (10.0 + n))
        }
    }

    /// Updates done so far.
    pub fn num_updates(&self) -> u64 {
        self.step
    }

    /// `shadow = d * shadow + (1 - d) * p` for every parameter, with `d = next_decay()`.
    pub fn update(&mut self) -> Result<()> {
        let d = self.next_decay();
        for (_, var, shadow) in self.entries.iter_mut() {
            if self.backend == Backend::Auto && shadow.device().is_cpu() && shadow.is_contiguous() {
                shadow.inplace_op2(var.as_tensor(), &EmaKernel(d))?;
            } else {
                let p = var.as_tensor().detach();
                *shadow = ((&*shadow * d)? + (p * (1.0 - d))?)?;
            }
        }
        self.step += 1;
        Ok(())
    }

    /// The shadow of parameter `name`.
    pub fn shadow(&self, name: &str) -> Option<&Tensor> {
        self.entries
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, _, s)| s)
    }

    /// Writes the averaged weights into the model's vars (in place).
    pub fn copy_to(&self) -> Result<()> {
        for (_, var, shadow) in &self.entries {
            var.set(shadow)?;
        }
        Ok(())
    }

    /// Exchanges the model weights and the shadows: call once to sample with the averaged
    /// model, again to go back to training.
    pub fn swap(&mut self) -> Result<()> {
        for (_, var, shadow) in self.entries.iter_mut() {
            let current = var.as_tensor().detach().copy()?;
            var.set(shadow)?;
            *shadow = current;
        }
        Ok(())
    }

    /// The shadows by parameter name plus `__ema_step__` (f64 scalar), on the CPU.
    pub fn to_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(self.entries.len() + 1);
        for (name, _, shadow) in &self.entries {
            out.insert(name.clone(), shadow.to_device(&Device::Cpu)?);
        }
        out.insert(
            "__ema_step__".into(),
            Tensor::new(self.step as f64, &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores shadows and the update count saved by [`Ema::to_tensors`]; fails (changing
    /// nothing) if one is missing or has the wrong shape.
    pub fn load_tensors(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.entries.len());
        for (name, var, _) in &self.entries {
            let Some(t) = state.get(name) else {
                bail!("EMA state: `{name}` is missing")
            };
            if t.dims() != var.dims() {
                bail!(
                    "EMA state: `{name}` has shape {:?}, the parameter {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            // `copy` so the shadow never aliases the caller's tensor (updates are in place).
            loaded.push(t.to_dtype(var.dtype())?.to_device(var.device())?.copy()?);
        }
        let Some(step) = state.get("__ema_step__") else {
            bail!("EMA state: `__ema_step__` is missing")
        };
        let step = step.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        for (e, s) in self.entries.iter_mut().zip(loaded) {
            e.2 = s;
        }
        self.step = step as u64;
        Ok(())
    }
}
