//! `bundle import` on tiny checkpoints in the StoryGPT-V authors' exact layout (fixtures from
//! tools/fixtures/make_import_fixtures.py): the imported bundle loads and matches a PyTorch
//! reference of one stage-1 step (fused embedding -> UNet epsilon) and one stage-2 step ([IMG]
//! hidden states -> Mapper_LDM output); bf16 stage-2 weights, the legacy torch format, zip
//! checkpoints and sharded pickles are read; bad inputs give errors that name the tensor, the
//! file and the expected shape, and leave nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use models::bundle::import::{import, ImportOptions};
use models::bundle::Bundle;
use models::pipeline::StoryPipeline;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/import")
}

fn reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn reference_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn options(out: &Path) -> ImportOptions {
    let f = fixture();
    ImportOptions {
        sd: f.join("sd"),
        clip: f.join("clip-vit"),
        llm: f.join("opt"),
        stage1: f.join("stage1/pytorch_model.bin"),
        stage2: f.join("stage2.zip"),
        out: out.to_path_buf(),
        f16: false,
        dtype: "f32".into(),
        name: "tiny-import".into(),
        mapper_heads: 4,
        verify: true,
    }
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

fn assert_close(got: &Tensor, want: &Tensor, tol: f32, what: &str) {
    let e = max_abs(got, want);
    assert!(e <= tol, "{what}: max abs error {e} > {tol}");
}

/// Files under `dir`, relative, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// The two reference steps on a loaded bundle; returns (eps error, condition error).
/// `tol` bounds the intermediate checks (portrait embedding, fused embedding).
fn reference_steps(p: &StoryPipeline, tol: f32) -> (f32, f32) {
    let r = reference();
    let j = reference_json();
    let ldm = p.char_ldm();
    let caption = j["caption"].as_str().unwrap();
    let name = j["name"].as_str().unwrap();

    // Stage 1: the fine-tuned vision tower's embedding of the portrait, fused into the caption's
    // CLIP text at the last token of the name, then the fine-tuned UNet's epsilon.
    let emb = ldm
        .image_encoder
        .as_ref()
        .unwrap()
        .forward(&r["pixel_values"])
        .unwrap()
        .image_embeds
        .unwrap();
    assert_close(&emb, &r["image_embeds"], tol, "portrait embedding");
    assert_eq!(
        ldm.character_tokens(caption, &[name]),
        vec![(j["token_index"].as_u64().unwrap() as usize, 0)]
    );
    let fused = ldm.fused_condition(caption, &[(name, &emb)]).unwrap();
    assert_close(&fused, &r["fused"], tol, "fused embedding");
    let eps = ldm
        .unet
        .forward(&r["latent"], &r["timestep"], &fused)
        .unwrap();
    let eps_err = max_abs(&eps, &r["eps"]);

    // Stage 2: prompt + 8 [IMG] tokens through OPT, Mapper_LDM on their hidden states.
    let ids: Vec<u32> = r["prompt_ids"]
        .flatten_all()
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1()
        .unwrap();
    let cond = p.img_condition_for_ids(&ids).unwrap();
    (eps_err, max_abs(&cond, &r["condition"]))
}

#[test]
fn import_loads_and_matches_pytorch_reference_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bundle");
    let report = import(&options(&out)).unwrap();
    assert!(report.tensors > 100, "{}", report.tensors);

    // Only safetensors, configs and tokenizers; no pickles, no staging leftovers.
    let all = files(&out);
    for f in &all {
        assert!(
            f.ends_with(".safetensors")
                || f.ends_with(".json")
                || f.ends_with(".txt")
                || f == "bundle.toml",
            "unexpected file {f}"
        );
    }
    for want in [
        "bundle.toml",
        "sd/unet/diffusion_pytorch_model.safetensors",
        "sd/vae/diffusion_pytorch_model.safetensors",
        "sd/text_encoder/model.safetensors",
        "sd/tokenizer/vocab.json",
        "sd/scheduler/scheduler_config.json",
        "clip-vision/model.safetensors",
        "clip-vision/preprocessor_config.json",
        "llm/model.safetensors",
        "llm/tokenizer.json",
        "storygpt-v/stage1.safetensors",
        "storygpt-v/stage2.safetensors",
        "storygpt-v/args.json",
        "storygpt-v/model_args.json",
    ] {
        assert!(all.iter().any(|f| f == want), "{want} missing from {all:?}");
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        1,
        "staging directory left behind"
    );

    // Settings from args.json / model_args.json, Mapper_LDM sizes from its tensors.
    let b = Bundle::open(&out).unwrap();
    let l = &b.manifest.llm;
    assert_eq!(
        (l.num_img_tokens, l.visual_tokens, l.max_prompt_len),
        (8, 4, 160)
    );
    assert!(!l.caption_only);
    let d = l.mapper_ldm;
    assert_eq!(
        (
            d.d_model,
            d.heads,
            d.encoder_layers,
            d.decoder_layers,
            d.ff_dim
        ),
        (32, 4, 2, 2, 48)
    );
    assert_eq!(
        (b.manifest.sampling.height, b.manifest.sampling.width),
        (16, 16)
    );
    assert!(b.manifest.trained);

    // The stage-2 weights were bf16 in the checkpoint: stored as f32, the [IMG] rows as (R, d),
    // the GILL leftovers (retrieval mapper, visual_fc, logit_scale) left out.
    let s2 =
        candle_core::safetensors::load(out.join("storygpt-v/stage2.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(s2["model.input_embeddings.weight"].dims(), &[8, 32]);
    assert_eq!(s2["model.input_embeddings.weight"].dtype(), DType::F32);
    assert!(s2.keys().all(|k| !k.contains("ret_text")
        && !k.contains("visual_fc")
        && !k.contains("logit_scale")));
    // stage1.safetensors: FuseModule + the fine-tuned vision tower, under the authors' names.
    let s1 = nn::Weights::open(out.join("storygpt-v/stage1.safetensors")).unwrap();
    assert!(s1
        .keys()
        .iter()
        .all(|k| k.starts_with("postfuse_module.") || k.starts_with("image_encoder.")));
    assert!(!s1.keys_with_prefix("image_encoder.").is_empty());

    let p = StoryPipeline::load(&out, &Device::Cpu).unwrap();
    let (eps, cond) = reference_steps(&p, 1e-4);
    eprintln!("f32 import: eps max abs error {eps:e}, condition max abs error {cond:e}");
    assert!(
        eps <= 1e-4,
        "stage-1 step (UNet epsilon): max abs error {eps}"
    );
    assert!(
        cond <= 1e-4,
        "stage-2 step (Mapper_LDM output): max abs error {cond}"
    );
}

#[test]
fn import_f16_stores_half_weights_that_still_match() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("half");
    let mut o = options(&out);
    o.f16 = true;
    import(&o).unwrap();
    let s2 =
        candle_core::safetensors::load(out.join("storygpt-v/stage2.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(s2.values().all(|t| t.dtype() == DType::F16));
    let unet = candle_core::safetensors::load(
        out.join("sd/unet/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert!(unet.values().all(|t| t.dtype() == DType::F16));
    // Computed in f32 from f16 weights: close, not exact.
    let p = StoryPipeline::load(&out, &Device::Cpu).unwrap();
    let (eps, cond) = reference_steps(&p, 2e-2);
    eprintln!("f16 import: eps max abs error {eps:e}, condition max abs error {cond:e}");
    assert!(
        eps < 2e-2 && cond < 2e-2,
        "f16 weights: eps {eps}, condition {cond}"
    );
}

#[test]
fn legacy_torch_pickle_and_bf16_zip_checkpoint_are_read() {
    let r = reference();
    // The CLIP vision fixture is in torch's legacy (non-zip) format.
    let bin = fixture().join("clip-vit/pytorch_model.bin");
    assert_eq!(&std::fs::read(&bin).unwrap()[..2], &[0x80, 0x02]);
    let w = nn::Weights::open(fixture().join("clip-vit")).unwrap();
    for name in [
        "visual_projection.weight",
        "vision_model.post_layernorm.bias",
    ] {
        let t = w.get(name, DType::F32, &Device::Cpu).unwrap();
        assert_close(&t, &r[&format!("legacy.{name}")], 0.0, name);
    }
    assert!(w.len() > 30, "{}", w.len());
    // Sharded zip-format pickles with an index (the OPT fixture).
    let opt = nn::Weights::open(fixture().join("opt")).unwrap();
    assert!(opt.contains("model.decoder.embed_tokens.weight"));
    assert!(opt.contains("model.decoder.final_layer_norm.weight"));
}

#[test]
fn legacy_torch_pickle_nested_half_views_and_skipped_storages() {
    // {'epoch', 'optimizer': {...tensors...}, 'state_dict': {f16, a view at an offset into a
    // shared storage, a transposed tensor, bf16}} saved with _use_new_zipfile_serialization=False.
    let path = fixture().join("legacy_nested.pth.tar");
    let want =
        candle_core::safetensors::load(fixture().join("legacy_nested.safetensors"), &Device::Cpu)
            .unwrap();
    for w in [
        nn::Weights::open(&path).unwrap(),
        nn::Weights::open_pickle(&path, Some("state_dict")).unwrap(),
    ] {
        assert_eq!(w.keys(), vec!["a.row", "a.t", "a.weight", "b.bias"]);
        assert_eq!(w.shape("a.t").unwrap(), vec![4, 3]);
        for (name, t) in &want {
            let got = w.get(name, DType::F32, &Device::Cpu).unwrap();
            assert_close(&got, t, 0.0, name);
        }
    }
    // A key that is not there: the error names the file.
    let err = nn::Weights::open_pickle(&path, Some("model"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("legacy_nested.pth.tar") && err.contains("model"),
        "{err}"
    );
}

/// Copies the fixture's `clip-vit` into `dir` with its weights as safetensors, edited by `edit`.
fn edited_clip(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let clip = dir.join("clip-edited");
    std::fs::create_dir_all(&clip).unwrap();
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(fixture().join("clip-vit").join(f), clip.join(f)).unwrap();
    }
    let w = nn::Weights::open(fixture().join("clip-vit")).unwrap();
    let mut t = w.load_all(DType::F32, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, clip.join("model.safetensors")).unwrap();
    clip
}

fn assert_nothing_left(parent: &Path, keep: &[&str]) {
    let left: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    assert!(
        left.is_empty(),
        "left behind after a failed import: {left:?}"
    );
}

#[test]
fn missing_tensor_is_named_with_its_file_and_nothing_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = edited_clip(tmp.path(), |t| {
        t.remove("vision_model.post_layernorm.weight");
    });
    let out_parent = tmp.path().join("out");
    let mut o = options(&out_parent.join("bundle"));
    o.clip = clip.clone();
    let err = format!("{:#}", import(&o).unwrap_err());
    assert!(
        err.contains("`vision_model.post_layernorm.weight`"),
        "{err}"
    );
    assert!(err.contains("not found"), "{err}");
    assert!(
        err.contains(&clip.join("model.safetensors").display().to_string()),
        "{err}"
    );
    assert_nothing_left(&out_parent, &[]);
}

#[test]
fn wrong_shape_names_tensor_file_and_expected_shape() {
    let tmp = tempfile::tempdir().unwrap();
    // A base checkpoint with a transposed projection.
    let clip = edited_clip(tmp.path(), |t| {
        let w = t["visual_projection.weight"]
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert("visual_projection.weight".into(), w);
    });
    let mut o = options(&tmp.path().join("a"));
    o.clip = clip.clone();
    let err = format!("{:#}", import(&o).unwrap_err());
    assert!(
        err.contains("tensor `visual_projection.weight` has shape [24, 32]")
            && err.contains(&clip.join("model.safetensors").display().to_string())
            && err.contains("expected [32, 24]"),
        "{err}"
    );
    assert!(!tmp.path().join("a").exists());

    // A UNet config that does not describe the authors' stage-1 UNet: the stage-1 tensor is
    // named with the stage-1 file.
    let sd = tmp.path().join("sd");
    for sub in ["tokenizer", "text_encoder", "unet", "vae", "scheduler"] {
        std::fs::create_dir_all(sd.join(sub)).unwrap();
        for e in std::fs::read_dir(fixture().join("sd").join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), sd.join(sub).join(e.file_name())).unwrap();
        }
    }
    let cfg_path = sd.join("unet/config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["block_out_channels"] = serde_json::json!([16, 16]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let mut o = options(&tmp.path().join("b"));
    o.sd = sd;
    let err = format!("{:#}", import(&o).unwrap_err());
    let stage1 = fixture().join("stage1/pytorch_model.bin");
    assert!(
        err.contains("tensor `unet.conv_in.weight` has shape [8, 4, 3, 3]")
            && err.contains(&stage1.display().to_string())
            && err.contains("expected [16, 4, 3, 3]"),
        "{err}"
    );
    assert!(!tmp.path().join("b").exists());
}

#[test]
fn missing_stage2_setting_and_unpacked_stage2_directory() {
    let tmp = tempfile::tempdir().unwrap();
    // Unpack the zip into a directory (the other accepted --stage2 form).
    let dir = tmp.path().join("stage2");
    std::fs::create_dir_all(&dir).unwrap();
    let mut zip =
        zip::ZipArchive::new(std::fs::File::open(fixture().join("stage2.zip")).unwrap()).unwrap();
    for i in 0..zip.len() {
        let mut f = zip.by_index(i).unwrap();
        let name = f.name().unwrap().rsplit('/').next().unwrap().to_string();
        let mut out = std::fs::File::create(dir.join(name)).unwrap();
        std::io::copy(&mut f, &mut out).unwrap();
    }
    let mut o = options(&tmp.path().join("ok"));
    o.stage2 = dir.clone();
    o.verify = false;
    import(&o).unwrap();
    assert!(tmp.path().join("ok/bundle.toml").is_file());

    // Without `num_tokens` anywhere, R is unknown: refused, naming the field and the files.
    for f in ["args.json", "model_args.json"] {
        let p = dir.join(f);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("num_tokens");
        std::fs::write(&p, v.to_string()).unwrap();
    }
    let mut o = options(&tmp.path().join("bad"));
    o.stage2 = dir.clone();
    let err = format!("{:#}", import(&o).unwrap_err());
    assert!(
        err.contains("num_tokens") && err.contains("model_args.json"),
        "{err}"
    );
    // Disagreeing files are refused too.
    let p = dir.join("args.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v["n_visual_tokens"] = serde_json::json!(2);
    v["num_tokens"] = serde_json::json!(8);
    std::fs::write(&p, v.to_string()).unwrap();
    let err = format!("{:#}", import(&o).unwrap_err());
    assert!(
        err.contains("n_visual_tokens") && err.contains("agree"),
        "{err}"
    );
    assert!(!tmp.path().join("bad").exists());
}

#[test]
fn non_empty_out_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("full");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = format!("{:#}", import(&options(&out)).unwrap_err());
    assert!(err.contains("not empty") && err.contains("full"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    assert_eq!(files(&out), vec!["keep.txt".to_string()]);
    assert_nothing_left(tmp.path(), &["full"]);

    // An empty directory is fine (and is replaced by the bundle).
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut o = options(&empty);
    o.verify = false;
    import(&o).unwrap();
    assert!(empty.join("bundle.toml").is_file());
}
