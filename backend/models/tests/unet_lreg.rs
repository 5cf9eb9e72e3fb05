//! L_reg (Eq. 2-3) and the antialiased mask resize against the authors' PyTorch code
//! (FastComposer `get_object_localization_loss` + balanced loss, `F.interpolate(antialias)`),
//! plus its gradient.

mod unet_common;

use candle_core::{DType, Device, Var};
use models::lreg::{lreg_layer, lreg_loss, resize_masks, CharacterTokens};
use models::unet::CapturedAttention;
use nn::gradcheck::{gradcheck, seeded_uniform, GradCheckOptions};
use unet_common::{assert_close, io};

fn chars() -> CharacterTokens {
    CharacterTokens::from_lists(&[vec![1, 4], vec![7]])
}

#[test]
fn unet_lreg_resize_matches_torch_antialias() {
    let t = io("unet_lreg");
    for s in [8, 4, 5] {
        let got = resize_masks(&t["masks"], s, s).unwrap();
        assert_close(&got, &t[&format!("resized_{s}")], &format!("resize {s}"));
    }
    let got = resize_masks(&t["masks"], 32, 27).unwrap();
    assert_close(&got, &t["resized_up_32x27"], "upsample 32x27");
}

#[test]
fn unet_lreg_matches_authors_loss() {
    let t = io("unet_lreg");
    let mut maps = Vec::new();
    for i in 0..2 {
        let probs = &t[&format!("probs_{i}")];
        let l = lreg_layer(probs, &t["masks"], &chars(), None).unwrap();
        assert_close(
            &l.reshape(1).unwrap(),
            &t[&format!("loss_{i}")],
            &format!("layer {i}"),
        );
        maps.push(CapturedAttention {
            layer: format!("l{i}"),
            probs: probs.clone(),
        });
    }
    let l = lreg_loss(&maps, &t["masks"], &chars()).unwrap();
    assert_close(&l.reshape(1).unwrap(), &t["loss_mean"], "mean over layers");
}

#[test]
fn unet_lreg_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let t = io("unet_lreg");
    let masks = t["masks"].to_dtype(DType::F64).unwrap();
    let logits =
        Var::from_tensor(&seeded_uniform((2, 2, 16, 9), 5, -2.0, 2.0, DType::F64, &dev).unwrap())
            .unwrap();
    let loss = || {
        let probs = nn::softmax_last_dim(logits.as_tensor())?;
        lreg_layer(&probs, &masks, &chars(), None)
    };
    let report = gradcheck(&[("logits", &logits)], loss, &GradCheckOptions::default()).unwrap();
    assert!(report.passed(1e-5), "{report}");
    assert!(report.missing.is_empty());
}
