//! Scaled-dot-product attention that can hand back its probabilities, plus head helpers.
//!
//! The probabilities returned are part of the autograd graph, so losses on attention maps
//! (StoryGPT-V's cross-attention regulariser on UNet `attn2` maps) backpropagate through them.

use candle_core::{DType, Device, Result, Tensor};

use crate::ops::{matmul, softmax_last_dim_composed};

/// Options for [`scaled_dot_product_attention`].
#[derive(Debug, Clone, Default)]
pub struct SdpaOptions<'a> {
    /// Additive mask broadcastable to `(batch, heads, q_len, k_len)` (0 keeps, `-inf` or a large
    /// negative value drops). Added to the scaled scores in f32.
    pub mask: Option<&'a Tensor>,
    /// Causal masking, aligned bottom-right: query `i` sees keys `0..=i + (k_len - q_len)`,
    /// which is the right rule when the keys include a KV cache of earlier positions.
    pub causal: bool,
    /// Score scale; `None` means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Return the attention probabilities `(batch, heads, q_len, k_len)`.
    pub return_probs: bool,
}

/// The result of [`scaled_dot_product_attention`].
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `(batch, heads, q_len, head_dim_v)` in the query dtype.
    pub output: Tensor,
    /// `(batch, heads, q_len, k_len)` softmax probabilities (query dtype), when requested.
    pub probs: Option<Tensor>,
}

/// `softmax(q k^T * scale + mask) v` for `q: (b, h, q_len, d)`, `k: (b, h, k_len, d)`,
/// `v: (b, h, k_len, dv)`.
///
/// Scores are computed in the input dtype by matmul, then mask and softmax run in f32 (f64 for
/// f64 inputs) and the probabilities are cast back before multiplying `v`, like PyTorch's
/// reference attention. Differentiable in `q`, `k`, `v` (and in the mask if it is a variable).
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<AttentionOutput> {
    let dtype = q.dtype();
    let mask_is_trained = opts.mask.is_some_and(|m| m.track_op());
    if crate::fused::use_fused(q) && matches!(dtype, DType::F32 | DType::F64) && !mask_is_trained {
        return fused_attention(q, k, v, opts);
    }
    scaled_dot_product_attention_composed(q, k, v, opts)
}

/// [`scaled_dot_product_attention`] from candle primitives (any device; the reference for the
/// fused CPU path).
pub fn scaled_dot_product_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<AttentionOutput> {
    let (_, _, q_len, d) = q.dims4()?;
    let k_len = k.dim(2)?;
    let dtype = q.dtype();
    let cdt = crate::compute_dtype(dtype);
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let k_t = k.transpose(2, 3)?.contiguous()?;
    let scores = matmul(&q.contiguous()?, &k_t)?.to_dtype(cdt)?;
    let mut scores = (scores * scale)?;
    if let Some(mask) = opts.mask {
        scores = scores.broadcast_add(&mask.to_dtype(cdt)?)?;
    }
    if opts.causal {
        if q_len > k_len {
            candle_core::bail!("causal attention with q_len {q_len} > k_len {k_len}")
        }
        let m = causal_mask(q_len, k_len - q_len, cdt, q.device())?;
        scores = scores.broadcast_add(&m)?;
    }
    let probs = softmax_last_dim_composed(&scores)?.to_dtype(dtype)?;
    let output = matmul(&probs, &v.contiguous()?)?;
    Ok(AttentionOutput {
        output,
        probs: opts.return_probs.then_some(probs),
    })
}

