//! The key / value cache shared by the causal LMs: prefill once, decode token by token, and
//! rewind to a prefix so the story pipeline can reuse the context of earlier frames.

use std::sync::Arc;

use candle_core::{Result, Tensor};

/// Per-layer keys and values `(batch, kv_heads, len, head_dim)` of the positions seen so far.
///
/// Keys are stored after the rotary embedding (Llama) and before `repeat_kv`, so a GQA model
/// keeps only its `num_key_value_heads`. The cache is part of the autograd graph when the
/// forward pass was (training through a prefix works).
///
/// Without gradients (inference) each layer keeps a preallocated `(b, kv_heads, capacity, d)`
/// buffer, new positions are written into it in place and [`KvCache::append`] returns views of
/// the first `len` positions; capacity grows geometrically. In-place writes are invisible to
/// autograd, so as soon as the new or the cached keys / values track gradients the layer falls
/// back to concatenation (a new tensor per step, in the graph).
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Slot>,
    /// Positions the first buffer allocation reserves ([`KvCache::with_capacity`]).
    reserve: usize,
}

#[derive(Debug, Clone, Default)]
enum Slot {
    #[default]
    Empty,
    /// Concatenated keys / values (the autograd path).
    Graph((Tensor, Tensor)),
    /// Preallocated buffers (the inference path).
    Buffer(Buffered),
}

#[derive(Debug, Clone)]
struct Buffered {
    k: Tensor,
    v: Tensor,
    /// Views of the first `len` positions (what `layer()` / `append()` hand out).
    view: (Tensor, Tensor),
    /// The highest position count ever handed out as a view of these buffers. Views are
    /// immutable tensors to their holders, so positions below this mark must not be rewritten
    /// (after a `truncate`); writing there reallocates first.
    exposed: usize,
    /// Shared between clones of the cache: while another clone holds the same buffers, a write
    /// reallocates (copy on write) instead of changing what the other clone sees.
    owner: Arc<()>,
}

impl Buffered {
    fn len(&self) -> usize {
        self.view.0.dims()[2]
    }

    /// New buffers of `capacity` positions holding `prefix` (if any) followed by `k`, `v`.
    fn alloc(
        prefix: Option<(&Tensor, &Tensor)>,
        k: &Tensor,
        v: &Tensor,
        capacity: usize,
    ) -> Result<Self> {
        let (b, h, _, d) = k.dims4()?;
        let (_, hv, _, dv) = v.dims4()?;
        let kb = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, hv, capacity, dv), v.dtype(), v.device())?;
        let mut at = 0;
        if let Some((pk, pv)) = prefix {
            kb.slice_set(&pk.contiguous()?, 2, 0)?;
            vb.slice_set(&pv.contiguous()?, 2, 0)?;
            at = pk.dims()[2];
        }
        kb.slice_set(&k.contiguous()?, 2, at)?;
        vb.slice_set(&v.contiguous()?, 2, at)?;
        let len = at + k.dims()[2];
        Ok(Self {
            view: (kb.narrow(2, 0, len)?, vb.narrow(2, 0, len)?),
            k: kb,
            v: vb,
            exposed: len,
            owner: Arc::new(()),
        })
    }

    fn append(&mut self, k: &Tensor, v: &Tensor, reserve: usize) -> Result<()> {
        let len = self.len();
        let needed = len + k.dims()[2];
        let cap = self.k.dims()[2];
        let shared = Arc::strong_count(&self.owner) > 1;
        if needed > cap || len < self.exposed || shared {
            let grown = if needed > cap {
                (needed + needed / 2).max(2 * cap)
            } else {
                cap
            };
            let (pk, pv) = self.view.clone();
            *self = Self::alloc(Some((&pk, &pv)), k, v, grown.max(reserve))?;
            return Ok(());
        }
        self.k.slice_set(&k.contiguous()?, 2, len)?;
        self.v.slice_set(&v.contiguous()?, 2, len)?;
        self.view = (self.k.narrow(2, 0, needed)?, self.v.narrow(2, 0, needed)?);
        self.exposed = needed;
        Ok(())
    }
}

