//! Forward correctness: hand-computed examples, agreement with candle's fast (forward-only)
//! ops, and f16 / bf16 behaviour of every layer.

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use nn::attention::padding_mask;
use nn::gradcheck::seeded_uniform;
use nn::*;

fn cpu() -> Device {
    Device::Cpu
}

fn rand(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    seeded_uniform(shape, seed, -2.0, 2.0, dtype, &cpu()).unwrap()
}

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &cpu()).unwrap()
}

#[test]
fn layer_norm_hand_example_and_candle_agreement() {
    let x = t(&[1., 2., 3., 4.]);
    let w = t(&[1., 2., 1., 1.]);
    let b = t(&[0., 0., 1., 0.]);
    let y = layer_norm(&x, Some(&w), Some(&b), 0.0).unwrap();
    let s = 1.25f32.sqrt();
    assert_close(&y, &t(&[-1.5 / s, -1.0 / s, 0.5 / s + 1.0, 1.5 / s]), 1e-6);

    let x = rand(&[3, 5, 16], 1, DType::F32);
    let w = rand(&[16], 2, DType::F32);
    let b = rand(&[16], 3, DType::F32);
    let fast = candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap();
    assert_close(
        &layer_norm(&x, Some(&w), Some(&b), 1e-5).unwrap(),
        &fast,
        1e-5,
    );
}

#[test]
fn rms_norm_hand_example_and_candle_agreement() {
    let x = t(&[1., 2., 3., 4.]);
    let y = rms_norm(&x, Some(&t(&[1., 1., 2., 1.])), 0.0).unwrap();
    let r = 7.5f32.sqrt();
    assert_close(&y, &t(&[1. / r, 2. / r, 6. / r, 4. / r]), 1e-6);

    let x = rand(&[4, 32], 4, DType::F32);
    let w = rand(&[32], 5, DType::F32);
    let fast = candle_nn::ops::rms_norm(&x, &w, 1e-6).unwrap();
    assert_close(&rms_norm(&x, Some(&w), 1e-6).unwrap(), &fast, 1e-5);
}

#[test]
fn group_norm_matches_layer_norm_with_one_group_and_candle() {
    let x = rand(&[2, 4, 3, 3], 6, DType::F32);
    let y = group_norm(&x, 1, None, None, 1e-5).unwrap();
    let flat = layer_norm(&x.reshape((2, 36)).unwrap(), None, None, 1e-5).unwrap();
    assert_close(&y, &flat.reshape((2, 4, 3, 3)).unwrap(), 1e-5);

    let w = rand(&[4], 7, DType::F32);
    let b = rand(&[4], 8, DType::F32);
    let theirs = candle_nn::GroupNorm::new(w.clone(), b.clone(), 4, 2, 1e-5).unwrap();
    let expect = candle_core::Module::forward(&theirs, &x).unwrap();
    assert_close(
        &group_norm(&x, 2, Some(&w), Some(&b), 1e-5).unwrap(),
        &expect,
        1e-5,
    );
    assert!(group_norm(&x, 3, None, None, 1e-5).is_err());
}

#[test]
fn softmax_hand_example_stability_and_candle_agreement() {
    let x = t(&[0., 2f32.ln(), 5f32.ln()]);
    assert_close(
        &softmax_last_dim(&x).unwrap(),
        &t(&[0.125, 0.25, 0.625]),
        1e-6,
    );
    // Large logits do not overflow; -inf entries get zero probability.
    let x = t(&[1000., 1000., f32::NEG_INFINITY]);
    assert_close(&softmax_last_dim(&x).unwrap(), &t(&[0.5, 0.5, 0.0]), 1e-6);
    let ls = log_softmax_last_dim(&t(&[1000., 1000.])).unwrap();
    assert_close(&ls, &t(&[-(2f32.ln()), -(2f32.ln())]), 1e-6);

    let x = rand(&[2, 3, 7], 9, DType::F32);
    let fast = candle_nn::ops::softmax_last_dim(&x).unwrap();
    assert_close(&softmax_last_dim(&x).unwrap(), &fast, 1e-6);
}

