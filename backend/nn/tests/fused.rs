//! The fused CPU kernels (`nn::fused`): finite-difference gradients in f64 on odd shapes, and
//! agreement with the composed candle-primitive path in f32 for outputs and every gradient.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use common::*;
use nn::fused::{
    batched_matmul, channel_bias_fused, group_norm_fused, layer_norm_fused, rms_norm_fused,
    softmax_fused, SoftmaxMask, Transpose,
};
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
use nn::*;

fn var(shape: &[usize], seed: u64, lo: f64, hi: f64, dtype: DType) -> Var {
    Var::from_tensor(&seeded_uniform(shape, seed, lo, hi, dtype, &Device::Cpu).unwrap()).unwrap()
}

/// Finite-difference check of `f` w.r.t. `vars` (f64).
fn fd(vars: &[(&str, &Var)], f: impl Fn() -> Result<Tensor>) {
    let report = gradcheck(
        vars,
        || weighted_sum_loss(&f()?, 41),
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(report.checked > 0);
    assert!(report.passed(GRAD_TOL), "{report}");
}

/// Output and gradients of `a` and `b` (the fused and composed versions of one function) agree
/// in f32 for the same variables, to `tol` relative to the largest magnitude.
fn agree(vars: &[&Var], tol: f64, a: impl Fn() -> Result<Tensor>, b: impl Fn() -> Result<Tensor>) {
    let run = |f: &dyn Fn() -> Result<Tensor>| {
        let out = f().unwrap();
        let grads = weighted_sum_loss(&out, 7).unwrap().backward().unwrap();
        let g: Vec<Tensor> = vars
            .iter()
            .map(|v| {
                grads
                    .get(v.as_tensor())
                    .expect("variable got no gradient")
                    .clone()
            })
            .collect();
        (out, g)
    };
    let (oa, ga) = run(&a);
    let (ob, gb) = run(&b);
    let rel = |x: &Tensor, y: &Tensor| {
        let scale = y
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        max_diff(x, y) / scale.to_scalar::<f64>().unwrap().max(1e-6)
    };
    let r = rel(&oa, &ob);
    assert!(r <= tol, "outputs differ by {r:e} (relative)");
    for (i, (x, y)) in ga.iter().zip(&gb).enumerate() {
        let r = rel(x, y);
        assert!(
            r <= tol,
            "gradient of variable {i} differs by {r:e} (relative)"
        );
    }
}

#[test]
fn group_norm_fd_gradients_odd_shapes() {
    // (batch, channels, groups, spatial): batch 1, single group, one channel per group,
    // sizes that are not multiples of 8, and a (N, C, L) sequence.
    for (i, (shape, groups)) in [
        (vec![1, 6, 5, 3], 3),
        (vec![3, 4, 7], 1),
        (vec![2, 5, 3, 3], 5),
        (vec![2, 6, 2, 5], 2),
    ]
    .into_iter()
    .enumerate()
    {
        let c = shape[1];
        let seed = 10 * i as u64;
        let x = var(&shape, seed, -1.5, 1.5, DType::F64);
        let w = var(&[c], seed + 1, 0.5, 1.5, DType::F64);
        let b = var(&[c], seed + 2, -0.5, 0.5, DType::F64);
        for silu in [false, true] {
            fd(&[("x", &x), ("w", &w), ("b", &b)], || {
                group_norm_fused(
                    x.as_tensor(),
                    groups,
                    Some(w.as_tensor()),
                    Some(b.as_tensor()),
                    1e-5,
                    silu,
                )
            });
        }
        fd(&[("x", &x)], || {
            group_norm_fused(x.as_tensor(), groups, None, None, 1e-5, true)
        });
    }
}

#[test]
fn group_norm_fused_matches_composed_f32() {
    let x = var(&[4, 64, 8, 8], 1, -2.0, 3.0, DType::F32);
    let w = var(&[64], 2, 0.5, 1.5, DType::F32);
    let b = var(&[64], 3, -0.5, 0.5, DType::F32);
    let vars = [&x, &w, &b];
    agree(
        &vars,
        1e-5,
        || {
            group_norm_fused(
                x.as_tensor(),
                32,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
                false,
            )
        },
        || {
            norm::group_norm_composed(
                x.as_tensor(),
                32,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
            )
        },
    );
    agree(
        &vars,
        1e-5,
        || {
            group_norm_fused(
                x.as_tensor(),
                32,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
                true,
            )
        },
        || {
            norm::group_norm_composed(
                x.as_tensor(),
                32,
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-6,
            )?
            .silu()
        },
    );
}

#[test]
fn group_norm_layer_uses_fused_kernel_with_silu_and_refuses_bad_groups() {
    let (vm, vb) = f64_varmap();
    let gn = GroupNorm::new(vb, 2, 6, 1e-6, true).unwrap();
    randomize(&vm, 4);
    let x = input_var((2, 6, 3, 2), 5);
    check_module(&vm, &[("x", &x)], || gn.forward_silu(x.as_tensor()));
    let bad = Tensor::zeros((1, 5, 2), DType::F32, &Device::Cpu).unwrap();
    let err = group_norm_fused(&bad, 2, None, None, 1e-5, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not divisible"), "{err}");
}

#[test]
fn layer_norm_and_rms_norm_fd_gradients_odd_shapes() {
    for (i, shape) in [vec![1, 7], vec![3, 5, 9], vec![2, 1, 13]]
        .into_iter()
        .enumerate()
    {
        let d = *shape.last().unwrap();
        let seed = 100 + 10 * i as u64;
        let x = var(&shape, seed, -1.5, 1.5, DType::F64);
        let w = var(&[d], seed + 1, 0.5, 1.5, DType::F64);
        let b = var(&[d], seed + 2, -0.5, 0.5, DType::F64);
        fd(&[("x", &x), ("w", &w), ("b", &b)], || {
            layer_norm_fused(
                x.as_tensor(),
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-5,
            )
        });
        fd(&[("x", &x)], || {
            layer_norm_fused(x.as_tensor(), None, None, 1e-5)
        });
        fd(&[("x", &x), ("w", &w)], || {
            rms_norm_fused(x.as_tensor(), Some(w.as_tensor()), 1e-6)
        });
        fd(&[("x", &x)], || rms_norm_fused(x.as_tensor(), None, 1e-6));
    }
}

#[test]
fn layer_norm_and_rms_norm_fused_match_composed_f32() {
    let x = var(&[3, 77, 67], 11, -2.0, 3.0, DType::F32);
    let w = var(&[67], 12, 0.5, 1.5, DType::F32);
    let b = var(&[67], 13, -0.5, 0.5, DType::F32);
    agree(
        &[&x, &w, &b],
        1e-5,
        || {
            layer_norm_fused(
                x.as_tensor(),
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-5,
            )
        },
        || {
            norm::layer_norm_composed(
                x.as_tensor(),
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-5,
            )
        },
    );
    agree(
        &[&x, &w],
        1e-5,
        || rms_norm_fused(x.as_tensor(), Some(w.as_tensor()), 1e-6),
        || norm::rms_norm_composed(x.as_tensor(), Some(w.as_tensor()), 1e-6),
    );
}

#[test]
fn half_precision_inputs_are_computed_in_f32_and_cast_back() {
    let x32 = seeded_uniform((2, 8, 12), 5, -2.0, 2.0, DType::F32, &Device::Cpu).unwrap();
    let w32 = seeded_uniform(12, 6, 0.5, 1.5, DType::F32, &Device::Cpu).unwrap();
    for dt in [DType::F16, DType::BF16] {
        let x = x32.to_dtype(dt).unwrap();
        let w = w32.to_dtype(dt).unwrap();
        let fused = rms_norm_fused(&x, Some(&w), 1e-6).unwrap();
        let composed = norm::rms_norm_composed(&x, Some(&w), 1e-6).unwrap();
        assert_eq!(fused.dtype(), dt);
        // Same rounding steps (normalise in f32, cast, multiply in the input dtype): identical.
        assert_eq!(max_diff(&fused, &composed), 0.0, "{dt:?}");
        let ln = layer_norm_fused(&x, Some(&w), None, 1e-5).unwrap();
        let ln_ref = norm::layer_norm_composed(&x, Some(&w), None, 1e-5).unwrap();
        assert!(max_diff(&ln, &ln_ref) < 2e-2, "{dt:?}");
    }
}

#[test]
fn softmax_fd_gradients_with_scale_masks_and_causal() {
    let x = var(&[2, 3, 4, 7], 21, -2.0, 2.0, DType::F64);
    let plain = SoftmaxMask::default();
    for log in [false, true] {
        fd(&[("x", &x)], || {
            softmax_fused(x.as_tensor(), 1.0, plain, log)
        });
        fd(&[("x", &x)], || {
            softmax_fused(x.as_tensor(), 0.37, plain, log)
        });
    }
    // A broadcast padding mask (b, 1, 1, k) with a dropped key, and bottom-right causal.
    let keep = Tensor::new(
        &[[1f64, 1., 0., 1., 1., 1., 1.], [1., 1., 1., 1., 1., 0., 1.]],
        &Device::Cpu,
    )
    .unwrap();
    let pad = padding_mask(&keep, DType::F64).unwrap();
    let masked = SoftmaxMask {
        additive: Some(&pad),
        causal: false,
    };
    fd(&[("x", &x)], || {
        softmax_fused(x.as_tensor(), 0.5, masked, false)
    });
    let causal = SoftmaxMask {
        additive: Some(&pad),
        causal: true,
    };
    fd(&[("x", &x)], || {
        softmax_fused(x.as_tensor(), 0.5, causal, false)
    });
    // Batch 1, a single key.
    let one = var(&[1, 1, 3, 1], 22, -1.0, 1.0, DType::F64);
    fd(&[("x", &one)], || {
        softmax_fused(one.as_tensor(), 2.0, plain, false)
    });
}

#[test]
fn softmax_masks_match_a_materialised_mask() {
    let x = seeded_uniform((2, 2, 3, 5), 31, -3.0, 3.0, DType::F32, &Device::Cpu).unwrap();
    let keep = Tensor::new(
        &[[1f32, 0., 1., 1., 1.], [1., 1., 1., 1., 0.]],
        &Device::Cpu,
    )
    .unwrap();
    let pad = padding_mask(&keep, DType::F32).unwrap();
    let opts = SoftmaxMask {
        additive: Some(&pad),
        causal: true,
    };
    let fused = softmax_fused(&x, 0.5, opts, false).unwrap();
    let full = ((x * 0.5).unwrap().broadcast_add(&pad).unwrap())
        .broadcast_add(&causal_mask(3, 2, DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let composed = ops::softmax_last_dim_composed(&full).unwrap();
    assert_close(&fused, &composed, 1e-6);
    // Masked keys get exactly zero probability.
    let v = fused.to_vec3::<f32>().ok();
    assert!(v.is_none(), "rank-4 output");
    let row = fused
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(row[1], 0.0, "padding");
    assert_eq!(row[3], 0.0, "causal: query 0 sees keys 0..=2");
}

#[test]
fn softmax_fused_matches_composed_f32_including_gradients() {
    let x = var(&[4, 8, 64, 77], 41, -4.0, 4.0, DType::F32);
    agree(
        &[&x],
        1e-5,
        || softmax_last_dim(x.as_tensor()),
        || ops::softmax_last_dim_composed(x.as_tensor()),
    );
    agree(
        &[&x],
        1e-5,
        || log_softmax_last_dim(x.as_tensor()),
        || ops::log_softmax_last_dim_composed(x.as_tensor()),
    );
}

#[test]
fn batched_matmul_fd_gradients_for_every_transpose() {
    use Transpose::{No, Yes};
    for (ta, tb) in [(No, No), (No, Yes), (Yes, No), (Yes, Yes)] {
        let (m, k, n) = (3, 5, 2);
        let a_shape = if ta == No { [2, m, k] } else { [2, k, m] };
        let b_shape = if tb == No { [2, k, n] } else { [2, n, k] };
        let a = var(&a_shape, 51, -1.0, 1.0, DType::F64);
        let b = var(&b_shape, 52, -1.0, 1.0, DType::F64);
        let out = batched_matmul(a.as_tensor(), b.as_tensor(), ta, tb).unwrap();
        assert_eq!(out.dims(), &[2, m, n]);
        // The same product through candle's matmul on explicit transposes.
        let op = |t: &Tensor, tr: Transpose| {
            if tr == Yes {
                t.transpose(1, 2).unwrap()
            } else {
                t.clone()
            }
        };
        let reference = op(a.as_tensor(), ta)
            .contiguous()
            .unwrap()
            .matmul(&op(b.as_tensor(), tb).contiguous().unwrap())
            .unwrap();
        assert_close(&out, &reference, 1e-12);
        fd(&[("a", &a), ("b", &b)], || {
            batched_matmul(a.as_tensor(), b.as_tensor(), ta, tb)
        });
    }
    // A batch smaller than the thread count and a single-row product.
    let a = var(&[1, 1, 9], 53, -1.0, 1.0, DType::F64);
    let b = var(&[1, 9, 4], 54, -1.0, 1.0, DType::F64);
    fd(&[("a", &a), ("b", &b)], || {
        batched_matmul(a.as_tensor(), b.as_tensor(), No, No)
    });
    let err = batched_matmul(a.as_tensor(), a.as_tensor(), No, No)
        .unwrap_err()
        .to_string();
    assert!(err.contains("inner sizes differ"), "{err}");

    // A (batch, heads) batch, as attention uses it: the same values as the product over the
    // flattened batch, the batch dimensions kept, and gradients for both operands.
    let a = var(&[2, 3, 4, 5], 55, -1.0, 1.0, DType::F64);
    let b = var(&[2, 3, 6, 5], 56, -1.0, 1.0, DType::F64);
    let out = batched_matmul(a.as_tensor(), b.as_tensor(), No, Yes).unwrap();
    assert_eq!(out.dims(), &[2, 3, 4, 6]);
    let flat = batched_matmul(
        &a.as_tensor().reshape((6, 4, 5)).unwrap(),
        &b.as_tensor().reshape((6, 6, 5)).unwrap(),
        No,
        Yes,
    )
    .unwrap();
    assert_close(&out.reshape((6, 4, 6)).unwrap(), &flat, 0.0);
    fd(&[("a", &a), ("b", &b)], || {
        batched_matmul(a.as_tensor(), b.as_tensor(), No, Yes)
    });
    let c = var(&[3, 2, 5, 4], 57, -1.0, 1.0, DType::F64);
    let err = batched_matmul(a.as_tensor(), c.as_tensor(), No, No)
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected (batch"), "{err}");
}

#[test]
fn relu_fused_is_candles_relu_forward_and_backward() {
    // f32 with exact zeros among the values: the same bits as candle's op, both ways.
    let x = seeded_uniform(&[5, 3, 700], 81, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let x = Var::from_tensor(&((x * 4.0).unwrap().round().unwrap() / 4.0).unwrap()).unwrap();
    let count = |t: Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
    };
    assert!(count(x.as_tensor().eq(0f32).unwrap()).unwrap() > 100.0);
    assert!(count(x.as_tensor().lt(0f32).unwrap()).unwrap() > 100.0);
    let fused = relu(x.as_tensor()).unwrap();
    let candle = x.as_tensor().relu().unwrap();
    assert_close(&fused, &candle, 0.0);
    let w = seeded_uniform(&[5, 3, 700], 82, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let (gf, gc) = (grad_through(&fused, &w), grad_through(&candle, &w));
    assert_close(
        gf.get(x.as_tensor()).unwrap(),
        gc.get(x.as_tensor()).unwrap(),
        0.0,
    );
    // f64 finite differences away from the kink.
    let x = var(&[4, 9], 83, 0.1, 1.0, DType::F64);
    let sign = seeded_uniform(&[4, 9], 84, -1.0, 1.0, DType::F64, &Device::Cpu)
        .unwrap()
        .sign()
        .unwrap();
    fd(&[("x", &x)], || relu(&(x.as_tensor() * &sign)?));
}

#[test]
fn head_split_and_merge_are_the_composed_copies_forward_and_backward() {
    // f32: the same bits as the reshape / transpose / copy chain, values and gradients.
    let x = var(&[3, 7, 12], 71, -1.0, 1.0, DType::F32);
    let fused = split_heads(x.as_tensor(), 4).unwrap();
    let composed = attention::split_heads_composed(x.as_tensor(), 4).unwrap();
    assert_eq!(fused.dims(), &[3, 4, 7, 3]);
    assert_close(&fused, &composed, 0.0);
    let back = merge_heads(&fused).unwrap();
    assert_close(&back, x.as_tensor(), 0.0);
    assert_close(
        &back,
        &attention::merge_heads_composed(&composed).unwrap(),
        0.0,
    );
    let w = seeded_uniform(&[3, 4, 7, 3], 72, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let (gf, gc) = (grad_through(&fused, &w), grad_through(&composed, &w));
    assert_close(
        gf.get(x.as_tensor()).unwrap(),
        gc.get(x.as_tensor()).unwrap(),
        0.0,
    );
    let h = var(&[3, 4, 7, 3], 73, -1.0, 1.0, DType::F32);
    let w = seeded_uniform(&[3, 7, 12], 74, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let gf = grad_through(&merge_heads(h.as_tensor()).unwrap(), &w);
    let gc = grad_through(&attention::merge_heads_composed(h.as_tensor()).unwrap(), &w);
    assert_close(
        gf.get(h.as_tensor()).unwrap(),
        gc.get(h.as_tensor()).unwrap(),
        0.0,
    );
    // f64 finite differences through both, and a width the heads do not divide.
    let x = var(&[2, 5, 6], 75, -1.0, 1.0, DType::F64);
    fd(&[("x", &x)], || split_heads(x.as_tensor(), 3));
    fd(&[("x", &x)], || {
        merge_heads(&split_heads(x.as_tensor(), 2)?)
    });
    let err = split_heads(x.as_tensor(), 4).unwrap_err().to_string();
    assert!(err.contains("not divisible"), "{err}");
}

/// The gradients of `sum(y * w)`.
fn grad_through(y: &Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
    (y * w).unwrap().sum_all().unwrap().backward().unwrap()
}

#[test]
fn attention_fused_matches_composed_with_probs_in_the_graph() {
    let q = var(&[2, 8, 64, 8], 61, -1.0, 1.0, DType::F32);
    let k = var(&[2, 8, 77, 8], 62, -1.0, 1.0, DType::F32);
    let v = var(&[2, 8, 77, 8], 63, -1.0, 1.0, DType::F32);
    let keep = Tensor::ones((2, 77), DType::F32, &Device::Cpu)
        .unwrap()
        .slice_assign(
            &[0..1, 70..77],
            &Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let mask = padding_mask(&keep, DType::F32).unwrap();
    for causal in [false, true] {
        let (qk, kk) = if causal {
            (
                q.as_tensor().narrow(2, 0, 40).unwrap(),
                k.as_tensor().clone(),
            )
        } else {
            (q.as_tensor().clone(), k.as_tensor().clone())
        };
        let opts = SdpaOptions {
            mask: Some(&mask),
            causal,
            scale: None,
            return_probs: true,
        };
        // Loss on the output and on the probabilities (as L_reg does).
        let both = |o: AttentionOutput| -> Result<Tensor> {
            let p = o.probs.unwrap();
            let (b, h, ql, kl) = p.dims4()?;
            let o = o.output.flatten_all()?;
            Tensor::cat(&[o, p.reshape(b * h * ql * kl)?], 0)
        };
        agree(
            &[&q, &k, &v],
            2e-5,
            || {
                both(scaled_dot_product_attention(
                    &qk,
                    &kk,
                    v.as_tensor(),
                    &opts,
                )?)
            },
            || {
                both(attention::scaled_dot_product_attention_composed(
                    &qk,
                    &kk,
                    v.as_tensor(),
                    &opts,
                )?)
            },
        );
    }
}

#[test]
fn attention_fd_gradients_through_the_fused_path() {
    let q = var(&[1, 2, 3, 5], 71, -1.0, 1.0, DType::F64);
    let k = var(&[1, 2, 4, 5], 72, -1.0, 1.0, DType::F64);
    let v = var(&[1, 2, 4, 3], 73, -1.0, 1.0, DType::F64);
    for causal in [false, true] {
        let opts = SdpaOptions {
            mask: None,
            causal,
            scale: Some(0.7),
            return_probs: true,
        };
        fd(&[("q", &q), ("k", &k), ("v", &v)], || {
            let o =
                scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)?;
            let p = o.probs.unwrap().sqr()?.sum_all()?;
            o.output.sum_all()?.add(&p)
        });
    }
}

#[test]
fn channel_bias_fd_gradients_and_agreement() {
    let x = var(&[3, 5, 2, 3], 81, -1.0, 1.0, DType::F64);
    let b = var(&[5], 82, -1.0, 1.0, DType::F64);
    fd(&[("x", &x), ("b", &b)], || {
        channel_bias_fused(x.as_tensor(), b.as_tensor())
    });
    let x = var(&[4, 32, 16, 16], 83, -1.0, 1.0, DType::F32);
    let b = var(&[32], 84, -1.0, 1.0, DType::F32);
    agree(
        &[&x, &b],
        1e-6,
        || channel_bias_fused(x.as_tensor(), b.as_tensor()),
        || {
            x.as_tensor()
                .broadcast_add(&b.as_tensor().reshape((1, 32, 1, 1))?)
        },
    );
    let err = channel_bias_fused(
        x.as_tensor(),
        &Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("3 channels") || err.to_string().contains("bias"),
        "{err}"
    );
}

#[test]
fn attention_node_is_the_composed_kernels_bit_for_bit_forward_and_backward() {
    use nn::fused::attention_fused;
    let q = var(&[2, 3, 9, 8], 91, -1.0, 1.0, DType::F32);
    let k = var(&[2, 3, 11, 8], 92, -1.0, 1.0, DType::F32);
    let v = var(&[2, 3, 11, 5], 93, -1.0, 1.0, DType::F32);
    let keep = Tensor::ones((2, 11), DType::F32, &Device::Cpu)
        .unwrap()
        .slice_assign(
            &[1..2, 8..11],
            &Tensor::zeros((1, 3), DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let pad = padding_mask(&keep, DType::F32).unwrap();
    let w = seeded_uniform(&[2, 3, 9, 5], 94, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    for (additive, causal) in [(None, false), (Some(&pad), false), (Some(&pad), true)] {
        let mask = SoftmaxMask { additive, causal };
        let node = attention_fused(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3, mask).unwrap();
        let scores =
            batched_matmul(q.as_tensor(), k.as_tensor(), Transpose::No, Transpose::Yes).unwrap();
        let probs = softmax_fused(&scores, 0.3, mask, false).unwrap();
        let composed = batched_matmul(&probs, v.as_tensor(), Transpose::No, Transpose::No).unwrap();
        assert_close(&node, &composed, 0.0);
        // One node: nothing of the scores' size (2, 3, 9, 11) left for the backward pass.
        let loss = (&node * &w).unwrap().sum_all().unwrap();
        let score_sized = loss
            .sorted_nodes()
            .iter()
            .filter(|t| t.dims() == [2, 3, 9, 11])
            .count();
        assert_eq!(
            score_sized,
            0,
            "mask {:?} causal {causal}",
            additive.is_some()
        );
        let (gn, gc) = (grad_through(&node, &w), grad_through(&composed, &w));
        for x in [&q, &k, &v] {
            assert_close(
                gn.get(x.as_tensor()).unwrap(),
                gc.get(x.as_tensor()).unwrap(),
                0.0,
            );
        }
        // The attention entry point takes the node when the probabilities are not wanted.
        let opts = SdpaOptions {
            mask: additive,
            causal,
            scale: Some(0.3),
            return_probs: false,
        };
        let out = scaled_dot_product_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &opts)
            .unwrap();
        assert!(out.probs.is_none());
        assert_close(&out.output, &composed, 0.0);
    }
    // A second backward pass over the same graph sees the same probabilities.
    let node = attention_fused(
        q.as_tensor(),
        k.as_tensor(),
        v.as_tensor(),
        0.3,
        SoftmaxMask::default(),
    )
    .unwrap();
    let (g1, g2) = (grad_through(&node, &w), grad_through(&node, &w));
    assert_close(
        g1.get(q.as_tensor()).unwrap(),
        g2.get(q.as_tensor()).unwrap(),
        0.0,
    );
    let half = q.as_tensor().to_dtype(DType::F16).unwrap();
    let err = attention_fused(&half, &half, &half, 1.0, SoftmaxMask::default()).unwrap_err();
    assert!(err.to_string().contains("f32 or f64"), "{err}");
}

#[test]
fn attention_node_fd_gradients_with_masks_and_causal() {
    use nn::fused::attention_fused;
    let q = var(&[1, 2, 3, 5], 95, -1.0, 1.0, DType::F64);
    let k = var(&[1, 2, 4, 5], 96, -1.0, 1.0, DType::F64);
    let v = var(&[1, 2, 4, 3], 97, -1.0, 1.0, DType::F64);
    let mask = seeded_uniform(&[1, 1, 3, 4], 98, -2.0, 0.0, DType::F64, &Device::Cpu).unwrap();
    for (additive, causal) in [(None, false), (Some(&mask), false), (Some(&mask), true)] {
        fd(&[("q", &q), ("k", &k), ("v", &v)], || {
            attention_fused(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                0.7,
                SoftmaxMask { additive, causal },
            )
        });
    }
}

#[test]
fn row_norm_parameter_gradients_are_the_same_bits_on_any_thread_count() {
    // 64 rows of 128: few enough rows that the threads' fair share, not the task size, would
    // decide the blocks the weight / bias gradients are summed in.
    let x = var(&[64, 128], 21, -2.0, 3.0, DType::F32);
    let w = var(&[128], 22, 0.5, 1.5, DType::F32);
    let b = var(&[128], 23, -0.5, 0.5, DType::F32);
    let dy = seeded_uniform(&[64, 128], 24, -1.0, 1.0, DType::F32, &Device::Cpu).unwrap();
    let grads = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let y = layer_norm_fused(
                x.as_tensor(),
                Some(w.as_tensor()),
                Some(b.as_tensor()),
                1e-5,
            )
            .unwrap();
            let g = grad_through(&y, &dy);
            [&x, &w, &b].map(|v| {
                g.get(v.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
        })
    };
    let two = grads(2);
    for threads in [1, 3] {
        assert_eq!(grads(threads), two, "{threads} threads");
    }
}
