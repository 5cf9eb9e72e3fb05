//! Reader round trips: a generated toy dataset read back exactly, byte-identical output for
//! the same seed, and a hand-made FlintstonesSV-style directory (list annotations, str-array
//! following cache, Fortran-ordered float masks, (K,H,W) mask stacks).

use std::collections::BTreeMap;
use std::path::Path;

use data::dataset::{DatasetKind, DatasetReader, Split};
use data::ndarray::{DType, NdArray};
use data::npy::{to_npy_bytes, write_npy};
use data::pickle::{write_pickle, Value};
use data::toyworld::{self, Backgrounds, ToyConfig};

fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(
                    p.strip_prefix(root).unwrap().display().to_string(),
                    std::fs::read(&p).unwrap(),
                );
            }
        }
    }
    out
}

#[test]
fn toy_dataset_reads_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ToyConfig {
        stories: 20,
        size: 32,
        seed: 11,
        story_len: 5,
        threads: 2,
    };
    let report = toyworld::generate(dir.path(), &cfg).unwrap();
    assert_eq!(report.splits, [16, 2, 2]);
    let reader = DatasetReader::open(dir.path(), DatasetKind::Auto, 5).unwrap();
    assert_eq!(reader.rules().characters.len(), 7);
    assert_eq!(reader.backgrounds().unwrap().len(), 10);
    let ids = reader.story_ids(Split::Train);
    assert_eq!(ids.len(), 16);
    assert_eq!(
        reader.story_ids(Split::Test),
        vec![toyworld::frame_id(9, 0), toyworld::frame_id(19, 0)]
    );
    let bgs = Backgrounds::new(32);
    let ann: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("cleaned_annotations.json")).unwrap(),
    )
    .unwrap();
    for (i, id) in ids.iter().enumerate().take(8) {
        let n = if i < 8 { i } else { i + 2 };
        let truth = toyworld::story(11, n, 5);
        let story = reader.load_story(id, 0).unwrap();
        assert_eq!(story.frames.len(), 5);
        // The LM's text-only corpus draws the same story, both caption forms, without frames.
        let (captions, referential) = toyworld::story_text(11, n, 5, &toyworld::rules());
        let both = |f: &data::dataset::FrameRecord| (f.caption.clone(), f.referential.clone());
        assert_eq!(
            story.frames.iter().map(both).collect::<Vec<_>>(),
            captions.into_iter().zip(referential).collect::<Vec<_>>()
        );
        for (f, t) in story.frames.iter().zip(&truth.frames) {
            assert_eq!(f.caption, t.caption);
            assert_eq!(
                Some(f.referential.as_str()),
                ann[&f.id]["referential"].as_str()
            );
            let canvas = toyworld::render_frame(t, &bgs, 32);
            assert_eq!(f.image.as_ref().unwrap().as_raw(), &canvas.rgb);
            let mut names: Vec<&str> = t
                .placements
                .iter()
                .map(|p| toyworld::cast::CAST[p.character].name)
                .collect();
            names.sort_unstable();
            let mut got: Vec<&str> = f.characters.iter().map(String::as_str).collect();
            got.sort_unstable();
            assert_eq!(got, names);
            assert_eq!(
                f.char_labels.iter().filter(|&&v| v == 1.0).count(),
                names.len()
            );
            assert_eq!(f.bg_labels.iter().filter(|&&v| v == 1.0).count(), 1);
            assert_eq!(
                f.background.as_deref(),
                Some(toyworld::scenes::SCENES[t.scene].name)
            );
            for m in &f.masks {
                let idx = toyworld::cast::CAST
                    .iter()
                    .position(|c| c.name == m.name)
                    .unwrap();
                let expect: Vec<bool> = canvas.ids.iter().map(|&v| v as usize == idx + 1).collect();
                assert_eq!(m.mask, expect);
                assert_eq!(Some(m.bbox), data::dataset::mask_bbox(&expect, 32));
            }
        }
    }
    // The paper's four-frame stories come from following_cache3.pkl.
    let four = DatasetReader::open(dir.path(), DatasetKind::Auto, 4).unwrap();
    assert_eq!(four.story_text(&ids[0]).unwrap().frames.len(), 4);
    let st = reader.stats("Toy world", None).unwrap();
    assert_eq!(
        (st.stories, st.frames, st.characters, st.backgrounds),
        (20, 100, 7, Some(10))
    );
    assert!(st.refs_after > st.refs_before);
}

