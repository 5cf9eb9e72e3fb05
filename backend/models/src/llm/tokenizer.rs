//! The LLM's `tokenizer.json` (HF `tokenizers`, pure Rust with `fancy-regex`) with the R
//! `[IMG0]..[IMG{R-1}]` tokens added as in GILL / StoryGPT-V (`tokenizer.add_tokens`), matched on
//! the raw text (`normalized: false`) so that they stay atomic with sentencepiece-style normalisers.

use std::path::Path;

use anyhow::{bail, Context};
use tokenizers::{AddedToken, Tokenizer};

/// A `tokenizer.json` tokenizer plus the `[IMG]` token ids and the BOS id.
#[derive(Clone)]
pub struct LlmTokenizer {
    inner: Tokenizer,
    img_ids: Vec<u32>,
    bos_id: Option<u32>,
}

impl std::fmt::Debug for LlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmTokenizer")
            .field("img_ids", &self.img_ids)
            .field("bos_id", &self.bos_id)
            .finish()
    }
}

/// The text of the i-th `[IMG]` token.
pub fn img_token_text(i: usize) -> String {
    format!("[IMG{i}]")
}

impl LlmTokenizer {
    /// Loads `dir/tokenizer.json` and adds `num_img_tokens` `[IMG]` tokens. The BOS token is
    /// read from `dir/tokenizer_config.json` (`bos_token`, a string or `{"content": ..}`) when
    /// present, else `<s>` or `</s>` if the vocabulary has one (Llama / OPT conventions).
    pub fn from_dir(dir: impl AsRef<Path>, num_img_tokens: usize) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("tokenizer.json");
        let mut t = Self::from_file(&path, num_img_tokens)?;
        let cfg = dir.join("tokenizer_config.json");
        let bos_text = std::fs::read_to_string(&cfg)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| match v.get("bos_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string),
                None => None,
            });
        t.bos_id = match bos_text {
            Some(b) => Some(t.inner.token_to_id(&b).with_context(|| {
                format!(
                    "{}: bos_token `{b}` is not in {}",
                    cfg.display(),
                    path.display()
                )
            })?),
            None => t
                .inner
                .token_to_id("<s>")
                .or_else(|| t.inner.token_to_id("</s>")),
        };
        Ok(t)
    }

    /// Loads a `tokenizer.json` file and adds `num_img_tokens` `[IMG]` tokens (no BOS known).
    pub fn from_file(path: impl AsRef<Path>, num_img_tokens: usize) -> anyhow::Result<Self> {
        let path = path.as_ref();
        let mut inner = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("loading tokenizer {}: {e}", path.display()))?;
        let first = inner.get_vocab_size(true) as u32;
        let tokens: Vec<AddedToken> = (0..num_img_tokens)
            .map(|i| AddedToken::from(img_token_text(i), false).normalized(false))
            .collect();
        inner
            .add_tokens(tokens)
            .map_err(|e| anyhow::anyhow!("{}: adding [IMG] tokens: {e}", path.display()))?;
        let img_ids: Vec<u32> = (0..num_img_tokens)
            .map(|i| {
                inner
                    .token_to_id(&img_token_text(i))
                    .with_context(|| format!("{}: [IMG{i}] was not added", path.display()))
            })
            .collect::<anyhow::Result<_>>()?;
        let expected: Vec<u32> = (0..num_img_tokens as u32).map(|i| first + i).collect();
        if img_ids != expected {
            bail!(
                "{}: [IMG] tokens got ids {img_ids:?}, expected consecutive ids from {first} \
                 (does the tokenizer already contain [IMG] tokens?)",
                path.display()
            )
        }
        Ok(Self {
            inner,
            img_ids,
            bos_id: None,
        })
    }

    /// Token ids of `text` without special tokens (no BOS).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the tokenizer's post-processor (e.g. BOS prepended).
    pub fn encode_with_special_tokens(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing {text:?}: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding {ids:?}: {e}"))
    }

    /// Ids of `[IMG0]..[IMG{R-1}]`.
    pub fn img_token_ids(&self) -> &[u32] {
        &self.img_ids
    }

    /// Id of `[IMG0]` (= the vocabulary size before adding the `[IMG]` tokens).
    pub fn first_img_id(&self) -> u32 {
        self.img_ids
            .first()
            .copied()
            .unwrap_or(self.inner.get_vocab_size(true) as u32)
    }

    /// The BOS id, if known.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The id of a token string, if in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}
