//! Weight loading: safetensors (single, sharded, directory), zip-format torch pickles written
//! by a test helper (top-level and nested under `state_dict`), error messages, prefixed views
//! and the frozen / trainable `VarBuilder`s.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use common::*;
use nn::{Linear, Weights, WeightsError};

fn cpu() -> Device {
    Device::Cpu
}

fn arange(n: usize, shape: &[usize]) -> Tensor {
    Tensor::arange(0f32, n as f32, &cpu())
        .unwrap()
        .reshape(shape)
        .unwrap()
}

fn save(path: &Path, tensors: &[(&str, Tensor)]) {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn single_safetensors_with_dtype_conversion_and_keys() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    save(
        &p,
        &[
            ("model.visual_embeddings.weight", arange(6, &[2, 3])),
            ("model.visual_embeddings.bias", arange(2, &[2])),
            ("lm.weight", arange(4, &[4]).to_dtype(DType::F16).unwrap()),
        ],
    );
    let w = Weights::open(&p).unwrap();
    assert_eq!(w.len(), 3);
    assert_eq!(w.keys()[0], "lm.weight");
    assert_eq!(
        w.shape("model.visual_embeddings.weight").unwrap(),
        vec![2, 3]
    );
    assert_eq!(w.file_of("lm.weight"), Some(p.as_path()));
    let lm = w.get("lm.weight", DType::F64, &cpu()).unwrap();
    assert_eq!(lm.dtype(), DType::F64);
    assert_eq!(lm.to_vec1::<f64>().unwrap(), vec![0., 1., 2., 3.]);

    // A prefixed subset strips the prefix; a trailing dot is optional.
    let sub = w.subset("model.visual_embeddings");
    assert_eq!(sub.keys(), vec!["bias".to_string(), "weight".to_string()]);
    assert_eq!(
        w.subset("model.").subset("visual_embeddings.").keys().len(),
        2
    );
    assert_eq!(w.keys_with_prefix("model.").len(), 2);
    let all = sub.load_all(DType::F32, &cpu()).unwrap();
    assert_close(&all["weight"], &arange(6, &[2, 3]), 0.0);

    // The same constructor as training, reading frozen weights through a VarBuilder.
    let lin = Linear::new(sub.var_builder(DType::F16, &cpu()), 3, 2, true).unwrap();
    assert_eq!(lin.weight().dtype(), DType::F16);
    assert!(!lin.weight().is_variable());
    let vb = w.var_builder(DType::F32, &cpu());
    assert!(vb.contains_tensor("lm.weight"));
    assert!(vb
        .pp("model")
        .pp("visual_embeddings")
        .contains_tensor("bias"));
    // Opening the directory finds model.safetensors.
    assert_eq!(Weights::open(dir.path()).unwrap().len(), 3);
}

