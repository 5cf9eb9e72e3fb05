//! Finite-difference gradient checks for every layer (input and parameter gradients, f64),
//! and the tests that document candle 0.11's gradient-free fused ops (`candle_trap_*`).

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
use nn::*;

#[test]
fn linear_with_and_without_bias() {
    for bias in [true, false] {
        let (vm, vb) = f64_varmap();
        let lin = Linear::new(vb.pp("proj"), 4, 3, bias).unwrap();
        let x = input_var((2, 5, 4), 1);
        check_module(&vm, &[("x", &x)], || lin.forward(x.as_tensor()));
        let n = vm.all_vars().len();
        assert_eq!(n, if bias { 2 } else { 1 });
    }
}

#[test]
fn layer_norm_affine_and_plain() {
    let (vm, vb) = f64_varmap();
    let ln = LayerNorm::new(vb.pp("ln"), 6, 1e-5).unwrap();
    randomize(&vm, 3);
    let x = input_var((2, 3, 6), 2);
    check_module(&vm, &[("x", &x)], || ln.forward(x.as_tensor()));

    let (vm, vb) = f64_varmap();
    let plain = LayerNorm::new_with(vb, 6, 1e-5, false, false).unwrap();
    assert!(vm.all_vars().is_empty());
    check_module(&vm, &[("x", &x)], || plain.forward(x.as_tensor()));
}

#[test]
fn group_norm_nchw_and_ncl() {
    let (vm, vb) = f64_varmap();
    let gn = GroupNorm::new(vb.pp("norm"), 2, 4, 1e-6, true).unwrap();
    randomize(&vm, 5);
    let x = input_var((2, 4, 3, 3), 4);
    check_module(&vm, &[("x", &x)], || gn.forward(x.as_tensor()));

    let (vm, vb) = f64_varmap();
    let gn = GroupNorm::new(vb, 3, 6, 1e-6, true).unwrap();
    randomize(&vm, 6);
    let x = input_var((2, 6, 5), 7);
    check_module(&vm, &[("x", &x)], || gn.forward(x.as_tensor()));
}

#[test]
fn rms_norm_gradients() {
    let (vm, vb) = f64_varmap();
    let n = RmsNorm::new(vb.pp("norm"), 8, 1e-6).unwrap();
    randomize(&vm, 8);
    let x = input_var((3, 8), 9);
    check_module(&vm, &[("x", &x)], || n.forward(x.as_tensor()));
}

#[test]
fn softmax_and_log_softmax_gradients() {
    let (vm, _) = f64_varmap();
    let x = input_var((3, 5), 10);
    check_module(&vm, &[("x", &x)], || softmax_last_dim(x.as_tensor()));
    check_module(&vm, &[("x", &x)], || log_softmax_last_dim(x.as_tensor()));
}

#[test]
fn activation_gradients() {
    let (vm, _) = f64_varmap();
    let x = input_var((4, 6), 11);
    // candle's fused GELU backward formulas use 6-significant-digit constants (0.398942,
    // 0.797885, ...), so their gradients are only accurate to ~2e-5 relative.
    for act in [Activation::Gelu, Activation::GeluTanh] {
        check_module_tol(&vm, &[("x", &x)], || act.forward(x.as_tensor()), 1e-4);
    }
    for act in [
        Activation::QuickGelu,
        Activation::Silu,
        Activation::Relu,
        Activation::Identity,
    ] {
        check_module(&vm, &[("x", &x)], || act.forward(x.as_tensor()));
    }
    check_module(&vm, &[("x", &x)], || sigmoid(x.as_tensor()));
}

#[test]
fn embedding_gradient_accumulates_repeated_ids() {
    let (vm, vb) = f64_varmap();
    let emb = Embedding::new(vb.pp("tok"), 5, 3).unwrap();
    let ids = Tensor::new(&[[0u32, 3, 3], [4, 0, 1]], &Device::Cpu).unwrap();
    check_module(&vm, &[], || emb.forward(&ids));
    assert_eq!(emb.forward(&ids).unwrap().dims(), &[2, 3, 3]);
}

