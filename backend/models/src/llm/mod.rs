//! The frozen causal LLM of StoryGPT-V's stage 2 (OPT-6.7B in the paper, Llama-2 as an
//! alternative), its KV cache, its tokenizer and the R trainable `[IMG]` tokens.
//!
//! * [`CausalLm`]: Llama or OPT loaded from a transformers directory; takes token ids or input
//!   embeddings (so visual tokens can be spliced in), returns logits and last hidden states
//!   (after the final norm) for every position, keeps a [`KvCache`] across calls.
//! * [`ImgTokens`]: the `(R, d)` trainable rows for `[IMG0]..[IMG{R-1}]`, spliced into the
//!   frozen embedding table on lookup and appended to the logits.
//! * [`LlmTokenizer`]: `tokenizer.json` with the `[IMG]` tokens added.
//!
//! Everything is built from `nn` layers: gradients flow through the frozen model to the
//! `[IMG]` rows and the mapper outputs.

pub mod cache;
pub mod conformance;
pub mod img_tokens;
pub mod llama;
pub mod opt;
pub mod tokenizer;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};

pub use cache::KvCache;
pub use img_tokens::ImgTokens;
pub use llama::{Llama, LlamaConfig};
pub use opt::{Opt, OptConfig};
pub use tokenizer::LlmTokenizer;

/// Which positions a forward pass computes next-token logits for. The `lm_head` is the
/// largest matmul of a small model's prefill (`s x d x vocab`); decoding needs only the last
/// row and the story pipeline's `[IMG]` conditioning needs none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsFor {
    /// Every position: `(b, s, vocab)` (training losses, parity tests).
    #[default]
    All,
    /// The last position only: `(b, 1, vocab)`.
    Last,
    /// None: an empty `(b, 0, vocab)` tensor; only `last_hidden_state` is wanted.
    None,
}

/// Applies `lm_head` to the positions of `x: (b, s, d)` that `which` asks for.
pub(crate) fn logits_for(lm_head: &nn::Linear, x: &Tensor, which: LogitsFor) -> Result<Tensor> {
    let (b, s, _) = x.dims3()?;
    match which {
        LogitsFor::All => lm_head.forward(x),
        LogitsFor::Last if s == 0 => candle_core::bail!("LogitsFor::Last on an empty input"),
        LogitsFor::Last => lm_head.forward(&x.narrow(1, s - 1, 1)?),
        LogitsFor::None => {
            let vocab = lm_head.weight().dims()[0];
            Tensor::zeros((b, 0, vocab), x.dtype(), x.device())
        }
    }
}

/// What a forward pass returns, for every input position.
#[derive(Debug, Clone)]
pub struct LlmOutput {
    /// `(b, s, vocab)` next-token logits (model dtype); `(b, 1, vocab)` / `(b, 0, vocab)` with
    /// [`LogitsFor::Last`] / [`LogitsFor::None`].
    pub logits: Tensor,
    /// `(b, s, d)` last-layer hidden states after the final norm (and OPT's `project_out`):
    /// transformers' `hidden_states[-1]`, the input of the `lm_head`.
    pub last_hidden_state: Tensor,
}

/// A frozen causal LM of one of the supported architectures.
#[derive(Debug, Clone)]
pub enum CausalLm {
    /// `model_type: llama`.
    Llama(Llama),
    /// `model_type: opt`.
    Opt(Opt),
}

/// Converts an optional `(b, total)` keep-mask into the additive attention mask, checking shape.
pub(crate) fn attention_mask_for(
    keep: Option<&Tensor>,
    b: usize,
    total: usize,
    dtype: DType,
) -> Result<Option<Tensor>> {
    match keep {
        None => Ok(None),
        Some(m) => {
            let dims = m.dims();
            if dims != [b, total] {
                candle_core::bail!(
                    "attention_mask has shape {dims:?}, expected [{b}, {total}] (batch, cached + new positions)"
                )
            }
            Ok(Some(nn::padding_mask(m, dtype)?))
        }
    }
}

impl CausalLm {
    /// Loads a transformers directory: `config.json` (`model_type` `llama` or `opt`) and the
    /// weights (`model.safetensors`, a sharded `model.safetensors.index.json` or
    /// `pytorch_model.bin`), as frozen tensors in `dtype` on `device`.
    pub fn load(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let dir = dir.as_ref();
        let weights = nn::Weights::open(dir)
            .with_context(|| format!("opening LLM weights in {}", dir.display()))?;
        Self::from_weights(dir, &weights, dtype, device)
    }

