//! Char-LDM sampling on a tiny randomly initialised pipeline: determinism, progress and
//! cancellation, delayed conditioning, guidance 1.0, the fused condition, size checks.

mod unet_common;

use std::cell::Cell;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use models::char_ldm::{
    is_cancelled, seeded_normal, to_rgb_image, Cancelled, CharLdm, SampleOptions,
};
use models::clip::{
    ClipImageProcessor, ClipTextConfig, ClipTextModel, ClipTokenizer, ClipVisionConfig,
    ClipVisionModel,
};
use models::fuse::FuseModule;
use models::schedulers::{self, SchedulerConfig, SchedulerKind};
use models::unet::{OneOrMany, UNet2DConditionModel, UNetConfig};
use models::vae::{AutoencoderKL, VaeConfig};
use rand::SeedableRng;
use unet_common::randomize;

const D: usize = 32;
const CAPTION: &str = "Fred and Wilma talk in the living room.";

fn tiny() -> (CharLdm, VarMap) {
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let tok = ClipTokenizer::from_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip_tokenizer"),
    )
    .unwrap();
    let tcfg = ClipTextConfig {
        vocab_size: tok.vocab_size(),
        hidden_size: D,
        intermediate_size: 2 * D,
        projection_dim: D,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        max_position_embeddings: 77,
        eos_token_id: tok.eos_id() as i64,
        bos_token_id: tok.bos_id() as i64,
        pad_token_id: tok.pad_id() as i64,
        ..ClipTextConfig::default()
    };
    let text = ClipTextModel::new(vb.pp("text"), &tcfg).unwrap();
    let vcfg = ClipVisionConfig {
        hidden_size: D,
        intermediate_size: 2 * D,
        projection_dim: D,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        image_size: 16,
        patch_size: 8,
        ..ClipVisionConfig::default()
    };
    // Create the projection first so that the tower picks it up.
    vb.pp("vision")
        .get((D, D), "visual_projection.weight")
        .unwrap();
    let vision = ClipVisionModel::new(vb.pp("vision"), &vcfg).unwrap();
    let fuse = FuseModule::new(vb.pp("fuse"), D).unwrap();
    let ucfg = UNetConfig {
        sample_size: Some(8),
        block_out_channels: vec![16, 32],
        layers_per_block: OneOrMany::One(1),
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        attention_head_dim: OneOrMany::One(8),
        cross_attention_dim: OneOrMany::One(D),
        norm_num_groups: 8,
        ..UNetConfig::default()
    };
    let unet = UNet2DConditionModel::new(vb.pp("unet"), &ucfg).unwrap();
    let vae_cfg = VaeConfig {
        block_out_channels: vec![8, 16],
        down_block_types: vec!["DownEncoderBlock2D".into(); 2],
        up_block_types: vec!["UpDecoderBlock2D".into(); 2],
        norm_num_groups: 4,
        latent_channels: 4,
        ..VaeConfig::default()
    };
    let vae = AutoencoderKL::new(vb.pp("vae"), &vae_cfg).unwrap();
    randomize(&vm, 7, 0.5);
    let ldm = CharLdm::from_parts(
        tok,
        text,
        Some(vision),
        ClipImageProcessor::for_image_size(16),
        Some(fuse),
        unet,
        vae,
        SchedulerConfig::stable_diffusion_v1_5(),
        dev,
    );
    (ldm, vm)
}

