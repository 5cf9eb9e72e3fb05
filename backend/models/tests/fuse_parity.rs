//! FuseModule parity against a PyTorch re-implementation of the authors' `postfuse_module`,
//! and its gradients (finite differences in f64; every parameter and input gets a gradient).

mod unet_common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use models::fuse::{CharacterSlot, FuseModule};
use nn::gradcheck::{gradcheck, seeded_uniform, weighted_sum_loss, GradCheckOptions};
use unet_common::{assert_close, fixture, io, randomize};

fn slots(images: &Tensor) -> Vec<Vec<CharacterSlot>> {
    let s = |t: usize, i: usize| CharacterSlot {
        token_index: t,
        image_embedding: images.get(i).unwrap(),
    };
    vec![vec![s(2, 0), s(6, 1)], vec![s(4, 2)]]
}

#[test]
fn fuse_module_matches_authors_pytorch_module() {
    let dev = Device::Cpu;
    let t = io("unet_fuse_module");
    let w = nn::Weights::open(fixture("unet_fuse_module").join("model.safetensors")).unwrap();
    let fuse = FuseModule::new(w.var_builder(DType::F32, &dev), 16).unwrap();
    let out = fuse
        .fuse_into_text(&t["text"], &slots(&t["images"]))
        .unwrap();
    assert_close(&out, &t["fused_text"], "fused text");
    // Untouched positions are bit-identical to the text-encoder output.
    let a: Vec<f32> = out.get(1).unwrap().get(0).unwrap().to_vec1().unwrap();
    let b: Vec<f32> = t["text"].get(1).unwrap().get(0).unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
}

#[test]
fn fuse_into_text_rejects_bad_slots() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let fuse = FuseModule::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), 8).unwrap();
    let text = Tensor::zeros((1, 5, 8), DType::F32, &dev).unwrap();
    let img = Tensor::zeros(8, DType::F32, &dev).unwrap();
    let slot = |t| CharacterSlot {
        token_index: t,
        image_embedding: img.clone(),
    };
    assert!(fuse.fuse_into_text(&text, &[vec![slot(5)]]).is_err());
    assert!(fuse
        .fuse_into_text(&text, &[vec![slot(1), slot(1)]])
        .is_err());
    assert!(fuse
        .fuse_into_text(&text, &[(0..5).map(slot).collect()])
        .is_err());
    let same = fuse.fuse_into_text(&text, &[vec![]]).unwrap();
    assert_eq!(same.dims(), text.dims());
}

#[test]
fn fuse_module_gradients_match_finite_differences() {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let fuse = FuseModule::new(VarBuilder::from_varmap(&vm, DType::F64, &dev), 6).unwrap();
    randomize(&vm, 3, 1.0);
    let text =
        Var::from_tensor(&seeded_uniform((2, 8, 6), 1, -1.0, 1.0, DType::F64, &dev).unwrap())
            .unwrap();
    let images =
        Var::from_tensor(&seeded_uniform((3, 6), 2, -1.0, 1.0, DType::F64, &dev).unwrap()).unwrap();
    let loss = || {
        let out = fuse.fuse_into_text(text.as_tensor(), &slots(images.as_tensor()))?;
        weighted_sum_loss(&out, 9)
    };
    nn::check_all_vars_get_gradient(&loss().unwrap(), &vm).unwrap();
    let data = vm.data().lock().unwrap().clone();
    let mut vars: Vec<(&str, &Var)> = data.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("text", &text));
    vars.push(("images", &images));
    let report = gradcheck(&vars, loss, &GradCheckOptions::default()).unwrap();
    assert!(report.passed(1e-5), "{report}");
}
