//! Trainable vs frozen construction with the same code: an AdamW step on a tiny net built from
//! this crate's layers moves every parameter; the same net loaded from the saved weights is
//! frozen and computes the same output.

mod common;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use nn::gradcheck::{check_all_vars_get_gradient, seeded_uniform, snapshot};
use nn::*;

/// Token embedding -> Linear -> LayerNorm -> rotary causal self-attention -> RMSNorm -> GELU
/// -> Linear, plus a Conv2d -> GroupNorm -> SiLU image branch.
struct TinyNet {
    emb: Embedding,
    fc1: Linear,
    ln: LayerNorm,
    qkv: Linear,
    rope: RotaryEmbedding,
    rms: RmsNorm,
    fc2: Linear,
    conv: Conv2d,
    gn: GroupNorm,
}

impl TinyNet {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            emb: Embedding::new(vb.pp("emb"), 10, 8)?,
            fc1: Linear::new(vb.pp("fc1"), 8, 8, true)?,
            ln: LayerNorm::new(vb.pp("ln"), 8, 1e-5)?,
            qkv: Linear::new(vb.pp("qkv"), 8, 24, false)?,
            rope: RotaryEmbedding::new(4, 16, 10000.0, vb.device())?,
            rms: RmsNorm::new(vb.pp("rms"), 8, 1e-6)?,
            fc2: Linear::new(vb.pp("fc2"), 8, 3, true)?,
            conv: Conv2d::new(
                vb.pp("conv"),
                2,
                4,
                3,
                Conv2dConfig {
                    padding: 1,
                    ..Default::default()
                },
                true,
            )?,
            gn: GroupNorm::new(vb.pp("gn"), 2, 4, 1e-5, true)?,
        })
    }

    fn forward(&self, ids: &Tensor, img: &Tensor) -> Result<Tensor> {
        let h = self
            .ln
            .forward(&self.fc1.forward(&self.emb.forward(ids)?)?)?;
        let qkv = self.qkv.forward(&h)?;
        let q = split_heads(&qkv.narrow(2, 0, 8)?, 2)?;
        let k = split_heads(&qkv.narrow(2, 8, 8)?, 2)?;
        let v = split_heads(&qkv.narrow(2, 16, 8)?, 2)?;
        let (q, k) = self.rope.apply_qk(&q, &k, 0)?;
        let a = scaled_dot_product_attention(
            &q,
            &k,
            &v,
            &SdpaOptions {
                causal: true,
                ..Default::default()
            },
        )?;
        let h = (h + merge_heads(&a.output)?)?;
        let out = self.fc2.forward(&gelu(&self.rms.forward(&h)?)?)?;
        let img = silu(&self.gn.forward(&self.conv.forward(img)?)?)?;
        let img = img.mean_keepdim(1)?.flatten_from(1)?.narrow(1, 0, 3)?; // (1, 3)
        out.broadcast_add(&img.unsqueeze(1)?)
    }
}

#[test]
fn adamw_step_moves_every_parameter_and_frozen_load_matches() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let net = TinyNet::new(VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
    let ids = Tensor::new(&[[1u32, 4, 2, 7, 7]], &dev).unwrap();
    let img = seeded_uniform((1, 2, 4, 4), 1, -1.0, 1.0, DType::F32, &dev).unwrap();
    let target = seeded_uniform((1, 5, 3), 2, -1.0, 1.0, DType::F32, &dev).unwrap();

    let before = snapshot(&vm).unwrap();
    assert_eq!(before.len(), 13);
    let loss = mse(&net.forward(&ids, &img).unwrap(), &target).unwrap();
    let grads = check_all_vars_get_gradient(&loss, &vm).unwrap();
    let mut opt = AdamW::new(
        vm.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    let after = snapshot(&vm).unwrap();
    let mut unmoved = vec![];
    for (name, b) in &before {
        let d = b
            .sub(&after[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if d == 0.0 {
            unmoved.push(name.clone());
        }
    }
    assert!(
        unmoved.is_empty(),
        "parameters not moved by AdamW: {unmoved:?}"
    );
    let loss2 = mse(&net.forward(&ids, &img).unwrap(), &target)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(loss2 < loss.to_scalar::<f32>().unwrap());

    // Frozen: the same constructor over the saved weights.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.safetensors");
    vm.save(&path).unwrap();
    let frozen = TinyNet::new(Weights::open(&path).unwrap().var_builder(DType::F32, &dev)).unwrap();
    assert!(!frozen.fc1.weight().is_variable());
    let a = net.forward(&ids, &img).unwrap();
    let b = frozen.forward(&ids, &img).unwrap();
    assert_eq!(common::max_diff(&a, &b), 0.0);
}

#[test]
fn varmap_parameters_under_candle_fast_layer_norm_get_no_gradient() {
    // The trap at the level of a model: upstream Linear parameters silently stop learning.
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let fc = Linear::new(vb.pp("fc"), 4, 4, true).unwrap();
    let ln = candle_nn::layer_norm(4, 1e-5, vb.pp("ln")).unwrap();
    let x = seeded_uniform((2, 4), 3, -1.0, 1.0, DType::F32, &dev).unwrap();
    let y = candle_core::Module::forward(&ln, &fc.forward(&x).unwrap()).unwrap();
    let loss = nn::weighted_sum_loss(&y, 5).unwrap();
    let err = check_all_vars_get_gradient(&loss, &vm)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc.weight") && err.contains("ln.weight"),
        "{err}"
    );
}
