//! UNet benchmarks, the Rust side of `tools/bench/run.sh` (see docs/BENCHMARKS.md).
//!
//! `cargo run -p models --profile numeric --example bench_unet -- [sd15|train|all] [iters]`
//! prints one JSON line per case:
//! * `sd15`: the SD 1.5 UNet architecture (random weights, f32), forward at 32x32 latents,
//!   batch 1, 77x768 context;
//! * `train`: forward + backward + AdamW step of the calibration config (channels (64, 128),
//!   1 layer per block, cross-attention 256, 8 heads), batch 32, 8x8 latents, 77 tokens; then
//!   the forward pass alone (graph-building, as in training) to split the step's time; and the
//!   toy bundle's own UNet (the same with cross-attention 128) and toy VAE ((32, 32, 64, 64),
//!   f = 8) training steps at batch 32 on 8x8 latents / 64x64 frames.
//!
//! Threads: candle's CPU kernels follow `RAYON_NUM_THREADS` (run.sh sets 2).

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{ParamsAdamW, VarBuilder, VarMap};
use models::unet::{OneOrMany, UNet2DConditionModel, UNetConfig};
use models::vae::{AutoencoderKL, VaeConfig};
use nn::optim::AdamW;

fn train_config() -> UNetConfig {
    UNetConfig {
        sample_size: Some(8),
        block_out_channels: vec![64, 128],
        layers_per_block: OneOrMany::One(1),
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        cross_attention_dim: OneOrMany::One(256),
        attention_head_dim: OneOrMany::One(8),
        ..UNetConfig::default()
    }
}

/// CPU seconds used so far by all threads of this process (sum of `/proc/self/task/*/schedstat`;
/// 0 where unavailable). Time spent waiting for a core on a loaded machine is not counted.
fn cpu_seconds() -> f64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0.0;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    ns as f64 * 1e-9
}

/// Wall and process CPU seconds of each timed iteration.
fn time<F: FnMut() -> Result<()>>(
    warmup: usize,
    iters: usize,
    mut f: F,
) -> Result<Vec<(f64, f64)>> {
    for _ in 0..warmup {
        f()?;
    }
    let mut out = Vec::with_capacity(iters);
    for _ in 0..iters {
        let (t0, c0) = (Instant::now(), cpu_seconds());
        f()?;
        out.push((t0.elapsed().as_secs_f64(), cpu_seconds() - c0));
    }
    Ok(out)
}

fn report(case: &str, params: usize, times: &[(f64, f64)]) {
    let n = times.len() as f64;
    let mean = times.iter().map(|t| t.0).sum::<f64>() / n;
    let min = times.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
    let cpu_mean = times.iter().map(|t| t.1).sum::<f64>() / n;
    let cpu_min = times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    println!(
        "{{\"impl\":\"candle\",\"case\":\"{case}\",\"params\":{params},\"mean_s\":{mean:.4},\"min_s\":{min:.4},\"cpu_mean_s\":{cpu_mean:.4},\"cpu_min_s\":{cpu_min:.4},\"iters\":{}}}",
        times.len()
    );
}

fn num_params(vm: &VarMap) -> usize {
    vm.all_vars().iter().map(|v| v.elem_count()).sum()
}

fn bench_sd15(dev: &Device, iters: usize) -> Result<()> {
    let vm = VarMap::new();
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_varmap(&vm, DType::F32, dev),
        &UNetConfig::sd15(),
    )?;
    let x = Tensor::randn(0f32, 1., (1, 4, 32, 32), dev)?;
    let t = Tensor::new(&[999i64], dev)?;
    let c = Tensor::randn(0f32, 1., (1, 77, 768), dev)?;
    let times = time(1, iters, || {
        unet.forward(&x, &t, &c)?;
        Ok(())
    })?;
    report("sd15_fwd_32x32_b1", num_params(&vm), &times);
    Ok(())
}

fn adamw(vm: &VarMap) -> Result<AdamW> {
    Ok(AdamW::from_varmap(
        vm,
        ParamsAdamW {
            lr: 1e-4,
            weight_decay: 1e-2,
            ..Default::default()
        },
    )?)
}

fn bench_train(dev: &Device, iters: usize) -> Result<()> {
    bench_unet_train(dev, iters, &train_config(), "64_128_b32_8x8", true)
}

fn bench_toy_unet(dev: &Device, iters: usize) -> Result<()> {
    let mut cfg = train_config();
    cfg.cross_attention_dim = OneOrMany::One(128);
    bench_unet_train(dev, iters, &cfg, "toy_unet_b32_8x8", false)
}

fn bench_toy(dev: &Device, iters: usize) -> Result<()> {
    bench_toy_unet(dev, iters)?;
    bench_vae_train(dev, iters)
}

