//! Llama-architecture causal LM (Llama-2, TinyLlama-style GQA), built from `nn` layers so that
//! gradients reach the input embeddings through the frozen model.
//!
//! Tensor names follow transformers' `LlamaForCausalLM` (`model.embed_tokens`,
//! `model.layers.{i}.self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
//! `post_attention_layernorm`, `model.norm`, `lm_head`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::{attention_mask_for, logits_for, KvCache, LlmOutput, LogitsFor};

/// The fields of a Llama `config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size (rows of `embed_tokens`).
    pub vocab_size: usize,
    /// Model width `d`.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key / value heads (GQA when fewer than the query heads); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Rotary table length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (transformers 4.x key).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE parameters (transformers 5.x key, holds `rope_theta`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    /// Whether `lm_head` shares the input embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Bias on the attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// MLP activation (`silu` for every Llama checkpoint).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_max_pos() -> usize {
    4096
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

impl LlamaConfig {
    /// The RoPE base: `rope_theta`, else `rope_parameters.rope_theta`, else 10000.
    pub fn theta(&self) -> f64 {
        self.rope_theta
            .or_else(|| {
                self.rope_parameters
                    .as_ref()
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|v| v.as_f64())
            })
            .unwrap_or(10000.0)
    }

    /// Key / value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    o: nn::Linear,
    heads: usize,
    kv_heads: usize,
}

#[derive(Debug, Clone)]
struct Layer {
    attn: Attention,
    gate: nn::Linear,
    up: nn::Linear,
    down: nn::Linear,
    act: nn::Activation,
    ln1: nn::RmsNorm,
    ln2: nn::RmsNorm,
}

/// `LlamaForCausalLM`: token ids or input embeddings in, logits and final-norm hidden states out.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed: nn::Embedding,
    layers: Vec<Layer>,
    norm: nn::RmsNorm,
    lm_head: nn::Linear,
    rotary: nn::RotaryEmbedding,
}

impl Llama {
    /// Builds the model; `vb` is rooted at the checkpoint root (holding `model.` and `lm_head`).
    pub fn new(config: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let c = config;
        let d = c.hidden_size;
        let (h, kvh, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        if h % kvh != 0 {
            candle_core::bail!(
                "llama: num_attention_heads {h} not a multiple of num_key_value_heads {kvh}"
            )
        }
        let act = nn::Activation::from_config_name(&c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("llama: unknown hidden_act `{}`", c.hidden_act))
        })?;
        let m = vb.pp("model");
        let embed = nn::Embedding::new(m.pp("embed_tokens"), c.vocab_size, d)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let l = m.pp("layers").pp(i);
            let a = l.pp("self_attn");
            let ab = c.attention_bias;
            let attn = Attention {
                q: nn::Linear::new(a.pp("q_proj"), d, h * hd, ab)?,
                k: nn::Linear::new(a.pp("k_proj"), d, kvh * hd, ab)?,
                v: nn::Linear::new(a.pp("v_proj"), d, kvh * hd, ab)?,
                o: nn::Linear::new(a.pp("o_proj"), h * hd, d, ab)?,
                heads: h,
                kv_heads: kvh,
            };
            let mlp = l.pp("mlp");
            let mb = c.mlp_bias;
            layers.push(Layer {
                attn,
                gate: nn::Linear::new(mlp.pp("gate_proj"), d, c.intermediate_size, mb)?,
                up: nn::Linear::new(mlp.pp("up_proj"), d, c.intermediate_size, mb)?,
                down: nn::Linear::new(mlp.pp("down_proj"), c.intermediate_size, d, mb)?,
                act,
                ln1: nn::RmsNorm::new(l.pp("input_layernorm"), d, c.rms_norm_eps)?,
                ln2: nn::RmsNorm::new(l.pp("post_attention_layernorm"), d, c.rms_norm_eps)?,
            });
        }
        let norm = nn::RmsNorm::new(m.pp("norm"), d, c.rms_norm_eps)?;
        let lm_head = if c.tie_word_embeddings {
            nn::Linear::from_tensors(embed.weight().clone(), None)
        } else {
            nn::Linear::new(vb.pp("lm_head"), d, c.vocab_size, false)?
        };
        let rotary =
            nn::RotaryEmbedding::new(hd, c.max_position_embeddings, c.theta(), vb.device())?;
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            rotary,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The frozen input embedding table `(vocab, d)`.
    pub fn embedding_weight(&self) -> &Tensor {
        self.embed.weight()
    }

    /// The output projection `(vocab, d)`.
    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// Looks token ids `(b, s)` up in the input embedding table.
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed.forward(ids)
    }

    /// Runs the decoder on `embeds: (b, s, d)` after the `cache.len()` cached positions.
    ///
    /// `attention_mask` is an optional `(b, cache.len() + s)` keep-mask (1 keep, 0 padding) over
    /// all positions; positions are `cache.len()..` as transformers' default `cache_position`.
    pub fn forward_embeds(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
    ) -> Result<LlmOutput> {
        self.forward_embeds_with(embeds, cache, attention_mask, LogitsFor::All)
    }

    /// `forward_embeds` computing logits only for the positions `logits` names.
    pub fn forward_embeds_with(
        &self,
        embeds: &Tensor,
        cache: &mut KvCache,
        attention_mask: Option<&Tensor>,
        logits: LogitsFor,
    ) -> Result<LlmOutput> {
        let (b, s, _) = embeds.dims3()?;
        let offset = cache.len();
        let mask = attention_mask_for(attention_mask, b, offset + s, embeds.dtype())?;
        let mut x = embeds.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = x.clone();
            let hs = layer.ln1.forward(&x)?;
            let a = &layer.attn;
            let q = nn::split_heads(&a.q.forward(&hs)?, a.heads)?;
            let k = nn::split_heads(&a.k.forward(&hs)?, a.kv_heads)?;
            let v = nn::split_heads(&a.v.forward(&hs)?, a.kv_heads)?;
            let (q, k) = self.rotary.apply_qk(&q, &k, offset)?;
            let (k, v) = cache.append(i, &k, &v)?;
            let rep = a.heads / a.kv_heads;
            let k = nn::repeat_kv(&k, rep)?;
            let v = nn::repeat_kv(&v, rep)?;
            let opts = nn::SdpaOptions {
                mask: mask.as_ref(),
                causal: true,
                scale: None,
                return_probs: false,
            };
            let att = nn::scaled_dot_product_attention(&q, &k, &v, &opts)?.output;
            let att = a.o.forward(&nn::merge_heads(&att)?)?;
            x = (residual + att)?;
            let residual = x.clone();
            let hs = layer.ln2.forward(&x)?;
            let gate = layer.act.forward(&layer.gate.forward(&hs)?)?;
            let mlp = layer.down.forward(&(gate * layer.up.forward(&hs)?)?)?;
            x = (residual + mlp)?;
        }
        let last_hidden_state = self.norm.forward(&x)?;
        let logits = logits_for(&self.lm_head, &last_hidden_state, logits)?;
        Ok(LlmOutput {
            logits,
            last_hidden_state,
        })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed.weight().dtype()
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        self.embed.weight().device()
    }

    /// Number of decoder layers (the KV cache size).
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
