//! Stage-2 training losses of StoryGPT-V.
//!
//! * [`lgen_loss`]: L_gen, the causal-LM cross-entropy of producing the `[IMG]` tokens (and,
//!   in the authors' variant, the caption tokens) given the prompt; a target mask selects the
//!   positions that count ([`target_mask`]).
//! * [`lalign_loss`]: L_align, the MSE between Mapper_LDM's output and the precomputed
//!   (77, 768) condition of the non-referential caption (paper's default).
//! * [`diffusion_align_loss`]: the authors' later variant, the epsilon-prediction MSE of the
//!   frozen Char-LDM UNet conditioned on the mapper output; the UNet is passed as a closure.
//! * [`diffusion_align_lreg_loss`]: the same diffusion loss and, from the same forward pass,
//!   stage 1's cross-attention regulariser L_reg (`crate::lreg`) on the UNet's `attn2` maps at
//!   the character-name slots of the mapper output, against the target frame's masks: the
//!   gradient reaches the mapper through the attention probabilities (the UNet stays frozen).
//! * [`attention_match_loss`]: at the same slots, the distance between the UNet's attention maps
//!   under the mapper output and under the target condition (same noisy latents), so that each
//!   name slot draws the UNet's attention where stage 1's own condition draws it.
//!
//! The paper's total is `L_gen * w_gen + L_align` with `w_gen = 0.5` in the authors' code
//! ([`AUTHORS_LGEN_WEIGHT`]).

use candle_core::{DType, Result, Tensor, D};

use crate::lreg::{lreg_loss, CharacterTokens};
use crate::unet::{CapturedAttention, UNetOutput};

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