    /// Builds the model from `config.json` in `dir` and already opened `weights`.
    pub fn from_weights(
        dir: &Path,
        weights: &nn::Weights,
        dtype: DType,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path)
            .with_context(|| format!("reading {}", cfg_path.display()))?;
        let raw: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("parsing {}", cfg_path.display()))?;
        let model_type = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let vb = weights.var_builder(dtype, device);
        match model_type {
            "llama" | "mistral" => {
                let cfg: LlamaConfig = serde_json::from_value(raw).with_context(|| {
                    format!("reading a Llama config from {}", cfg_path.display())
                })?;
                let m = Llama::new(&cfg, vb)
                    .with_context(|| format!("building Llama from {}", dir.display()))?;
                Ok(Self::Llama(m))
            }
            "opt" => {
                let cfg: OptConfig = serde_json::from_value(raw).with_context(|| {
                    format!("reading an OPT config from {}", cfg_path.display())
                })?;
                // facebook/opt-* checkpoints store `decoder.*`; save_pretrained stores `model.decoder.*`.
                let vb = if weights.contains("model.decoder.embed_tokens.weight") {
                    vb.pp("model")
                } else {
                    vb
                };
                let m = Opt::new(&cfg, vb)
                    .with_context(|| format!("building OPT from {}", dir.display()))?;
                Ok(Self::Opt(m))
            }
            other => anyhow::bail!(
                "{}: model_type `{other}` is not a supported causal LM (expected `llama` or `opt`)",
                cfg_path.display()
            ),
        }
    }

    /// Looks token ids `(b, s)` (ids below the base vocabulary) up in the frozen embedding table.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Self::Llama(m) => m.embed_ids(ids),
            Self::Opt(m) => m.embed_ids(ids),
        }
    }

    /// The frozen input embedding table `(vocab, embed_dim)`.
    pub fn embedding_weight(&self) -> &Tensor {
        match self {
            Self::Llama(m) => m.embedding_weight(),
            Self::Opt(m) => m.embedding_weight(),
        }
    }

    /// The width of input embeddings (OPT: `word_embed_proj_dim`), also that of
    /// `last_hidden_state`.
    pub fn embed_dim(&self) -> usize {
        self.embedding_weight().dims()[1]
    }

    /// The base vocabulary size (rows of the embedding table).
    pub fn vocab_size(&self) -> usize {
        self.embedding_weight().dims()[0]
    }

    /// The model's dtype.
    pub fn dtype(&self) -> DType {
        self.embedding_weight().dtype()
    }

    /// The model's device.
    pub fn device(&self) -> &Device {
        self.embedding_weight().device()
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        match self {
            Self::Llama(m) => m.num_layers(),
            Self::Opt(m) => m.num_layers(),
        }
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.num_layers())
    }

    /// An empty KV cache with room for `capacity` positions before it reallocates.
    pub fn new_cache_with_capacity(&self, capacity: usize) -> KvCache {
        KvCache::with_capacity(self.num_layers(), capacity)
    }

    /// Runs the model on input embeddings `(b, s, embed_dim)` after the cached positions,
    /// appending the new keys / values to `cache`. See [`Llama::forward_embeds`] and
    /// [`Opt::forward_embeds`] for `attention_mask` (`(b, cache.len() + s)`, 1 keep).
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
    ) -> Result<LlmOutput> {
        self.forward_embeds_with(embeds, cache, attention_mask, LogitsFor::All)
    }

    /// [`CausalLm::forward_embeds`] computing logits only for the positions `logits` names.
    pub fn forward_embeds_with(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
        logits: LogitsFor,
    ) -> Result<LlmOutput> {
        if cache.num_layers() != self.num_layers() {
            candle_core::bail!(
                "KV cache has {} layers, the model {}",
                cache.num_layers(),
                self.num_layers()
            )
        }
        let embeds = embeds.to_dtype(self.dtype())?;
        match self {
            Self::Llama(m) => m.forward_embeds_with(&embeds, cache, attention_mask, logits),
            Self::Opt(m) => m.forward_embeds_with(&embeds, cache, attention_mask, logits),
        }
    }

    /// Runs the model on token ids `(b, s)` (base vocabulary; use [`ImgTokens::embed`] for
    /// ids that include `[IMG]` tokens).
    pub fn forward_ids(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
    ) -> Result<LlmOutput> {
        self.forward_ids_with(ids, cache, attention_mask, LogitsFor::All)
    }

    /// [`CausalLm::forward_ids`] computing logits only for the positions `logits` names.
    pub fn forward_ids_with(
        &self,
        ids: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
        logits: LogitsFor,
    ) -> Result<LlmOutput> {
        let embeds = self.embed_ids(ids)?;
        self.forward_embeds_with(&embeds, cache, attention_mask, logits)
    }
}
