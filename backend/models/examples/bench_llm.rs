//! Prefill / decode throughput of the Rust Llama and OPT (random weights, f32, CPU).
//!
//! `RAYON_NUM_THREADS=2 cargo run -p models --example bench_llm` (dev profile: candle and gemm
//! are built at opt-level 3 there too; `--release` also works)
//! (compare with `tools/bench/bench_llm.py`, same configs: d = 512, 8 layers, 8 heads,
//! vocab 32000, FFN 2048 (OPT) / 1408 (Llama, 4 kv heads), prefill 128, decode 64).

#[path = "common/frozen.rs"]
mod frozen;
#[path = "common/memory.rs"]
mod memory;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use models::llm::{CausalLm, KvCache, Llama, LlamaConfig, LogitsFor, Opt, OptConfig};

const PREFILL: usize = 128;
const DECODE: usize = 64;
const REPEATS: usize = 3;

/// A model with random weights held as plain tensors, as a loaded bundle's are. Weights built
/// as `Var`s would track gradients, and then the KV cache takes its autograd path (a new
/// concatenated tensor per step, every earlier one kept alive by the graph): half a GiB more
/// memory over 64 decode steps than a user's model ever holds.
fn build(kind: &str) -> anyhow::Result<CausalLm> {
    let vm = VarMap::new();
    build_with(kind, VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    build_with(
        kind,
        VarBuilder::from_tensors(frozen::detached(&vm), DType::F32, &Device::Cpu),
    )
}

fn build_with(kind: &str, vb: VarBuilder) -> anyhow::Result<CausalLm> {
    Ok(match kind {
        "llama" => {
            let c: LlamaConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1408,
                "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 4,
                "max_position_embeddings": 512
            }))?;
            CausalLm::Llama(Llama::new(&c, vb)?)
        }
        _ => {
            let c: OptConfig = serde_json::from_value(serde_json::json!({
                "vocab_size": 32000, "hidden_size": 512, "ffn_dim": 2048,
                "num_hidden_layers": 8, "num_attention_heads": 8, "max_position_embeddings": 512
            }))?;
            CausalLm::Opt(Opt::new(&c, vb.pp("model"))?)
        }
    })
}

/// `bench_llm [llama|opt|all]`: one model per process gives that model's own peak memory.
fn main() -> anyhow::Result<()> {
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let base_rss = memory::status_mib("VmRSS:");
    let dev = Device::Cpu;
    for kind in ["llama", "opt"] {
        if which != "all" && which != kind {
            continue;
        }
        let lm = build(kind)?;
        let ids: Vec<u32> = (0..(PREFILL + DECODE) as u32)
            .map(|i| (i * 7919) % 32000)
            .collect();
        let prompt = Tensor::from_vec(ids[..PREFILL].to_vec(), (1, PREFILL), &dev)?;
        let (mut best_pre, mut best_dec, mut best_last) = (f64::MAX, f64::MAX, f64::MAX);
        for _ in 0..REPEATS {
            // A generator's prefill: only the last position's logits are needed.
            let t = Instant::now();
            lm.forward_ids_with(&prompt, &mut lm.new_cache(), None, LogitsFor::Last)?;
            best_last = best_last.min(t.elapsed().as_secs_f64());
            let mut cache = lm.new_cache();
            let t = Instant::now();
            lm.forward_ids(&prompt, &mut cache, None)?;
            best_pre = best_pre.min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            for &id in &ids[PREFILL..] {
                let x = Tensor::from_vec(vec![id], (1, 1), &dev)?;
                let out = lm.forward_ids(&x, &mut cache, None)?;
                // Greedy pick as a generator would (forces the logits to be computed).
                out.logits.argmax(2)?.to_vec2::<u32>()?;
            }
            best_dec = best_dec.min(t.elapsed().as_secs_f64());
        }
        println!(
            "rust {kind}: prefill {:.0} tok/s ({PREFILL} tokens in {:.3} s), decode {:.1} tok/s ({DECODE} tokens in {:.3} s)",
            PREFILL as f64 / best_pre,
            best_pre,
            DECODE as f64 / best_dec,
            best_dec
        );
        println!(
            "rust {kind}: prefill with LogitsFor::Last {:.0} tok/s ({:.3} s)",
            PREFILL as f64 / best_last,
            best_last
        );
        // For tools/bench/run.sh's table.
        println!(
            "{{\"impl\":\"candle\",\"case\":\"llm_{kind}\",\"prefill_tok_s\":{:.1},\"prefill_last_tok_s\":{:.1},\"decode_tok_s\":{:.2},\"peak_rss_mib\":{:.0},\"base_rss_mib\":{base_rss:.0}}}",
            PREFILL as f64 / best_pre,
            PREFILL as f64 / best_last,
            DECODE as f64 / best_dec,
            memory::status_mib("VmHWM:"),
        );
    }
    if which == "all" {
        kv_cache_appends()?;
    }
    Ok(())
}

/// The cache alone at a longer context: 1024 single-position appends to 8 layers of
/// `(1, 8, len, 64)` keys and values, preallocated buffers vs growing by `Tensor::cat` (what
/// the cache did before; O(len) copying per step).
fn kv_cache_appends() -> anyhow::Result<()> {
    const STEPS: usize = 1024;
    const LAYERS: usize = 8;
    let dev = Device::Cpu;
    let k = Tensor::randn(0f32, 1.0, (1, 8, 1, 64), &dev)?;
    let t = Instant::now();
    let mut cache = KvCache::new(LAYERS);
    for _ in 0..STEPS {
        for l in 0..LAYERS {
            cache.append(l, &k, &k)?;
        }
    }
    let buffered = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut layers: Vec<Option<(Tensor, Tensor)>> = vec![None; LAYERS];
    for _ in 0..STEPS {
        for slot in layers.iter_mut() {
            *slot = Some(match slot.take() {
                None => (k.clone(), k.clone()),
                Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &k], 2)?),
            });
        }
    }
    let cat = t.elapsed().as_secs_f64();
    println!(
        "kv cache, {STEPS} decode appends x {LAYERS} layers: preallocated {:.1} ms, concatenation {:.1} ms",
        buffered * 1e3,
        cat * 1e3
    );
    Ok(())
}
