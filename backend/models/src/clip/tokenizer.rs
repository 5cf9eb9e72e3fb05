//! The CLIP byte-level BPE tokenizer (transformers `CLIPTokenizer` / `CLIPTokenizerFast`),
//! written in Rust, plus the word -> token-index lookup the FuseModule needs.
//!
//! Pipeline, as in transformers: whitespace runs collapse to one space and the text is
//! lowercased; CLIP's regex splits it into pre-tokens (`'s`, `'t`, ... contractions, letter runs,
//! single digits, punctuation runs); each pre-token's UTF-8 bytes are mapped through GPT-2's
//! `bytes_to_unicode` table, `</w>` is appended to its last symbol and the merges are applied by
//! rank. `encode` adds `<|startoftext|>` / `<|endoftext|>`, truncates to `model_max_length`
//! (77) and pads with the configured pad token (SD 1.5: `<|endoftext|>`).
//!
//! Differences from Python, documented rather than hidden: no NFC normalisation (captions in
//! composed form, the usual case, are unaffected) and no `ftfy` repair (transformers skips it
//! too unless `ftfy` is installed).
//!
//! Loads `vocab.json` + `merges.txt` (SD's `tokenizer/` directory) or a `tokenizer.json`.

use anyhow::{bail, Context, Result};
use regex::Regex;
use serde_json::Value;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";
/// transformers reads at most this many merges from `merges.txt` (`49152 - 256 - 2`).
const MAX_MERGES: usize = 48894;

/// A vocabulary (token -> id) and its merges, in rank order.
pub type VocabMerges = (HashMap<String, u32>, Vec<(String, String)>);

/// The result of [`ClipTokenizer::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoding {
    /// `max_length` ids: BOS, tokens (truncated), EOS, padding.
    pub ids: Vec<u32>,
    /// 1 for BOS, tokens and EOS; 0 for padding.
    pub attention_mask: Vec<u32>,
    /// Per pre-token (word or punctuation run): its text and its token range in `ids`
    /// (ranges of truncated pre-tokens are cut; fully truncated ones are dropped).
    pub words: Vec<(String, Range<usize>)>,
}

/// What [`ClipTokenizer::fit`] says about a text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFit {
    /// Tokens of the text, without the start and end tokens.
    pub tokens: usize,
    /// The most the encoder reads (`max_length - 2`: 75 of CLIP's 77).
    pub limit: usize,
    /// The first word (as the tokenizer lower-cases it) that is cut off, wholly or in part;
    /// `None` when the whole text is read.
    pub first_dropped: Option<String>,
}

/// A CLIP tokenizer loaded from a vocabulary and merges.
pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    ranks: HashMap<(String, String), usize>,
    byte_encoder: [char; 256],
    pattern: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    unk_id: u32,
    max_length: usize,
    cache: Mutex<HashMap<String, Vec<String>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.encoder.len())
            .field("merges", &self.ranks.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

/// GPT-2 / CLIP's reversible byte -> printable character table.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).expect("valid code point");
    }
    table
}

/// Collapses whitespace runs to single spaces, trims and lowercases (transformers' cleanup).
pub fn clean_text(text: &str) -> String {
    text.split_whitespace()
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .filter(|c| !c.is_control() || c.is_whitespace())
        .collect::<String>()
        .to_lowercase()
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid JSON in {}", path.display()))
}

