//! The trainable `[IMG]` rows: gradients reach them through the whole frozen LLM (finite
//! differences in f64, both architectures), AdamW moves them and nothing else, renormalisation.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarMap};
use models::llm::img_tokens::IMG_ROWS_NAME;
use models::llm::{CausalLm, ImgTokens};
use nn::{gradcheck, weighted_sum_loss, GradCheckOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A prompt of base ids with the R = 3 [IMG] ids at the end, (1, 8).
fn ids_with_img(first: u32) -> Tensor {
    Tensor::new(
        &[[5u32, 17, 9, 40, 3, first, first + 1, first + 2]],
        &Device::Cpu,
    )
    .unwrap()
}

fn gradcheck_through(name: &str) {
    let lm = CausalLm::load(fixture(name), DType::F64, &Device::Cpu).unwrap();
    let first = lm.vocab_size() as u32 - 5; // [IMG] ids overlap padded rows, as with OPT-6.7B
    let init = ImgTokens::init(&lm, 3, first, 7).unwrap();
    let rows = init.rows().as_tensor().to_dtype(DType::F64).unwrap();
    let img = ImgTokens::from_rows(&lm, &rows, first).unwrap();
    let ids = ids_with_img(first);
    let loss = || {
        let e = img.embed(&lm, &ids)?;
        let out = lm.forward_embeds(&e, &mut lm.new_cache(), None)?;
        // Logits over the extended vocabulary and the [IMG] hidden states both count.
        let logits = img.extend_logits(&out.logits, &out.last_hidden_state)?;
        let h = out.last_hidden_state.narrow(1, 5, 3)?;
        weighted_sum_loss(&logits, 1)? + weighted_sum_loss(&h, 2)?
    };
    let opts = GradCheckOptions {
        max_elements_per_var: 24,
        ..Default::default()
    };
    let report = gradcheck(&[("img_rows", img.rows())], loss, &opts).unwrap();
    assert!(report.missing.is_empty(), "{name}: {report}");
    assert!(report.passed(1e-5), "{name}: {report}");
}

#[test]
fn llm_img_rows_gradcheck_through_frozen_llama() {
    gradcheck_through("llm_llama");
}

#[test]
fn llm_img_rows_gradcheck_through_frozen_opt() {
    gradcheck_through("llm_opt_proj");
}

#[test]
fn llm_adamw_moves_img_rows_only_and_renormalises() {
    let lm = CausalLm::load(fixture("llm_opt"), DType::F32, &Device::Cpu).unwrap();
    let frozen_before = lm.embedding_weight().copy().unwrap();
    let first = lm.vocab_size() as u32 - 5;
    let img = ImgTokens::init(&lm, 3, first, 3).unwrap();
    let varmap = VarMap::new();
    img.register(&varmap);
    assert_eq!(varmap.all_vars().len(), 1);
    let before = img.rows().as_tensor().copy().unwrap();
    let mut opt = AdamW::new(
        varmap.all_vars(),
        ParamsAdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.95,
            weight_decay: 0.01,
            ..Default::default()
        },
    )
    .unwrap();
    let ids = ids_with_img(first);
    let e = img.embed(&lm, &ids).unwrap();
    let out = lm.forward_embeds(&e, &mut lm.new_cache(), None).unwrap();
    let logits = img
        .extend_logits(&out.logits, &out.last_hidden_state)
        .unwrap();
    assert_eq!(logits.dims(), &[1, 8, first as usize + 3]);
    let mask = Tensor::new(&[[0f32, 0., 0., 0., 0., 1., 1., 1.]], &Device::Cpu).unwrap();
    let loss = models::stage2_losses::lgen_loss(&logits, &ids, &mask).unwrap();
    let grads = nn::check_all_vars_get_gradient(&loss, &varmap).unwrap();
    // Frozen weights are plain tensors: they get no gradient at all.
    assert!(grads.get(lm.embedding_weight()).is_none());
    opt.step(&grads).unwrap();
    let moved = (img.rows().as_tensor() - &before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        moved.to_scalar::<f32>().unwrap() > 1e-4,
        "rows did not move"
    );
    let frozen_diff = (lm.embedding_weight() - &frozen_before)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(frozen_diff.to_scalar::<f32>().unwrap(), 0.0);

    // Renormalise: mean row norm == mean norm of the frozen rows 0..first.
    img.rows()
        .set(&(img.rows().as_tensor() * 3.0).unwrap())
        .unwrap();
    img.renormalise().unwrap();
    let norms = img
        .rows()
        .as_tensor()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap();
    let mean = norms.mean_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!(
        (mean - img.frozen_mean_norm()).abs() < 1e-4 * img.frozen_mean_norm(),
        "{mean}"
    );
    let saved: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert_eq!(saved, vec![IMG_ROWS_NAME.to_string()]);
}

