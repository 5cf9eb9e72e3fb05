//! CLIP text and vision towers against transformers (tiny random models in
//! `fixtures/clip_*`, made by `tools/fixtures/make_clip_scheduler_fixtures.py`), the
//! `component` conformance entry point, the image preprocessor against Pillow, and gradients
//! into the trainable vision layers.

use candle_core::{DType, Device, Tensor};
use models::clip::{preprocess, ClipImageProcessor, ClipTextModel, ClipVisionModel};
use models::conformance::{run_component, ComponentKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
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

/// max |got - want| <= 1e-4 * max(1, max |want|).
fn assert_close(got: &Tensor, want: &Tensor, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let err = max_abs(&(got.to_dtype(DType::F32).unwrap() - want).unwrap());
    let tol = 1e-4 * max_abs(want).max(1.0);
    assert!(err <= tol, "{what}: max abs error {err} > {tol}");
    eprintln!("{what}: max abs error {err:.2e} (tolerance {tol:.2e})");
}

#[test]
fn text_models_match_transformers() {
    for name in ["clip_text_quick", "clip_text_gelu_legacy"] {
        let dir = fixtures().join(name);
        let inputs = load(&dir.join("inputs.safetensors"));
        let want = load(&dir.join("outputs.safetensors"));
        let model = ClipTextModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
        let out = model.forward(&ids, None).unwrap();
        assert_close(&out.last_hidden_state, &want["last_hidden_state"], name);
        assert_close(&out.pooler_output, &want["pooler_output"], name);
        // The trimmed pooled path (contrastive training) gives the same pooled output.
        assert_close(&model.pooled(&ids).unwrap(), &want["pooler_output"], name);
        assert_eq!(
            out.hidden_states.len(),
            model.config().num_hidden_layers + 1
        );
    }
}

#[test]
fn vision_models_match_transformers() {
    for name in ["clip_vision_quick", "clip_vision_gelu_bin"] {
        let dir = fixtures().join(name);
        let inputs = load(&dir.join("inputs.safetensors"));
        let want = load(&dir.join("outputs.safetensors"));
        let model = ClipVisionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let out = model.forward(&inputs["pixel_values"]).unwrap();
        assert_close(&out.last_hidden_state, &want["last_hidden_state"], name);
        assert_close(&out.pooler_output, &want["pooler_output"], name);
        assert_close(
            out.image_embeds.as_ref().unwrap(),
            &want["image_embeds"],
            name,
        );
        for (i, h) in out.hidden_states.iter().enumerate() {
            assert_close(
                h,
                &want[&format!("hidden_states.{i}")],
                &format!("{name} hidden {i}"),
            );
        }
    }
}

#[test]
fn full_clip_model_directory_loads_both_towers() {
    let dir = fixtures().join("clip_full");
    let inputs = load(&dir.join("inputs.safetensors"));
    let want = load(&dir.join("outputs.safetensors"));
    let text = ClipTextModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let ids = inputs["input_ids"].to_dtype(DType::U32).unwrap();
    let t = text.forward(&ids, None).unwrap();
    assert_close(
        &t.last_hidden_state,
        &want["text.last_hidden_state"],
        "text",
    );
    assert_close(&t.pooler_output, &want["text.pooler_output"], "text pooled");
    assert!(t.text_embeds.is_some(), "CLIPModel has text_projection");
    let vision = ClipVisionModel::load(&dir, DType::F32, &Device::Cpu).unwrap();
    let v = vision.forward(&inputs["pixel_values"]).unwrap();
    assert_close(
        &v.last_hidden_state,
        &want["vision.last_hidden_state"],
        "vision",
    );
    assert_close(
        &v.pooler_output,
        &want["vision.pooler_output"],
        "vision pooled",
    );
    assert_close(
        v.image_embeds.as_ref().unwrap(),
        &want["vision.image_embeds"],
        "embeds",
    );
}

#[test]
fn component_entry_point_writes_reference_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        (
            ComponentKind::ClipText,
            "clip_text_gelu_legacy",
            vec!["last_hidden_state", "pooler_output"],
        ),
        (
            ComponentKind::ClipVision,
            "clip_vision_quick",
            vec!["last_hidden_state", "pooler_output", "image_embeds"],
        ),
    ];
    for (kind, name, keys) in cases {
        let dir = fixtures().join(name);
        let out = tmp.path().join(format!("{name}.safetensors"));
        run_component(
            kind,
            &dir,
            &dir.join("inputs.safetensors"),
            &out,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let got = load(&out);
        let want = load(&dir.join("outputs.safetensors"));
        for k in keys {
            assert_close(&got[k], &want[k], &format!("{name}/{k}"));
        }
    }
    // i32 ids are accepted too.
    let dir = fixtures().join("clip_text_quick");
    let ids = load(&dir.join("inputs.safetensors"))["input_ids"]
        .to_dtype(DType::I32)
        .unwrap();
    let inp = tmp.path().join("i32.safetensors");
    candle_core::safetensors::save(&HashMap::from([("input_ids".to_string(), ids)]), &inp).unwrap();
    let out = tmp.path().join("o.safetensors");
    run_component(
        ComponentKind::ClipText,
        &dir,
        &inp,
        &out,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let want = load(&dir.join("outputs.safetensors"));
    assert_close(
        &load(&out)["pooler_output"],
        &want["pooler_output"],
        "i32 ids",
    );
    // Errors name the missing tensor and the directory.
    let err = run_component(
        ComponentKind::ClipVision,
        &dir,
        &inp,
        &out,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("clip_text_quick"), "{msg}");
    let err = run_component(
        ComponentKind::ClipText,
        Path::new("/nonexistent/m"),
        &inp,
        &out,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/m"), "{err}");
}

#[test]
fn preprocessor_matches_pillow() {
    let fx = load(&fixtures().join("clip_preprocess/images.safetensors"));
    let proc = ClipImageProcessor::for_image_size(64);
    for name in ["up", "down"] {
        let img = &fx[&format!("{name}.image")];
        let (h, w, _) = img.dims3().unwrap();
        let data: Vec<u8> = img.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let img = image::RgbImage::from_raw(w as u32, h as u32, data).unwrap();
        let want = &fx[&format!("{name}.resized")];
        let (rh, rw, _) = want.dims3().unwrap();
        let resized = preprocess::resize_bicubic(&img, rw as u32, rh as u32);
        let want_px: Vec<u8> = want.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let diff = resized
            .as_raw()
            .iter()
            .zip(&want_px)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{name}: {diff} bytes differ from Pillow's bicubic resize"
        );
        let pv = proc.preprocess(&img, &Device::Cpu).unwrap();
        let want = &fx[&format!("{name}.pixel_values")];
        let err = max_abs(&(&pv - want).unwrap());
        assert!(err <= 1e-5, "{name}: pixel_values error {err}");
    }
}

#[test]
fn pad_to_square_centres_the_image() {
    let img = image::RgbImage::from_pixel(4, 2, image::Rgb([200, 10, 10]));
    let sq = preprocess::pad_to_square(&img, [0, 0, 255]);
    assert_eq!(sq.dimensions(), (4, 4));
    assert_eq!(sq.get_pixel(0, 0).0, [0, 0, 255]);
    assert_eq!(sq.get_pixel(0, 1).0, [200, 10, 10]);
    assert_eq!(sq.get_pixel(3, 2).0, [200, 10, 10]);
    assert_eq!(sq.get_pixel(3, 3).0, [0, 0, 255]);
}

#[test]
fn last_vision_layers_receive_gradient() {
    // Three layers: the last two (1, 2) are trained, layer 0 stays frozen.
    let dir = fixtures().join("clip_vision_gelu_bin");
    let varmap = candle_nn::VarMap::new();
    let model =
        ClipVisionModel::load_partially_trainable(&dir, &varmap, 2, DType::F32, &Device::Cpu)
            .unwrap();
    let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
    assert!(
        names
            .iter()
            .any(|n| n.contains("encoder.layers.2.mlp.fc2.weight")),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n.contains("encoder.layers.1.")),
        "both of the last 2 layers"
    );
    assert!(
        !names.iter().any(|n| n.contains("encoder.layers.0.")),
        "layer 0 is frozen"
    );
    assert!(!names
        .iter()
        .any(|n| n.contains("pre_layrnorm") || n.contains("patch_embedding")));
    let inputs = load(&dir.join("inputs.safetensors"));
    let out = model.forward(&inputs["pixel_values"]).unwrap();
    // Still numerically the same model.
    let want = load(&dir.join("outputs.safetensors"));
    assert_close(
        out.image_embeds.as_ref().unwrap(),
        &want["image_embeds"],
        "trainable load",
    );
    let loss = nn::weighted_sum_loss(out.image_embeds.as_ref().unwrap(), 3).unwrap();
    let grads = nn::check_all_vars_get_gradient(&loss, &varmap).unwrap();
    let data = varmap.data().lock().unwrap();
    let fc2 = data
        .iter()
        .find(|(k, _)| k.ends_with("layers.2.mlp.fc2.weight"))
        .unwrap()
        .1;
    let g = grads
        .get(fc2.as_tensor())
        .expect("gradient for the last layer's fc2");
    assert!(max_abs(g) > 0.0);
}

