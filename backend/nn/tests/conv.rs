//! The fast CPU conv2d (`nn::conv`): finite-difference gradients through `nn::Conv2d` (f64),
//! agreement with candle's own conv2d forward and backward (f32), the fast-path selection and
//! the candle fallback (groups > 1).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
use nn::*;

fn cfg(padding: usize, stride: usize) -> Conv2dConfig {
    Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    }
}

/// Gradient-checks `Conv2d` (dx, dw, db) on an f64 input of `x_shape`, checking up to 400
/// elements of each variable.
fn gradcheck_conv(x_shape: (usize, usize, usize, usize), cout: usize, k: usize, c: Conv2dConfig) {
    let (vm, vb) = f64_varmap();
    let conv = Conv2d::new(vb.pp("conv"), x_shape.1, cout, k, c, true).unwrap();
    randomize(&vm, 5);
    // Perturbations of randomize's [0.5, 1.5) so weights have both signs.
    for v in vm.all_vars() {
        let t = (v.as_tensor() - 1.0).unwrap();
        v.set(&t).unwrap();
    }
    let x = input_var(x_shape, 7);
    assert!(nn::conv::uses_fast_path(x.as_tensor(), &c));
    let params = {
        let data = vm.data().lock().unwrap();
        let mut p: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        p.sort_by(|a, b| a.0.cmp(&b.0));
        p
    };
    assert_eq!(params.len(), 2);
    let mut vars: Vec<(&str, &Var)> = params.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("x", &x));
    let opts = GradCheckOptions {
        max_elements_per_var: 400,
        ..Default::default()
    };
    let report = gradcheck(
        &vars,
        || weighted_sum_loss(&conv.forward(x.as_tensor())?, 99),
        &opts,
    )
    .unwrap();
    assert!(report.missing.is_empty(), "{report}");
    assert!(report.passed(GRAD_TOL), "{x_shape:?} k{k} {c:?}: {report}");
}

#[test]
fn gradcheck_3x3_pad1_stride1() {
    gradcheck_conv((1, 4, 6, 6), 3, 3, cfg(1, 1));
    gradcheck_conv((3, 4, 6, 6), 3, 3, cfg(1, 1));
}

#[test]
fn gradcheck_3x3_pad1_stride2() {
    gradcheck_conv((1, 4, 6, 6), 3, 3, cfg(1, 2));
    gradcheck_conv((3, 4, 7, 5), 3, 3, cfg(1, 2));
    // H and W of different parity (candle's own backward fails on this one).
    gradcheck_conv((3, 4, 7, 6), 3, 3, cfg(1, 2));
}

#[test]
fn gradcheck_1x1() {
    // The pointwise special case, and 1x1 kernels that go through im2col.
    gradcheck_conv((1, 4, 5, 5), 3, 1, cfg(0, 1));
    gradcheck_conv((3, 4, 5, 5), 3, 1, cfg(0, 1));
    gradcheck_conv((3, 4, 5, 5), 3, 1, cfg(0, 2));
    gradcheck_conv((1, 4, 5, 5), 3, 1, cfg(1, 1));
}

#[test]
fn gradcheck_grouped_samples() {
    // A small column limit puts 2-3 whole samples side by side in one gemm, with a shorter
    // last group (n = 5), and runs the units in parallel.
    for (limit, k, c) in [(40, 3, cfg(1, 1)), (40, 3, cfg(1, 2)), (20, 1, cfg(0, 1))] {
        nn::conv::set_max_cols_elems(limit);
        gradcheck_conv((5, 4, 3, 4), 3, k, c);
        gradcheck_conv((1, 4, 3, 4), 3, k, c);
        nn::conv::reset_max_cols_elems();
    }
}

#[test]
fn gradcheck_odd_sizes() {
    for n in [1, 3] {
        gradcheck_conv((n, 3, 7, 5), 5, 3, cfg(1, 1));
        gradcheck_conv((n, 3, 7, 5), 5, 3, cfg(0, 2));
        gradcheck_conv((n, 3, 7, 5), 5, 3, cfg(2, 3));
        gradcheck_conv((n, 3, 7, 5), 5, 5, cfg(2, 1));
        gradcheck_conv((n, 3, 7, 5), 5, 2, cfg(0, 1));
        // Maps smaller than the kernel (the row-shift copies start and end off the plane).
        gradcheck_conv((n, 3, 1, 1), 2, 3, cfg(1, 1));
        gradcheck_conv((n, 3, 2, 1), 2, 3, cfg(1, 1));
        gradcheck_conv((n, 2, 2, 3), 2, 5, cfg(2, 1));
    }
}

