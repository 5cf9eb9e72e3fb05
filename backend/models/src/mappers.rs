//! StoryGPT-V's two stage-2 mappers.
//!
//! * [`MapperLlm`] (`model.visual_embeddings`): one Linear(1024 -> m * d) on the CLIP ViT-L/14
//!   vision POOLED output (not projected) of a frame, giving m visual tokens for the LLM.
//! * [`MapperLdm`] (`model.gen_text_hidden_fcs.0`, GILL's `TextFcLayer` in mode `gill_mapper`):
//!   `x = h_IMG + e_IMG` (last-layer hidden states at the R `[IMG]` positions plus those
//!   tokens' input embeddings, summed as GILL's `TextFcLayer.forward(x, input_embs)` does),
//!   then `fc` Linear(d, 512) -> `tfm` (PyTorch `nn.Transformer`, batch_first, norm_first,
//!   no dropout, ReLU, final encoder / decoder LayerNorms) with the 77 learnable `query_embs`
//!   as decoder input -> `model` Linear(512, 768): the (77, 768) Char-LDM condition.
//!
//! All sizes come from [`MapperLlmConfig`] / [`MapperLdmConfig`] (tiny ones in tests).

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Sizes of [`MapperLlm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MapperLlmConfig {
    /// CLIP vision pooled width (1024 for ViT-L/14).
    pub vision_dim: usize,
    /// Visual tokens per frame, m (4).
    pub num_tokens: usize,
    /// LLM input-embedding width d (4096 for OPT-6.7B / Llama-2-7b).
    pub llm_dim: usize,
}

impl Default for MapperLlmConfig {
    fn default() -> Self {
        Self {
            vision_dim: 1024,
            num_tokens: 4,
            llm_dim: 4096,
        }
    }
}

/// Mapper_LLM: CLIP pooled output `(b, vision_dim)` -> `(b, m, d)` visual tokens.
#[derive(Debug, Clone)]
pub struct MapperLlm {
    fc: nn::Linear,
    config: MapperLlmConfig,
}

impl MapperLlm {
    /// Builds the mapper; `vb` points at `model.visual_embeddings` (tensors `weight`, `bias`).
    pub fn new(config: MapperLlmConfig, vb: VarBuilder) -> Result<Self> {
        let fc = nn::Linear::new(
            vb,
            config.vision_dim,
            config.num_tokens * config.llm_dim,
            true,
        )?;
        Ok(Self { fc, config })
    }

    /// Maps pooled CLIP vision outputs `(b, vision_dim)` to `(b, m, d)`.
    pub fn forward(&self, pooled: &Tensor) -> Result<Tensor> {
        let b = pooled.dim(0)?;
        self.fc
            .forward(pooled)?
            .reshape((b, self.config.num_tokens, self.config.llm_dim))
    }

    /// The configuration.
    pub fn config(&self) -> &MapperLlmConfig {
        &self.config
    }
}

/// Sizes of [`MapperLdm`] (defaults: the paper's / GILL's).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MapperLdmConfig {
    /// LLM hidden / embedding width d.
    pub in_dim: usize,
    /// Transformer width (512).
    pub d_model: usize,
    /// Attention heads (4).
    pub heads: usize,
    /// Encoder layers (4).
    pub encoder_layers: usize,
    /// Decoder layers (4).
    pub decoder_layers: usize,
    /// Feed-forward width (2048).
    pub ff_dim: usize,
    /// Learnable decoder queries = output tokens (77).
    pub num_queries: usize,
    /// Output width (768, the CLIP text width the UNet cross-attends to).
    pub out_dim: usize,
    /// LayerNorm epsilon (PyTorch default 1e-5).
    pub eps: f64,
}

impl Default for MapperLdmConfig {
    fn default() -> Self {
        Self {
            in_dim: 4096,
            d_model: 512,
            heads: 4,
            encoder_layers: 4,
            decoder_layers: 4,
            ff_dim: 2048,
            num_queries: 77,
            out_dim: 768,
            eps: 1e-5,
        }
    }
}

/// PyTorch `nn.MultiheadAttention` (batch_first, packed `in_proj_weight`, no masks).
#[derive(Debug, Clone)]
struct MultiheadAttention {
    q: nn::Linear,
    k: nn::Linear,
    v: nn::Linear,
    out: nn::Linear,
    heads: usize,
}

impl MultiheadAttention {
    fn new(vb: VarBuilder, d: usize, heads: usize) -> Result<Self> {
        let bound = (6.0 / (d + 3 * d) as f64).sqrt();
        let w = vb.get_with_hints(
            (3 * d, d),
            "in_proj_weight",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let b = vb.get_with_hints(3 * d, "in_proj_bias", Init::Const(0.0))?;
        let part = |i: usize| -> Result<nn::Linear> {
            Ok(nn::Linear::from_tensors(
                w.narrow(0, i * d, d)?,
                Some(b.narrow(0, i * d, d)?),
            ))
        };
        Ok(Self {
            q: part(0)?,
            k: part(1)?,
            v: part(2)?,
            out: nn::Linear::new(vb.pp("out_proj"), d, d, true)?,
            heads,
        })
    }

    fn forward(&self, q: &Tensor, kv: &Tensor) -> Result<Tensor> {
        let q = nn::split_heads(&self.q.forward(q)?, self.heads)?;
        let k = nn::split_heads(&self.k.forward(kv)?, self.heads)?;
        let v = nn::split_heads(&self.v.forward(kv)?, self.heads)?;
        let att = nn::scaled_dot_product_attention(&q, &k, &v, &nn::SdpaOptions::default())?;
        self.out.forward(&nn::merge_heads(&att.output)?)
    }
}

/// Feed-forward `linear2(relu(linear1(x)))` of PyTorch's transformer layers.
#[derive(Debug, Clone)]
struct FeedForward {
    linear1: nn::Linear,
    linear2: nn::Linear,
}

impl FeedForward {
    fn new(vb: &VarBuilder, d: usize, ff: usize) -> Result<Self> {
        Ok(Self {
            linear1: nn::Linear::new(vb.pp("linear1"), d, ff, true)?,
            linear2: nn::Linear::new(vb.pp("linear2"), ff, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear2.forward(&nn::relu(&self.linear1.forward(x)?)?)
    }
}

/// `nn.TransformerEncoderLayer(norm_first=True)`.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: MultiheadAttention,
    ff: FeedForward,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
}

/// `nn.TransformerDecoderLayer(norm_first=True)`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: MultiheadAttention,
    cross_attn: MultiheadAttention,
    ff: FeedForward,
    norm1: nn::LayerNorm,
    norm2: nn::LayerNorm,
    norm3: nn::LayerNorm,
}

/// PyTorch `nn.Transformer` (pre-norm, no masks, no dropout) as used by GILL's mapper.
#[derive(Debug, Clone)]
pub struct Seq2SeqTransformer {
    encoder: Vec<EncoderLayer>,
    encoder_norm: nn::LayerNorm,
    decoder: Vec<DecoderLayer>,
    decoder_norm: nn::LayerNorm,
}

impl Seq2SeqTransformer {
    /// Builds it with PyTorch's names (`encoder.layers.{i}.self_attn.in_proj_weight`,
    /// `decoder.layers.{i}.multihead_attn`, `encoder.norm`, `decoder.norm`, ...).
    pub fn new(c: &MapperLdmConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.d_model;
        let ln = |vb: VarBuilder| nn::LayerNorm::new(vb, d, c.eps);
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        let encoder = (0..c.encoder_layers)
            .map(|i| {
                let l = enc.pp("layers").pp(i);
                Ok(EncoderLayer {
                    self_attn: MultiheadAttention::new(l.pp("self_attn"), d, c.heads)?,
                    ff: FeedForward::new(&l, d, c.ff_dim)?,
                    norm1: ln(l.pp("norm1"))?,
                    norm2: ln(l.pp("norm2"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder = (0..c.decoder_layers)
            .map(|i| {
                let l = dec.pp("layers").pp(i);
                Ok(DecoderLayer {
                    self_attn: MultiheadAttention::new(l.pp("self_attn"), d, c.heads)?,
                    cross_attn: MultiheadAttention::new(l.pp("multihead_attn"), d, c.heads)?,
                    ff: FeedForward::new(&l, d, c.ff_dim)?,
                    norm1: ln(l.pp("norm1"))?,
                    norm2: ln(l.pp("norm2"))?,
                    norm3: ln(l.pp("norm3"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            encoder,
            encoder_norm: ln(enc.pp("norm"))?,
            decoder,
            decoder_norm: ln(dec.pp("norm"))?,
        })
    }

    /// `tfm(src (b, s, d), tgt (b, t, d)) -> (b, t, d)`.
    pub fn forward(&self, src: &Tensor, tgt: &Tensor) -> Result<Tensor> {
        let mut x = src.clone();
        for l in &self.encoder {
            let h = l.norm1.forward(&x)?;
            x = (&x + l.self_attn.forward(&h, &h)?)?;
            x = (&x + l.ff.forward(&l.norm2.forward(&x)?)?)?;
        }
        let memory = self.encoder_norm.forward(&x)?;
        let mut y = tgt.clone();
        for l in &self.decoder {
            let h = l.norm1.forward(&y)?;
            y = (&y + l.self_attn.forward(&h, &h)?)?;
            y = (&y + l.cross_attn.forward(&l.norm2.forward(&y)?, &memory)?)?;
            y = (&y + l.ff.forward(&l.norm3.forward(&y)?)?)?;
        }
        self.decoder_norm.forward(&y)
    }
}

/// Mapper_LDM (GILL mapper): `[IMG]` hidden states + embeddings -> `(b, 77, 768)` condition.
#[derive(Debug, Clone)]
pub struct MapperLdm {
    fc: nn::Linear,
    tfm: Seq2SeqTransformer,
    model: nn::Linear,
    query_embs: Tensor,
    config: MapperLdmConfig,
}

impl MapperLdm {
    /// Builds the mapper; `vb` points at `model.gen_text_hidden_fcs.0` (`fc`, `tfm`, `model`,
    /// `query_embs` of shape `(1, num_queries, d_model)`, randn-initialised when trained).
    pub fn new(config: MapperLdmConfig, vb: VarBuilder) -> Result<Self> {
        let c = &config;
        Ok(Self {
            fc: nn::Linear::new(vb.pp("fc"), c.in_dim, c.d_model, true)?,
            tfm: Seq2SeqTransformer::new(c, vb.pp("tfm"))?,
            model: nn::Linear::new(vb.pp("model"), c.d_model, c.out_dim, true)?,
            query_embs: vb.get_with_hints(
                (1, c.num_queries, c.d_model),
                "query_embs",
                Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            config,
        })
    }

    /// `hidden: (b, R, d)` last-layer hidden states at the `[IMG]` positions, `input_embs:
    /// (b, R, d)` the `[IMG]` input embeddings -> `(b, num_queries, out_dim)`.
    pub fn forward(&self, hidden: &Tensor, input_embs: &Tensor) -> Result<Tensor> {
        let x = (hidden + input_embs.to_dtype(hidden.dtype())?)?;
        let x = self.fc.forward(&x)?;
        let b = x.dim(0)?;
        let q = self
            .query_embs
            .to_dtype(x.dtype())?
            .broadcast_as((b, self.config.num_queries, self.config.d_model))?
            .contiguous()?;
        self.model.forward(&self.tfm.forward(&x, &q)?)
    }

    /// The configuration.
    pub fn config(&self) -> &MapperLdmConfig {
        &self.config
    }
}
