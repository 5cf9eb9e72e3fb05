//! The CLIP tokenizer against transformers' on a vocabulary of our own making
//! (`fixtures/clip_tokenizer/cases.json`, from `tools/fixtures/make_clip_scheduler_fixtures.py`),
//! from `vocab.json` + `merges.txt` and from `tokenizer.json`; and the name -> token lookup.

use models::clip::ClipTokenizer;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn cases() -> serde_json::Value {
    let p = fixtures().join("clip_tokenizer/cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn check(tok: &ClipTokenizer) {
    let c = cases();
    let caps = c["captions"].as_array().unwrap();
    for (i, cap) in caps.iter().enumerate() {
        let cap = cap.as_str().unwrap();
        let enc = tok.encode(cap);
        assert_eq!(enc.ids, ids(&c["input_ids"][i]), "ids of {cap:?}");
        assert_eq!(
            enc.attention_mask,
            ids(&c["attention_mask"][i]),
            "mask of {cap:?}"
        );
        assert_eq!(
            tok.encode_unpadded(cap),
            ids(&c["unpadded_ids"][i]),
            "unpadded {cap:?}"
        );
        let want: Vec<String> = c["tokens"][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(tok.tokenize(cap), want, "tokens of {cap:?}");
    }
}

#[test]
fn vocab_and_merges_match_transformers() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip_tokenizer")).unwrap();
    assert_eq!(tok.max_length(), 77);
    assert_eq!(tok.pad_id(), tok.eos_id(), "SD 1.5 pads with <|endoftext|>");
    check(&tok);
}

#[test]
fn tokenizer_json_matches_transformers() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip_tokenizer_json")).unwrap();
    check(&tok);
}

#[test]
fn truncates_to_77_with_eos_last() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip_tokenizer")).unwrap();
    let long = "fred walks to the quarry ".repeat(30);
    let enc = tok.encode(&long);
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.ids[0], tok.bos_id());
    assert_eq!(enc.ids[76], tok.eos_id());
    assert!(enc.attention_mask.iter().all(|&m| m == 1));
    assert!(enc.words.iter().all(|(_, r)| r.end <= 76));
}

#[test]
fn fit_says_how_much_of_a_caption_is_read() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip_tokenizer")).unwrap();
    let short = tok.fit("Fred walks to the quarry.");
    assert_eq!(short.limit, 75);
    assert_eq!(
        short.tokens,
        tok.encode_unpadded("Fred walks to the quarry.").len() - 2
    );
    assert_eq!(short.first_dropped, None);
    // Past 75 tokens the encoder drops the rest; `fit` names the first word cut off. Plain
    // lower-case words are one pre-token each, so the expected word is found by counting.
    let long = format!(
        "{}and then barney waves",
        "fred walks to the quarry ".repeat(20)
    );
    let fit = tok.fit(&long);
    assert_eq!(fit.tokens, tok.encode_unpadded(&long).len() - 2);
    assert!(fit.tokens > 75);
    let mut used = 0;
    let expected = long
        .split_whitespace()
        .find(|word| {
            used += tok.encode_unpadded(word).len() - 2;
            used > 75
        })
        .unwrap();
    assert_eq!(fit.first_dropped.as_deref(), Some(expected));
}

#[test]
fn finds_the_last_token_of_names() {
    let tok = ClipTokenizer::from_dir(&fixtures().join("clip_tokenizer")).unwrap();
    let cap = "Mr Slate shouts at Fred's desk, while Barney waits.";
    let enc = tok.encode(cap);
    // "mr</w>" "slate</w>" are tokens 1 and 2; "fred</w>" is 5, "'s</w>" 6.
    let slate = tok.find_phrase(cap, "Mr Slate");
    assert_eq!(slate, vec![1..3]);
    assert_eq!(tok.last_token_index(cap, "mr slate"), Some(2));
    assert_eq!(tok.last_token_index(cap, "FRED"), Some(5));
    assert_eq!(tok.decode(&enc.ids[5..6]), "fred");
    assert_eq!(tok.last_token_index(cap, "Barney"), Some(10));
    assert_eq!(tok.last_token_index(cap, "Wilma"), None);
    // Several occurrences, whole words only, punctuation inside a multi-word name skipped.
    let cap = "Fred fred FRED Freddy Mr. Slate mr slate";
    assert_eq!(tok.find_phrase(cap, "Fred").len(), 3);
    let slates = tok.find_phrase(cap, "Mr Slate");
    assert_eq!(slates.len(), 2);
    let enc = tok.encode(cap);
    for r in &slates {
        assert_eq!(tok.decode(&enc.ids[r.end - 1..r.end]), "slate");
    }
    // A name split into several BPE tokens: the range covers them all.
    let cap = "Betty laughs with Wilma";
    let r = tok.find_phrase(cap, "betty")[0].clone();
    let enc = tok.encode(cap);
    assert_eq!(tok.decode(&enc.ids[r.clone()]), "betty");
    assert_eq!(tok.last_token_index(cap, "Betty"), Some(r.end - 1));
}

#[test]
fn missing_tokenizer_names_the_directory() {
    let err = ClipTokenizer::from_dir(Path::new("/nonexistent/tok"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/tok"), "{err}");
}
