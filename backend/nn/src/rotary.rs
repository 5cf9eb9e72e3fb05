//! Rotary position embeddings in the Llama "rotate-half" convention.
//!
//! candle's fused `candle_nn::rotary_emb::rope*` ops have no backward; this module uses
//! narrow / cat / mul only, so gradients flow to the queries and keys (and to whatever
//! produced them).

use candle_core::{DType, Device, Result, Tensor, D};

/// Precomputed cos / sin tables for positions `0..max_positions`.
///
/// As in transformers' `LlamaRotaryEmbedding`: `inv_freq[i] = theta^(-2i / dim)`,
/// `emb = cat(pos * inv_freq, pos * inv_freq)`, and
/// `rope(x) = x * cos + rotate_half(x) * sin` with `rotate_half(x) = cat(-x2, x1)`.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
    dim: usize,
}

impl RotaryEmbedding {
    /// Builds f32 tables of shape `(max_positions, head_dim)` on `device`
    /// (`theta` is 10000 for Llama-2).
    pub fn new(head_dim: usize, max_positions: usize, theta: f64, device: &Device) -> Result<Self> {
        if !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary embedding needs an even head_dim, got {head_dim}")
        }
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
        let pos: Vec<f32> = (0..max_positions).map(|p| p as f32).collect();
        let pos = Tensor::from_vec(pos, (max_positions, 1), device)?;
        let freqs = pos.broadcast_mul(&inv_freq)?;
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?;
        Ok(Self {
            cos: emb.cos()?,
            sin: emb.sin()?,
            dim: head_dim,
        })
    }

    /// The head dimension the tables were built for.
    pub fn head_dim(&self) -> usize {
        self.dim
    }

    /// The number of positions in the tables.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// `(cos, sin)` rows for positions `offset..offset + seq_len`, `(seq_len, head_dim)`, cast
    /// to `dtype`.
    pub fn tables(&self, offset: usize, seq_len: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
        if offset + seq_len > self.max_positions() {
            candle_core::bail!(
                "rotary positions {offset}..{} exceed the table of {} positions",
                offset + seq_len,
                self.max_positions()
            )
        }
        Ok((
            self.cos.narrow(0, offset, seq_len)?.to_dtype(dtype)?,
            self.sin.narrow(0, offset, seq_len)?.to_dtype(dtype)?,
        ))
    }

    /// Rotates `x: (b, heads, seq_len, head_dim)` for positions starting at `offset` (the
    /// number of positions already in the KV cache).
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (_, _, seq_len, d) = x.dims4()?;
        if d != self.dim {
            candle_core::bail!("rotary tables are for head_dim {}, got {d}", self.dim)
        }
        let (cos, sin) = self.tables(offset, seq_len, x.dtype())?;
        x.broadcast_mul(&cos)?
            .add(&rotate_half(x)?.broadcast_mul(&sin)?)
    }

    /// Applies [`RotaryEmbedding::apply`] to queries and keys at the same offset.
    pub fn apply_qk(&self, q: &Tensor, k: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        Ok((self.apply(q, offset)?, self.apply(k, offset)?))
    }
}

/// `cat(-x[..., d/2..], x[..., ..d/2])` on the last dimension.
pub fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, d - half)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}