#[test]
fn conv2d_padding_stride_groups() {
    let cases = [
        (
            Conv2dConfig {
                padding: 1,
                ..Default::default()
            },
            true,
        ),
        (
            Conv2dConfig {
                padding: 1,
                stride: 2,
                ..Default::default()
            },
            true,
        ),
        (
            Conv2dConfig {
                groups: 2,
                ..Default::default()
            },
            false,
        ),
    ];
    for (i, (cfg, bias)) in cases.into_iter().enumerate() {
        let (vm, vb) = f64_varmap();
        let conv = Conv2d::new(vb.pp("conv"), 4, 2, 3, cfg, bias).unwrap();
        let x = input_var((1, 4, 5, 5), 12 + i as u64);
        check_module(&vm, &[("x", &x)], || conv.forward(x.as_tensor()));
    }
}

#[test]
fn attention_output_and_probs_gradients() {
    let (vm, _) = f64_varmap();
    let q = input_var((1, 2, 3, 4), 20);
    let k = input_var((1, 2, 5, 4), 21);
    let v = input_var((1, 2, 5, 3), 22);
    let mask = seeded_uniform((1, 1, 3, 5), 23, -2.0, 0.0, DType::F64, &Device::Cpu).unwrap();
    for causal in [false, true] {
        let opts = SdpaOptions {
            mask: Some(&mask),
            causal,
            scale: None,
            return_probs: true,
        };
        // Both the output and the returned probabilities carry gradients to q, k, v.
        check_module(&vm, &[("q", &q), ("k", &k), ("v", &v)], || {
            let a =
                scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)?;
            let p = a.probs.unwrap().flatten_all()?;
            Tensor::cat(&[a.output.flatten_all()?, p], 0)
        });
    }
}

#[test]
fn attention_gradients_flow_into_projections() {
    // Self-attention block: q/k/v/out projections all learn through our softmax.
    let (vm, vb) = f64_varmap();
    let (wq, wk, wv, wo) = (
        Linear::new(vb.pp("q"), 4, 4, false).unwrap(),
        Linear::new(vb.pp("k"), 4, 4, false).unwrap(),
        Linear::new(vb.pp("v"), 4, 4, false).unwrap(),
        Linear::new(vb.pp("o"), 4, 4, true).unwrap(),
    );
    let x = input_var((1, 3, 4), 30);
    check_module(&vm, &[("x", &x)], || {
        let xt = x.as_tensor();
        let q = split_heads(&wq.forward(xt)?, 2)?;
        let k = split_heads(&wk.forward(xt)?, 2)?;
        let v = split_heads(&wv.forward(xt)?, 2)?;
        let a = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            &SdpaOptions {
                causal: true,
                ..Default::default()
            },
        )?;
        wo.forward(&merge_heads(&a.output)?)
    });
}

#[test]
fn rotary_gradients_with_offset() {
    let (vm, _) = f64_varmap();
    let rope = RotaryEmbedding::new(6, 16, 10000.0, &Device::Cpu).unwrap();
    let x = input_var((1, 2, 3, 6), 40);
    check_module(&vm, &[("x", &x)], || rope.apply(x.as_tensor(), 5));
}

