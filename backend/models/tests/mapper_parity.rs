//! Mapper_LDM against PyTorch's nn.Transformer (GILL `TextFcLayer`, mode `gill_mapper`),
//! Mapper_LLM shapes / names, and gradient checks of both mappers.

use std::path::PathBuf;

use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};
use models::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
use nn::gradcheck::seeded_uniform;
use nn::{gradcheck, weighted_sum_loss, GradCheckOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn tiny_ldm_config() -> MapperLdmConfig {
    // Mirrors tests/fixtures/llm_mapper_ldm/config.json.
    MapperLdmConfig {
        in_dim: 24,
        d_model: 32,
        heads: 4,
        encoder_layers: 2,
        decoder_layers: 2,
        ff_dim: 48,
        num_queries: 7,
        out_dim: 20,
        eps: 1e-5,
    }
}

#[test]
fn mapper_ldm_matches_pytorch_transformer() {
    let dir = fixture("llm_mapper_ldm");
    let w = nn::Weights::open(dir.join("weights.safetensors")).unwrap();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let m = MapperLdm::new(tiny_ldm_config(), vb.pp("model.gen_text_hidden_fcs.0")).unwrap();
    let r =
        candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    let y = m.forward(&r["hidden"], &r["input_embs"]).unwrap();
    assert_eq!(y.dims(), r["output"].dims());
    let err = (&y - &r["output"])
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(err <= 1e-4, "max abs error {err}");
}

#[test]
fn mapper_ldm_default_config_is_the_papers() {
    let c = MapperLdmConfig::default();
    assert_eq!(
        (
            c.d_model,
            c.heads,
            c.encoder_layers,
            c.decoder_layers,
            c.ff_dim
        ),
        (512, 4, 4, 4, 2048)
    );
    assert_eq!((c.num_queries, c.out_dim), (77, 768));
    let c = MapperLlmConfig::default();
    assert_eq!((c.vision_dim, c.num_tokens), (1024, 4));
}

#[test]
fn mapper_ldm_gradcheck_all_parameters_and_inputs() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
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
    let m = MapperLdm::new(c, vb.pp("model.gen_text_hidden_fcs.0")).unwrap();
    // Move every parameter away from its constant initialisation (LayerNorm 1 / 0, biases 0).
    for (i, (_, v)) in vm.data().lock().unwrap().iter().enumerate() {
        let t = seeded_uniform(
            v.shape().clone(),
            100 + i as u64,
            -0.6,
            0.6,
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
        v.set(&t).unwrap();
    }
    let h = Var::from_tensor(
        &seeded_uniform((1, 2, 6), 1, -1.0, 1.0, DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let e = Var::from_tensor(
        &seeded_uniform((1, 2, 6), 2, -1.0, 1.0, DType::F64, &Device::Cpu).unwrap(),
    )
    .unwrap();
    let loss = || weighted_sum_loss(&m.forward(h.as_tensor(), e.as_tensor())?, 3);
    let named: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut vars: Vec<(&str, &Var)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("hidden", &h));
    vars.push(("input_embs", &e));
    let opts = GradCheckOptions {
        max_elements_per_var: 8,
        ..Default::default()
    };
    let report = gradcheck(&vars, loss, &opts).unwrap();
    assert!(report.passed(1e-5), "{report}");
    assert!(named
        .iter()
        .any(|(k, _)| k.ends_with("tfm.decoder.layers.0.multihead_attn.in_proj_weight")));
    assert!(named.iter().any(|(k, _)| k.ends_with("query_embs")));
}

#[test]
fn mapper_llm_maps_pooled_output_to_visual_tokens_with_gradients() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let c = MapperLlmConfig {
        vision_dim: 6,
        num_tokens: 4,
        llm_dim: 5,
    };
    let m = MapperLlm::new(c, vb.pp("model.visual_embeddings")).unwrap();
    let mut keys: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "model.visual_embeddings.bias",
            "model.visual_embeddings.weight"
        ]
    );
    let x =
        Var::from_tensor(&seeded_uniform((2, 6), 4, -1.0, 1.0, DType::F64, &Device::Cpu).unwrap())
            .unwrap();
    let y = m.forward(x.as_tensor()).unwrap();
    assert_eq!(y.dims(), &[2, 4, 5]);
    // Token j of frame b is rows j*d..(j+1)*d of the Linear output.
    let flat = x
        .as_tensor()
        .matmul(
            &vm.get(
                (20, 6),
                "model.visual_embeddings.weight",
                candle_nn::Init::Const(0.),
                DType::F64,
                &Device::Cpu,
            )
            .unwrap()
            .t()
            .unwrap(),
        )
        .unwrap();
    let bias = vm
        .get(
            20,
            "model.visual_embeddings.bias",
            candle_nn::Init::Const(0.),
            DType::F64,
            &Device::Cpu,
        )
        .unwrap();
    let flat = flat.broadcast_add(&bias).unwrap();
    let d = (y.flatten_from(1).unwrap() - flat)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(d < 1e-12);
    let named: Vec<(String, Var)> = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut vars: Vec<(&str, &Var)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    vars.push(("pooled", &x));
    let report = gradcheck(
        &vars,
        || weighted_sum_loss(&m.forward(x.as_tensor())?, 5),
        &GradCheckOptions::default(),
    )
    .unwrap();
    assert!(report.passed(1e-5), "{report}");
}
