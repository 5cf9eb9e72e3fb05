//! AutoencoderKL parity against diffusers: encode (mean, clamped logvar) and decode for two
//! tiny configs, one saved with the legacy `query`/`key`/`value`/`proj_attn` names; plus the
//! `run_vae_encode` / `run_vae_decode` conformance functions.

mod unet_common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use models::vae::conformance::{run_vae_decode, run_vae_encode};
use models::vae::AutoencoderKL;
use unet_common::{assert_close, fixture, io};

fn parity(name: &str) {
    let dev = Device::Cpu;
    let t = io(name);
    let vae = AutoencoderKL::load(&fixture(name), DType::F32, &dev).unwrap();
    let post = vae.encode(&t["sample"]).unwrap();
    assert_close(&post.mean, &t["mean"], &format!("{name} mean"));
    assert_close(&post.logvar, &t["logvar"], &format!("{name} logvar"));
    let dec = vae.decode(&t["latent"]).unwrap();
    assert_close(&dec, &t["decoded"], &format!("{name} decode"));
}

#[test]
fn vae_a_matches_diffusers() {
    parity("vae_a");
}

#[test]
fn vae_b_legacy_attention_names_matches_diffusers() {
    parity("vae_b");
    let vae = AutoencoderKL::load(&fixture("vae_b"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scaling_factor(), 0.5);
    assert_eq!(vae.config().downscale(), 4);
}

#[test]
fn vae_posterior_sample_uses_given_noise() {
    let dev = Device::Cpu;
    let mean = Tensor::new(&[[1f32, 2.0]], &dev).unwrap();
    let logvar = Tensor::new(&[[0f32, 100.0]], &dev).unwrap();
    let moments = Tensor::cat(&[mean, logvar], 1)
        .unwrap()
        .reshape((1, 2, 1, 2))
        .unwrap();
    let post = models::vae::DiagonalGaussian::from_moments(&moments).unwrap();
    // logvar 100 is clamped to 20.
    let lv: Vec<f32> = post.logvar.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(lv, [0.0, 20.0]);
    let noise = Tensor::ones((1, 1, 1, 2), DType::F32, &dev).unwrap();
    let s: Vec<f32> = post
        .sample(&noise)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!((s[0] - 2.0).abs() < 1e-6 && (s[1] - (2.0 + 10f32.exp())).abs() < 1e-1);
}

#[test]
fn vae_conformance_functions() {
    let dev = Device::Cpu;
    let t = io("vae_a");
    let inputs = HashMap::from([("sample".to_string(), t["sample"].clone())]);
    let out = run_vae_encode(&fixture("vae_a"), &inputs, DType::F32, &dev).unwrap();
    assert_close(&out["mean"], &t["mean"], "run_vae_encode mean");
    assert_close(&out["logvar"], &t["logvar"], "run_vae_encode logvar");
    let inputs = HashMap::from([("latent".to_string(), t["latent"].clone())]);
    let out = run_vae_decode(&fixture("vae_a"), &inputs, DType::F32, &dev).unwrap();
    assert_close(&out["sample"], &t["decoded"], "run_vae_decode");
    let err = run_vae_decode(&fixture("vae_a"), &HashMap::new(), DType::F32, &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("latent"), "{err}");
}