#[test]
fn activations_match_formulas() {
    let xs = [-3.0f64, -1.0, -0.25, 0.0, 0.5, 1.0, 2.5];
    let x = Tensor::new(&xs[..], &cpu()).unwrap();
    let get = |a: Activation| a.forward(&x).unwrap().to_vec1::<f64>().unwrap();
    let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
    // erf GELU reference values (PyTorch: torch.nn.functional.gelu).
    let gelu_ref = [
        -0.00404969409489031,
        -0.15865525393145707,
        -0.10032341857926907,
        0.0,
        0.34573123063700656,
        0.8413447460685429,
        2.4844758366855597,
    ];
    for (g, r) in get(Activation::Gelu).iter().zip(gelu_ref) {
        assert!((g - r).abs() < 1e-12, "{g} vs {r}");
    }
    let c = (2.0 / std::f64::consts::PI).sqrt();
    for (i, v) in xs.iter().enumerate() {
        let tanh_ref = 0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh());
        assert!((get(Activation::GeluTanh)[i] - tanh_ref).abs() < 1e-6);
        assert!((get(Activation::QuickGelu)[i] - v * sig(1.702 * v)).abs() < 1e-12);
        assert!((get(Activation::Silu)[i] - v * sig(*v)).abs() < 1e-12);
        assert_eq!(get(Activation::Relu)[i], v.max(0.0));
        assert_eq!(get(Activation::Identity)[i], *v);
    }
    assert_eq!(
        Activation::from_config_name("quick_gelu"),
        Some(Activation::QuickGelu)
    );
    assert_eq!(
        "gelu_pytorch_tanh".parse::<Activation>(),
        Ok(Activation::GeluTanh)
    );
    assert_eq!("swish".parse::<Activation>(), Ok(Activation::Silu));
    assert!("nope".parse::<Activation>().is_err());
}

#[test]
fn linear_embedding_conv_forward() {
    let dev = cpu();
    let w = Tensor::new(&[[1f32, 2.], [0., -1.], [3., 0.5]], &dev).unwrap();
    let lin = Linear::from_tensors(w.clone(), Some(t(&[0.5, 0., -1.])));
    let x = Tensor::new(&[[[1f32, 1.], [2., 0.]]], &dev).unwrap();
    let y = lin.forward(&x).unwrap();
    let expect = Tensor::new(&[[[3.5f32, -1., 2.5], [2.5, 0., 5.]]], &dev).unwrap();
    assert_close(&y, &expect, 1e-6);

    let emb = Embedding::from_tensors(w);
    let ids = Tensor::new(&[[2u32, 0]], &dev).unwrap();
    let e = emb.forward(&ids).unwrap();
    assert_close(
        &e,
        &Tensor::new(&[[[3f32, 0.5], [1., 2.]]], &dev).unwrap(),
        0.0,
    );

    let k = rand(&[6, 2, 3, 3], 10, DType::F32);
    let b = rand(&[6], 11, DType::F32);
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        dilation: 1,
        groups: 2,
    };
    let conv = Conv2d::from_tensors(k.clone(), Some(b.clone()), cfg);
    let x = rand(&[2, 4, 7, 7], 12, DType::F32);
    let theirs = candle_nn::Conv2d::new(
        k,
        Some(b),
        candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            dilation: 1,
            groups: 2,
            cudnn_fwd_algo: None,
        },
    );
    let expect = candle_core::Module::forward(&theirs, &x).unwrap();
    assert_close(&conv.forward(&x).unwrap(), &expect, 1e-5);
}

fn naive_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Tensor {
    let d = q.dim(3).unwrap() as f64;
    let s = (q.matmul(&k.t().unwrap()).unwrap() / d.sqrt()).unwrap();
    let s = s.broadcast_add(mask).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
    p.matmul(v).unwrap()
}