#[test]
fn long_stories_serve_every_shorter_length() {
    // 20-frame stories write following_cache3.pkl and following_cache19.pkl only; a 10-frame
    // reader cuts the longer cache (the evaluation's long-story table reads one dataset at
    // several lengths), and a length past the longest is refused by name.
    let dir = tempfile::tempdir().unwrap();
    let cfg = ToyConfig {
        stories: 10,
        size: 16,
        seed: 2,
        story_len: 20,
        threads: 1,
    };
    toyworld::generate(dir.path(), &cfg).unwrap();
    let long = DatasetReader::open(dir.path(), DatasetKind::Auto, 20).unwrap();
    let id = &long.story_ids(Split::Test)[0];
    let whole = long.story_text(id).unwrap();
    for len in [4, 10, 20] {
        let r = DatasetReader::open(dir.path(), DatasetKind::Auto, len).unwrap();
        let st = r.story_text(id).unwrap();
        assert_eq!(st.frames.len(), len);
        for (a, b) in st.frames.iter().zip(&whole.frames) {
            assert_eq!((&a.id, &a.caption), (&b.id, &b.caption));
        }
    }
    let err = DatasetReader::open(dir.path(), DatasetKind::Auto, 21).unwrap_err();
    assert!(err.to_string().contains("following_cache20"), "{err}");
}

#[test]
fn same_seed_same_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cfg = ToyConfig {
        stories: 6,
        size: 24,
        seed: 5,
        story_len: 5,
        threads: 1,
    };
    toyworld::generate(a.path(), &cfg).unwrap();
    toyworld::generate(
        b.path(),
        &ToyConfig {
            threads: 3,
            ..cfg.clone()
        },
    )
    .unwrap();
    toyworld::generate(c.path(), &ToyConfig { seed: 6, ..cfg }).unwrap();
    let (fa, fb, fc) = (files(a.path()), files(b.path()), files(c.path()));
    assert_eq!(fa.len(), 7 + 6 * 5 * 2 + 8);
    assert!(fa == fb, "same seed must give identical files");
    assert!(fa != fc);
}

fn str_ids(ids: &[&str]) -> Value {
    Value::Array(NdArray::from_strings(
        &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    ))
}

