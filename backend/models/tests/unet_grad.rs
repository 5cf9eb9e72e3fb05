//! Gradients of the trainable UNet and VAE: every parameter of a tiny model (every block type)
//! gets a non-zero gradient from an MSE + L_reg loss, and autograd matches central finite
//! differences in f64 on a very small config.

mod unet_common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use models::lreg::{lreg_loss, CharacterTokens};
use models::unet::{AttentionCapture, OneOrMany, UNet2DConditionModel, UNetConfig};
use models::vae::{AutoencoderKL, VaeConfig};
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
use unet_common::randomize;

fn tiny_config(ch: &[usize], groups: usize, ctx: usize, linear: bool) -> UNetConfig {
    UNetConfig {
        sample_size: Some(8),
        block_out_channels: ch.to_vec(),
        layers_per_block: OneOrMany::One(1),
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        attention_head_dim: OneOrMany::One(2),
        cross_attention_dim: OneOrMany::One(ctx),
        norm_num_groups: groups,
        use_linear_projection: linear,
        ..UNetConfig::default()
    }
}

fn inputs(b: usize, hw: usize, ctx: usize, dtype: DType) -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = seeded_uniform((b, 4, hw, hw), 11, -1.0, 1.0, dtype, &dev).unwrap();
    let t = Tensor::new(&[3i64, 700][..b], &dev).unwrap();
    let c = seeded_uniform((b, 5, ctx), 12, -1.0, 1.0, dtype, &dev).unwrap();
    (x, t, c)
}

#[test]
fn unet_every_parameter_gets_gradient_from_mse_and_lreg() {
    for linear in [false, true] {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let cfg = tiny_config(&[8, 16], 4, 8, linear);
        let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg)
            .unwrap();
        randomize(&vm, 1, 0.5);
        let (x, t, c) = inputs(2, 8, 8, DType::F32);
        let out = unet
            .forward_with_capture(&x, &t, &c, &AttentionCapture::all())
            .unwrap();
        assert_eq!(out.attention_probs.len(), 4); // down 1, mid 1, up 2
        assert_eq!(out.attention_probs[0].probs.dims(), [2, 2, 64, 5]);
        let target = seeded_uniform(out.sample.shape(), 13, -1.0, 1.0, DType::F32, &dev).unwrap();
        let masks = seeded_uniform((2, 2, 16, 16), 14, 0.0, 1.0, DType::F32, &dev)
            .unwrap()
            .ge(0.5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let chars = CharacterTokens::from_lists(&[vec![1, 3], vec![2]]);
        let lreg = lreg_loss(&out.attention_probs, &masks, &chars).unwrap();
        let loss = (nn::mse(&out.sample, &target).unwrap() + (lreg * 1e-3).unwrap()).unwrap();
        nn::check_all_vars_get_gradient(&loss, &vm).unwrap();

        // L_reg alone reaches the attn2 projections through the captured maps.
        let lreg = lreg_loss(&out.attention_probs, &masks, &chars).unwrap();
        let grads = lreg.backward().unwrap();
        let data = vm.data().lock().unwrap();
        let q = &data["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight"];
        let g = grads
            .get(q.as_tensor())
            .expect("to_q gets an L_reg gradient");
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0
        );
    }
}

#[test]
fn unet_gradients_match_finite_differences_f64() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let cfg = tiny_config(&[4, 8], 2, 4, false);
    let unet =
        UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), &cfg).unwrap();
    randomize(&vm, 2, 0.8);
    let (x, t, c) = inputs(1, 4, 4, DType::F64);
    let x = Var::from_tensor(&x).unwrap();
    let c = Var::from_tensor(&c).unwrap();
    let loss = || weighted_sum_loss(&unet.forward(x.as_tensor(), &t, c.as_tensor())?, 21);
    let data = vm.data().lock().unwrap().clone();
    let mut vars: Vec<(&str, &Var)> = data.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("sample", &x));
    vars.push(("encoder_hidden_states", &c));
    let opts = GradCheckOptions {
        max_elements_per_var: 3,
        ..Default::default()
    };
    let report = gradcheck(&vars, loss, &opts).unwrap();
    assert!(report.passed(1e-5), "{report}");
    assert!(report.missing.is_empty(), "{:?}", report.missing);
}

fn tiny_vae(vm: &VarMap, dtype: DType, ch: &[usize], groups: usize) -> AutoencoderKL {
    let cfg = VaeConfig {
        block_out_channels: ch.to_vec(),
        down_block_types: vec!["DownEncoderBlock2D".into(); ch.len()],
        up_block_types: vec!["UpDecoderBlock2D".into(); ch.len()],
        norm_num_groups: groups,
        latent_channels: 2,
        ..VaeConfig::default()
    };
    AutoencoderKL::new(VarBuilder::from_varmap(vm, dtype, &Device::Cpu), &cfg).unwrap()
}

#[test]
fn vae_every_parameter_gets_gradient_and_matches_finite_differences() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vae = tiny_vae(&vm, DType::F32, &[8, 16], 4);
    randomize(&vm, 4, 0.5);
    let x = seeded_uniform((2, 3, 8, 8), 31, -1.0, 1.0, DType::F32, &dev).unwrap();
    let noise = seeded_uniform((2, 2, 4, 4), 32, -1.0, 1.0, DType::F32, &dev).unwrap();
    let post = vae.encode(&x).unwrap();
    let rec = vae.decode(&post.sample(&noise).unwrap()).unwrap();
    assert_eq!(rec.dims(), x.dims());
    let loss = (nn::mse(&rec, &x).unwrap() + post.logvar.mean_all().unwrap()).unwrap();
    nn::check_all_vars_get_gradient(&loss, &vm).unwrap();

    let vm = VarMap::new();
    let vae = tiny_vae(&vm, DType::F64, &[4, 4], 2);
    randomize(&vm, 5, 0.8);
    let x =
        Var::from_tensor(&seeded_uniform((1, 3, 4, 4), 33, -1.0, 1.0, DType::F64, &dev).unwrap())
            .unwrap();
    let noise = seeded_uniform((1, 2, 2, 2), 34, -1.0, 1.0, DType::F64, &dev).unwrap();
    let loss = || {
        let post = vae.encode(x.as_tensor())?;
        weighted_sum_loss(&vae.decode(&post.sample(&noise)?)?, 35)
    };
    let data = vm.data().lock().unwrap().clone();
    let mut vars: Vec<(&str, &Var)> = data.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("sample", &x));
    let opts = GradCheckOptions {
        max_elements_per_var: 3,
        ..Default::default()
    };
    let report = gradcheck(&vars, loss, &opts).unwrap();
    assert!(report.passed(1e-5), "{report}");
}

#[test]
fn unet_fine_tunes_from_checkpoint_through_trainable_var_builder() {
    let dev = Device::Cpu;
    let dir = unet_common::fixture("unet_a");
    let t = unet_common::io("unet_a");
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let w = nn::Weights::open(&dir).unwrap();
    let vm = VarMap::new();
    let unet =
        UNet2DConditionModel::new(w.trainable_var_builder(&vm, DType::F32, &dev), &cfg).unwrap();
    assert_eq!(
        vm.all_vars().len(),
        w.len(),
        "every checkpoint tensor becomes a Var"
    );
    let out = unet
        .forward(&t["sample"], &t["timestep"], &t["encoder_hidden_states"])
        .unwrap();
    unet_common::assert_close(&out, &t["out_sample"], "trainable unet_a");
    let loss = nn::mse(&out, &out.zeros_like().unwrap()).unwrap();
    nn::check_all_vars_get_gradient(&loss, &vm).unwrap();
}