/// The CPU path: `q k^T` and `probs v` as one batched product each over `(batch x heads)`, and
/// scale + mask + causal mask + softmax in one kernel.
fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<AttentionOutput> {
    use crate::fused::{batched_matmul, softmax_fused, SoftmaxMask, Transpose};
    let (b, h, _, d) = q.dims4()?;
    let (kb, kh, k_len, kd) = k.dims4()?;
    let (vb, vh, v_len, _) = v.dims4()?;
    if (kb, kh, kd) != (b, h, d) || (vb, vh, v_len) != (b, h, k_len) {
        candle_core::bail!(
            "attention: q {:?}, k {:?} and v {:?} do not match",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let scale = opts.scale.unwrap_or(1.0 / (d as f64).sqrt());
    let mask = SoftmaxMask {
        additive: opts.mask,
        causal: opts.causal,
    };
    if !opts.return_probs {
        // One node instead of three: no score-sized gradients for the backward pass to fill.
        return Ok(AttentionOutput {
            output: crate::fused::attention_fused(q, k, v, scale, mask)?,
            probs: None,
        });
    }
    // Products over the (batch, heads) dimensions as they are: a reshape to 3 dimensions and
    // back would add graph nodes whose gradients the backward pass zero-fills and adds.
    let scores = batched_matmul(q, k, Transpose::No, Transpose::Yes)?;
    let probs = softmax_fused(&scores, scale, mask, false)?;
    let output = batched_matmul(&probs, v, Transpose::No, Transpose::No)?;
    Ok(AttentionOutput {
        output,
        probs: opts.return_probs.then_some(probs),
    })
}

/// Additive causal mask `(q_len, offset + q_len)`: 0 where query `i` may see key `j`
/// (`j <= i + offset`), `-inf` elsewhere. `offset` is the number of cached positions.
pub fn causal_mask(q_len: usize, offset: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let k_len = offset + q_len;
    let data: Vec<f32> = (0..q_len)
        .flat_map(|i| {
            (0..k_len).map(move |j| {
                if j <= i + offset {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (q_len, k_len), device)?.to_dtype(dtype)
}

/// `(b, s, heads * d)` -> `(b, heads, s, d)` (contiguous).
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    if crate::fused::use_fused(xs) && matches!(xs.dtype(), DType::F32 | DType::F64) {
        return crate::fused::split_heads_fused(xs, heads);
    }
    split_heads_composed(xs, heads)
}

/// [`split_heads`] from candle primitives (any device; the reference for the fused CPU path).
pub fn split_heads_composed(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, hd) = xs.dims3()?;
    if heads == 0 || !hd.is_multiple_of(heads) {
        candle_core::bail!("split_heads: width {hd} not divisible by {heads} heads")
    }
    xs.reshape((b, s, heads, hd / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `(b, heads, s, d)` -> `(b, s, heads * d)`.
pub fn merge_heads(xs: &Tensor) -> Result<Tensor> {
    if crate::fused::use_fused(xs) && matches!(xs.dtype(), DType::F32 | DType::F64) {
        return crate::fused::merge_heads_fused(xs);
    }
    merge_heads_composed(xs)
}

/// [`merge_heads`] from candle primitives (any device; the reference for the fused CPU path).
pub fn merge_heads_composed(xs: &Tensor) -> Result<Tensor> {
    let (b, h, s, d) = xs.dims4()?;
    xs.transpose(1, 2)?.contiguous()?.reshape((b, s, h * d))
}

/// Repeats key / value heads `n_rep` times for grouped-query attention:
/// `(b, kv_heads, s, d)` -> `(b, kv_heads * n_rep, s, d)`, each head repeated consecutively.
pub fn repeat_kv(xs: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(xs.clone());
    }
    let (b, h, s, d) = xs.dims4()?;
    xs.unsqueeze(2)?
        .broadcast_as((b, h, n_rep, s, d))?
        .contiguous()?
        .reshape((b, h * n_rep, s, d))
}

/// Converts a `(b, k_len)` keep-mask of 1s / 0s (any dtype, e.g. a tokenizer attention mask)
/// into an additive `(b, 1, 1, k_len)` mask in `dtype` (0 keep, `-inf`-like drop).
///
/// Dropped positions get the dtype's most negative finite value, so a fully padded row still
/// gives finite (uniform) probabilities instead of NaN.
pub fn padding_mask(keep: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, k_len) = keep.dims2()?;
    let keep = keep.to_dtype(DType::F32)?;
    let neg = match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.38e38,
        _ => f64::from(f32::MIN),
    };
    let drop = keep.affine(-1.0, 1.0)?; // 1 where dropped
    (drop * neg)?.to_dtype(dtype)?.reshape((b, 1, 1, k_len))
}
