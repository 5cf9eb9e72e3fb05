//! The key / value cache shared by the causal LMs: prefill once, decode token by token, and
//! rewind to a prefix so the story pipeline can reuse the context of earlier frames.

use candle_core::{Result, Tensor};

/// Per-layer keys and values `(batch, kv_heads, len, head_dim)` of the positions seen so far.
///
/// Keys are stored after the rotary embedding (Llama) and before `repeat_kv`, so a GQA model
/// keeps only its `num_key_value_heads`. The cache is part of the autograd graph when the
/// forward pass was (training through a prefix works).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
        }
    }

    /// The number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims()[2])
            .unwrap_or(0)
    }

    /// Whether no position is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of layers this cache was made for.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Drops every cached position.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// Keeps the first `len` positions ("rewind"), e.g. to reuse the prompt prefix shared with
    /// the previous frame. Fails if `len` exceeds the cached length.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        let have = self.len();
        if len > have {
            candle_core::bail!("cannot truncate a KV cache of {have} positions to {len}")
        }
        if len == 0 {
            self.clear();
            return Ok(());
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.narrow(2, 0, len)?;
            *v = v.narrow(2, 0, len)?;
        }
        Ok(())
    }

    /// Appends `k`, `v` of shape `(b, kv_heads, new, d)` to layer `layer` and returns the full
    /// keys and values of that layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!(
                "KV cache has {} layers, got layer {layer}",
                self.layers.len()
            )
        };
        let (k, v) = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// The keys and values of layer `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.as_ref())
    }
}