/// Output and gradients `(y, dx, dw)` of `conv` on a contiguous `x` for the loss
/// `sum(y * r)`, `r` fixed.
fn run_f32(
    x: &Tensor,
    w: &Var,
    conv: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> (Tensor, Tensor, Tensor) {
    let xv = Var::from_tensor(x).unwrap();
    let y = conv(xv.as_tensor(), w.as_tensor()).unwrap();
    let r = seeded_uniform(y.shape(), 3, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = grads.get(xv.as_tensor()).unwrap().clone();
    let dw = grads.get(w.as_tensor()).unwrap().clone();
    (y, dx, dw)
}

/// Max relative difference `max|a - b| / max|b|`.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
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
    max_diff(a, b) / scale.max(1e-30)
}

fn agree_with_candle(x: &Tensor, w_shape: (usize, usize, usize, usize), pad: usize, stride: usize) {
    let w = seeded_uniform(w_shape, 11, -0.5, 0.5, DType::F32, &Device::Cpu).unwrap();
    let w = Var::from_tensor(&w).unwrap();
    let c = cfg(pad, stride);
    assert!(nn::conv::uses_fast_path(x, &c));
    let ours = run_f32(x, &w, |x, w| nn::conv::conv2d(x, w, pad, stride));
    let theirs = run_f32(x, &w, |x, w| x.conv2d(w, pad, stride, 1, 1));
    let what = format!("x {:?} w {w_shape:?} pad {pad} stride {stride}", x.dims());
    assert_eq!(ours.0.dims(), theirs.0.dims(), "{what}");
    for (name, a, b) in [
        ("y", &ours.0, &theirs.0),
        ("dx", &ours.1, &theirs.1),
        ("dw", &ours.2, &theirs.2),
    ] {
        let d = rel_diff(a, b);
        assert!(d < 1e-4, "{what}: {name} relative difference {d:e}");
    }
}

#[test]
fn f32_agrees_with_candle_conv2d_and_its_backward() {
    let x = |shape: (usize, usize, usize, usize), seed| {
        seeded_uniform(shape, seed, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap()
    };
    agree_with_candle(&x((4, 64, 8, 8), 1), (64, 64, 3, 3), 1, 1);
    agree_with_candle(&x((4, 16, 9, 9), 2), (8, 16, 3, 3), 1, 2);
    agree_with_candle(&x((2, 16, 8, 10), 3), (8, 16, 3, 3), 1, 2);
    agree_with_candle(&x((1, 8, 12, 12), 4), (16, 8, 3, 3), 1, 1); // serial samples
    agree_with_candle(&x((3, 32, 6, 6), 5), (24, 32, 1, 1), 0, 1); // pointwise
    agree_with_candle(&x((3, 8, 6, 7), 6), (4, 8, 5, 5), 2, 1);
    agree_with_candle(&x((2, 8, 6, 7), 7), (4, 8, 3, 2), 0, 1); // rectangular kernel
}

#[test]
fn f32_agrees_on_non_contiguous_inputs() {
    // (N, H, C, W) transposed to (N, C, H, W), then narrowed on W: strided, offset view.
    let base = seeded_uniform((2, 8, 6, 11), 8, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let x = base.transpose(1, 2).unwrap().narrow(3, 2, 8).unwrap();
    assert!(!x.is_contiguous());
    let w = Var::from_tensor(
        &seeded_uniform((5, 6, 3, 3), 9, -0.5, 0.5, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    for (pad, stride) in [(1, 1), (1, 2)] {
        // Gradients reach a Var through the strided view.
        let xv = Var::from_tensor(&base).unwrap();
        let view = xv
            .as_tensor()
            .transpose(1, 2)
            .unwrap()
            .narrow(3, 2, 8)
            .unwrap();
        let mut out = vec![];
        for fast in [true, false] {
            let y = if fast {
                nn::conv::conv2d(&view, w.as_tensor(), pad, stride).unwrap()
            } else {
                view.conv2d(w.as_tensor(), pad, stride, 1, 1).unwrap()
            };
            let r = seeded_uniform(y.shape(), 3, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
            let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
            out.push((
                y,
                grads.get(xv.as_tensor()).unwrap().clone(),
                grads.get(w.as_tensor()).unwrap().clone(),
            ));
        }
        assert!(rel_diff(&out[0].0, &out[1].0) < 1e-4);
        assert!(rel_diff(&out[0].1, &out[1].1) < 1e-4);
        assert!(rel_diff(&out[0].2, &out[1].2) < 1e-4);
        // The non-contiguous view and its contiguous copy give the same result.
        let y2 = nn::conv::conv2d(&x.contiguous().unwrap(), w.as_tensor(), pad, stride).unwrap();
        assert_close(&out[0].0, &y2, 0.0);
    }
}

#[test]
fn banded_im2col_matches_whole_image() {
    // A tiny band limit forces one output row per band (and the batch / serial paths).
    let x = seeded_uniform((3, 4, 7, 9), 12, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let w = Var::from_tensor(
        &seeded_uniform((5, 4, 3, 3), 13, -0.5, 0.5, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    for (pad, stride) in [(1, 1), (1, 2), (0, 1)] {
        for n in [1, 3] {
            let x = x.narrow(0, 0, n).unwrap();
            nn::conv::set_max_cols_elems(1);
            let banded = run_f32(&x, &w, |x, w| nn::conv::conv2d(x, w, pad, stride));
            nn::conv::reset_max_cols_elems();
            let theirs = run_f32(&x, &w, |x, w| x.conv2d(w, pad, stride, 1, 1));
            assert!(rel_diff(&banded.0, &theirs.0) < 1e-5);
            assert!(rel_diff(&banded.1, &theirs.1) < 1e-5);
            assert!(rel_diff(&banded.2, &theirs.2) < 1e-5);
        }
    }
}

#[test]
fn frozen_input_or_kernel_gets_no_gradient() {
    let x = seeded_uniform((2, 3, 5, 5), 14, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let w = seeded_uniform((4, 3, 3, 3), 15, -0.5, 0.5, DType::F32, &Device::Cpu).unwrap();
    let wv = Var::from_tensor(&w).unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let reference = |x: &Tensor, w: &Tensor| {
        let y = x.conv2d(w, 1, 1, 1, 1).unwrap();
        y.sqr().unwrap().sum_all().unwrap().backward().unwrap()
    };
    // Frozen input (an image): only the kernel gradient.
    let y = nn::conv::conv2d(&x, wv.as_tensor(), 1, 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none());
    let want = reference(&x, wv.as_tensor());
    assert!(
        rel_diff(
            g.get(wv.as_tensor()).unwrap(),
            want.get(wv.as_tensor()).unwrap()
        ) < 1e-5
    );
    // Frozen kernel (a frozen layer): only the input gradient.
    let y = nn::conv::conv2d(xv.as_tensor(), &w, 1, 1).unwrap();
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none());
    let want = reference(xv.as_tensor(), &w);
    assert!(
        rel_diff(
            g.get(xv.as_tensor()).unwrap(),
            want.get(xv.as_tensor()).unwrap()
        ) < 1e-5
    );
}

#[test]
fn fast_path_selection() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev).unwrap();
    assert!(nn::conv::uses_fast_path(&x, &cfg(1, 1)));
    assert!(nn::conv::uses_fast_path(&x, &cfg(0, 2)));
    for dt in [DType::F64, DType::F16, DType::BF16] {
        assert!(nn::conv::uses_fast_path(
            &x.to_dtype(dt).unwrap(),
            &cfg(1, 1)
        ));
    }
    let grouped = Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let dilated = Conv2dConfig {
        dilation: 2,
        ..Default::default()
    };
    assert!(!nn::conv::uses_fast_path(&x, &grouped));
    assert!(!nn::conv::uses_fast_path(&x, &dilated));
    assert!(!nn::conv::uses_fast_path(
        &x.to_dtype(DType::U32).unwrap(),
        &cfg(1, 1)
    ));

    // Conv2d really runs the custom op: its output is bitwise the op's (candle's conv2d sums
    // in another order), and its backward works where candle's fails (see
    // `candle_conv2d_backward_fails_when_h_and_w_need_different_output_padding`).
    let w =
        Var::from_tensor(&seeded_uniform((4, 4, 3, 3), 1, -0.5, 0.5, DType::F32, &dev).unwrap())
            .unwrap();
    let xs =
        Var::from_tensor(&seeded_uniform((2, 4, 7, 6), 2, -1.0, 1.0, DType::F32, &dev).unwrap())
            .unwrap();
    let layer = Conv2d::from_tensors(w.as_tensor().clone(), None, cfg(1, 2));
    let y = layer.forward(xs.as_tensor()).unwrap();
    assert_close(
        &y,
        &nn::conv::conv2d(xs.as_tensor(), w.as_tensor(), 1, 2).unwrap(),
        0.0,
    );
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(xs.as_tensor()).is_some() && g.get(w.as_tensor()).is_some());
}

/// candle 0.11's Conv2D backward derives the transposed convolution's output padding from the
/// height only, so with stride 2 an input whose height and width need different output padding
/// (here H = 7, W = 6) fails with a shape mismatch. The fast op has no such limit (checked by
/// `gradcheck_3x3_pad1_stride2`). If this starts failing, candle fixed it.
#[test]
fn candle_conv2d_backward_fails_when_h_and_w_need_different_output_padding() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::ones((1, 2, 7, 6), DType::F32, &dev).unwrap()).unwrap();
    let w = Tensor::ones((2, 2, 3, 3), DType::F32, &dev).unwrap();
    let y = x.as_tensor().conv2d(&w, 1, 2, 1, 1).unwrap();
    let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("shape mismatch"), "{err}");
}

#[test]
fn grouped_conv_falls_back_with_right_values_and_gradients() {
    let dev = Device::Cpu;
    let groups = Conv2dConfig {
        padding: 1,
        groups: 2,
        ..Default::default()
    };
    let x = seeded_uniform((2, 4, 5, 5), 16, -1.0, 1.0, DType::F32, &dev).unwrap();
    let w = seeded_uniform((6, 2, 3, 3), 17, -0.5, 0.5, DType::F32, &dev).unwrap();
    let b = seeded_uniform(6, 18, -0.5, 0.5, DType::F32, &dev).unwrap();
    let y = Conv2d::from_tensors(w.clone(), Some(b.clone()), groups)
        .forward(&x)
        .unwrap();
    // Reference: each group as its own (fast, groups = 1) convolution.
    let mut parts = vec![];
    for gi in 0..2 {
        let xg = x.narrow(1, 2 * gi, 2).unwrap();
        let wg = w.narrow(0, 3 * gi, 3).unwrap();
        parts.push(nn::conv::conv2d(&xg, &wg, 1, 1).unwrap());
    }
    let expect = Tensor::cat(&parts, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
        .unwrap();
    assert!(rel_diff(&y, &expect) < 1e-5);

    // Gradients by finite differences (f64).
    let (vm, vb) = f64_varmap();
    let conv = Conv2d::new(vb.pp("conv"), 4, 6, 3, groups, true).unwrap();
    let x = input_var((2, 4, 5, 5), 19);
    assert!(!nn::conv::uses_fast_path(x.as_tensor(), &groups));
    check_module(&vm, &[("x", &x)], || conv.forward(x.as_tensor()));
}

#[test]
fn half_precision_on_cpu_computes_in_f32() {
    let dev = Device::Cpu;
    let x = seeded_uniform((2, 4, 6, 6), 20, -1.0, 1.0, DType::F32, &dev).unwrap();
    let w = seeded_uniform((3, 4, 3, 3), 21, -0.5, 0.5, DType::F32, &dev).unwrap();
    let b = seeded_uniform(3, 22, -0.5, 0.5, DType::F32, &dev).unwrap();
    let c = cfg(1, 2);
    let want = x
        .conv2d(&w, 1, 2, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((1, 3, 1, 1)).unwrap())
        .unwrap();
    for dt in [DType::F16, DType::BF16] {
        let layer = Conv2d::from_tensors(w.to_dtype(dt).unwrap(), Some(b.to_dtype(dt).unwrap()), c);
        let xv = Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
        let y = layer.forward(xv.as_tensor()).unwrap();
        assert_eq!(y.dtype(), dt);
        assert!(rel_diff(&y, &want) < 2e-2, "{dt:?}");
        // Gradients flow back through the casts to the half-precision input.
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx = g.get(xv.as_tensor()).unwrap();
        assert_eq!(dx.dtype(), dt);
        assert!(max_diff(dx, &dx.zeros_like().unwrap()) > 0.0);
    }
}

/// `(y, dx, dw, db)` of `conv2d_bias` for the loss `sum(y * r)`, `r` fixed.
fn run_bias_f32(x: &Tensor, w: &Tensor, b: &Tensor, c: Conv2dConfig, fused: bool) -> Vec<Tensor> {
    let (xv, wv, bv) = (
        Var::from_tensor(x).unwrap(),
        Var::from_tensor(w).unwrap(),
        Var::from_tensor(b).unwrap(),
    );
    let y = if fused {
        nn::conv::conv2d_bias(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()), &c).unwrap()
    } else {
        let y = xv
            .as_tensor()
            .conv2d(wv.as_tensor(), c.padding, c.stride, 1, 1)
            .unwrap();
        y.broadcast_add(&bv.as_tensor().reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    };
    let r = seeded_uniform(y.shape(), 3, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let grads = y.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
    vec![y.clone(), g(&xv), g(&wv), g(&bv)]
}

#[test]
fn f32_bias_and_sample_groups_agree_with_candle() {
    let dev = Device::Cpu;
    // (x, out channels, kernel, padding, stride, column limit): whole batch in one group,
    // groups of several samples with a remainder, bands of rows, pointwise.
    let cases = [
        ((6, 16, 8, 8), 12, 3, 1, 1, None),
        ((7, 16, 8, 8), 12, 3, 1, 1, Some(300)),
        ((7, 16, 8, 8), 12, 3, 1, 2, Some(300)),
        ((3, 8, 11, 9), 5, 3, 1, 1, Some(64)),
        ((1, 8, 11, 9), 5, 3, 1, 2, Some(64)),
        ((5, 16, 4, 4), 8, 1, 0, 1, Some(40)),
        ((1, 16, 4, 4), 8, 1, 0, 1, None),
    ];
    for (i, (xs, o, k, pad, stride, limit)) in cases.into_iter().enumerate() {
        let x = seeded_uniform(xs, 30 + i as u64, -1.0, 1.0, DType::F32, &dev).unwrap();
        let w = seeded_uniform((o, xs.1, k, k), 40, -0.5, 0.5, DType::F32, &dev).unwrap();
        let b = seeded_uniform(o, 41, -0.5, 0.5, DType::F32, &dev).unwrap();
        let c = cfg(pad, stride);
        if let Some(l) = limit {
            nn::conv::set_max_cols_elems(l);
        }
        let ours = run_bias_f32(&x, &w, &b, c, true);
        nn::conv::reset_max_cols_elems();
        let theirs = run_bias_f32(&x, &w, &b, c, false);
        for (j, name) in ["y", "dx", "dw", "db"].iter().enumerate() {
            let d = rel_diff(&ours[j], &theirs[j]);
            assert!(
                d < 1e-5,
                "case {i} {xs:?}: {name} relative difference {d:e}"
            );
        }
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    // The same bits with 1, 2 and 3 threads, in the grouped, banded and pointwise paths: a
    // resumed training run on another thread count stays reproducible, and the serial (few
    // units) and parallel paths sum in the same order.
    let dev = Device::Cpu;
    let cases = [
        ((32, 16, 8, 8), 16, 3, 1, 1, None),
        ((5, 8, 6, 6), 8, 3, 1, 2, Some(40)),
        ((2, 8, 12, 10), 8, 3, 1, 1, Some(64)),
        ((9, 16, 4, 4), 8, 1, 0, 1, Some(40)),
    ];
    for (xs, o, k, pad, stride, limit) in cases {
        let x = seeded_uniform(xs, 50, -1.0, 1.0, DType::F32, &dev).unwrap();
        let w = seeded_uniform((o, xs.1, k, k), 51, -0.5, 0.5, DType::F32, &dev).unwrap();
        let b = seeded_uniform(o, 52, -0.5, 0.5, DType::F32, &dev).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                if let Some(l) = limit {
                    nn::conv::set_max_cols_elems(l);
                }
                let out = run_bias_f32(&x, &w, &b, cfg(pad, stride), true);
                nn::conv::reset_max_cols_elems();
                out
            })
        };
        let one = run(1);
        for threads in [2, 3] {
            for (a, r) in run(threads).iter().zip(&one) {
                assert_close(a, r, 0.0);
            }
        }
    }
}
