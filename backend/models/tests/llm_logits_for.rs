//! `LogitsFor`: the last-position / no-logits forward passes agree with the full one, and
//! cached decoding through the preallocated KV cache equals a full pass (random tiny models).

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use models::llm::{CausalLm, Llama, LlamaConfig, LogitsFor, Opt, OptConfig};

fn models() -> Vec<(&'static str, CausalLm)> {
    let mk = |seed: u64| {
        let vm = VarMap::new();
        let dev = Device::Cpu;
        dev.set_seed(seed).ok();
        (vm, dev)
    };
    let (vm, dev) = mk(1);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let llama: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128
    }))
    .unwrap();
    let llama = CausalLm::Llama(Llama::new(&llama, vb).unwrap());
    let (vm, dev) = mk(2);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let opt: OptConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 50, "hidden_size": 32, "ffn_dim": 48,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 128
    }))
    .unwrap();
    let opt = CausalLm::Opt(Opt::new(&opt, vb.pp("model")).unwrap());
    vec![("llama", llama), ("opt", opt)]
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
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

fn ids(b: usize, s: usize) -> Tensor {
    let v: Vec<u32> = (0..(b * s) as u32).map(|i| (i * 13 + 5) % 50).collect();
    Tensor::from_vec(v, (b, s), &Device::Cpu).unwrap()
}

#[test]
fn last_and_none_agree_with_all() {
    for (name, lm) in models() {
        let x = ids(2, 9);
        let all = lm.forward_ids(&x, &mut lm.new_cache(), None).unwrap();
        let last = lm
            .forward_ids_with(&x, &mut lm.new_cache(), None, LogitsFor::Last)
            .unwrap();
        let none = lm
            .forward_ids_with(&x, &mut lm.new_cache(), None, LogitsFor::None)
            .unwrap();
        assert_eq!(all.logits.dims(), &[2, 9, 50], "{name}");
        assert_eq!(last.logits.dims(), &[2, 1, 50], "{name}");
        assert_eq!(none.logits.dims(), &[2, 0, 50], "{name}");
        let want = all.logits.i((.., 8..9)).unwrap();
        // Same rows, a different gemm shape: equal up to f32 summation order.
        let scale = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let d = max_diff(&last.logits, &want);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{name}: {d} (logits up to {scale})"
        );
        assert!(max_diff(&none.last_hidden_state, &all.last_hidden_state) == 0.0);
        assert!(lm
            .forward_ids_with(&ids(1, 0), &mut lm.new_cache(), None, LogitsFor::Last)
            .is_err());
    }
}

#[test]
fn cached_decode_with_rewinds_equals_full_pass() {
    for (name, lm) in models() {
        let s = 40;
        let x = ids(1, s);
        let full = lm
            .forward_ids(&x, &mut lm.new_cache(), None)
            .unwrap()
            .logits;
        // Small prefill so the buffers grow several times while decoding.
        let mut cache = lm.new_cache();
        let mut rows = vec![
            lm.forward_ids(&x.narrow(1, 0, 3).unwrap(), &mut cache, None)
                .unwrap()
                .logits,
        ];
        for t in 3..s {
            let out = lm
                .forward_ids_with(
                    &x.narrow(1, t, 1).unwrap(),
                    &mut cache,
                    None,
                    LogitsFor::Last,
                )
                .unwrap();
            rows.push(out.logits);
        }
        let inc = Tensor::cat(&rows, 1).unwrap();
        assert!(
            max_diff(&inc, &full) < 1e-4,
            "{name}: {}",
            max_diff(&inc, &full)
        );
        assert!(cache.capacity(0) >= s);
        // Rewind into the middle and redo the tail (the pipeline's frame-to-frame reuse); a
        // clone taken before the rewind keeps its own contents.
        let before = cache.clone();
        cache.truncate(17).unwrap();
        let tail = lm
            .forward_ids(&x.narrow(1, 17, s - 17).unwrap(), &mut cache, None)
            .unwrap()
            .logits;
        assert!(
            max_diff(&tail, &full.narrow(1, 17, s - 17).unwrap()) < 1e-4,
            "{name}"
        );
        assert_eq!(before.len(), s);
        let snapshot: Vec<f32> = before
            .layer(1)
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        cache.truncate(10).unwrap();
        let other: Vec<u32> = (0..25u32).map(|i| (i * 7 + 3) % 50).collect();
        let other = Tensor::from_vec(other, (1, 25), &Device::Cpu).unwrap();
        lm.forward_ids(&other, &mut cache, None).unwrap();
        let now: Vec<f32> = before
            .layer(1)
            .unwrap()
            .0
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(snapshot, now, "{name}: a clone saw another cache's writes");
        assert_eq!(cache.len(), 35);
    }
}