#[test]
fn gradcheck_reports_missing_and_wrong_gradients() {
    // A variable the loss ignores has no autograd gradient and is reported.
    let x = input_var((2, 2), 50);
    let unused = input_var(2, 51);
    let r = gradcheck(
        &[("x", &x), ("unused", &unused)],
        || weighted_sum_loss(&x.as_tensor().sqr()?, 1),
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert_eq!(r.missing, vec!["unused".to_string()]);
    assert!(!r.passed(GRAD_TOL));
    // A detached path gives a wrong (zero) gradient that finite differences catch.
    let r = gradcheck(
        &[("x", &x)],
        || weighted_sum_loss(&x.as_tensor().detach().sqr()?.add(x.as_tensor())?, 1),
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(r.max_rel_error > 0.1, "{r}");
    assert!(r.to_string().contains("worst `x`"));
}

// ---- The candle 0.11 trap: fused ops whose backward drops the gradient. ----
// Each `candle_trap_*` test asserts that candle's fast op gives NO gradient to its inputs
// while ours does. If one of them starts failing, candle has fixed that op's backward:
// update docs/NN.md (the trap section) and consider using the fast op again.

fn f32_var(shape: (usize, usize), seed: u64) -> Var {
    Var::from_tensor(&seeded_uniform(shape, seed, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap())
        .unwrap()
}

/// Backpropagates `loss` (which must SUCCEED: the trap is that nothing fails) and tells
/// whether `v` was left without a (non-zero) gradient.
fn gets_no_gradient(loss: candle_core::Result<Tensor>, v: &Var) -> bool {
    let grads = loss.unwrap().backward().expect("backward itself succeeds");
    nn::vars_without_gradient(&grads, &[("v".into(), v.clone())]).unwrap() == vec!["v".to_string()]
}

#[test]
fn candle_trap_fast_softmax_last_dim_has_no_gradient() {
    let x = f32_var((3, 4), 60);
    let theirs =
        candle_nn::ops::softmax_last_dim(x.as_tensor()).and_then(|y| weighted_sum_loss(&y, 1));
    assert!(
        gets_no_gradient(theirs, &x),
        "candle fixed softmax_last_dim's backward"
    );
    let ours = softmax_last_dim(x.as_tensor()).and_then(|y| weighted_sum_loss(&y, 1));
    assert!(!gets_no_gradient(ours, &x));
}

#[test]
fn candle_trap_fast_layer_norm_has_no_gradient() {
    let x = f32_var((3, 4), 61);
    let w = Var::from_tensor(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let run = || {
        candle_nn::ops::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
            .and_then(|y| weighted_sum_loss(&y, 2))
    };
    assert!(
        gets_no_gradient(run(), &x),
        "candle fixed layer_norm's backward (input)"
    );
    assert!(
        gets_no_gradient(run(), &w),
        "candle fixed layer_norm's backward (weight)"
    );
    // The `candle_nn::LayerNorm` module takes the same fused path on contiguous input.
    let m = candle_nn::LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5);
    let y = candle_core::Module::forward(&m, x.as_tensor()).and_then(|y| weighted_sum_loss(&y, 2));
    assert!(
        gets_no_gradient(y, &w),
        "candle fixed candle_nn::LayerNorm's backward"
    );
    let ours = layer_norm(
        x.as_tensor(),
        Some(w.as_tensor()),
        Some(b.as_tensor()),
        1e-5,
    )
    .and_then(|y| weighted_sum_loss(&y, 2));
    assert!(!gets_no_gradient(ours, &w));
}

#[test]
fn candle_trap_fast_rms_norm_has_no_gradient() {
    let x = f32_var((3, 4), 62);
    let w = Var::from_tensor(&Tensor::ones(4, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let theirs = candle_nn::ops::rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)
        .and_then(|y| weighted_sum_loss(&y, 3));
    assert!(
        gets_no_gradient(theirs, &w),
        "candle fixed rms_norm's backward"
    );
    let ours =
        rms_norm(x.as_tensor(), Some(w.as_tensor()), 1e-6).and_then(|y| weighted_sum_loss(&y, 3));
    assert!(!gets_no_gradient(ours, &w));
}

#[test]
fn candle_trap_fast_rope_has_no_gradient() {
    let x = Var::from_tensor(
        &seeded_uniform((1, 1, 3, 4), 63, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let rope = RotaryEmbedding::new(4, 8, 10000.0, &Device::Cpu).unwrap();
    let (cos, sin) = rope.tables(0, 3, DType::F32).unwrap();
    let cos = cos.narrow(1, 0, 2).unwrap().contiguous().unwrap();
    let sin = sin.narrow(1, 0, 2).unwrap().contiguous().unwrap();
    let theirs = candle_nn::rotary_emb::rope(x.as_tensor(), &cos, &sin)
        .and_then(|y| weighted_sum_loss(&y, 4));
    assert!(gets_no_gradient(theirs, &x), "candle fixed rope's backward");
    let ours = rope
        .apply(x.as_tensor(), 0)
        .and_then(|y| weighted_sum_loss(&y, 4));
    assert!(!gets_no_gradient(ours, &x));
}