#[test]
fn attention_matches_naive_and_returns_probs() {
    let q = rand(&[2, 3, 4, 8], 20, DType::F32);
    let k = rand(&[2, 3, 6, 8], 21, DType::F32);
    let v = rand(&[2, 3, 6, 5], 22, DType::F32);
    let zero = Tensor::zeros((4, 6), DType::F32, &cpu()).unwrap();
    let opts = SdpaOptions {
        return_probs: true,
        ..Default::default()
    };
    let a = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap();
    assert_close(&a.output, &naive_attention(&q, &k, &v, &zero), 1e-5);
    let p = a.probs.unwrap();
    assert_eq!(p.dims(), &[2, 3, 4, 6]);
    let sums = p.sum(3).unwrap();
    assert_close(
        &sums,
        &Tensor::ones((2, 3, 4), DType::F32, &cpu()).unwrap(),
        1e-5,
    );
    // Without return_probs none are kept.
    let a = scaled_dot_product_attention(&q, &k, &v, &SdpaOptions::default()).unwrap();
    assert!(a.probs.is_none());
}

#[test]
fn causal_attention_is_bottom_right_aligned_for_kv_cache() {
    let q = rand(&[1, 2, 5, 4], 30, DType::F32);
    let k = rand(&[1, 2, 5, 4], 31, DType::F32);
    let v = rand(&[1, 2, 5, 4], 32, DType::F32);
    let opts = SdpaOptions {
        causal: true,
        return_probs: true,
        ..Default::default()
    };
    let full = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap();
    let p = full.probs.unwrap();
    // Strict upper triangle is exactly zero.
    let upper = p
        .i((0, 0, 1, 2..))
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(upper, 0.0);
    assert_close(
        &full.output,
        &naive_attention(&q, &k, &v, &causal_mask(5, 0, DType::F32, &cpu()).unwrap()),
        1e-5,
    );
    // Decoding the last 2 positions against all 5 keys (3 cached) gives the same rows.
    let q_tail = q.narrow(2, 3, 2).unwrap();
    let tail = scaled_dot_product_attention(&q_tail, &k, &v, &opts).unwrap();
    assert_close(&tail.output, &full.output.narrow(2, 3, 2).unwrap(), 1e-6);
    assert!(scaled_dot_product_attention(
        &k.narrow(2, 0, 5).unwrap(),
        &k.narrow(2, 0, 3).unwrap(),
        &v.narrow(2, 0, 3).unwrap(),
        &opts
    )
    .is_err());
}

#[test]
fn padding_mask_drops_keys() {
    let q = rand(&[2, 1, 3, 4], 40, DType::F32);
    let k = rand(&[2, 1, 4, 4], 41, DType::F32);
    let v = rand(&[2, 1, 4, 4], 42, DType::F32);
    let keep = Tensor::new(&[[1u32, 1, 0, 0], [1, 1, 1, 1]], &cpu()).unwrap();
    let mask = padding_mask(&keep, DType::F32).unwrap();
    let opts = SdpaOptions {
        mask: Some(&mask),
        return_probs: true,
        ..Default::default()
    };
    let a = scaled_dot_product_attention(&q, &k, &v, &opts).unwrap();
    let p = a.probs.unwrap();
    let dropped = p
        .i((0, 0, .., 2..))
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(dropped, 0.0);
    let short = scaled_dot_product_attention(
        &q.i(0..1).unwrap(),
        &k.i((0..1, .., 0..2)).unwrap(),
        &v.i((0..1, .., 0..2)).unwrap(),
        &SdpaOptions::default(),
    )
    .unwrap();
    assert_close(&a.output.i(0..1).unwrap(), &short.output, 1e-6);
}

#[test]
fn head_helpers_round_trip() {
    let x = rand(&[2, 3, 8], 50, DType::F32);
    let h = split_heads(&x, 4).unwrap();
    assert_eq!(h.dims(), &[2, 4, 3, 2]);
    assert_close(&merge_heads(&h).unwrap(), &x, 0.0);
    let kv = rand(&[1, 2, 3, 4], 51, DType::F32);
    let r = repeat_kv(&kv, 3).unwrap();
    assert_eq!(r.dims(), &[1, 6, 3, 4]);
    assert_close(&r.i((.., 4)).unwrap(), &kv.i((.., 1)).unwrap(), 0.0);
}