/// Slack for the first allocation: prefill `n` positions, room for `n / 2` more (at least 16)
/// before the first growth.
fn initial_capacity(n: usize, reserve: usize) -> usize {
    (n + (n / 2).max(16)).max(reserve)
}

impl KvCache {
    /// An empty cache for `num_layers` decoder layers.
    pub fn new(num_layers: usize) -> Self {
        Self::with_capacity(num_layers, 0)
    }

    /// An empty cache whose inference buffers start with room for `capacity` positions (e.g.
    /// prompt + maximum new tokens), so decoding never reallocates.
    pub fn with_capacity(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: vec![Slot::Empty; num_layers],
            reserve: capacity,
        }
    }

    /// The number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| match l {
                Slot::Empty => None,
                Slot::Graph((k, _)) => Some(k.dims()[2]),
                Slot::Buffer(b) => Some(b.len()),
            })
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
        self.layers.iter_mut().for_each(|l| *l = Slot::Empty);
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
        for l in self.layers.iter_mut() {
            match l {
                Slot::Empty => {}
                Slot::Graph((k, v)) => {
                    *k = k.narrow(2, 0, len)?;
                    *v = v.narrow(2, 0, len)?;
                }
                // The buffers keep their contents; the next append rewrites from `len`
                // (after copying, since the old views may still be held).
                Slot::Buffer(b) => b.view = (b.k.narrow(2, 0, len)?, b.v.narrow(2, 0, len)?),
            }
        }
        Ok(())
    }

    /// Appends `k`, `v` of shape `(b, kv_heads, new, d)` to layer `layer` and returns the full
    /// keys and values of that layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let reserve = self.reserve;
        let n_layers = self.layers.len();
        let Some(slot) = self.layers.get_mut(layer) else {
            candle_core::bail!("KV cache has {n_layers} layers, got layer {layer}")
        };
        let grad = k.track_op() || v.track_op();
        let new = k.dims4()?.2;
        *slot = match std::mem::take(slot) {
            Slot::Empty if grad => Slot::Graph((k.clone(), v.clone())),
            Slot::Empty => {
                Slot::Buffer(Buffered::alloc(None, k, v, initial_capacity(new, reserve))?)
            }
            Slot::Graph((pk, pv)) if grad || pk.track_op() || pv.track_op() => {
                Slot::Graph((Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?))
            }
            // An untracked prefix (detached by the caller): move to buffers.
            Slot::Graph((pk, pv)) => {
                let cap = initial_capacity(pk.dims()[2] + new, reserve);
                Slot::Buffer(Buffered::alloc(Some((&pk, &pv)), k, v, cap)?)
            }
            Slot::Buffer(b) if grad => {
                let (pk, pv) = &b.view;
                Slot::Graph((Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?))
            }
            Slot::Buffer(mut b) => {
                b.append(k, v, reserve)?;
                Slot::Buffer(b)
            }
        };
        Ok(self.layer(layer).expect("just appended").clone())
    }

    /// The keys and values of layer `layer`, if any.
    pub fn layer(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        match self.layers.get(layer)? {
            Slot::Empty => None,
            Slot::Graph(kv) => Some(kv),
            Slot::Buffer(b) => Some(&b.view),
        }
    }

    /// Positions layer `layer` can hold before reallocating (its current length on the
    /// autograd path, 0 when empty).
    pub fn capacity(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Slot::Buffer(b)) => b.k.dims()[2],
            Some(Slot::Graph((k, _))) => k.dims()[2],
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Var};

    use super::*;

    fn kv(seed: usize, b: usize, new: usize) -> (Tensor, Tensor) {
        let n = b * 2 * new * 3;
        let f = |off: usize| {
            let vals: Vec<f32> = (0..n)
                .map(|i| ((seed * 31 + i + off) % 17) as f32 - 8.0)
                .collect();
            Tensor::from_vec(vals, (b, 2, new, 3), &Device::Cpu).unwrap()
        };
        (f(0), f(5))
    }

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// What the cache must hold: the plain concatenation of everything appended.
    fn concat(parts: &[(Tensor, Tensor)]) -> (Tensor, Tensor) {
        let ks: Vec<&Tensor> = parts.iter().map(|p| &p.0).collect();
        let vs: Vec<&Tensor> = parts.iter().map(|p| &p.1).collect();
        (Tensor::cat(&ks, 2).unwrap(), Tensor::cat(&vs, 2).unwrap())
    }

    #[test]
    fn buffered_appends_equal_concatenation_across_growth() {
        let mut c = KvCache::new(2);
        let mut parts = vec![kv(0, 2, 5)];
        c.append(1, &parts[0].0, &parts[0].1).unwrap();
        assert_eq!(c.capacity(1), 5 + 16);
        for s in 1..40 {
            parts.push(kv(s, 2, 1 + s % 3));
            let p = parts.last().unwrap().clone();
            let (k, v) = c.append(1, &p.0, &p.1).unwrap();
            let (ek, ev) = concat(&parts);
            assert_eq!(vals(&k), vals(&ek), "step {s}");
            assert_eq!(vals(&v), vals(&ev), "step {s}");
            assert_eq!(c.len(), ek.dims()[2]);
        }
        // Grew geometrically, not per step.
        assert!(c.capacity(1) >= c.len() && c.capacity(1) < 2 * c.len() + 16);
        assert!(c.layer(0).is_none());
    }

    #[test]
    fn rewinding_does_not_change_views_already_handed_out() {
        let mut c = KvCache::with_capacity(1, 64);
        let a = kv(1, 1, 6);
        let (k_before, _) = c.append(0, &a.0, &a.1).unwrap();
        let snapshot = vals(&k_before);
        c.truncate(2).unwrap();
        assert_eq!(c.len(), 2);
        let b = kv(2, 1, 4);
        let (k, v) = c.append(0, &b.0, &b.1).unwrap();
        assert_eq!(vals(&k_before), snapshot, "an old view was overwritten");
        let prefix = (a.0.narrow(2, 0, 2).unwrap(), a.1.narrow(2, 0, 2).unwrap());
        let (ek, ev) = concat(&[prefix, b]);
        assert_eq!(vals(&k), vals(&ek));
        assert_eq!(vals(&v), vals(&ev));
        assert!(c.truncate(7).is_err());
        c.truncate(0).unwrap();
        assert!(c.is_empty());
    }

    #[test]
    fn clones_are_independent() {
        let mut a = KvCache::new(1);
        let p = kv(3, 1, 4);
        a.append(0, &p.0, &p.1).unwrap();
        let mut b = a.clone();
        let (xa, ya) = kv(4, 1, 1);
        let (xb, yb) = kv(5, 1, 1);
        a.append(0, &xa, &ya).unwrap();
        b.append(0, &xb, &yb).unwrap();
        let ka = vals(&a.layer(0).unwrap().0);
        let kb = vals(&b.layer(0).unwrap().0);
        assert_eq!(ka, vals(&concat(&[p.clone(), (xa, ya)]).0));
        assert_eq!(kb, vals(&concat(&[p, (xb, yb)]).0));
    }

    #[test]
    fn gradients_flow_through_cached_prefix() {
        // Keys that track gradients go through the concatenation path: the loss on a later
        // step's full keys reaches the prefix's parameters.
        let w = Var::from_tensor(&kv(6, 1, 3).0).unwrap();
        let mut c = KvCache::new(1);
        let (k0, v0) = (w.as_tensor() * 2.0).map(|k| (k.clone(), k)).unwrap();
        c.append(0, &k0, &v0).unwrap();
        let (x, y) = kv(7, 1, 1);
        let (k, _) = c.append(0, &x, &y).unwrap();
        assert!(k.track_op());
        let grads = k.sum_all().unwrap().backward().unwrap();
        let g = grads.get(w.as_tensor()).expect("prefix lost its gradient");
        assert!(vals(g).iter().all(|&x| x == 2.0));

        // An inference prefix followed by a tracked step also keeps the new keys in the graph.
        let mut c = KvCache::new(1);
        let p = kv(8, 1, 3);
        c.append(0, &p.0, &p.1).unwrap();
        let w = Var::zeros((1, 2, 1, 3), DType::F32, &Device::Cpu).unwrap();
        let (k, _) = c.append(0, w.as_tensor(), w.as_tensor()).unwrap();
        let grads = k.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(w.as_tensor()).is_some());
        assert_eq!(c.len(), 4);
    }
}
