//! `nn::optim`: AdamW against a plain-f64 transcription of PyTorch's algorithm and against
//! candle_nn::AdamW, in-place updates, checkpoint round trips, gradient clipping and EMA.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use nn::optim::{clip_grad_norm, AdamW, Backend, Ema};

/// Deterministic values in [-scale, scale) (xorshift).
fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Shapes covering a scalar-ish bias, a matrix and one parameter large enough for the
/// parallel (rayon) path.
const SHAPES: [&[usize]; 4] = [&[7], &[13, 5], &[3, 4, 6], &[200, 250]];

fn make_vars(dtype: DType, seed: u64) -> Vec<(String, Var)> {
    SHAPES
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let t = Tensor::from_vec(rand_vec(seed + i as u64, n, 1.0), *s, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (format!("layer{i}.weight"), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

/// Gradients of step `step`; var 1 gets tiny gradients so that `eps` placement matters.
fn grads_for(vars: &[(String, Var)], step: u64) -> GradStore {
    let mut g = GradStore::default();
    for (i, (_, v)) in vars.iter().enumerate() {
        let scale = if i == 1 { 1e-3 } else { 1.0 };
        let vals = rand_vec(1000 * step + i as u64 + 17, v.elem_count(), scale);
        let t = Tensor::from_vec(vals, v.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        g.insert(v.as_tensor(), t);
    }
    g
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// PyTorch `torch.optim.AdamW` (amsgrad=False, maximize=False), as published in its docs:
/// theta *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// theta -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps).
struct Reference {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl Reference {
    fn new(p: Vec<f64>) -> Self {
        let n = p.len();
        Self {
            p,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    #[allow(clippy::needless_range_loop)] // mirrors the published per-element algorithm
    fn step(&mut self, g: &[f64], lr: f64, b1: f64, b2: f64, eps: f64, wd: f64) {
        self.t += 1;
        let bc1 = 1.0 - b1.powi(self.t);
        let bc2 = 1.0 - b2.powi(self.t);
        for i in 0..self.p.len() {
            self.p[i] *= 1.0 - lr * wd;
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let m_hat = self.m[i] / bc1;
            let v_hat = self.v[i] / bc2;
            self.p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
}

fn assert_close(a: &[f64], b: &[f64], rel: f64, floor: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut worst = (0.0, 0);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let err = (x - y).abs() / y.abs().max(floor);
        if err > worst.0 || err.is_nan() {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= rel,
        "{what}: relative error {:e} at {} ({} vs {})",
        worst.0,
        worst.1,
        a[worst.1],
        b[worst.1]
    );
}

const LRS: [f64; 6] = [1e-2, 2e-2, 5e-3, 1e-2, 3e-2, 1e-3];

fn run_against_reference(dtype: DType, backend: Backend, floor: f64) {
    let (b1, b2, eps, wd) = (0.8, 0.95, 1e-3, 0.1);
    let vars = make_vars(dtype, 1);
    let mut refs: Vec<Reference> = vars
        .iter()
        .map(|(_, v)| Reference::new(values(v.as_tensor())))
        .collect();
    let hp = ParamsAdamW {
        lr: 0.0,
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    };
    let mut opt = AdamW::with_backend(vars.clone(), hp, backend).unwrap();
    // Var 0 plays the role of a bias without weight decay.
    assert_eq!(opt.exclude_from_weight_decay(|n| n == "layer0.weight"), 1);
    for (step, &lr) in LRS.iter().enumerate() {
        let grads = grads_for(&vars, step as u64);
        opt.set_learning_rate(lr);
        opt.step(&grads).unwrap();
        for (i, (_, v)) in vars.iter().enumerate() {
            let g = values(grads.get(v.as_tensor()).unwrap());
            refs[i].step(&g, lr, b1, b2, eps, if i == 0 { 0.0 } else { wd });
        }
    }
    for (i, (name, v)) in vars.iter().enumerate() {
        assert_close(
            &values(v.as_tensor()),
            &refs[i].p,
            1e-6,
            floor,
            &format!("{dtype:?} {backend:?} {name}"),
        );
        assert_eq!(opt.step_count(name), Some(LRS.len() as u64));
    }
}

#[test]
fn adamw_matches_pytorch_algorithm_f64_params() {
    // f64 params: the only rounding is the f32 moment storage (~1e-9 absolute here; an
    // algorithmic slip such as eps inside the sqrt or coupled weight decay is >= 1e-4).
    run_against_reference(DType::F64, Backend::Auto, 0.1);
}

#[test]
fn adamw_matches_pytorch_algorithm_f32_params() {
    // f32 arithmetic: relative to max(|p|, 1) (p is O(1)).
    run_against_reference(DType::F32, Backend::Auto, 1.0);
}

#[test]
fn tensor_ops_fallback_matches_pytorch_algorithm() {
    run_against_reference(DType::F32, Backend::TensorOps, 1.0);
    run_against_reference(DType::F64, Backend::TensorOps, 0.1);
}

#[test]
fn adamw_agrees_with_candle_nn_adamw() {
    let hp = ParamsAdamW {
        lr: 3e-3,
        weight_decay: 0.05,
        ..Default::default()
    };
    let ours = make_vars(DType::F32, 5);
    let theirs = make_vars(DType::F32, 5);
    let mut a = AdamW::new(ours.clone(), hp.clone()).unwrap();
    let mut b = candle_nn::AdamW::new(theirs.iter().map(|(_, v)| v.clone()).collect(), hp).unwrap();
    for step in 0..5 {
        a.step(&grads_for(&ours, step)).unwrap();
        b.step(&grads_for(&theirs, step)).unwrap();
    }
    for ((n, x), (_, y)) in ours.iter().zip(&theirs) {
        assert_close(&values(x), &values(y), 1e-6, 1.0, n);
        // And the parameters actually moved.
        assert_ne!(values(x), values(&make_vars(DType::F32, 5)[0].1));
    }
}

/// The address of a CPU f32 tensor's buffer.
fn buffer_ptr(t: &Tensor) -> usize {
    let (st, _) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => v.as_ptr() as usize,
        _ => panic!("expected a CPU f32 tensor"),
    }
}

#[test]
fn adamw_updates_the_var_storage_in_place() {
    for backend in [Backend::Auto, Backend::TensorOps] {
        let vars = make_vars(DType::F32, 9);
        let before: Vec<usize> = vars.iter().map(|(_, v)| buffer_ptr(v)).collect();
        // A tensor handle taken before the step (as a model's Linear holds its weight).
        let handles: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let old: Vec<Vec<f64>> = handles.iter().map(values).collect();
        let mut opt = AdamW::with_backend(vars.clone(), ParamsAdamW::default(), backend).unwrap();
        opt.step(&grads_for(&vars, 0)).unwrap();
        for (i, (n, v)) in vars.iter().enumerate() {
            assert_eq!(buffer_ptr(v), before[i], "{backend:?} {n}: reallocated");
            assert_ne!(
                values(&handles[i]),
                old[i],
                "{backend:?} {n}: handle not updated"
            );
            assert_eq!(values(&handles[i]), values(v));
        }
    }
}

#[test]
fn parameters_without_gradient_are_skipped() {
    let vars = make_vars(DType::F32, 3);
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW::default()).unwrap();
    let mut grads = grads_for(&vars, 0);
    grads.remove(vars[2].1.as_tensor());
    let before = values(&vars[2].1);
    opt.step(&grads).unwrap();
    assert_eq!(values(&vars[2].1), before);
    assert_eq!(opt.step_count("layer2.weight"), Some(0));
    assert_eq!(opt.step_count("layer1.weight"), Some(1));
}

#[test]
fn half_precision_params_are_rejected() {
    let v = Var::zeros(4, DType::F16, &Device::Cpu).unwrap();
    let err = AdamW::new(vec![("w".into(), v.clone())], ParamsAdamW::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("`w`") && err.contains("F16"), "{err}");
    assert!(Ema::new(vec![("w".into(), v)], 0.9).is_err());
}

fn copy_vars(vars: &[(String, Var)]) -> Vec<(String, Var)> {
    vars.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

#[test]
fn adamw_checkpoint_resumes_exactly() {
    for backend in [Backend::Auto, Backend::TensorOps] {
        let hp = ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        };
        let vars = make_vars(DType::F32, 11);
        let mut a = AdamW::with_backend(vars.clone(), hp.clone(), backend).unwrap();
        for s in 0..3 {
            a.step(&grads_for(&vars, s)).unwrap();
        }
        // Through a safetensors file, as a training checkpoint would.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optim.safetensors");
        candle_core::safetensors::save(&a.to_tensors().unwrap(), &path).unwrap();
        let state: HashMap<String, Tensor> =
            candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert!(state.contains_key("layer3.weight.exp_avg_sq"));

        let resumed_vars = copy_vars(&vars);
        let mut b = AdamW::with_backend(resumed_vars.clone(), hp.clone(), backend).unwrap();
        b.load_tensors(&state).unwrap();
        // A fresh optimiser (no state) must diverge, so the comparison below is meaningful.
        let fresh_vars = copy_vars(&vars);
        let mut c = AdamW::with_backend(fresh_vars.clone(), hp.clone(), backend).unwrap();
        for s in 3..6 {
            a.step(&grads_for(&vars, s)).unwrap();
            b.step(&grads_for(&resumed_vars, s)).unwrap();
            c.step(&grads_for(&fresh_vars, s)).unwrap();
        }
        for i in 0..vars.len() {
            assert_eq!(
                values(&vars[i].1),
                values(&resumed_vars[i].1),
                "{backend:?}"
            );
            assert_ne!(values(&vars[i].1), values(&fresh_vars[i].1), "{backend:?}");
        }
    }
}

#[test]
fn adamw_load_rejects_missing_or_misshaped_state() {
    let vars = make_vars(DType::F32, 2);
    let mut opt = AdamW::new(vars.clone(), ParamsAdamW::default()).unwrap();
    let mut state = opt.to_tensors().unwrap();
    state.remove("layer1.weight.exp_avg");
    let err = opt.load_tensors(&state).unwrap_err().to_string();
    assert!(err.contains("layer1.weight.exp_avg"), "{err}");
    let mut state = opt.to_tensors().unwrap();
    state.insert(
        "layer0.weight.exp_avg_sq".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(opt.load_tensors(&state).is_err());
}

#[test]
fn state_moves_between_backends() {
    // A checkpoint written by the in-place path resumes on the tensor-ops path (CPU -> CUDA).
    let hp = ParamsAdamW::default();
    let vars = make_vars(DType::F32, 4);
    let mut a = AdamW::new(vars.clone(), hp.clone()).unwrap();
    a.step(&grads_for(&vars, 0)).unwrap();
    let other = copy_vars(&vars);
    let mut b = AdamW::with_backend(other.clone(), hp, Backend::TensorOps).unwrap();
    b.load_tensors(&a.to_tensors().unwrap()).unwrap();
    a.step(&grads_for(&vars, 1)).unwrap();
    b.step(&grads_for(&other, 1)).unwrap();
    for (x, y) in vars.iter().zip(&other) {
        assert_close(&values(&x.1), &values(&y.1), 1e-6, 1.0, &x.0);
    }
}

#[test]
fn works_through_the_candle_optimizer_trait_and_backward() {
    let w = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
    let mut opt = <AdamW as Optimizer>::new(vec![w.clone()], ParamsAdamW::default()).unwrap();
    // loss = sum(w^2): AdamW's first step moves each entry by ~lr towards 0.
    let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
    opt.backward_step(&loss).unwrap();
    let got = values(&w);
    for (g, x) in got.iter().zip([1.0f64, -2.0, 3.0]) {
        let expect = x * (1.0 - 1e-3 * 0.01) - 1e-3 * x.signum();
        assert!((g - expect).abs() < 1e-6, "{got:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// clip_grad_norm
// ---------------------------------------------------------------------------------------------

#[test]
fn clip_grad_norm_matches_torch_definition() {
    for dtype in [DType::F32, DType::F64] {
        let vars = make_vars(dtype, 21);
        let mut grads = grads_for(&vars, 3);
        // A var outside the list keeps its gradient untouched.
        let outsider = &vars[3].1;
        let listed: Vec<Var> = vars[..3].iter().map(|(_, v)| v.clone()).collect();
        let orig: Vec<Vec<f64>> = vars
            .iter()
            .map(|(_, v)| values(grads.get(v.as_tensor()).unwrap()))
            .collect();
        let norm: f64 = orig[..3]
            .iter()
            .flatten()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        // Above the norm: nothing changes.
        let got = clip_grad_norm(&mut grads, &listed, norm * 2.0).unwrap();
        assert!((got as f64 - norm).abs() < 1e-5 * norm);
        for (i, (_, v)) in vars.iter().enumerate() {
            assert_eq!(values(grads.get(v.as_tensor()).unwrap()), orig[i]);
        }
        // Below: every listed gradient scaled by max / (norm + 1e-6).
        let max = norm / 4.0;
        let got = clip_grad_norm(&mut grads, &listed, max).unwrap();
        assert!((got as f64 - norm).abs() < 1e-5 * norm);
        let coef = max / (norm + 1e-6);
        for (i, (n, v)) in vars[..3].iter().enumerate() {
            let want: Vec<f64> = orig[i].iter().map(|x| x * coef).collect();
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
            assert_close(
                &values(grads.get(v.as_tensor()).unwrap()),
                &want,
                tol,
                1e-3,
                n,
            );
        }
        assert_eq!(values(grads.get(outsider.as_tensor()).unwrap()), orig[3]);
        let after = clip_grad_norm(&mut grads, &listed, f64::INFINITY).unwrap() as f64;
        assert!((after - max).abs() < 1e-5 * max, "{after} vs {max}");
    }
}

#[test]
fn clip_grad_norm_scales_a_shared_gradient_once() {
    let a = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let b = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let g = Tensor::new(&[3.0f32, 0.0, 4.0], &Device::Cpu).unwrap();
    let mut grads = GradStore::default();
    grads.insert(a.as_tensor(), g.clone());
    grads.insert(b.as_tensor(), g.clone());
    let norm = clip_grad_norm(&mut grads, &[a.clone(), b.clone()], 1.0).unwrap();
    assert!((norm - 50f32.sqrt()).abs() < 1e-5);
    let coef = 1.0 / (50f64.sqrt() + 1e-6);
    for v in [&a, &b] {
        let got = values(grads.get(v.as_tensor()).unwrap());
        assert_close(&got, &[3.0 * coef, 0.0, 4.0 * coef], 1e-6, 1e-3, "shared");
    }
}

// ---------------------------------------------------------------------------------------------
// EMA
// ---------------------------------------------------------------------------------------------

fn perturb(vars: &[(String, Var)], step: u64) {
    for (i, (_, v)) in vars.iter().enumerate() {
        let d = rand_vec(500 + step * 10 + i as u64, v.elem_count(), 0.5);
        let d = Tensor::from_vec(d, v.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        v.set(&(v.as_tensor() + d).unwrap()).unwrap();
    }
}

fn ema_reference(backend: Backend, warmup: bool) {
    let decay = 0.9;
    let vars = make_vars(DType::F64, 31);
    let mut ema = Ema::with_backend(vars.clone(), decay, backend).unwrap();
    if warmup {
        ema = ema.with_warmup();
    }
    let mut shadow: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
    for step in 0..30u64 {
        perturb(&vars, step);
        let d = if !warmup {
            decay
        } else if step == 0 {
            0.0
        } else {
            f64::min(decay, (1.0 + step as f64) / (10.0 + step as f64))
        };
        assert!((ema.next_decay() - d).abs() < 1e-15);
        ema.update().unwrap();
        for (i, (_, v)) in vars.iter().enumerate() {
            let p = values(v);
            for (s, p) in shadow[i].iter_mut().zip(p) {
                *s = d * *s + (1.0 - d) * p;
            }
        }
    }
    for (i, (n, _)) in vars.iter().enumerate() {
        assert_close(&values(ema.shadow(n).unwrap()), &shadow[i], 1e-12, 1e-3, n);
    }
    assert_eq!(ema.num_updates(), 30);
}

#[test]
fn ema_matches_definition() {
    for backend in [Backend::Auto, Backend::TensorOps] {
        ema_reference(backend, false);
        ema_reference(backend, true);
    }
}

#[test]
fn ema_copy_swap_and_checkpoint() {
    let vars = make_vars(DType::F32, 41);
    let mut ema = Ema::new(vars.clone(), 0.5).unwrap();
    perturb(&vars, 0);
    ema.update().unwrap();
    let trained: Vec<Vec<f64>> = vars.iter().map(|(_, v)| values(v)).collect();
    let shadows: Vec<Vec<f64>> = vars
        .iter()
        .map(|(n, _)| values(ema.shadow(n).unwrap()))
        .collect();
    assert_ne!(trained[0], shadows[0]);

    ema.swap().unwrap();
    for (i, (n, v)) in vars.iter().enumerate() {
        assert_eq!(values(v), shadows[i]);
        assert_eq!(values(ema.shadow(n).unwrap()), trained[i]);
    }
    ema.swap().unwrap();
    for (i, (_, v)) in vars.iter().enumerate() {
        assert_eq!(values(v), trained[i]);
    }

    // Round trip, then both continue identically (`other` shadows equal copies of the weights,
    // perturbed the same way).
    let state = ema.to_tensors().unwrap();
    let other_vars = copy_vars(&vars);
    let mut other = Ema::new(other_vars.clone(), 0.5).unwrap();
    other.load_tensors(&state).unwrap();
    assert_eq!(other.num_updates(), 1);
    perturb(&vars, 1);
    perturb(&other_vars, 1);
    ema.update().unwrap();
    other.update().unwrap();
    for (n, _) in &vars {
        assert_eq!(
            values(ema.shadow(n).unwrap()),
            values(other.shadow(n).unwrap())
        );
    }
    // Without the loaded state the shadows would differ (the test can fail).
    let mut fresh = Ema::new(copy_vars(&vars), 0.5).unwrap();
    fresh.update().unwrap();
    assert_ne!(
        values(ema.shadow("layer0.weight").unwrap()),
        values(fresh.shadow("layer0.weight").unwrap())
    );

    ema.copy_to().unwrap();
    for (n, v) in &vars {
        assert_eq!(values(v), values(ema.shadow(n).unwrap()));
    }
    let mut bad = state.clone();
    bad.remove("__ema_step__");
    assert!(other.load_tensors(&bad).is_err());
}