#[test]
fn error_messages_name_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("diffusion_pytorch_model.safetensors");
    save(
        &p,
        &[(
            "down_blocks.0.attentions.0.proj_in.weight",
            arange(16, &[4, 4, 1, 1]),
        )],
    );
    let w = Weights::open(&p).unwrap();
    let vb = w.var_builder(DType::F32, &cpu());
    let err = vb
        .pp("down_blocks.0.attentions.0.proj_in")
        .get((4, 4), "weight")
        .unwrap_err()
        .to_string();
    let expect = format!(
        "tensor `down_blocks.0.attentions.0.proj_in.weight` has shape [4, 4, 1, 1] in {}, expected [4, 4]",
        p.display()
    );
    assert!(err.contains(&expect), "{err}");

    let err = vb
        .get(4, "down_blocks.0.attentions.0.proj_in.bias")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tensor `down_blocks.0.attentions.0.proj_in.bias` not found in"),
        "{err}"
    );
    assert!(err.contains(&p.display().to_string()), "{err}");
    assert!(
        err.contains("nearest names: down_blocks.0.attentions.0.proj_in.weight"),
        "{err}"
    );

    // Typed errors are available without going through candle.
    match w
        .subset("down_blocks.0")
        .get_with_shape("nope", &4.into(), DType::F32, &cpu())
    {
        Err(WeightsError::Missing { name, .. }) => assert_eq!(name, "down_blocks.0.nope"),
        other => panic!("{other:?}"),
    }
    let err = Weights::open(dir.path().join("absent.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
}

#[test]
fn sharded_safetensors_via_index() {
    let dir = tempfile::tempdir().unwrap();
    save(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[("a.weight", arange(4, &[2, 2]))],
    );
    save(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("b.weight", arange(3, &[3]))],
    );
    let index = serde_json::json!({
        "metadata": {"total_size": 28},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors"
        }
    });
    let ip = dir.path().join("model.safetensors.index.json");
    std::fs::write(&ip, index.to_string()).unwrap();
    for w in [
        Weights::open(&ip).unwrap(),
        Weights::open(dir.path()).unwrap(),
    ] {
        assert_eq!(
            w.keys(),
            vec!["a.weight".to_string(), "b.weight".to_string()]
        );
        assert_eq!(w.files().len(), 2);
        assert!(w
            .file_of("b.weight")
            .unwrap()
            .ends_with("model-00002-of-00002.safetensors"));
        let b = w.get("b.weight", DType::F32, &cpu()).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![0., 1., 2.]);
        // The index promised c.weight in shard 2: the error names that shard.
        let err = w
            .get("c.weight", DType::F32, &cpu())
            .unwrap_err()
            .to_string();
        assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");
        assert!(err.contains("c.weight"), "{err}");
    }
    // Several paths merged: the later one wins.
    let extra = dir.path().join("extra.safetensors");
    save(
        &extra,
        &[("b.weight", Tensor::new(&[9f32, 9., 9.], &cpu()).unwrap())],
    );
    let merged = Weights::open_many(&[ip.as_path(), extra.as_path()]).unwrap();
    assert_eq!(
        merged
            .get("b.weight", DType::F32, &cpu())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![9., 9., 9.]
    );
    assert_eq!(merged.len(), 2);
}

fn pickle_fixture(path: &Path, nest: Option<&str>) {
    // Storage "0" holds 10 floats shared by two tensors (as torch saves views of one storage);
    // storage "1" holds a 2x3 tensor saved transposed (Fortran-contiguous strides).
    let s0: Vec<f32> = (0..10).map(|i| i as f32).collect();
    let s1: Vec<f32> = vec![1., 4., 2., 5., 3., 6.]; // column-major [[1,2,3],[4,5,6]]
    write_torch_zip(
        path,
        &[
            PthEntry {
                name: "fuse.mlp1.0.weight",
                storage_class: "FloatStorage",
                storage_key: "0",
                offset: 0,
                shape: &[2, 3],
                stride: &[3, 1],
            },
            PthEntry {
                name: "fuse.mlp1.0.bias",
                storage_class: "FloatStorage",
                storage_key: "0",
                offset: 6,
                shape: &[2],
                stride: &[1],
            },
            PthEntry {
                name: "fuse.ln.weight",
                storage_class: "FloatStorage",
                storage_key: "1",
                offset: 0,
                shape: &[2, 3],
                stride: &[1, 2],
            },
        ],
        &[("0", f32_bytes(&s0), 10), ("1", f32_bytes(&s1), 6)],
        nest,
    );
}

fn check_pickle(w: &Weights) {
    assert_eq!(w.len(), 3, "{:?}", w.keys());
    let weight = w.get("fuse.mlp1.0.weight", DType::F32, &cpu()).unwrap();
    assert_close(&weight, &arange(6, &[2, 3]), 0.0);
    let bias = w.get("fuse.mlp1.0.bias", DType::F64, &cpu()).unwrap();
    assert_eq!(bias.to_vec1::<f64>().unwrap(), vec![6., 7.]);
    let t = w.get("fuse.ln.weight", DType::F32, &cpu()).unwrap();
    assert_eq!(
        t.to_vec2::<f32>().unwrap(),
        vec![vec![1., 2., 3.], vec![4., 5., 6.]]
    );
    let lin = Linear::new(
        w.subset("fuse.mlp1.0").var_builder(DType::F32, &cpu()),
        3,
        2,
        true,
    )
    .unwrap();
    let y = lin
        .forward(&Tensor::new(&[[1f32, 0., 0.]], &cpu()).unwrap())
        .unwrap();
    assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![6., 10.]]);
}