#[test]
fn pooling_position_follows_transformers_rule() {
    let ids = Tensor::new(&[[5u32, 9, 7, 7, 3], [1, 2, 6, 2, 2]], &Device::Cpu).unwrap();
    // New-style configs: first position equal to eos_token_id (0 when absent).
    assert_eq!(models::clip::eos_positions(&ids, 7).unwrap(), vec![2, 0]);
    // eos_token_id == 2 (legacy): argmax of the ids, first maximum.
    assert_eq!(models::clip::eos_positions(&ids, 2).unwrap(), vec![1, 2]);
}

#[cfg(unix)]
#[test]
fn pipeline_directories_are_accepted() {
    // A diffusers pipeline layout: text_encoder/, tokenizer/ (and image_encoder/).
    let tmp = tempfile::tempdir().unwrap();
    let link = |from: &str, to: &str| {
        std::os::unix::fs::symlink(fixtures().join(from), tmp.path().join(to)).unwrap()
    };
    link("clip_text_quick", "text_encoder");
    link("clip_tokenizer", "tokenizer");
    link("clip_vision_quick", "image_encoder");
    let tok = models::clip::ClipTokenizer::from_dir(tmp.path()).unwrap();
    let ids = tok
        .encode_batch(&["Fred and Wilma talk in the living room."], &Device::Cpu)
        .unwrap();
    let want_ids = load(&fixtures().join("clip_text_quick/inputs.safetensors"))["input_ids"]
        .to_dtype(DType::U32)
        .unwrap();
    assert_eq!(
        ids.to_vec2::<u32>().unwrap()[0],
        want_ids.to_vec2::<u32>().unwrap()[0]
    );
    let text = ClipTextModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let out = text.forward(&ids, None).unwrap();
    let want = load(&fixtures().join("clip_text_quick/outputs.safetensors"));
    assert_close(
        &out.last_hidden_state,
        &want["last_hidden_state"].narrow(0, 0, 1).unwrap(),
        "pipeline text_encoder",
    );
    ClipVisionModel::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
}