/// A special token in a tokenizer config: a string or `{"content": "..."}`.
fn token_content(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer directory: `tokenizer.json`, else `vocab.json` + `merges.txt`; special
    /// tokens and `model_max_length` from `tokenizer_config.json` / `special_tokens_map.json`.
    /// A diffusers pipeline directory (with `tokenizer/`) is accepted too.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let dir = if dir.join("tokenizer").is_dir() && !dir.join("vocab.json").exists() {
            dir.join("tokenizer")
        } else {
            dir.to_path_buf()
        };
        let (vocab, merges) = if dir.join("vocab.json").exists() && dir.join("merges.txt").exists()
        {
            Self::read_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"))?
        } else if dir.join("tokenizer.json").exists() {
            Self::read_tokenizer_json(&dir.join("tokenizer.json"))?
        } else {
            bail!(
                "{}: no tokenizer found (expected vocab.json + merges.txt, or tokenizer.json)",
                dir.display()
            )
        };
        let mut pad = EOS.to_owned();
        let mut max_length = 77;
        for name in ["special_tokens_map.json", "tokenizer_config.json"] {
            let p = dir.join(name);
            if p.exists() {
                let cfg = read_json(&p)?;
                if let Some(t) = token_content(cfg.get("pad_token")) {
                    pad = t;
                }
                if let Some(m) = cfg.get("model_max_length").and_then(Value::as_f64) {
                    if (2.0..1e6).contains(&m) {
                        max_length = m as usize;
                    }
                }
            }
        }
        Self::new(vocab, merges, &pad, max_length)
            .with_context(|| format!("tokenizer in {}", dir.display()))
    }

    /// Reads `vocab.json` and `merges.txt` as transformers' slow `CLIPTokenizer` does.
    pub fn read_vocab_merges(vocab: &Path, merges: &Path) -> Result<VocabMerges> {
        let v: HashMap<String, u32> = serde_json::from_value(read_json(vocab)?)
            .with_context(|| format!("{}: expected an object token -> id", vocab.display()))?;
        let text = std::fs::read_to_string(merges)
            .with_context(|| format!("cannot read {}", merges.display()))?;
        let mut lines = text.trim().lines().peekable();
        if lines.peek().is_some_and(|l| l.starts_with("#version")) {
            lines.next();
        }
        let mut m = Vec::new();
        for (i, line) in lines.take(MAX_MERGES).enumerate() {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => m.push((a.to_owned(), b.to_owned())),
                _ => bail!(
                    "{}: line {} is not a merge `a b`: {line:?}",
                    merges.display(),
                    i + 2
                ),
            }
        }
        Ok((v, m))
    }

    /// Reads the vocabulary and merges of a HF `tokenizer.json` (BPE model).
    pub fn read_tokenizer_json(path: &Path) -> Result<VocabMerges> {
        let j = read_json(path)?;
        let model = j
            .get("model")
            .with_context(|| format!("{}: no `model`", path.display()))?;
        let mut vocab: HashMap<String, u32> =
            serde_json::from_value(model.get("vocab").cloned().unwrap_or(Value::Null))
                .with_context(|| format!("{}: `model.vocab` is not token -> id", path.display()))?;
        let mut merges = Vec::new();
        for m in model
            .get("merges")
            .and_then(Value::as_array)
            .with_context(|| format!("{}: no `model.merges`", path.display()))?
        {
            let pair = match m {
                Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())),
                Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                    (Some(x), Some(y)) => Some((x.to_owned(), y.to_owned())),
                    _ => None,
                },
                _ => None,
            };
            merges.push(pair.with_context(|| format!("{}: bad merge {m}", path.display()))?);
        }
        for t in j
            .get("added_tokens")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(c), Some(id)) = (
                t.get("content").and_then(Value::as_str),
                t.get("id").and_then(Value::as_u64),
            ) {
                vocab.insert(c.to_owned(), id as u32);
            }
        }
        Ok((vocab, merges))
    }

    /// Builds a tokenizer from a vocabulary and ranked merges; `pad` names the pad token.
    pub fn new(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: &str,
        max_length: usize,
    ) -> Result<Self> {
        let id = |t: &str| {
            vocab
                .get(t)
                .copied()
                .with_context(|| format!("token {t:?} is not in the vocabulary"))
        };
        let (bos_id, eos_id, pad_id) = (id(BOS)?, id(EOS)?, id(pad)?);
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )?;
        if max_length < 2 {
            bail!("model_max_length {max_length} leaves no room for BOS and EOS")
        }
        Ok(Self {
            decoder: vocab.iter().map(|(k, &v)| (v, k.clone())).collect(),
            encoder: vocab,
            ranks: merges
                .into_iter()
                .enumerate()
                .map(|(i, p)| (p, i))
                .collect(),
            byte_encoder: bytes_to_unicode(),
            pattern,
            bos_id,
            eos_id,
            pad_id,
            unk_id: eos_id,
            max_length,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// `<|startoftext|>` id (49406 for CLIP).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }
    /// `<|endoftext|>` id (49407 for CLIP).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }
    /// The padding id (SD 1.5: the EOS id).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
    /// Sequence length of [`ClipTokenizer::encode`] (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }
    /// Vocabulary size (largest id + 1).
    pub fn vocab_size(&self) -> usize {
        self.decoder.keys().max().map_or(0, |&m| m as usize + 1)
    }

    /// BPE of one pre-token (already byte-encoded), as `CLIPTokenizer.bpe`.
    fn bpe(&self, token: &str) -> Vec<String> {
        if let Some(hit) = self.cache.lock().expect("cache lock").get(token) {
            return hit.clone();
        }
        let chars: Vec<char> = token.chars().collect();
        let mut word: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
        if let Some(last) = word.last_mut() {
            last.push_str("</w>");
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|w| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|&r| (r, w))
                })
                .min_by_key(|(r, _)| *r)
                .map(|(_, w)| (w[0].clone(), w[1].clone()));
            let Some((first, second)) = best else { break };
            let mut merged = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    merged.push(format!("{first}{second}"));
                    i += 2;
                } else {
                    merged.push(word[i].clone());
                    i += 1;
                }
            }
            word = merged;
        }
        self.cache
            .lock()
            .expect("cache lock")
            .insert(token.to_owned(), word.clone());
        word
    }

    /// Pre-tokens of the cleaned text with their BPE ids (special tokens map directly).
    fn pre_tokenize(&self, text: &str) -> Vec<(String, Vec<u32>)> {
        let cleaned = clean_text(text);
        self.pattern
            .find_iter(&cleaned)
            .map(|m| {
                let piece = m.as_str();
                let ids = if piece == BOS {
                    vec![self.bos_id]
                } else if piece == EOS {
                    vec![self.eos_id]
                } else {
                    let encoded: String = piece
                        .bytes()
                        .map(|b| self.byte_encoder[b as usize])
                        .collect();
                    self.bpe(&encoded)
                        .iter()
                        .map(|t| self.encoder.get(t).copied().unwrap_or(self.unk_id))
                        .collect()
                };
                (piece.to_owned(), ids)
            })
            .collect()
    }

    /// The BPE token strings of `text` (no BOS / EOS), as `tokenizer.tokenize`.
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        self.pre_tokenize(text)
            .into_iter()
            .flat_map(|(_, ids)| ids)
            .map(|i| self.decoder.get(&i).cloned().unwrap_or_default())
            .collect()
    }

    /// BOS + all tokens + EOS, without truncation or padding.
    pub fn encode_unpadded(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos_id];
        ids.extend(self.pre_tokenize(text).into_iter().flat_map(|(_, i)| i));
        ids.push(self.eos_id);
        ids
    }

    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True)`, with the token
    /// range of every pre-token.
    pub fn encode(&self, text: &str) -> Encoding {
        let budget = self.max_length - 2;
        let mut ids = vec![self.bos_id];
        let mut words = Vec::new();
        for (piece, piece_ids) in self.pre_tokenize(text) {
            let start = ids.len();
            let room = budget + 1 - start.min(budget + 1);
            ids.extend(piece_ids.iter().take(room));
            if ids.len() > start {
                words.push((piece, start..ids.len()));
            }
        }
        ids.push(self.eos_id);
        let mut attention_mask = vec![1; ids.len()];
        attention_mask.resize(self.max_length, 0);
        ids.resize(self.max_length, self.pad_id);
        Encoding {
            ids,
            attention_mask,
            words,
        }
    }

    /// How much of `text` the text encoder reads: what [`ClipTokenizer::encode`] keeps of it
    /// and what it silently drops, so an editor can say so while the caption is typed.
    pub fn fit(&self, text: &str) -> TokenFit {
        let limit = self.max_length - 2;
        let mut tokens = 0;
        let mut first_dropped = None;
        for (piece, ids) in self.pre_tokenize(text) {
            if tokens + ids.len() > limit && first_dropped.is_none() {
                first_dropped = Some(piece);
            }
            tokens += ids.len();
        }
        TokenFit {
            tokens,
            limit,
            first_dropped,
        }
    }

    /// Encodes a batch into a `(batch, max_length)` u32 tensor of ids.
    pub fn encode_batch(
        &self,
        texts: &[&str],
        device: &candle_core::Device,
    ) -> candle_core::Result<candle_core::Tensor> {
        let ids: Vec<u32> = texts.iter().flat_map(|t| self.encode(t).ids).collect();
        candle_core::Tensor::from_vec(ids, (texts.len(), self.max_length), device)
    }

    /// Every occurrence of `phrase` (a name such as "Fred" or "Mr Slate") in `text`, as the
    /// token range in [`ClipTokenizer::encode`]'s ids. Matching is on whole words,
    /// case-insensitive; possessives match ("Fred's" holds the word "fred" then "'s"), and
    /// punctuation between the words of a multi-word phrase is skipped ("Mr. Slate").
    pub fn find_phrase(&self, text: &str, phrase: &str) -> Vec<Range<usize>> {
        let words = self.encode(text).words;
        let target: Vec<String> = self
            .pre_tokenize(phrase)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        let is_punct = |w: &str| !w.chars().any(char::is_alphanumeric);
        let target: Vec<&String> = target.iter().filter(|w| !is_punct(w)).collect();
        let mut found = Vec::new();
        if target.is_empty() {
            return found;
        }
        for start in 0..words.len() {
            let mut k = 0;
            let mut i = start;
            let mut end = None;
            while i < words.len() {
                let w = &words[i].0;
                if *w == *target[k] {
                    k += 1;
                    if k == target.len() {
                        end = Some(i);
                        break;
                    }
                } else if !(k > 0 && is_punct(w)) {
                    break;
                }
                i += 1;
            }
            if let Some(e) = end {
                found.push(words[start].1.start..words[e].1.end);
            }
        }
        found
    }

    /// The index (in the 77 ids) of the LAST BPE token of the first occurrence of `phrase`:
    /// the position whose text embedding the FuseModule replaces.
    pub fn last_token_index(&self, text: &str, phrase: &str) -> Option<usize> {
        self.find_phrase(text, phrase).first().map(|r| r.end - 1)
    }

    /// Decodes ids back to text (special tokens dropped, `</w>` becomes a space).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut inv = HashMap::new();
        for (b, c) in self.byte_encoder.iter().enumerate() {
            inv.insert(*c, b as u8);
        }
        let mut bytes = Vec::new();
        for id in ids {
            if [self.bos_id, self.eos_id, self.pad_id].contains(id) {
                continue;
            }
            if let Some(t) = self.decoder.get(id) {
                for c in t.replace("</w>", " ").chars() {
                    match inv.get(&c) {
                        Some(&b) => bytes.push(b),
                        None => bytes.extend(c.to_string().as_bytes()),
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_owned()
    }
}
