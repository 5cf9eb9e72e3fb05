//! Stage-2 losses: L_gen against a hand computation and finite differences, target masks,
//! L_align and the diffusion variant backpropagating into Mapper_LDM.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use models::mappers::{MapperLdm, MapperLdmConfig};
use models::stage2_losses::{
    diffusion_align_loss, lalign_loss, lgen_loss, target_mask, LgenTargets,
};
use nn::gradcheck::seeded_uniform;
use nn::{gradcheck, GradCheckOptions};

#[test]
fn llm_lgen_is_masked_shifted_cross_entropy() {
    let dev = Device::Cpu;
    let logits = seeded_uniform((1, 4, 5), 1, -2.0, 2.0, DType::F64, &dev).unwrap();
    let ids = Tensor::new(&[[0i64, 3, 1, 4]], &dev).unwrap();
    let mask = Tensor::new(&[[0f32, 1., 0., 1.]], &dev).unwrap();
    let got = lgen_loss(&logits, &ids, &mask)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let l: Vec<Vec<f64>> = logits.squeeze(0).unwrap().to_vec2().unwrap();
    let nll = |t: usize, id: usize| {
        let lse = l[t].iter().map(|x| x.exp()).sum::<f64>().ln();
        lse - l[t][id]
    };
    let want = (nll(0, 3) + nll(2, 4)) / 2.0;
    assert!((got - want).abs() < 1e-10, "{got} vs {want}");
    let none = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
    assert!(lgen_loss(&logits, &ids, &none).is_err());
}

#[test]
fn llm_lgen_gradcheck() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&seeded_uniform((2, 3, 6), 2, -1.0, 1.0, DType::F64, &dev).unwrap())
        .unwrap();
    let ids = Tensor::new(&[[1i64, 5, 2], [0, 4, 4]], &dev).unwrap();
    let mask = Tensor::new(&[[0f32, 1., 1.], [0., 0., 1.]], &dev).unwrap();
    let opts = GradCheckOptions::default();
    let r = gradcheck(
        &[("logits", &x)],
        || lgen_loss(x.as_tensor(), &ids, &mask),
        &opts,
    )
    .unwrap();
    assert!(r.passed(1e-5), "{r}");
}

#[test]
fn llm_target_masks_select_img_or_caption_and_first_img() {
    let dev = Device::Cpu;
    let all = target_mask(8, &[5, 6, 7], 1..4, LgenTargets::AllImg, &dev).unwrap();
    assert_eq!(
        all.to_vec2::<f32>().unwrap()[0],
        vec![0., 0., 0., 0., 0., 1., 1., 1.]
    );
    let authors = target_mask(8, &[5, 6, 7], 1..4, LgenTargets::CaptionAndFirstImg, &dev).unwrap();
    assert_eq!(
        authors.to_vec2::<f32>().unwrap()[0],
        vec![0., 1., 1., 1., 0., 1., 0., 0.]
    );
    assert!(target_mask(4, &[5], 0..0, LgenTargets::AllImg, &dev).is_err());
}

fn tiny_mapper(vm: &VarMap) -> MapperLdm {
    let vb = VarBuilder::from_varmap(vm, DType::F32, &Device::Cpu);
    let c = MapperLdmConfig {
        in_dim: 6,
        d_model: 8,
        heads: 2,
        encoder_layers: 1,
        decoder_layers: 1,
        ff_dim: 12,
        num_queries: 3,
        out_dim: 5,
        eps: 1e-5,
    };
    MapperLdm::new(c, vb.pp("model.gen_text_hidden_fcs.0")).unwrap()
}

#[test]
fn mapper_lalign_and_diffusion_loss_reach_every_mapper_parameter() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let m = tiny_mapper(&vm);
    let h = seeded_uniform((1, 2, 6), 1, -1.0, 1.0, DType::F32, &dev).unwrap();
    let e = seeded_uniform((1, 2, 6), 2, -1.0, 1.0, DType::F32, &dev).unwrap();
    let target = seeded_uniform((1, 3, 5), 3, -1.0, 1.0, DType::F32, &dev).unwrap();
    let out = m.forward(&h, &e).unwrap();
    let l = lalign_loss(&out, &target).unwrap();
    nn::check_all_vars_get_gradient(&l, &vm).unwrap();
    assert!(lalign_loss(&out, &target.narrow(1, 0, 2).unwrap()).is_err());

    // A stand-in "frozen UNet": a fixed linear map of the condition.
    let w = seeded_uniform((5, 4), 4, -1.0, 1.0, DType::F32, &dev).unwrap();
    let unet = |cond: &Tensor| cond.broadcast_matmul(&w);
    let noise = seeded_uniform((1, 3, 4), 5, -1.0, 1.0, DType::F32, &dev).unwrap();
    let l = diffusion_align_loss(&out, unet, &noise).unwrap();
    nn::check_all_vars_get_gradient(&l, &vm).unwrap();
    assert!(diffusion_align_loss(&out, unet, &noise.narrow(2, 0, 2).unwrap()).is_err());
}