fn bench_vae_train(dev: &Device, iters: usize) -> Result<()> {
    let cfg: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "layers_per_block": 1, "latent_channels": 4, "norm_num_groups": 32, "sample_size": 64,
    }))?;
    let vm = VarMap::new();
    let vae = AutoencoderKL::new(VarBuilder::from_varmap(&vm, DType::F32, dev), &cfg)?;
    let mut opt = adamw(&vm)?;
    let b = 32;
    let x = Tensor::rand(-1f32, 1., (b, 3, 64, 64), dev)?;
    let noise = Tensor::randn(0f32, 1., (b, 4, 8, 8), dev)?;
    let times = time(2, iters, || {
        let post = vae.encode(&x)?;
        let z = post.sample(&noise)?;
        let rec = vae.decode(&z)?;
        let kl = ((post.mean.sqr()? + post.logvar.exp()?)? - 1.0)?.sub(&post.logvar)?;
        let loss = (nn::mse(&rec, &x)? + (kl.sum_all()? * (0.5e-6 / b as f64))?)?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    report("toy_vae_train_step_b32_64x64", num_params(&vm), &times);
    Ok(())
}

fn bench_unet_train(
    dev: &Device,
    iters: usize,
    cfg: &UNetConfig,
    name: &str,
    fwd_only: bool,
) -> Result<()> {
    let vm = VarMap::new();
    let unet = UNet2DConditionModel::new(VarBuilder::from_varmap(&vm, DType::F32, dev), cfg)?;
    let mut opt = adamw(&vm)?;
    let ctx = match cfg.cross_attention_dim {
        OneOrMany::One(d) => d,
        _ => anyhow::bail!("one cross-attention width expected"),
    };
    let b = 32;
    let x = Tensor::randn(0f32, 1., (b, 4, 8, 8), dev)?;
    let t = Tensor::arange(0i64, b as i64, dev)?.affine(30.0, 1.0)?;
    let c = Tensor::randn(0f32, 1., (b, 77, ctx), dev)?;
    let target = Tensor::randn(0f32, 1., (b, 4, 8, 8), dev)?;
    let times = time(2, iters, || {
        let pred = unet.forward(&x, &t, &c)?;
        let loss = nn::mse(&pred, &target)?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;
    report(&format!("train_step_{name}"), num_params(&vm), &times);
    if fwd_only {
        let times = time(1, iters, || {
            unet.forward(&x, &t, &c)?;
            Ok(())
        })?;
        report(&format!("train_fwd_only_{name}"), num_params(&vm), &times);
    }
    Ok(())
}

/// Per-op split for the analysis in docs/BENCHMARKS.md: a 3x3 128->128 convolution and a
/// 32-group GroupNorm on the `(32, 128, 8, 8)` activations of the training config, forward vs
/// forward + backward.
fn bench_ops(dev: &Device, iters: usize) -> Result<()> {
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1., (32, 128, 8, 8), dev)?)?;
    let w = candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.05, (128, 128, 3, 3), dev)?)?;
    let conv = || nn::conv::conv2d(x.as_tensor(), w.as_tensor(), 1, 1);
    let gn = || nn::group_norm(x.as_tensor(), 32, None, None, 1e-5);
    let f = time(1, iters, || {
        conv()?;
        Ok(())
    })?;
    report("op_conv3x3_128_b32_8x8_fwd", 0, &f);
    let fb = time(1, iters, || {
        conv()?.sum_all()?.backward()?;
        Ok(())
    })?;
    report("op_conv3x3_128_b32_8x8_fwd_bwd", 0, &fb);
    let f = time(1, iters, || {
        gn()?;
        Ok(())
    })?;
    report("op_groupnorm32_b32_8x8_fwd", 0, &f);
    let fb = time(1, iters, || {
        nn::gradcheck::weighted_sum_loss(&gn()?, 1)?.backward()?;
        Ok(())
    })?;
    report("op_groupnorm32_b32_8x8_fwd_bwd", 0, &fb);
    // Cross-attention core of the training config: 8 heads of 8, 64 queries, 77 keys.
    let q = Tensor::randn(0f32, 1., (32, 8, 64, 8), dev)?;
    let k = Tensor::randn(0f32, 1., (32, 8, 77, 8), dev)?;
    let f = time(1, iters, || {
        nn::scaled_dot_product_attention(&q, &k, &k, &Default::default())?;
        Ok(())
    })?;
    report("op_sdpa_b32_h8_64x77_fwd", 0, &f);
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let which = args.get(1).map(String::as_str).unwrap_or("all");
    let iters: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let dev = Device::Cpu;
    // What the training and generation commands do too (see nn::alloc).
    if std::env::var("BENCH_MALLOC_DEFAULT").is_err() {
        nn::retain_freed_memory();
    }
    if which == "train" || which == "all" {
        bench_train(&dev, iters)?;
    }
    if which == "toy" || which == "all" {
        bench_toy(&dev, iters)?;
    }
    // Single cases, for profiling.
    if which == "toy_unet" {
        bench_toy_unet(&dev, iters)?;
    }
    if which == "vae" {
        bench_vae_train(&dev, iters)?;
    }
    if which == "ops" {
        bench_ops(&dev, iters)?;
    }
    if which == "sd15" || which == "all" {
        bench_sd15(&dev, iters)?;
    }
    Ok(())
}
