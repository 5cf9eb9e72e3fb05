//! UNet benchmarks, the Rust side of `tools/bench/run.sh` (see docs/BENCHMARKS.md).
//!
//! `cargo run -p models --profile numeric --example bench_unet -- [sd15|train|toy|toy_unet|vae|stage2|ops|all] [iters]`
//! prints one JSON line per case:
//! * `sd15`: the SD 1.5 UNet architecture (random weights, f32), forward at 32x32 latents,
//!   batch 1, 77x768 context;
//! * `train`: forward + backward + AdamW step of the calibration config (channels (64, 128),
//!   1 layer per block, cross-attention 256, 8 heads), batch 32, 8x8 latents, 77 tokens; then
//!   the forward pass alone (graph-building, as in training) to split the step's time; and the
//!   toy bundle's own UNet (the same with cross-attention 128) and toy VAE ((32, 32, 64, 64),
//!   f = 8) training steps at batch 32 on 8x8 latents / 64x64 frames (also alone as `toy_unet`
//!   and `vae`);
//! * `stage2`: the toy bundle's stage-2 step (frozen toy OPT, `[IMG]` rows, both mappers).
//!
//! Each line also carries the process's peak resident memory (`VmHWM`) and its resident memory
//! before the first case, in MiB: run one case per process to read a case's own peak.
//!
//! Threads: candle's CPU kernels follow `RAYON_NUM_THREADS` (run.sh sets 2).

#[path = "common/frozen.rs"]
mod frozen;
#[path = "common/memory.rs"]
mod memory;

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

/// Resident memory before any case ran (the binary and its libraries), set in `main`.
static BASE_RSS_MIB: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