#[test]
fn flintstones_style_directory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let ids = [
        "s_01_e_01_shot_1",
        "s_01_e_01_shot_2",
        "s_01_e_01_shot_3",
        "s_01_e_01_shot_4",
    ];
    std::fs::write(
        root.join("train-val-test_split.json"),
        serde_json::json!({"train": [], "val": [], "test": ids}).to_string(),
    )
    .unwrap();
    let follow = Value::Dict(vec![(Value::Str(ids[0].into()), str_ids(&ids[1..]))]);
    write_pickle(&root.join("following_cache3.pkl"), &follow).unwrap();
    let records = serde_json::json!([
        {"globalID": ids[0], "description": "Fred and Barney walk to Mr. Slate's quarry.", "setting": "quarry",
         "characters": [{"entityLabel": "Fred", "labelNPC": "x"}, {"entityLabel": " barney"}]},
        {"globalID": ids[1], "description": "Barney and Fred talk.", "setting": "quarry",
         "characters": [{"entityLabel": "barney"}, {"entityLabel": "fred"}]},
        {"globalID": ids[2], "description": "Mr. Slate yells.", "setting": "office", "characters": [{"entityLabel": "Mr Slate"}]},
        {"globalID": ids[3], "description": "Mr. Slate sits at his desk.", "setting": "office", "characters": [{"entityLabel": "slate"}]},
    ]);
    std::fs::write(root.join("cleaned_annotations.json"), records.to_string()).unwrap();
    let labels: Vec<(Value, Value)> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let hot: Vec<Value> = (0..7)
                .map(|k| Value::Int((i < 2 && (k == 0 || k == 2) || i >= 2 && k == 6) as i64))
                .collect();
            (Value::Str(id.to_string()), Value::List(hot))
        })
        .collect();
    write_pickle(&root.join("labels.pkl"), &Value::Dict(labels)).unwrap();
    std::fs::create_dir_all(root.join("video_frames_sampled_4x")).unwrap();
    std::fs::create_dir_all(root.join("seg_mask_4x_comb")).unwrap();
    for (i, id) in ids.iter().enumerate() {
        let clip = NdArray::from_u8(vec![3, 4, 6, 3], (0..216).map(|v| (v + i) as u8).collect());
        write_npy(
            &root.join(format!("video_frames_sampled_4x/{id}.npy")),
            &clip,
        )
        .unwrap();
    }
    // Frame 0: a Fortran-ordered float (K,H,W) stack, one plane per labelled character.
    let mut planes = [0f32; 2 * 4 * 6];
    planes[1] = 1.0; // Fred at (x=1, y=0)
    planes[24 + 6 * 2 + 3] = 1.0; // Barney at (x=3, y=2)
    let mut fortran = vec![0u8; planes.len() * 4];
    for k in 0..2 {
        for y in 0..4 {
            for x in 0..6 {
                let f = k + 2 * (y + 4 * x);
                fortran[f * 4..f * 4 + 4]
                    .copy_from_slice(&planes[k * 24 + y * 6 + x].to_le_bytes());
            }
        }
    }
    let stack = NdArray::from_raw(DType::F32, vec![2, 4, 6], false, &fortran).unwrap();
    let mut bytes = to_npy_bytes(&stack).unwrap();
    let header = String::from_utf8_lossy(&bytes[10..74])
        .replace("'fortran_order': False", "'fortran_order': True ");
    bytes[10..74].copy_from_slice(header.as_bytes());
    std::fs::write(
        root.join(format!("seg_mask_4x_comb/{}-frame2.npy", ids[0])),
        bytes,
    )
    .unwrap();

    let reader = DatasetReader::open(root, DatasetKind::Flintstones, 4).unwrap();
    assert_eq!(reader.story_ids(Split::Test), vec![ids[0].to_string()]);
    let story = reader.load_story(ids[0], 2).unwrap();
    let refs: Vec<&str> = story
        .frames
        .iter()
        .map(|f| f.referential.as_str())
        .collect();
    assert_eq!(
        refs,
        vec![
            "Fred and Barney walk to Mr. Slate's quarry.",
            "They talk.",
            "Mr. Slate yells.",
            "He sits at his desk."
        ]
    );
    assert_eq!(story.frames[0].characters, vec!["Fred", "Barney"]);
    assert_eq!(
        story.frames[0].char_labels,
        vec![1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(story.frames[2].background.as_deref(), Some("office"));
    let img = story.frames[1].image.as_ref().unwrap();
    assert_eq!(
        (img.width(), img.height(), img.as_raw()[0]),
        (6, 4, (2 * 72 + 1) as u8)
    );
    let m = &story.frames[0].masks;
    assert_eq!(m.len(), 2);
    assert_eq!((m[0].name.as_str(), m[0].bbox), ("Fred", [1, 0, 2, 1]));
    assert_eq!((m[1].name.as_str(), m[1].bbox), ("Barney", [3, 2, 4, 3]));
    assert!(story.frames[1].masks.is_empty());
    let st = reader.stats("FlintstonesSV", None).unwrap();
    assert_eq!(
        (st.backgrounds, st.refs_before, st.refs_after),
        (Some(2), 1.0, 3.0)
    );
}
