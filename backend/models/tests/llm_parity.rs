//! Parity of the Rust Llama / OPT against transformers (fixtures from
//! `tools/fixtures/make_llm_fixtures.py`), KV-cache decoding, loading paths and dtypes.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use models::llm::{CausalLm, KvCache, LlmTokenizer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
        .unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts `max|a - b| <= 1e-4 * max(1, max|b|)`.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, rel: f32) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let err = max_abs(&(&a - &b).unwrap());
    let tol = rel * max_abs(&b).max(1.0);
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
}

fn check_model(name: &str) {
    let lm = CausalLm::load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let r = reference(name);
    let mut cache = lm.new_cache();
    let out = lm.forward_ids(&r["input_ids"], &mut cache, None).unwrap();
    assert_close(&format!("{name} logits"), &out.logits, &r["logits"], 1e-4);
    assert_close(
        &format!("{name} hidden"),
        &out.last_hidden_state,
        &r["last_hidden_state"],
        1e-4,
    );
    assert_eq!(cache.len(), r["input_ids"].dim(1).unwrap());

    let mut cache = lm.new_cache();
    let out = lm
        .forward_embeds(&r["inputs_embeds"], &mut cache, None)
        .unwrap();
    assert_close(
        &format!("{name} embeds logits"),
        &out.logits,
        &r["embeds_logits"],
        1e-4,
    );
    assert_close(
        &format!("{name} embeds hidden"),
        &out.last_hidden_state,
        &r["embeds_last_hidden_state"],
        1e-4,
    );

    if let Some(mask) = r.get("attention_mask") {
        let mut cache = lm.new_cache();
        let out = lm
            .forward_ids(&r["input_ids"], &mut cache, Some(mask))
            .unwrap();
        // Compare the kept (non-padded) positions only: padded queries are undefined.
        assert_close(
            &format!("{name} row 0"),
            &out.logits.i(0).unwrap(),
            &r["padded_logits"].i(0).unwrap(),
            1e-4,
        );
        assert_close(
            &format!("{name} row 1 kept"),
            &out.logits.i((1, 3..)).unwrap(),
            &r["padded_logits"].i((1, 3..)).unwrap(),
            1e-4,
        );
    }
}

#[test]
fn llm_llama_gqa_matches_transformers() {
    check_model("llm_llama");
}

#[test]
fn llm_llama_tied_sharded_matches_transformers() {
    check_model("llm_llama_tied");
}

#[test]
fn llm_opt_matches_transformers() {
    check_model("llm_opt");
}

#[test]
fn llm_opt_project_in_out_post_norm_pickle_matches_transformers() {
    assert!(fixture("llm_opt_proj/pytorch_model.bin").exists());
    check_model("llm_opt_proj");
}

/// Prefill then token-by-token decoding (and a rewind) equals one full pass.
fn check_cache(name: &str) {
    let lm = CausalLm::load(fixture(name), DType::F32, &Device::Cpu).unwrap();
    let ids = reference(name)["input_ids"].clone();
    let s = ids.dim(1).unwrap();
    let full = lm.forward_ids(&ids, &mut lm.new_cache(), None).unwrap();
    let mut cache = lm.new_cache();
    let pre = lm
        .forward_ids(&ids.narrow(1, 0, 6).unwrap(), &mut cache, None)
        .unwrap();
    let mut pieces = vec![pre.logits];
    for t in 6..s {
        let o = lm
            .forward_ids(&ids.narrow(1, t, 1).unwrap(), &mut cache, None)
            .unwrap();
        pieces.push(o.logits);
    }
    let inc = Tensor::cat(&pieces, 1).unwrap();
    assert_close(&format!("{name} cached decode"), &inc, &full.logits, 1e-5);

    // Rewind to 4 positions and re-run the rest in one chunk.
    cache.truncate(4).unwrap();
    assert_eq!(cache.len(), 4);
    let rest = lm
        .forward_ids(&ids.narrow(1, 4, s - 4).unwrap(), &mut cache, None)
        .unwrap();
    assert_close(
        &format!("{name} rewind"),
        &rest.logits,
        &full.logits.narrow(1, 4, s - 4).unwrap(),
        1e-5,
    );
    assert!(cache.truncate(100).is_err());
}

#[test]
fn llm_llama_kv_cache_decode_equals_full_pass() {
    check_cache("llm_llama");
}

