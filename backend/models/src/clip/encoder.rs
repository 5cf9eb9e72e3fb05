//! The transformer shared by both CLIP towers (transformers `CLIPAttention`, `CLIPMLP`,
//! `CLIPEncoderLayer`, `CLIPEncoder`): pre-LayerNorm blocks, every op from `nn` so the layers
//! can be trained (StoryGPT-V fine-tunes the last two vision layers).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Activation, LayerNorm, Linear, SdpaOptions};

/// Multi-head self-attention with `q_proj`, `k_proj`, `v_proj`, `out_proj` (all with bias).
#[derive(Debug, Clone)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    /// Reads `q_proj`, `k_proj`, `v_proj`, `out_proj` under `vb`.
    pub fn new(vb: VarBuilder, hidden: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            q_proj: Linear::new(vb.pp("q_proj"), hidden, hidden, true)?,
            k_proj: Linear::new(vb.pp("k_proj"), hidden, hidden, true)?,
            v_proj: Linear::new(vb.pp("v_proj"), hidden, hidden, true)?,
            out_proj: Linear::new(vb.pp("out_proj"), hidden, hidden, true)?,
            heads,
        })
    }

    /// `(b, s, hidden)` -> `(b, s, hidden)`; `mask` is additive, broadcastable to
    /// `(b, heads, s, s)`; `causal` adds the causal mask (text tower).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
        let q = nn::split_heads(&self.q_proj.forward(xs)?, self.heads)?;
        let k = nn::split_heads(&self.k_proj.forward(xs)?, self.heads)?;
        let v = nn::split_heads(&self.v_proj.forward(xs)?, self.heads)?;
        let opts = SdpaOptions {
            mask,
            causal,
            ..Default::default()
        };
        let out = nn::scaled_dot_product_attention(&q, &k, &v, &opts)?;
        self.out_proj.forward(&nn::merge_heads(&out.output)?)
    }
}

/// `fc1 -> activation -> fc2`.
#[derive(Debug, Clone)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl ClipMlp {
    /// Reads `fc1`, `fc2` under `vb`.
    pub fn new(vb: VarBuilder, hidden: usize, inter: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            fc1: Linear::new(vb.pp("fc1"), hidden, inter, true)?,
            fc2: Linear::new(vb.pp("fc2"), inter, hidden, true)?,
            act,
        })
    }

    /// Applies the MLP.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

/// One pre-LN block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

/// Shapes of an encoder, read from a text or vision config.
#[derive(Debug, Clone, Copy)]
pub struct EncoderShape {
    /// Width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Attention heads.
    pub heads: usize,
    /// Number of layers.
    pub layers: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// MLP activation.
    pub act: Activation,
}

impl ClipEncoderLayer {
    /// Reads `self_attn`, `layer_norm1`, `mlp`, `layer_norm2` under `vb`.
    pub fn new(vb: VarBuilder, s: &EncoderShape) -> Result<Self> {
        Ok(Self {
            self_attn: ClipAttention::new(vb.pp("self_attn"), s.hidden, s.heads)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), s.hidden, s.eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), s.hidden, s.intermediate, s.act)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), s.hidden, s.eps)?,
        })
    }

    /// Applies the block.
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, causal: bool) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, mask, causal)?;
        let xs = (xs + h)?;
        let h = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + h
    }
}

/// The stack of layers (`encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

impl ClipEncoder {
    /// Reads `layers.{i}` under `vb` (the `encoder` prefix). `vb_for(i)` may redirect single
    /// layers to another builder (e.g. trainable ones); `None` uses `vb`.
    pub fn new_with(
        vb: VarBuilder,
        s: &EncoderShape,
        mut vb_for: impl FnMut(usize) -> Option<VarBuilder<'static>>,
    ) -> Result<Self> {
        let layers = (0..s.layers)
            .map(|i| {
                let name = format!("layers.{i}");
                match vb_for(i) {
                    Some(other) => ClipEncoderLayer::new(other.pp(&name), s),
                    None => ClipEncoderLayer::new(vb.pp(&name), s),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Runs every layer; returns the input followed by each layer's output
    /// (transformers' `hidden_states`, `len = layers + 1`).
    pub fn forward_all(
        &self,
        xs: &Tensor,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Result<Vec<Tensor>> {
        let mut states = vec![xs.clone()];
        let mut h = xs.clone();
        for layer in &self.layers {
            h = layer.forward(&h, mask, causal)?;
            states.push(h.clone());
        }
        Ok(states)
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether there are no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