fn opts(steps: usize, seed: u64) -> SampleOptions {
    SampleOptions {
        steps,
        guidance_scale: 5.0,
        start_merge_step: steps / 2,
        seed,
        height: 16,
        width: 16,
        scheduler: SchedulerKind::Ddim,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

struct Conds {
    text: Tensor,
    other: Tensor,
    neg: Tensor,
}

fn conds(ldm: &CharLdm) -> Conds {
    Conds {
        text: ldm.text_condition(CAPTION).unwrap(),
        other: ldm
            .text_condition("Barney waits near the snowy house.")
            .unwrap(),
        neg: ldm.negative_condition().unwrap(),
    }
}

fn run(ldm: &CharLdm, c: &Conds, cond: Option<&Tensor>, o: &SampleOptions) -> Tensor {
    ldm.sample(&c.text, cond, &c.neg, o, &mut |_, _| {}, &|| false)
        .unwrap()
}

#[test]
fn seeds_are_deterministic_for_every_scheduler() {
    let (ldm, _vm) = tiny();
    let c = conds(&ldm);
    for kind in [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddpm,
    ] {
        let mut o = opts(4, 1);
        o.scheduler = kind;
        let a = run(&ldm, &c, Some(&c.other), &o);
        assert_eq!(a.dims(), [3, 16, 16]);
        let mn = a
            .flatten_all()
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let mx = a
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (0.0..=1.0).contains(&mn) && (0.0..=1.0).contains(&mx),
            "{kind:?}"
        );
        let b = run(&ldm, &c, Some(&c.other), &o);
        assert_eq!(max_diff(&a, &b), 0.0, "{kind:?}: same seed");
        o.seed = 2;
        let d = run(&ldm, &c, Some(&c.other), &o);
        assert!(max_diff(&a, &d) > 1e-6, "{kind:?}: different seed");
    }
    let img = to_rgb_image(&run(&ldm, &c, None, &opts(2, 3))).unwrap();
    assert_eq!(img.dimensions(), (16, 16));
}

#[test]
fn progress_and_cancellation() {
    let (ldm, _vm) = tiny();
    let c = conds(&ldm);
    let o = opts(5, 0);
    let mut calls = Vec::new();
    ldm.sample(
        &c.text,
        None,
        &c.neg,
        &o,
        &mut |i, n| calls.push((i, n)),
        &|| false,
    )
    .unwrap();
    assert_eq!(calls, (1..=5).map(|i| (i, 5)).collect::<Vec<_>>());

    let mut calls = Vec::new();
    let checks = Cell::new(0);
    let cancel = || {
        checks.set(checks.get() + 1);
        checks.get() == 3
    };
    let err = ldm
        .sample(
            &c.text,
            None,
            &c.neg,
            &o,
            &mut |i, n| calls.push((i, n)),
            &cancel,
        )
        .unwrap_err();
    assert!(err.downcast_ref::<Cancelled>().is_some(), "{err:#}");
    assert!(is_cancelled(&err));
    assert_eq!(calls, vec![(1, 5), (2, 5)]);
}

#[test]
fn delayed_conditioning_and_guidance_one() {
    let (ldm, _vm) = tiny();
    let c = conds(&ldm);
    let mut o = opts(4, 5);
    o.start_merge_step = 4;
    let text_only = run(&ldm, &c, None, &o);
    assert_eq!(
        max_diff(&text_only, &run(&ldm, &c, Some(&c.other), &o)),
        0.0
    );
    o.start_merge_step = 10;
    assert_eq!(
        max_diff(&text_only, &run(&ldm, &c, Some(&c.other), &o)),
        0.0
    );
    o.start_merge_step = 0;
    assert!(max_diff(&text_only, &run(&ldm, &c, Some(&c.other), &o)) > 1e-6);
    o.start_merge_step = 2;
    let merged = run(&ldm, &c, Some(&c.other), &o);
    assert!(max_diff(&text_only, &merged) > 1e-6);

    // Guidance 1.0: the conditional prediction only, as a manual loop computes it.
    o.guidance_scale = 1.0;
    let got = run(&ldm, &c, Some(&c.other), &o);
    let mut sched =
        schedulers::build(o.scheduler, SchedulerConfig::stable_diffusion_v1_5()).unwrap();
    sched.set_timesteps(o.steps).unwrap();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(o.seed);
    let shape = (1, 4, 8, 8);
    let mut x = (seeded_normal(&mut rng, shape, &Device::Cpu, DType::F32).unwrap()
        * sched.init_noise_sigma())
    .unwrap();
    for (i, t) in sched.timesteps().to_vec().into_iter().enumerate() {
        let ctx = if i < o.start_merge_step {
            &c.text
        } else {
            &c.other
        };
        let inp = sched.scale_model_input(&x, t).unwrap();
        let eps = ldm
            .unet
            .forward(&inp, &Tensor::new(t as f32, &Device::Cpu).unwrap(), ctx)
            .unwrap();
        let noise = seeded_normal(&mut rng, shape, &Device::Cpu, DType::F32).unwrap();
        x = sched.step(&eps, t, &x, Some(&noise)).unwrap();
    }
    let img = ldm
        .vae
        .decode(&(x / ldm.vae.scaling_factor()).unwrap())
        .unwrap();
    let want = ((img.squeeze(0).unwrap() + 1.0).unwrap() / 2.0)
        .unwrap()
        .clamp(0f32, 1f32)
        .unwrap();
    assert!(max_diff(&got, &want) < 1e-5);
    assert!(max_diff(&got, &merged) > 1e-6);
}

#[test]
fn fused_condition_replaces_only_the_name_tokens() {
    let (ldm, _vm) = tiny();
    let text = ldm.text_condition(CAPTION).unwrap();
    assert_eq!(text.dims(), [1, 77, D]);
    let portrait =
        image::RgbImage::from_fn(20, 24, |x, y| image::Rgb([x as u8 * 10, y as u8 * 9, 77]));
    let fred = ldm.portrait_embedding(&portrait).unwrap();
    assert_eq!(fred.dims(), [D]);
    let wilma = Tensor::ones(D, DType::F32, &Device::Cpu).unwrap();
    let barney = Tensor::zeros(D, DType::F32, &Device::Cpu).unwrap();
    let fred_at = ldm.tokenizer.last_token_index(CAPTION, "Fred").unwrap();
    let wilma_at = ldm.tokenizer.last_token_index(CAPTION, "Wilma").unwrap();
    let chars = [
        ("Fred".to_string(), &fred),
        ("Barney".to_string(), &barney), // not in the caption: skipped
        ("Wilma".to_string(), &wilma),
    ];
    let fused = ldm.fused_condition(CAPTION, &chars).unwrap();
    assert_eq!(fused.dims(), [1, 77, D]);
    for i in 0..77 {
        let d = max_diff(
            &fused.narrow(1, i, 1).unwrap(),
            &text.narrow(1, i, 1).unwrap(),
        );
        if i == fred_at || i == wilma_at {
            assert!(d > 1e-4, "row {i} should be fused");
        } else {
            assert_eq!(d, 0.0, "row {i} should be the text condition");
        }
    }
    // No character named: the text condition itself.
    let none = ldm
        .fused_condition(CAPTION, &[("Barney", &barney)])
        .unwrap();
    assert_eq!(max_diff(&none, &text), 0.0);
}

#[test]
fn bad_sizes_are_refused_clearly() {
    let (ldm, _vm) = tiny();
    let c = conds(&ldm);
    let mut o = opts(2, 0);
    o.height = 15;
    let err = ldm
        .sample(&c.text, None, &c.neg, &o, &mut |_, _| {}, &|| false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("multiple of the VAE downscale factor 2"),
        "{err}"
    );
    assert!(!is_cancelled(&anyhow::anyhow!(err)));
}
