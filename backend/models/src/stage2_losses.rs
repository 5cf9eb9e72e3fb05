//! Stage-2 training losses of StoryGPT-V.
//!
//! * [`lgen_loss`]: L_gen, the causal-LM cross-entropy of producing the `[IMG]` tokens (and,
//!   in the authors' variant, the caption tokens) given the prompt; a target mask selects the
//!   positions that count ([`target_mask`]).
//! * [`lalign_loss`]: L_align, the MSE between Mapper_LDM's output and the precomputed
//!   (77, 768) condition of the non-referential caption (paper's default).
//! * [`diffusion_align_loss`]: the authors' later variant, the epsilon-prediction MSE of the
//!   frozen Char-LDM UNet conditioned on the mapper output; the UNet is passed as a closure.
//!
//! The paper's total is `L_gen * w_gen + L_align` with `w_gen = 0.5` in the authors' code
//! ([`AUTHORS_LGEN_WEIGHT`]).

use candle_core::{DType, Result, Tensor, D};

/// Weight of L_gen in the authors' trainer.
pub const AUTHORS_LGEN_WEIGHT: f64 = 0.5;

/// L_gen: mean cross-entropy of `input_ids[:, t + 1]` under `logits[:, t]` over the target
/// positions `t + 1` where `target_mask` is non-zero.
///
/// `logits: (b, s, V)` over the extended vocabulary (see `ImgTokens::extend_logits`),
/// `input_ids: (b, s)` the sequence fed to the model (`[IMG]` ids included), `target_mask:
/// (b, s)` indexed like `input_ids` (position 0 can never be a target). Computed in f32 (f64
/// for f64 logits) with
/// `nn::log_softmax_last_dim` (differentiable). Fails if no position is selected.
pub fn lgen_loss(logits: &Tensor, input_ids: &Tensor, target_mask: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if input_ids.dims() != [b, s] || target_mask.dims() != [b, s] {
        candle_core::bail!(
            "lgen_loss: logits {:?}, input_ids {:?} and target_mask {:?} disagree",
            logits.dims(),
            input_ids.dims(),
            target_mask.dims()
        )
    }
    if s < 2 {
        candle_core::bail!("lgen_loss needs at least 2 positions, got {s}")
    }
    // f32 for f32 / f16 / bf16 logits; f64 stays f64 (gradient checks).
    let cdt = if logits.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let logp = nn::log_softmax_last_dim(&logits.narrow(1, 0, s - 1)?.to_dtype(cdt)?)?;
    let targets = input_ids.narrow(1, 1, s - 1)?.to_dtype(DType::I64)?;
    let max_id = targets.max_all()?.to_scalar::<i64>()?;
    if max_id as usize >= v {
        candle_core::bail!("lgen_loss: target id {max_id} outside the {v} logits")
    }
    let picked = logp
        .contiguous()?
        .gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let w = target_mask.narrow(1, 1, s - 1)?.to_dtype(cdt)?;
    let count = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if count <= 0.0 {
        candle_core::bail!("lgen_loss: target_mask selects no position")
    }
    (picked * w)?.sum_all()?.affine(-1.0 / count, 0.0)
}

/// Which targets L_gen counts ([`target_mask`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LgenTargets {
    /// Every `[IMG]` token (GILL / the paper's description).
    AllImg,
    /// The current caption tokens and `[IMG0]` only (StoryGPT-V authors' code).
    CaptionAndFirstImg,
}

/// A `(1, len)` f32 mask for [`lgen_loss`] from the `[IMG]` positions and the current caption
/// range of a prompt (both as produced by `prompt::Prompt`).
pub fn target_mask(
    len: usize,
    img_positions: &[usize],
    caption: std::ops::Range<usize>,
    which: LgenTargets,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let mut m = vec![0f32; len];
    let mut set = |p: usize| -> Result<()> {
        match m.get_mut(p) {
            Some(x) => {
                *x = 1.0;
                Ok(())
            }
            None => candle_core::bail!("target position {p} outside the prompt of {len}"),
        }
    };
    match which {
        LgenTargets::AllImg => img_positions.iter().try_for_each(|&p| set(p))?,
        LgenTargets::CaptionAndFirstImg => {
            caption.clone().try_for_each(&mut set)?;
            if let Some(&p) = img_positions.first() {
                set(p)?;
            }
        }
    }
    Tensor::from_vec(m, (1, len), device)
}

/// L_align: mean squared error between the mapper output `(b, 77, 768)` and the target
/// condition (same shape; precomputed FUSED or text embedding of the non-referential caption).
pub fn lalign_loss(mapper_out: &Tensor, target: &Tensor) -> Result<Tensor> {
    if mapper_out.dims() != target.dims() {
        candle_core::bail!(
            "lalign_loss: mapper output {:?} vs target condition {:?}",
            mapper_out.dims(),
            target.dims()
        )
    }
    nn::mse(
        &mapper_out.to_dtype(DType::F32)?,
        &target.to_dtype(DType::F32)?,
    )
}

/// The diffusion-loss variant of L_align: `mse(noise_pred_fn(cond), target_noise)`, where
/// `noise_pred_fn` runs the frozen Char-LDM UNet on fixed noisy latents and timesteps
/// conditioned on `cond` (the mapper output), so the gradient flows into the mapper through
/// the frozen UNet.
pub fn diffusion_align_loss(
    cond: &Tensor,
    noise_pred_fn: impl Fn(&Tensor) -> Result<Tensor>,
    target_noise: &Tensor,
) -> Result<Tensor> {
    let pred = noise_pred_fn(cond)?;
    if pred.dims() != target_noise.dims() {
        candle_core::bail!(
            "diffusion_align_loss: noise prediction {:?} vs target noise {:?}",
            pred.dims(),
            target_noise.dims()
        )
    }
    nn::mse(
        &pred.to_dtype(DType::F32)?,
        &target_noise.to_dtype(DType::F32)?,
    )
}