/// L_align with a weight per condition token: `sum_bt(w_bt * mean_d(err^2)) / sum_bt(w_bt)` for
/// `token_weights (b, 77)`; equal to [`lalign_loss`] when every weight is 1. Raising the weight
/// of the character-name tokens makes stage 2 fit the few slots the Char-LDM's attention reads
/// a character from, which the plain mean over 77 tokens lets it neglect.
pub fn weighted_lalign_loss(
    mapper_out: &Tensor,
    target: &Tensor,
    token_weights: &Tensor,
) -> Result<Tensor> {
    if mapper_out.dims() != target.dims() || mapper_out.dims()[..2] != *token_weights.dims() {
        candle_core::bail!(
            "weighted_lalign_loss: mapper output {:?}, target {:?}, token weights {:?}",
            mapper_out.dims(),
            target.dims(),
            token_weights.dims()
        )
    }
    let err = (mapper_out.to_dtype(DType::F32)? - target.to_dtype(DType::F32)?)?
        .sqr()?
        .mean(D::Minus1)?;
    let w = token_weights.to_dtype(DType::F32)?;
    (err * &w)?.sum_all()? / w.sum_all()?.to_scalar::<f32>()? as f64
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

/// [`diffusion_align_loss`] and L_reg from one forward pass: `unet_fn` runs the frozen UNet
/// conditioned on `cond (b, tokens, d)` and captures its cross-attention probabilities
/// (`UNet2DConditionModel::forward_with_capture`); returns `(diffusion loss, L_reg)`, where
/// L_reg is `crate::lreg::lreg_loss` over every captured map for the character slots `chars`
/// (token indices into `cond`'s `tokens` axis) and their masks `(b, kmax, H, W)` (resized to
/// each map). Both are differentiable in `cond`; L_reg through the attention probabilities.
/// Fails if the UNet captured no map (a UNet without cross-attention has nothing to regularise).
pub fn diffusion_align_lreg_loss(
    cond: &Tensor,
    unet_fn: impl Fn(&Tensor) -> Result<UNetOutput>,
    target_noise: &Tensor,
    masks: &Tensor,
    chars: &CharacterTokens,
) -> Result<(Tensor, Tensor)> {
    let (diffusion, maps) = diffusion_align_capture_loss(cond, unet_fn, target_noise)?;
    let lreg = lreg_loss(&maps, masks, chars)?;
    Ok((diffusion, lreg))
}

/// [`diffusion_align_loss`] from a forward pass that captured cross-attention maps: returns
/// `(diffusion loss, the captured maps)` (still in the autograd graph), for L_reg
/// ([`diffusion_align_lreg_loss`]) or [`attention_match_loss`]. Fails if the UNet captured no map.
pub fn diffusion_align_capture_loss(
    cond: &Tensor,
    unet_fn: impl Fn(&Tensor) -> Result<UNetOutput>,
    target_noise: &Tensor,
) -> Result<(Tensor, Vec<CapturedAttention>)> {
    let out = unet_fn(cond)?;
    if out.sample.dims() != target_noise.dims() {
        candle_core::bail!(
            "diffusion_align_capture_loss: noise prediction {:?} vs target noise {:?}",
            out.sample.dims(),
            target_noise.dims()
        )
    }
    if out.attention_probs.is_empty() {
        candle_core::bail!(
            "diffusion_align_capture_loss: the UNet captured no cross-attention map (does it have \
             cross-attention, and was the capture requested?)"
        )
    }
    let diffusion = nn::mse(
        &out.sample.to_dtype(DType::F32)?,
        &target_noise.to_dtype(DType::F32)?,
    )?;
    Ok((diffusion, out.attention_probs))
}

/// Attention matching at the character-name slots `chars` (token indices into the condition):
/// for every captured layer, the squared difference between the slot columns of `maps`
/// (`(b, heads, h*w, tokens)`, the UNet conditioned on the mapper output) and of `target_maps`
/// (the same layers of the same UNet on the same noisy latents, conditioned on the target;
/// treated as constants), averaged over pixels, heads and a sample's valid slots, then over
/// the batch and the layers. Its minimum is the target's own attention: unlike L_reg it gives
/// nothing for attending more sharply than stage 1 does, which is how L_reg at a large weight
/// pulled the mapper output away from the embeddings the UNet was trained on.
/// Fails if no map was captured or the two lists do not pair layer by layer.
pub fn attention_match_loss(
    maps: &[CapturedAttention],
    target_maps: &[CapturedAttention],
    chars: &CharacterTokens,
) -> Result<Tensor> {
    if maps.is_empty() || maps.len() != target_maps.len() {
        candle_core::bail!(
            "attention_match_loss: {} captured maps against {} target maps (need the same \
             non-empty list of layers)",
            maps.len(),
            target_maps.len()
        )
    }
    let kmax = chars.count.iter().copied().max().unwrap_or(0).max(1);
    let mut total: Option<Tensor> = None;
    for (m, t) in maps.iter().zip(target_maps) {
        if m.layer != t.layer || m.probs.dims() != t.probs.dims() {
            candle_core::bail!(
                "attention_match_loss: layer {} {:?} paired with {} {:?}",
                m.layer,
                m.probs.dims(),
                t.layer,
                t.probs.dims()
            )
        }
        let (b, _heads, _hw, tokens) = m.probs.dims4()?;
        if chars.token_index.len() != b {
            candle_core::bail!(
                "attention_match_loss: batch {b} of the maps, {} of the token lists",
                chars.token_index.len()
            )
        }
        let dtype = m.probs.dtype();
        let (onehot, valid) = chars.tensors(tokens, kmax, dtype, m.probs.device())?;
        let onehot = onehot.unsqueeze(1)?;
        // (b, heads, hw, k): each slot's map.
        let ours = m.probs.broadcast_matmul(&onehot)?;
        let theirs = t.probs.detach().broadcast_matmul(&onehot)?;
        let err = (ours - theirs)?.sqr()?.mean(2)?; // (b, heads, k)
        let cnt = (valid.sum(2)? + 1e-5)?; // (b, 1)
        let layer = err
            .broadcast_mul(&valid)?
            .sum(2)?
            .broadcast_div(&cnt)?
            .mean_all()?;
        total = Some(match total {
            None => layer,
            Some(acc) => (acc + layer)?,
        });
    }
    match total {
        Some(t) => t / maps.len() as f64,
        None => candle_core::bail!("attention_match_loss: no map"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp, Var};

    #[test]
    fn weighted_lalign_is_the_plain_mse_at_weight_one_and_weights_its_gradient() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap()).unwrap();
        let t = Tensor::randn(0f32, 1.0, (2, 5, 3), &dev).unwrap();
        let ones = Tensor::ones((2, 5), DType::F32, &dev).unwrap();
        let plain = lalign_loss(x.as_tensor(), &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let same = weighted_lalign_loss(x.as_tensor(), &t, &ones)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((plain - same).abs() < 1e-6, "{plain} vs {same}");

        // Token 1 of row 0 weighted 5: d/dx = 2 w (x - t) / (d * sum w).
        let mut w = vec![1f32; 10];
        w[1] = 5.0;
        let w = Tensor::from_vec(w, (2, 5), &dev).unwrap();
        let loss = weighted_lalign_loss(x.as_tensor(), &t, &w).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap();
        let diff = (x.as_tensor() - &t).unwrap();
        let expected = diff
            .broadcast_mul(&w.unsqueeze(2).unwrap())
            .unwrap()
            .affine(2.0 / (3.0 * 14.0), 0.0)
            .unwrap();
        let err = (g - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err < 1e-6, "gradient error {err}");
    }

    /// Autograd of `loss` in `cond` matches central differences (48 elements), and some
    /// gradient reaches it.
    fn assert_condition_gradient(cond: &Var, loss: impl Fn() -> Result<Tensor>) {
        use nn::gradcheck::{gradcheck, GradCheckOptions};
        let report = gradcheck(
            &[("cond", cond)],
            loss,
            &GradCheckOptions {
                max_elements_per_var: 48,
                ..Default::default()
            },
        )
        .unwrap();
        assert!(
            report.missing.is_empty(),
            "no gradient reached the condition"
        );
        assert!(report.passed(1e-5), "{report}");
    }

    fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// A tiny frozen UNet (random weights in `dtype`) with cross-attention at two resolutions.
    fn tiny_unet(dtype: DType) -> crate::unet::UNet2DConditionModel {
        use crate::unet::{OneOrMany, UNet2DConditionModel, UNetConfig};
        let dev = Device::Cpu;
        let cfg = UNetConfig {
            sample_size: Some(4),
            block_out_channels: vec![4, 8],
            layers_per_block: OneOrMany::One(1),
            down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
            up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
            attention_head_dim: OneOrMany::One(2),
            cross_attention_dim: OneOrMany::One(4),
            norm_num_groups: 2,
            ..UNetConfig::default()
        };
        let vm = candle_nn::VarMap::new();
        let unet =
            UNet2DConditionModel::new(candle_nn::VarBuilder::from_varmap(&vm, dtype, &dev), &cfg)
                .unwrap();
        let data = vm.data().lock().unwrap();
        let mut names: Vec<_> = data.keys().cloned().collect();
        names.sort();
        for (i, name) in names.iter().enumerate() {
            let v = &data[name];
            let (lo, hi) = if name.contains("norm") && name.ends_with("weight") {
                (0.7, 1.3)
            } else {
                let a = 1.6 / (v.dims().iter().skip(1).product::<usize>().max(1) as f64).sqrt();
                (-a, a)
            };
            let t = nn::gradcheck::seeded_uniform(v.shape(), 100 + i as u64, lo, hi, dtype, &dev)
                .unwrap();
            v.set(&t).unwrap();
        }
        unet
    }

    #[test]
    fn lreg_on_the_diffusion_pass_reaches_the_condition_through_the_attention_maps() {
        use crate::unet::AttentionCapture;
        use nn::gradcheck::seeded_uniform;
        let dev = Device::Cpu;
        let dt = DType::F64;
        let unet = tiny_unet(dt);
        let x = seeded_uniform((2, 4, 4, 4), 1, -1.0, 1.0, dt, &dev).unwrap();
        let t = Tensor::new(&[10i64, 600], &dev).unwrap();
        let target = seeded_uniform((2, 4, 4, 4), 2, -1.0, 1.0, dt, &dev).unwrap();
        let cond =
            Var::from_tensor(&seeded_uniform((2, 6, 4), 3, -1.0, 1.0, dt, &dev).unwrap()).unwrap();
        // Sample 0: two characters (slots 1 and 3), each on one half of an 8x8 frame; sample 1:
        // one character (slot 2) in a corner, and an unused mask slot.
        let mut m = vec![0f64; 2 * 2 * 64];
        for p in 0..64 {
            let (r, c) = (p / 8, p % 8);
            m[p] = (c < 4) as u8 as f64;
            m[64 + p] = (c >= 4) as u8 as f64;
            m[128 + p] = (r < 3 && c < 3) as u8 as f64;
        }
        let masks = Tensor::from_vec(m, (2, 2, 8, 8), &dev).unwrap();
        let chars = CharacterTokens::from_lists(&[vec![1, 3], vec![2]]);
        let unet_fn = |c: &Tensor| unet.forward_with_capture(&x, &t, c, &AttentionCapture::all());

        // The diffusion term is the plain diffusion loss of the same forward pass.
        let (diff, lreg) =
            diffusion_align_lreg_loss(cond.as_tensor(), unet_fn, &target, &masks, &chars).unwrap();
        let plain = diffusion_align_loss(cond.as_tensor(), |c| unet.forward(&x, &t, c), &target)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), plain);
        let l = lreg.to_scalar::<f64>().unwrap();
        assert!(l.is_finite() && l.abs() > 1e-6, "L_reg {l}");

        // L_reg alone: autograd through the captured probabilities matches central differences
        // in the condition (every token moves the softmax, the slots' most).
        assert_condition_gradient(&cond, || {
            Ok(diffusion_align_lreg_loss(cond.as_tensor(), unet_fn, &target, &masks, &chars)?.1)
        });
        let g = lreg.backward().unwrap();
        let g = g.get(cond.as_tensor()).unwrap();
        let slot = g.i((0, 1)).unwrap().abs().unwrap().sum_all().unwrap();
        assert!(slot.to_scalar::<f64>().unwrap() > 0.0);

        // A step against the gradient lowers L_reg (the mapper output learns where to attend).
        let stepped = (cond.as_tensor() - (g * (0.01 / max_abs(g))).unwrap()).unwrap();
        let after = diffusion_align_lreg_loss(&stepped, unet_fn, &target, &masks, &chars)
            .unwrap()
            .1
            .to_scalar::<f64>()
            .unwrap();
        assert!(after < l, "L_reg {l} -> {after}");

        // No cross-attention captured: a clear error, not a silent zero.
        let err = diffusion_align_lreg_loss(
            cond.as_tensor(),
            |c| unet.forward_with_capture(&x, &t, c, &AttentionCapture::none()),
            &target,
            &masks,
            &chars,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no cross-attention map"), "{err}");
    }
    #[test]
    fn attention_match_is_zero_at_the_target_and_its_gradient_moves_the_slots_toward_it() {
        use crate::unet::AttentionCapture;
        use nn::gradcheck::seeded_uniform;
        let dev = Device::Cpu;
        let dt = DType::F64;
        let unet = tiny_unet(dt);
        let x = seeded_uniform((2, 4, 4, 4), 11, -1.0, 1.0, dt, &dev).unwrap();
        let t = Tensor::new(&[10i64, 600], &dev).unwrap();
        let target_cond = seeded_uniform((2, 6, 4), 12, -1.5, 1.5, dt, &dev).unwrap();
        let cond =
            Var::from_tensor(&seeded_uniform((2, 6, 4), 13, -1.0, 1.0, dt, &dev).unwrap()).unwrap();
        let chars = CharacterTokens::from_lists(&[vec![1, 3], vec![2]]);
        let maps = |c: &Tensor| {
            unet.forward_with_capture(&x, &t, c, &AttentionCapture::all())
                .map(|o| o.attention_probs)
        };
        let target_maps = maps(&target_cond).unwrap();

        // At the target itself the loss is zero; elsewhere it is positive.
        let at_target = attention_match_loss(&target_maps, &target_maps, &chars)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(at_target, 0.0);
        let loss =
            attention_match_loss(&maps(cond.as_tensor()).unwrap(), &target_maps, &chars).unwrap();
        let l = loss.to_scalar::<f64>().unwrap();
        assert!(l > 1e-8, "attention match {l}");

        // Autograd through the captured probabilities matches central differences in the
        // condition, and nothing flows into the target maps (they are constants).
        assert_condition_gradient(&cond, || {
            attention_match_loss(&maps(cond.as_tensor())?, &target_maps, &chars)
        });

        // Steps against the gradient bring the slots' maps toward the target's.
        let mut c = cond.as_tensor().clone();
        for _ in 0..20 {
            let v = Var::from_tensor(&c).unwrap();
            let l =
                attention_match_loss(&maps(v.as_tensor()).unwrap(), &target_maps, &chars).unwrap();
            let g = l.backward().unwrap();
            let g = g.get(v.as_tensor()).unwrap().clone();
            c = (c - (&g * (0.02 / max_abs(&g))).unwrap()).unwrap();
        }
        let after = attention_match_loss(&maps(&c).unwrap(), &target_maps, &chars)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(after < 0.8 * l, "attention match {l} -> {after}");

        // Lists that do not pair layer by layer are an error, not a silent partial loss.
        let err = attention_match_loss(&target_maps[..1], &target_maps, &chars)
            .unwrap_err()
            .to_string();
        assert!(err.contains("need the same"), "{err}");
    }
}