fn report(case: &str, params: usize, times: &[(f64, f64)]) {
    let n = times.len() as f64;
    let mean = times.iter().map(|t| t.0).sum::<f64>() / n;
    let min = times.iter().map(|t| t.0).fold(f64::INFINITY, f64::min);
    let cpu_mean = times.iter().map(|t| t.1).sum::<f64>() / n;
    let cpu_min = times.iter().map(|t| t.1).fold(f64::INFINITY, f64::min);
    println!(
        "{{\"impl\":\"candle\",\"case\":\"{case}\",\"params\":{params},\"mean_s\":{mean:.4},\"min_s\":{min:.4},\"cpu_mean_s\":{cpu_mean:.4},\"cpu_min_s\":{cpu_min:.4},\"iters\":{},\"peak_rss_mib\":{:.0},\"base_rss_mib\":{:.0}}}",
        times.len(),
        memory::status_mib("VmHWM:"),
        BASE_RSS_MIB.get().copied().unwrap_or(0.0),
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

/// The toy bundle's stage-2 training step, as `train::stages::stage2` takes it: the frozen toy
/// OPT (vocab 634, d 128, 4 layers, 4 heads, FFN 512) over 32 prompts of 151 positions (BOS; 7
/// history frames of 2 marker ids, 4 Mapper_LLM visual tokens and 12 caption ids; 16 ids of the
/// current caption and markers; 8 `[IMG]` tokens), L_gen over the `[IMG]` targets, Mapper_LDM
/// (d_model 128, 2 + 2 layers, FFN 512, 77 queries -> 128) against a (32, 77, 128) target by
/// MSE, backward into the `[IMG]` rows, Mapper_LLM and Mapper_LDM, AdamW, and the rows'
/// renormalisation. `tools/bench/bench_unet.py stage2` builds the same in PyTorch.
fn bench_stage2(dev: &Device, iters: usize) -> Result<()> {
    use candle_core::IndexOp;
    use models::llm::{ImgTokens, LogitsFor};
    use models::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
    use models::prompt::{Prompt, Segment};
    use models::stage2_losses::{lalign_loss, lgen_loss, target_mask, LgenTargets};
    let (vocab, d, b, r, history, m) = (634u32, 128usize, 32usize, 8usize, 7usize, 4usize);
    let cfg: models::llm::OptConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": vocab, "hidden_size": d, "ffn_dim": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "max_position_embeddings": 256, "word_embed_proj_dim": d,
    }))?;
    // The LLM is frozen: built once on Vars, then rebuilt on plain tensors so that backward
    // computes no gradient for it (as loading it from safetensors does in training).
    let lm_vars = VarMap::new();
    models::llm::Opt::new(
        &cfg,
        VarBuilder::from_varmap(&lm_vars, DType::F32, dev).pp("model"),
    )?;
    let lm = models::llm::CausalLm::Opt(models::llm::Opt::new(
        &cfg,
        VarBuilder::from_tensors(frozen::detached(&lm_vars), DType::F32, dev).pp("model"),
    )?);
    let vm = VarMap::new();
    let img = ImgTokens::init(&lm, r, vocab, 0)?;
    img.register(&vm);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let mapper_llm = MapperLlm::new(
        MapperLlmConfig {
            vision_dim: 128,
            num_tokens: m,
            llm_dim: d,
        },
        vb.pp("model.visual_embeddings"),
    )?;
    let mapper_ldm = MapperLdm::new(
        MapperLdmConfig {
            in_dim: d,
            d_model: 128,
            heads: 4,
            encoder_layers: 2,
            decoder_layers: 2,
            ff_dim: 512,
            num_queries: 77,
            out_dim: 128,
            eps: 1e-5,
        },
        vb.pp("model.gen_text_hidden_fcs.0"),
    )?;
    let mut opt = adamw(&vm)?;
    // Deterministic text ids in 3..vocab; the layout is what build_prompt makes.
    let mut next = 7u32;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                next = next.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                3 + (next >> 8) % (vocab - 3)
            })
            .collect()
    };
    let prompts: Vec<Prompt> = (0..b)
        .map(|_| {
            let mut segments = vec![Segment::Text(vec![2])];
            for k in 0..history {
                segments.push(Segment::Text(ids(2)));
                segments.push(Segment::Visual { frame: k, len: m });
                segments.push(Segment::Text(ids(12)));
            }
            segments.push(Segment::Text(ids(16)));
            let img_start = 1 + history * (2 + m + 12) + 16;
            segments.push(Segment::Img((vocab..vocab + r as u32).collect()));
            Prompt {
                segments,
                len: img_start + r,
                img_positions: (img_start..img_start + r).collect(),
                current_caption: img_start - 14..img_start - 2,
                first_kept_frame: 0,
                truncated_caption_tokens: 0,
            }
        })
        .collect();
    let pooled = Tensor::randn(0f32, 1., (b * history, 128), dev)?;
    let target = Tensor::randn(0f32, 1., (b, 77, 128), dev)?;
    let len = prompts[0].len;
    let times = time(2, iters, || {
        let visual = mapper_llm.forward(&pooled)?;
        let mut embeds = Vec::with_capacity(b);
        let mut rows = Vec::with_capacity(b);
        let mut masks = Vec::with_capacity(b);
        for (i, p) in prompts.iter().enumerate() {
            let v: Vec<Tensor> = (0..history)
                .map(|k| visual.i(i * history + k))
                .collect::<candle_core::Result<_>>()?;
            embeds.push(p.embed(&lm, &img, &v)?);
            rows.push(p.ids_tensor(dev)?);
            masks.push(target_mask(
                len,
                &p.img_positions,
                p.current_caption.clone(),
                LgenTargets::AllImg,
                dev,
            )?);
        }
        let embeds = Tensor::cat(&embeds, 0)?;
        let out = lm.forward_embeds_with(&embeds, &mut lm.new_cache(), None, LogitsFor::All)?;
        let logits = img.extend_logits(&out.logits, &out.last_hidden_state)?;
        let lgen = lgen_loss(&logits, &Tensor::cat(&rows, 0)?, &Tensor::cat(&masks, 0)?)?;
        let start = prompts[0].img_range().start;
        let hidden = out.last_hidden_state.narrow(1, start, r)?;
        let embs = img
            .embeddings(DType::F32)?
            .unsqueeze(0)?
            .broadcast_as(hidden.shape())?
            .contiguous()?;
        let conds = mapper_ldm.forward(&hidden, &embs)?;
        let loss = (lalign_loss(&conds, &target)? + lgen)?;
        opt.backward_step(&loss)?;
        img.renormalise()?;
        Ok(())
    })?;
    report("stage2_step_toy_b32_151", num_params(&vm), &times);
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
    BASE_RSS_MIB.get_or_init(|| memory::status_mib("VmRSS:"));
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
    if which == "stage2" || which == "all" {
        bench_stage2(&dev, iters)?;
    }
    if which == "ops" {
        bench_ops(&dev, iters)?;
    }
    if which == "sd15" || which == "all" {
        bench_sd15(&dev, iters)?;
    }
    Ok(())
}
