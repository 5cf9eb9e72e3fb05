//! Byte-level BPE vocabularies learned from a small corpus, for bundles made without a model
//! hub (the random toy bundle). Two output formats, read back by the same loaders that read the
//! real checkpoints:
//!
//! * CLIP (`vocab.json` + `merges.txt`): words are lower-cased, split like CLIP's tokenizer,
//!   bytes mapped through the GPT-2 byte table, `</w>` appended to a word's last symbol.
//! * A GPT-2 / OPT style `tokenizer.json` (byte-level pre-tokenizer, BPE model, `<s>`, `<pad>`,
//!   `</s>`, `<unk>` at ids 0..3 as in OPT).
//!
//! The 256 single bytes (and, for CLIP, their `</w>` forms) are always in the vocabulary, so any
//! text can be encoded; the learned merges only make the corpus's words short. Learning is
//! deterministic: the most frequent pair wins, ties go to the lexicographically smallest pair.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{json, Value};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};

use crate::clip::tokenizer::bytes_to_unicode;

/// Learns up to `max_merges` merges over `words` (symbol sequences with counts); pairs seen
/// fewer than `min_count` times are never merged.
pub fn learn_merges(
    words: &BTreeMap<Vec<String>, u64>,
    max_merges: usize,
    min_count: u64,
) -> Vec<(String, String)> {
    let mut words: Vec<(Vec<String>, u64)> = words.iter().map(|(w, c)| (w.clone(), *c)).collect();
    let mut merges = Vec::new();
    while merges.len() < max_merges {
        let mut counts: BTreeMap<(&str, &str), u64> = BTreeMap::new();
        for (w, c) in &words {
            for p in w.windows(2) {
                *counts.entry((p[0].as_str(), p[1].as_str())).or_default() += c;
            }
        }
        // BTreeMap iteration is ordered, so `max_by` keeping the first maximum breaks ties
        // towards the smallest pair.
        let Some(((a, b), n)) =
            counts
                .into_iter()
                .fold(None::<((&str, &str), u64)>, |best, (p, n)| match best {
                    Some((_, bn)) if bn >= n => best,
                    _ => Some((p, n)),
                })
        else {
            break;
        };
        if n < min_count {
            break;
        }
        let (a, b) = (a.to_owned(), b.to_owned());
        let joined = format!("{a}{b}");
        for (w, _) in &mut words {
            let mut i = 0;
            while i + 1 < w.len() {
                if w[i] == a && w[i + 1] == b {
                    w[i] = joined.clone();
                    w.remove(i + 1);
                }
                i += 1;
            }
        }
        merges.push((a, b));
    }
    merges
}

fn byte_symbols(word: &str, table: &[char; 256]) -> Vec<String> {
    word.bytes()
        .map(|b| table[b as usize].to_string())
        .collect()
}

/// Splits lower-cased text into CLIP words (letter runs, single digits, other runs).
fn clip_words(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+").expect("valid regex");
    re.find_iter(&text.to_lowercase())
        .map(|m| m.as_str().to_owned())
        .collect()
}

/// Writes a CLIP tokenizer (`vocab.json`, `merges.txt`, `tokenizer_config.json`) learned from
/// `corpus` into `dir`; returns the vocabulary size.
pub fn write_clip_tokenizer(dir: &Path, corpus: &[String], max_merges: usize) -> Result<usize> {
    let table = bytes_to_unicode();
    let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for line in corpus {
        for w in clip_words(line) {
            let mut s = byte_symbols(&w, &table);
            if let Some(last) = s.last_mut() {
                last.push_str("</w>");
            }
            *words.entry(s).or_default() += 1;
        }
    }
    let merges = learn_merges(&words, max_merges, 2);
    let mut vocab: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    vocab.extend(table.iter().map(|c| format!("{c}</w>")));
    for (a, b) in &merges {
        vocab.push(format!("{a}{b}"));
    }
    vocab.push("<|startoftext|>".into());
    vocab.push("<|endoftext|>".into());
    let map: BTreeMap<&str, usize> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map)?)?;
    let mut text = String::from("#version: 0.2\n");
    for (a, b) in &merges {
        text.push_str(&format!("{a} {b}\n"));
    }
    std::fs::write(dir.join("merges.txt"), text)?;
    let cfg = json!({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    });
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    Ok(vocab.len())
}

