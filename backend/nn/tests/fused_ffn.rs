//! The fused feed-forward kernels: Linear (`nn::fused::linear_fused`, used by `nn::Linear` on
//! the CPU) and GEGLU (`nn::fused::geglu`): finite-difference gradients in f64 on odd shapes,
//! agreement with the composed path in f32 for the output and every gradient, frozen
//! arguments, thread-count independence, f16.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nn::fused::{geglu_composed, geglu_fused, linear_fused};
use nn::gradcheck::seeded_uniform;
use nn::Linear;

fn var(shape: &[usize], seed: u64, dtype: DType) -> Var {
    Var::from_tensor(&seeded_uniform(shape, seed, -1.0, 1.0, dtype, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn linear_fd_gradients_odd_shapes() {
    // (input shape, out): batch 1, any rank, a single output, sizes not multiples of 8.
    let cases: [(&[usize], usize); 5] = [
        (&[1, 5], 3),
        (&[2, 3, 7], 9),
        (&[4, 1, 1, 13], 1),
        (&[3, 11], 50),
        (&[1, 1], 1),
    ];
    for (i, (shape, out)) in cases.into_iter().enumerate() {
        for bias in [true, false] {
            let (vm, vb) = f64_varmap();
            let layer = Linear::new(vb.pp("l"), *shape.last().unwrap(), out, bias).unwrap();
            randomize(&vm, 3 + i as u64);
            let x = input_var(shape, 9 + i as u64);
            // The fused op itself, and Linear::forward (which uses it on the CPU).
            check_module(&vm, &[("x", &x)], || {
                linear_fused(x.as_tensor(), layer.weight(), layer.bias())
            });
            check_module(&vm, &[("x", &x)], || layer.forward(x.as_tensor()));
        }
    }
}

/// `(y, dx, dW, db)` of `f(x, w, b)` for a fixed weighted-sum loss.
fn run(
    x: &Var,
    w: &Var,
    b: &Var,
    f: impl Fn(&Tensor, &Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> Vec<Tensor> {
    let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
    let g = nn::weighted_sum_loss(&y, 5).unwrap().backward().unwrap();
    let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
    vec![y.clone(), get(x), get(w), get(b)]
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    max_diff(a, b) / scale.max(1e-6)
}

#[test]
fn linear_fused_matches_composed_f32() {
    // Rows not a multiple of 8, outputs below / above one 48-wide panel, inputs deeper than
    // one 256-deep block, many rows (several row blocks on every thread); below 16 rows the
    // matrix-vector path: one row (decoding), 15 rows, inputs off the 16 / 64 lanes, and
    // enough outputs to be split over threads.
    let cases: [(&[usize], usize); 9] = [
        (&[3, 5], 7),
        (&[2, 33, 64], 256),
        (&[7, 300], 50),
        (&[1, 600], 97),
        (&[32, 77, 128], 64),
        (&[5, 13, 520], 1),
        (&[1, 1, 520], 3000),
        (&[15, 72], 33),
        (&[2, 4, 129], 700),
    ];
    for (i, (shape, out)) in cases.into_iter().enumerate() {
        let inp = *shape.last().unwrap();
        let x = var(shape, 20 + i as u64, DType::F32);
        let w = var(&[out, inp], 30 + i as u64, DType::F32);
        let b = var(&[out], 40 + i as u64, DType::F32);
        let fused = run(&x, &w, &b, |x, w, b| linear_fused(x, w, Some(b)));
        let composed = run(&x, &w, &b, |x, w, b| {
            Linear::from_tensors(w.clone(), Some(b.clone())).forward_composed(x)
        });
        for (j, name) in ["y", "dx", "dW", "db"].iter().enumerate() {
            let r = rel(&fused[j], &composed[j]);
            assert!(r < 1e-5, "{shape:?} -> {out}: {name} differs by {r:e}");
        }
        // Without a bias too.
        let y = linear_fused(x.as_tensor(), w.as_tensor(), None).unwrap();
        let want = Linear::from_tensors(w.as_tensor().clone(), None)
            .forward_composed(x.as_tensor())
            .unwrap();
        assert!(rel(&y, &want) < 1e-5);
    }
}

#[test]
fn frozen_arguments_get_no_gradient_and_the_rest_stay_right() {
    let x = seeded_uniform((4, 6), 1, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let w = var(&[5, 6], 2, DType::F32);
    let b = seeded_uniform(5, 3, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let y = linear_fused(&x, w.as_tensor(), Some(&b)).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none() && g.get(&b).is_none());
    let want = x
        .matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dw = g.get(w.as_tensor()).unwrap();
    assert!(rel(dw, want.get(w.as_tensor()).unwrap()) < 1e-5);
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // Many rows (the packed product) and a few (the matrix-vector path).
    for (shape, out) in [(&[3usize, 70, 96][..], 130usize), (&[1, 5, 96], 2000)] {
        let x = var(shape, 4, DType::F32);
        let w = var(&[out, 96], 5, DType::F32);
        let b = var(&[out], 6, DType::F32);
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| run(&x, &w, &b, |x, w, b| linear_fused(x, w, Some(b))))
        };
        let one = on(1);
        for threads in [2, 3] {
            for (a, r) in on(threads).iter().zip(&one) {
                assert_close(a, r, 0.0);
            }
        }
    }
}

#[test]
fn half_precision_is_computed_in_f32_and_cast_back() {
    let x = seeded_uniform((3, 6, 8), 7, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let w = seeded_uniform((6, 8), 8, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let b = seeded_uniform(6, 9, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let want = Linear::from_tensors(w.clone(), Some(b.clone()))
        .forward_composed(&x)
        .unwrap();
    for dt in [DType::F16, DType::BF16] {
        let layer = Linear::from_tensors(w.to_dtype(dt).unwrap(), Some(b.to_dtype(dt).unwrap()));
        let xv = Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
        let y = layer.forward(xv.as_tensor()).unwrap();
        assert_eq!(y.dtype(), dt);
        assert!(rel(&y, &want) < 2e-2, "{dt:?}");
        let g = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(g.get(xv.as_tensor()).unwrap().dtype(), dt);
    }
}

#[test]
fn geglu_fd_gradients_odd_shapes() {
    // One row, one unit, rank 1 to 3, widths not multiples of 8; the gate spans [-3, 3] so
    // both GELU tails are exercised.
    let shapes: [&[usize]; 5] = [&[2], &[1, 2], &[3, 10], &[2, 5, 14], &[1, 1, 6]];
    for (i, shape) in shapes.into_iter().enumerate() {
        let p = Var::from_tensor(
            &seeded_uniform(shape, 60 + i as u64, -3.0, 3.0, DType::F64, &Device::Cpu).unwrap(),
        )
        .unwrap();
        let report = nn::gradcheck(
            &[("p", &p)],
            || nn::weighted_sum_loss(&geglu_fused(p.as_tensor())?, 8),
            &Default::default(),
        )
        .unwrap();
        assert!(
            report.checked > 0 && report.passed(GRAD_TOL),
            "{shape:?}: {report}"
        );
    }
    assert!(geglu_fused(&Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap()).is_err());
}

#[test]
fn geglu_fused_matches_composed_f32() {
    for (i, shape) in [&[4usize, 6][..], &[2, 33, 512], &[32, 64, 1024]]
        .into_iter()
        .enumerate()
    {
        let p = var(shape, 70 + i as u64, DType::F32);
        let grad = |f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>| {
            let y = f(p.as_tensor()).unwrap();
            let g = nn::weighted_sum_loss(&y, 3).unwrap().backward().unwrap();
            (y, g.get(p.as_tensor()).unwrap().clone())
        };
        let (ya, ga) = grad(&geglu_fused);
        let (yb, gb) = grad(&geglu_composed);
        assert!(rel(&ya, &yb) < 1e-5, "{shape:?}: output");
        // candle's GELU backward uses 6-digit constants (docs/NN.md): 2e-5 relative.
        assert!(
            rel(&ga, &gb) < 1e-4,
            "{shape:?}: gradient {:e}",
            rel(&ga, &gb)
        );
    }
    // Half precision is computed in f32 and cast back.
    let p = var(&[3, 8], 80, DType::F32);
    let want = geglu_composed(p.as_tensor()).unwrap();
    let y = nn::fused::geglu(&p.as_tensor().to_dtype(DType::F16).unwrap()).unwrap();
    assert_eq!(y.dtype(), DType::F16);
    assert!(rel(&y, &want) < 2e-2);
}