#[test]
fn llm_opt_kv_cache_decode_equals_full_pass() {
    check_cache("llm_opt");
    check_cache("llm_opt_proj");
}

#[test]
fn llm_half_precision_runs_close_to_f32() {
    for name in ["llm_llama", "llm_opt"] {
        let r = reference(name);
        for dt in [DType::F16, DType::BF16] {
            let lm = CausalLm::load(fixture(name), dt, &Device::Cpu).unwrap();
            let mut cache = lm.new_cache();
            let out = lm.forward_ids(&r["input_ids"], &mut cache, None).unwrap();
            assert_eq!(out.logits.dtype(), dt);
            assert_close(&format!("{name} {dt:?}"), &out.logits, &r["logits"], 5e-2);
        }
    }
}

#[test]
fn llm_errors_name_the_problem() {
    let err = CausalLm::load(fixture("llm_mapper_ldm"), DType::F32, &Device::Cpu).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("llm_mapper_ldm"), "{msg}");
    let lm = CausalLm::load(fixture("llm_opt"), DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 4, 5]], &Device::Cpu).unwrap();
    let bad_mask = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    let err = lm
        .forward_ids(&ids, &mut lm.new_cache(), Some(&bad_mask))
        .unwrap_err();
    assert!(err.to_string().contains("attention_mask"), "{err}");
    let err = lm
        .forward_ids(&ids, &mut KvCache::new(1), None)
        .unwrap_err();
    assert!(err.to_string().contains("KV cache"), "{err}");
}

#[test]
fn llm_tokenizers_match_transformers_and_add_img_tokens() {
    for name in ["llm_llama", "llm_opt"] {
        let dir = fixture(name);
        let tok = LlmTokenizer::from_dir(&dir, 8).unwrap();
        let reference: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_reference.json")).unwrap(),
        )
        .unwrap();
        let vocab = reference["vocab_size"].as_u64().unwrap() as u32;
        assert_eq!(tok.first_img_id(), vocab, "{name}");
        assert_eq!(
            tok.img_token_ids(),
            &(vocab..vocab + 8).collect::<Vec<_>>()[..]
        );
        for s in reference["samples"].as_array().unwrap() {
            let text = s["text"].as_str().unwrap();
            let ids: Vec<u32> = serde_json::from_value(s["ids"].clone()).unwrap();
            let with: Vec<u32> = serde_json::from_value(s["ids_with_special"].clone()).unwrap();
            assert_eq!(tok.encode(text).unwrap(), ids, "{name}: {text:?}");
            assert_eq!(
                tok.encode_with_special_tokens(text).unwrap(),
                with,
                "{name}: {text:?}"
            );
            assert_eq!(Some(with[0]), tok.bos_id(), "{name}: BOS");
        }
        let ids = tok.encode("Fred [IMG0][IMG7]").unwrap();
        assert_eq!(
            &ids[ids.len() - 2..],
            &[vocab, vocab + 7],
            "{name}: [IMG] tokens are atomic"
        );
    }
}

#[test]
fn llm_component_conformance_runs_ids_and_embeds() {
    use models::conformance::{run_component_tensors, ComponentKind};
    let kind: ComponentKind = "llm".parse().unwrap();
    assert_eq!(kind, ComponentKind::Llm);
    let r = reference("llm_opt");
    let ids = r["input_ids"].to_dtype(DType::I64).unwrap();
    let inputs = HashMap::from([("input_ids".to_string(), ids)]);
    let out = run_component_tensors(kind, &fixture("llm_opt"), &inputs, DType::F32, &Device::Cpu)
        .unwrap();
    assert_close("component logits", &out["logits"], &r["logits"], 1e-4);
    assert_close(
        "component hidden",
        &out["last_hidden_state"],
        &r["last_hidden_state"],
        1e-4,
    );
    let inputs = HashMap::from([("inputs_embeds".to_string(), r["inputs_embeds"].clone())]);
    let out = run_component_tensors(kind, &fixture("llm_opt"), &inputs, DType::F32, &Device::Cpu)
        .unwrap();
    assert_close(
        "component embeds logits",
        &out["logits"],
        &r["embeds_logits"],
        1e-4,
    );
    let err = run_component_tensors(
        kind,
        &fixture("llm_opt"),
        &HashMap::new(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("input_ids"), "{err:#}");
}
