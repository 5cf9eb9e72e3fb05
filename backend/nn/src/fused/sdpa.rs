//! Attention `softmax(scale * q k^T + mask) v` as one graph node, for callers that do not need
//! the probabilities in the graph.
//!
//! Composed from [`super::batched_matmul`] and [`super::softmax_fused`], attention leaves two
//! `(batch, heads, q_len, k_len)` nodes (scores and probabilities) in the graph, and candle's
//! backward pass zero-fills a gradient buffer for each and adds into it: for the stage-2 LLM
//! that is 8 layers x 2 x 12 MB per step of memory traffic with no arithmetic. This node runs
//! the same kernels in the same order forward and backward, so its output and gradients are
//! the composed path's bits; the probabilities are kept inside the node for the backward pass
//! (the composed path keeps them as a node), the scores are freed after the forward pass.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::bmm::{bmm_raw, BmmOp};
use super::softmax::{causal_offset, MaskIndex, SoftmaxOp};
use super::{kernel_dtype, tensor_of, KernelFloat, SoftmaxMask, Transpose};

struct AttentionOp {
    softmax: SoftmaxOp,
    /// The additive mask as a view broadcast to the scores' shape (never materialised).
    mask: Option<Tensor>,
    /// The probabilities of the forward pass, for the backward pass.
    probs: Mutex<Option<Tensor>>,
}

impl AttentionOp {
    fn run<T: KernelFloat>(
        &self,
        (q, qd): (&[T], &[usize]),
        (k, kd): (&[T], &[usize]),
        (v, vd): (&[T], &[usize]),
    ) -> Result<(Vec<T>, Shape)> {
        let scores_op = BmmOp {
            ta: Transpose::No,
            tb: Transpose::Yes,
        };
        let (scores, scores_shape) = scores_op.run(q, qd, k, kd)?;
        let probs = match &self.mask {
            None => self.softmax.forward(&scores, scores_shape.dims(), None),
            Some(mask) => {
                if mask.dims() != scores_shape.dims() {
                    candle_core::bail!(
                        "attention: mask shape {:?} differs from the scores' {:?}",
                        mask.dims(),
                        scores_shape.dims()
                    )
                }
                let (storage, layout) = mask.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("attention: the mask is not on the CPU")
                };
                let Some(m) = cpu.as_slice::<T>().ok() else {
                    candle_core::bail!("attention: the mask's dtype differs from the inputs'")
                };
                let index = MaskIndex {
                    dims: layout.dims(),
                    strides: layout.stride(),
                    start: layout.start_offset(),
                };
                self.softmax
                    .forward(&scores, scores_shape.dims(), Some((m, index)))
            }
        };
        drop(scores);
        let out_op = BmmOp {
            ta: Transpose::No,
            tb: Transpose::No,
        };
        let out = out_op.run(&probs, scores_shape.dims(), v, vd)?;
        let probs = tensor_of(probs, scores_shape.dims())?;
        match self.probs.lock() {
            Ok(mut slot) => *slot = Some(probs),
            Err(poisoned) => *poisoned.into_inner() = Some(probs),
        }
        Ok(out)
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "nn-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        macro_rules! run {
            ($t:ty) => {{
                let (v, s) = self.run::<$t>(
                    (<$t>::slice(s1, l1)?, l1.dims()),
                    (<$t>::slice(s2, l2)?, l2.dims()),
                    (<$t>::slice(s3, l3)?, l3.dims()),
                )?;
                Ok((<$t>::storage(v), s))
            }};
        }
        match s1 {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => candle_core::bail!("nn-attention: f32 or f64 inputs expected"),
        }
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        use Transpose::{No, Yes};
        let probs = match self.probs.lock() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(probs) = probs else {
            candle_core::bail!("nn-attention: backward pass before the forward pass")
        };
        // The composed path's backward, step by step: out = probs v, then the softmax, then
        // scores = q k^T (bmm.rs's rules for those transposes).
        let grad = grad.contiguous()?;
        let d_probs = bmm_raw(&grad, v, No, Yes)?;
        let dv = bmm_raw(&probs, &grad, Yes, No)?;
        let d_scores = self.softmax.grad(&probs, &d_probs)?;
        drop(d_probs);
        let dq = bmm_raw(&d_scores, k, No, No)?;
        let dk = bmm_raw(&d_scores, q, Yes, No)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// `softmax(scale * q k^T + mask) v` for `q: (b, h, q_len, d)`, `k: (b, h, k_len, d)`,
/// `v: (b, h, k_len, dv)` as one node, differentiable in `q`, `k` and `v` (the mask gets no
/// gradient). The same bits as `batched_matmul` + `softmax_fused` + `batched_matmul`. f32 /
/// f64 CPU tensors of one dtype.
pub fn attention_fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: SoftmaxMask,
) -> Result<Tensor> {
    let dtype = q.dtype();
    if k.dtype() != dtype || v.dtype() != dtype || kernel_dtype(dtype) != dtype {
        candle_core::bail!(
            "attention_fused: q, k and v must share an f32 or f64 dtype, got {:?}, {:?} and {:?}",
            dtype,
            k.dtype(),
            v.dtype()
        )
    }
    let (b, h, q_len, _) = q.dims4()?;
    let k_len = k.dim(2)?;
    let scores_dims = [b, h, q_len, k_len];
    let additive = match mask.additive {
        Some(m) => Some(m.to_dtype(dtype)?.broadcast_as(&scores_dims[..])?.detach()),
        None => None,
    };
    let op = AttentionOp {
        softmax: SoftmaxOp {
            scale,
            causal_offset: causal_offset(&scores_dims, mask.causal)?,
            log: false,
        },
        mask: additive,
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}