/// OPT's special tokens, in id order.
pub const LLM_SPECIAL_TOKENS: [&str; 4] = ["<s>", "<pad>", "</s>", "<unk>"];

/// Writes a byte-level BPE `tokenizer.json` (plus `tokenizer_config.json` naming `</s>` as BOS,
/// as OPT does) learned from `corpus` into `dir`; returns the vocabulary size.
pub fn write_llm_tokenizer(dir: &Path, corpus: &[String], max_merges: usize) -> Result<usize> {
    let splitter = ByteLevel::new(false, true, true);
    let mut words: BTreeMap<Vec<String>, u64> = BTreeMap::new();
    for line in corpus {
        let mut pts = PreTokenizedString::from(line.as_str());
        splitter
            .pre_tokenize(&mut pts)
            .map_err(|e| anyhow::anyhow!("pre-tokenizing the corpus: {e}"))?;
        for (piece, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
            let symbols: Vec<String> = piece.chars().map(|c| c.to_string()).collect();
            *words.entry(symbols).or_default() += 1;
        }
    }
    let merges = learn_merges(&words, max_merges, 2);
    let mut vocab: Vec<String> = LLM_SPECIAL_TOKENS.iter().map(|s| s.to_string()).collect();
    let mut alphabet: Vec<char> = bytes_to_unicode().to_vec();
    alphabet.sort_unstable();
    vocab.extend(alphabet.iter().map(|c| c.to_string()));
    for (a, b) in &merges {
        let t = format!("{a}{b}");
        if !vocab.contains(&t) {
            vocab.push(t);
        }
    }
    let map: serde_json::Map<String, Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = LLM_SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": true, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let tok = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": map,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    });
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok)?)?;
    let cfg = json!({"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>",
                     "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"});
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&cfg)?,
    )?;
    Ok(vocab.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clip::ClipTokenizer;
    use crate::llm::LlmTokenizer;

    fn corpus() -> Vec<String> {
        [
            "Tom walks in the park.",
            "Tom waves at Mia.",
            "Mia walks to the park. She waves.",
            "They walk in the park together.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn merges_are_deterministic_and_frequency_ordered() {
        let mut words = BTreeMap::new();
        words.insert(vec!["a".into(), "b".into(), "c".into()], 5);
        words.insert(vec!["b".into(), "c".into()], 3);
        words.insert(vec!["x".into(), "y".into()], 1);
        let m = learn_merges(&words, 10, 2);
        // (b, c) occurs 8 times, then (a, bc) 5 times; (x, y) is below min_count.
        assert_eq!(m, vec![("b".into(), "c".into()), ("a".into(), "bc".into())]);
        assert_eq!(learn_merges(&words, 10, 2), m);
    }

    #[test]
    fn clip_tokenizer_round_trips_corpus_words_into_few_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_clip_tokenizer(dir.path(), &corpus(), 200).unwrap();
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert!(n > 512);
        let ids = tok.encode_unpadded("Tom walks in the park.");
        // bos + 6 words/punctuation (each a single token after learning) + eos.
        assert_eq!(ids.len(), 8, "{ids:?}");
        // Unseen words still encode (byte fallback through the single-byte vocabulary).
        let ids = tok.encode_unpadded("Zebra ünïcode 42");
        assert!(ids.len() > 6);
    }

    #[test]
    fn llm_tokenizer_loads_and_decodes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        write_llm_tokenizer(dir.path(), &corpus(), 200).unwrap();
        let tok = LlmTokenizer::from_dir(dir.path(), 8).unwrap();
        assert_eq!(tok.bos_id(), Some(2));
        for text in [" Tom waves at Mia.", " Zoë throws 3 apples!"] {
            let ids = tok.encode(text).unwrap();
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
        // Every corpus word was seen at least twice, so each is one token.
        let doubled: Vec<String> = corpus().into_iter().flat_map(|l| [l.clone(), l]).collect();
        let dir2 = tempfile::tempdir().unwrap();
        write_llm_tokenizer(dir2.path(), &doubled, 200).unwrap();
        let tok2 = LlmTokenizer::from_dir(dir2.path(), 8).unwrap();
        assert_eq!(tok2.encode("Tom waves at Mia.").unwrap().len(), 5);
        assert_eq!(
            tok.first_img_id() as usize,
            tok.inner().get_vocab_size(false)
        );
    }
}