#[test]
fn torch_pickle_bin_top_level_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_model.bin");
    pickle_fixture(&p, None);
    check_pickle(&Weights::open(&p).unwrap());
    check_pickle(&Weights::open(dir.path()).unwrap());
    // candle's own reader agrees on the fixture.
    let raw = candle_core::pickle::read_all_with_key(&p, None).unwrap();
    assert_eq!(raw.len(), 3);
    let err = Weights::open(&p)
        .unwrap()
        .get("missing", DType::F32, &cpu())
        .unwrap_err()
        .to_string();
    assert!(err.contains("pytorch_model.bin"), "{err}");
}

#[test]
fn torch_pth_tar_nested_under_state_dict() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("checkpoint.pth.tar");
    pickle_fixture(&p, Some("state_dict"));
    // Found automatically, or by naming the key.
    check_pickle(&Weights::open(&p).unwrap());
    check_pickle(&Weights::open_pickle(&p, Some("state_dict")).unwrap());
    assert!(Weights::open_pickle(&p, Some("optimizer")).is_err());
    // Not a zip: the error says which file and why.
    let bad = dir.path().join("legacy.pth");
    std::fs::write(&bad, b"\x80\x02not a zip").unwrap();
    let err = Weights::open(&bad).unwrap_err().to_string();
    assert!(err.contains("legacy.pth") && err.contains("zip"), "{err}");
}

#[test]
fn trainable_var_builder_and_load_into_varmap() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.safetensors");
    save(
        &p,
        &[
            ("proj.weight", arange(6, &[2, 3])),
            ("proj.bias", arange(2, &[2])),
        ],
    );
    let w = Weights::open(&p).unwrap();

    // Fine-tuning: the same constructor, weights loaded into Vars registered in the VarMap.
    let vm = VarMap::new();
    let lin = Linear::new(
        w.trainable_var_builder(&vm, DType::F32, &cpu()).pp("proj"),
        3,
        2,
        true,
    )
    .unwrap();
    assert!(lin.weight().is_variable());
    assert_eq!(vm.all_vars().len(), 2);
    assert_close(lin.weight(), &arange(6, &[2, 3]), 0.0);
    let err = Linear::new(
        w.trainable_var_builder(&vm, DType::F32, &cpu()).pp("other"),
        3,
        2,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("other.weight") && err.contains("m.safetensors"),
        "{err}"
    );

    // Or: build fresh Vars, then overwrite them from the checkpoint.
    let vm = VarMap::new();
    let lin = Linear::new(
        candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &cpu()).pp("proj"),
        3,
        2,
        true,
    )
    .unwrap();
    w.load_into_varmap(&vm).unwrap();
    assert_close(lin.bias().unwrap(), &arange(2, &[2]), 0.0);
    let vm2 = VarMap::new();
    Linear::new(
        candle_nn::VarBuilder::from_varmap(&vm2, DType::F32, &cpu()).pp("proj"),
        2,
        2,
        false,
    )
    .unwrap();
    let err = w.load_into_varmap(&vm2).unwrap_err().to_string();
    assert!(
        err.contains("has shape [2, 3]") && err.contains("expected [2, 2]"),
        "{err}"
    );
}

#[test]
fn in_memory_weights() {
    let mut m = HashMap::new();
    m.insert("x.weight".to_string(), arange(4, &[2, 2]));
    let w = Weights::from_tensors(m, "<toy bundle>");
    assert!(w.contains("x.weight"));
    let err = w.get("y", DType::F32, &cpu()).unwrap_err().to_string();
    assert!(err.contains("<toy bundle>"), "{err}");
}
