//! StoryGPT-V's cross-attention regulariser L_reg (paper Eq. 2-3), as in the authors' code
//! (FastComposer's `get_object_localization_loss` with the balanced "A- minus A+" loss).
//!
//! For every hooked `attn2` layer with probabilities `A (b, heads, h*w, tokens)` and every
//! character `k` of sample `b` (token index `t_k`, mask `M_k` resized to `(h, w)` by
//! antialiased bilinear interpolation as `F.interpolate(mode="bilinear", antialias=True)`):
//! `A+ = sum(A[..t_k] * M_k) / (sum(M_k) + 1e-5)`, `A- = sum(A[..t_k] * (1 - M_k)) /
//! (sum(1 - M_k) + 1e-5)`; the layer loss is `(A- - A+)` summed over valid characters,
//! divided by their count (+1e-5), averaged over heads and batch; the total is the mean over
//! layers. Everything is differentiable in the attention maps.

use candle_core::{DType, Device, Result, Tensor};

use crate::unet::CapturedAttention;

/// Row weights `(out, in)` of PyTorch's antialiased bilinear resize along one axis
/// (`_upsample_bilinear2d_aa`, `align_corners=False`): a triangle filter whose support grows
/// with the downscale factor, each row normalised to sum 1. For upscaling this is plain
/// bilinear interpolation.
pub fn antialias_bilinear_weights(in_size: usize, out_size: usize) -> Vec<f32> {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { scale } else { 1.0 };
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut w = vec![0f32; out_size * in_size];
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let mut row = Vec::with_capacity(xmax.saturating_sub(xmin));
        for j in xmin..xmax {
            let x = (j as f64 - center + 0.5) * invscale;
            row.push((1.0 - x.abs()).max(0.0));
        }
        let total: f64 = row.iter().sum();
        for (o, v) in row.iter().enumerate() {
            let v = if total != 0.0 { v / total } else { *v };
            w[i * in_size + xmin + o] = v as f32;
        }
    }
    w
}

/// Resizes `masks (b, k, H, W)` to `(b, k, h, w)` like
/// `F.interpolate(masks, (h, w), mode="bilinear", antialias=True)`.
pub fn resize_masks(masks: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, mh, mw) = masks.dims4()?;
    if (mh, mw) == (h, w) {
        return Ok(masks.clone());
    }
    let dev = masks.device();
    let dtype = masks.dtype();
    let wh = Tensor::from_vec(antialias_bilinear_weights(mh, h), (h, mh), dev)?.to_dtype(dtype)?;
    let ww = Tensor::from_vec(antialias_bilinear_weights(mw, w), (w, mw), dev)?
        .to_dtype(dtype)?
        .t()?;
    wh.broadcast_matmul(&masks.contiguous()?)?
        .broadcast_matmul(&ww.contiguous()?)
}

/// Which characters each sample has: `token_index (b, kmax)` and `valid (b, kmax)` (1 for a
/// real character, 0 for padding), matching the masks' `k` axis.
#[derive(Debug, Clone)]
pub struct CharacterTokens {
    /// Token index per (sample, character); ignored where not valid.
    pub token_index: Vec<Vec<usize>>,
    /// Number of real characters per sample (the first `n` entries are valid).
    pub count: Vec<usize>,
}

impl CharacterTokens {
    /// From per-sample lists of token indices (each at most `kmax` long).
    pub fn from_lists(lists: &[Vec<usize>]) -> Self {
        Self {
            token_index: lists.to_vec(),
            count: lists.iter().map(Vec::len).collect(),
        }
    }

    /// One-hot selector `(b, tokens, kmax)` and validity `(b, 1, kmax)`.
    pub(crate) fn tensors(
        &self,
        tokens: usize,
        kmax: usize,
        dtype: DType,
        dev: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let b = self.token_index.len();
        let mut onehot = vec![0f32; b * tokens * kmax];
        let mut valid = vec![0f32; b * kmax];
        for (i, idx) in self.token_index.iter().enumerate() {
            if idx.len() > kmax {
                candle_core::bail!(
                    "L_reg: sample {i} has {} characters but masks hold {kmax}",
                    idx.len()
                )
            }
            for (k, &t) in idx.iter().enumerate() {
                if t >= tokens {
                    candle_core::bail!("L_reg: sample {i} token index {t} >= {tokens} tokens")
                }
                onehot[(i * tokens + t) * kmax + k] = 1.0;
                valid[i * kmax + k] = 1.0;
            }
        }
        Ok((
            Tensor::from_vec(onehot, (b, tokens, kmax), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(valid, (b, 1, kmax), dev)?.to_dtype(dtype)?,
        ))
    }
}

/// L_reg for one layer. `probs (b, heads, h*w, tokens)`, `masks (b, kmax, H, W)`;
/// `map_size` is the map's `(h, w)` (`None`: square, `h = w = sqrt(h*w)`).
pub fn lreg_layer(
    probs: &Tensor,
    masks: &Tensor,
    chars: &CharacterTokens,
    map_size: Option<(usize, usize)>,
) -> Result<Tensor> {
    let (b, _heads, hw, tokens) = probs.dims4()?;
    let (mb, kmax, _, _) = masks.dims4()?;
    if mb != b || chars.token_index.len() != b {
        candle_core::bail!(
            "L_reg: batch {b} of the attention map, {mb} of the masks, {} of the token lists",
            chars.token_index.len()
        )
    }
    let (h, w) = match map_size {
        Some(s) => s,
        None => {
            let s = (hw as f64).sqrt().round() as usize;
            (s, s)
        }
    };
    if h * w != hw {
        candle_core::bail!("L_reg: map of {hw} positions is not {h}x{w}; pass map_size")
    }
    let dtype = probs.dtype();
    let m = resize_masks(&masks.to_dtype(dtype)?, h, w)?
        .reshape((b, kmax, hw))?
        .unsqueeze(1)?; // (b, 1, k, hw)
    let (onehot, valid) = chars.tensors(tokens, kmax, dtype, probs.device())?;
    // (b, heads, hw, k) -> (b, heads, k, hw)
    let a = probs
        .broadcast_matmul(&onehot.unsqueeze(1)?)?
        .transpose(2, 3)?;
    let bg = m.affine(-1.0, 1.0)?;
    let obj = a
        .broadcast_mul(&m)?
        .sum(3)?
        .broadcast_div(&(m.sum(3)? + 1e-5)?)?;
    let back = a
        .broadcast_mul(&bg)?
        .sum(3)?
        .broadcast_div(&(bg.sum(3)? + 1e-5)?)?;
    let loss = (back - obj)?.broadcast_mul(&valid)?; // (b, heads, k)
    let cnt = (valid.sum(2)? + 1e-5)?; // (b, 1)
    loss.sum(2)?.broadcast_div(&cnt)?.mean_all()
}

/// L_reg averaged over the captured layers (each layer's map size inferred as square).
pub fn lreg_loss(
    maps: &[CapturedAttention],
    masks: &Tensor,
    chars: &CharacterTokens,
) -> Result<Tensor> {
    let Some((first, rest)) = maps.split_first() else {
        candle_core::bail!("L_reg: no attention maps were captured")
    };
    let mut total = lreg_layer(&first.probs, masks, chars, None)?;
    for m in rest {
        total = (total + lreg_layer(&m.probs, masks, chars, None)?)?;
    }
    total / maps.len() as f64
}