#[test]
fn rotary_rotates_pairs_and_respects_offset() {
    let rope = RotaryEmbedding::new(2, 8, 10000.0, &cpu()).unwrap();
    // head_dim 2: inv_freq = [1], position p rotates (1, 0) to (cos p, sin p).
    let x = Tensor::new(&[1f32, 0.], &cpu())
        .unwrap()
        .reshape((1, 1, 1, 2))
        .unwrap();
    let x4 = x.broadcast_as((1, 1, 4, 2)).unwrap().contiguous().unwrap();
    let y = rope.apply(&x4, 0).unwrap();
    for p in 0..4 {
        let row = y.i((0, 0, p)).unwrap();
        assert_close(&row, &t(&[(p as f32).cos(), (p as f32).sin()]), 1e-6);
    }
    let rope = RotaryEmbedding::new(8, 16, 10000.0, &cpu()).unwrap();
    let x = rand(&[1, 2, 6, 8], 60, DType::F32);
    let full = rope.apply(&x, 0).unwrap();
    let tail = rope.apply(&x.narrow(2, 4, 2).unwrap(), 4).unwrap();
    assert_close(&tail, &full.narrow(2, 4, 2).unwrap(), 1e-6);
    // Rotation preserves norms, and matches transformers' second-half frequency layout.
    let n = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!((n(&full) - n(&x)).abs() < 1e-3);
    let (cos, _) = rope.tables(3, 1, DType::F32).unwrap();
    let c = cos.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(c[1], c[5]);
    assert!((c[1] - (3.0f32 * 10000f32.powf(-2.0 / 8.0)).cos()).abs() < 1e-6);
    assert!(rope.apply(&x, 12).is_err());
}

/// Every layer in f16 and bf16 returns the input dtype and stays close to f32.
#[test]
fn half_precision_forward() {
    let dev = cpu();
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let lin = Linear::new(vb.pp("lin"), 16, 16, true).unwrap();
    let ln = LayerNorm::new(vb.pp("ln"), 16, 1e-5).unwrap();
    let rms = RmsNorm::new(vb.pp("rms"), 16, 1e-6).unwrap();
    let gn = GroupNorm::new(vb.pp("gn"), 4, 8, 1e-6, true).unwrap();
    let conv = Conv2d::new(
        vb.pp("conv"),
        8,
        4,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        true,
    )
    .unwrap();
    let rope = RotaryEmbedding::new(16, 8, 10000.0, &dev).unwrap();
    randomize(&vm, 70);
    let x = rand(&[2, 4, 16], 71, DType::F32);
    let img = rand(&[1, 8, 4, 4], 72, DType::F32);
    let run = |x: &Tensor, img: &Tensor| -> Vec<Tensor> {
        let x4 = x.unsqueeze(1).unwrap();
        let a = scaled_dot_product_attention(
            &x4,
            &x4,
            &x4,
            &SdpaOptions {
                causal: true,
                return_probs: true,
                ..Default::default()
            },
        )
        .unwrap();
        vec![
            lin.forward(x).unwrap(),
            ln.forward(x).unwrap(),
            rms.forward(x).unwrap(),
            softmax_last_dim(x).unwrap(),
            gelu(x).unwrap(),
            quick_gelu(x).unwrap(),
            silu(x).unwrap(),
            gn.forward(img).unwrap(),
            conv.forward(img).unwrap(),
            rope.apply(&x4, 2).unwrap(),
            a.output,
            a.probs.unwrap(),
        ]
    };
    let reference = run(&x, &img);
    for (dtype, tol) in [(DType::F16, 2e-2), (DType::BF16, 1.5e-1)] {
        let out = run(&x.to_dtype(dtype).unwrap(), &img.to_dtype(dtype).unwrap());
        for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
            assert_eq!(o.dtype(), dtype, "output {i}");
            let d = max_diff(o, r);
            assert!(d < tol, "{dtype:?} output {i}: max diff {d}");
        }
    }
}