#[test]
fn llm_img_embed_splices_rows_and_rejects_unknown_ids() {
    let lm = CausalLm::load(fixture("llm_llama"), DType::F32, &Device::Cpu).unwrap();
    let first = lm.vocab_size() as u32;
    let img = ImgTokens::init(&lm, 2, first, 1).unwrap();
    let ids = Tensor::new(&[[4u32, first + 1, 6]], &Device::Cpu).unwrap();
    let e = img.embed(&lm, &ids).unwrap();
    let base = lm
        .embed_ids(&Tensor::new(&[4u32, 6], &Device::Cpu).unwrap())
        .unwrap();
    let d = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        d(&e.get(0).unwrap().get(0).unwrap(), &base.get(0).unwrap()),
        0.0
    );
    assert_eq!(
        d(&e.get(0).unwrap().get(2).unwrap(), &base.get(1).unwrap()),
        0.0
    );
    assert_eq!(
        d(
            &e.get(0).unwrap().get(1).unwrap(),
            &img.rows().as_tensor().get(1).unwrap()
        ),
        0.0
    );
    let bad = Tensor::new(&[[first + 2]], &Device::Cpu).unwrap();
    let err = img.embed(&lm, &bad).unwrap_err();
    assert!(
        err.to_string().contains("outside the extended vocabulary"),
        "{err}"
    );
}

/// The whole stage-2 graph: frame -> Mapper_LLM -> prompt -> frozen LLM -> [IMG] hidden states
/// -> Mapper_LDM -> 0.5 L_gen + L_align; every trainable parameter gets a gradient.
#[test]
fn llm_stage2_graph_trains_img_rows_and_both_mappers() {
    use models::mappers::{MapperLdm, MapperLdmConfig, MapperLlm, MapperLlmConfig};
    use models::prompt::{build_prompt, PromptConfig};
    use models::stage2_losses::{
        lalign_loss, lgen_loss, target_mask, LgenTargets, AUTHORS_LGEN_WEIGHT,
    };

    let dev = Device::Cpu;
    let lm = CausalLm::load(fixture("llm_opt_proj"), DType::F32, &dev).unwrap();
    let d = lm.embed_dim();
    let first = lm.vocab_size() as u32 - 3;
    let img = ImgTokens::init(&lm, 3, first, 9).unwrap();
    let varmap = VarMap::new();
    img.register(&varmap);
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let m_llm = MapperLlm::new(
        MapperLlmConfig {
            vision_dim: 6,
            num_tokens: 2,
            llm_dim: d,
        },
        vb.pp("model.visual_embeddings"),
    )
    .unwrap();
    let ldm_cfg = MapperLdmConfig {
        in_dim: d,
        d_model: 8,
        heads: 2,
        encoder_layers: 1,
        decoder_layers: 1,
        ff_dim: 16,
        num_queries: 5,
        out_dim: 7,
        eps: 1e-5,
    };
    let m_ldm = MapperLdm::new(ldm_cfg, vb.pp("model.gen_text_hidden_fcs.0")).unwrap();

    let words = |t: &str| -> anyhow::Result<Vec<u32>> {
        Ok(t.split_whitespace().map(|w| 3 + w.len() as u32).collect())
    };
    let mut pc = PromptConfig::new(img.ids(), Some(1));
    pc.visual_tokens_per_frame = 2;
    let prompt = build_prompt(&words, &["Fred waves.", "He sits."], "They laugh.", &pc).unwrap();
    let pooled = nn::gradcheck::seeded_uniform((2, 6), 3, -1.0, 1.0, DType::F32, &dev).unwrap();
    let visual = m_llm.forward(&pooled).unwrap();
    let visual: Vec<Tensor> = (0..2).map(|i| visual.get(i).unwrap()).collect();
    let embeds = prompt.embed(&lm, &img, &visual).unwrap();
    let out = lm
        .forward_embeds(&embeds, &mut lm.new_cache(), None)
        .unwrap();
    let r = prompt.img_range();
    let h = out.last_hidden_state.narrow(1, r.start, r.len()).unwrap();
    let cond = m_ldm
        .forward(
            &h,
            &img.embeddings(DType::F32).unwrap().unsqueeze(0).unwrap(),
        )
        .unwrap();
    let target = nn::gradcheck::seeded_uniform((1, 5, 7), 4, -1.0, 1.0, DType::F32, &dev).unwrap();
    let logits = img
        .extend_logits(&out.logits, &out.last_hidden_state)
        .unwrap();
    let ids = prompt.ids_tensor(&dev).unwrap();
    let mask = target_mask(
        prompt.len,
        &prompt.img_positions,
        prompt.current_caption.clone(),
        LgenTargets::CaptionAndFirstImg,
        &dev,
    )
    .unwrap();
    let loss = ((lgen_loss(&logits, &ids, &mask).unwrap() * AUTHORS_LGEN_WEIGHT).unwrap()
        + lalign_loss(&cond, &target).unwrap())
    .unwrap();
    nn::check_all_vars_get_gradient(&loss, &varmap).unwrap();
}
