//! The R trainable `[IMG0]..[IMG{R-1}]` token rows of StoryGPT-V stage 2.
//!
//! Only these rows of the LLM's input embedding are trained; the LLM and every other row stay
//! frozen. They live in their own `Var` of shape `(R, d)` (saved as
//! `model.input_embeddings.weight`, the authors' checkpoint name) and are spliced into the
//! frozen table on lookup: ids `first_id..first_id + R` select these rows, smaller ids the
//! frozen table. For the output side ([`ImgTokens::extend_logits`]) the same rows score the
//! `[IMG]` tokens (as with OPT's tied `lm_head`; for an untied Llama this project also uses the
//! trainable rows, since the resized `lm_head` rows of a frozen model carry no information).

use candle_core::{DType, Device, Result, Tensor, Var, D};
use candle_nn::VarMap;

use super::CausalLm;

/// The checkpoint / VarMap name of the `[IMG]` rows (authors' stage-2 checkpoint).
pub const IMG_ROWS_NAME: &str = "model.input_embeddings.weight";

/// Trainable `[IMG]` token embeddings spliced into a frozen LLM vocabulary.
#[derive(Debug, Clone)]
pub struct ImgTokens {
    rows: Var,
    first_id: u32,
    frozen_mean_norm: f64,
}

/// Mean L2 norm of the first `n` rows of `table` (computed in f32).
fn mean_row_norm(table: &Tensor, n: usize) -> Result<f64> {
    let t = table.narrow(0, 0, n)?.to_dtype(DType::F32)?;
    t.sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .mean_all()?
        .to_scalar::<f32>()
        .map(f64::from)
}

impl ImgTokens {
    /// Default number of `[IMG]` tokens (R = 8, the paper's best in Table 8).
    pub const DEFAULT_NUM_TOKENS: usize = 8;

    /// New rows for `num_tokens` tokens whose ids start at `first_id` (the tokenizer's size
    /// before adding them), seeded uniform values scaled so each row has about the mean norm
    /// of the frozen rows `0..first_id`. The Var is f32 on the LLM's device.
    pub fn init(lm: &CausalLm, num_tokens: usize, first_id: u32, seed: u64) -> Result<Self> {
        let d = lm.embed_dim();
        let frozen = Self::frozen_norm(lm, first_id)?;
        let a = frozen * 3f64.sqrt() / (d as f64).sqrt();
        let rows =
            nn::gradcheck::seeded_uniform((num_tokens, d), seed, -a, a, DType::F32, lm.device())?;
        Ok(Self {
            rows: Var::from_tensor(&rows)?,
            first_id,
            frozen_mean_norm: frozen,
        })
    }

    /// Wraps existing rows `(R, d)` (e.g. the authors' `model.input_embeddings.weight`) into a
    /// trainable Var on the LLM's device, keeping their dtype (convert to f32 first for
    /// training from bf16 weights).
    pub fn from_rows(lm: &CausalLm, rows: &Tensor, first_id: u32) -> Result<Self> {
        let (_, d) = rows.dims2()?;
        if d != lm.embed_dim() {
            candle_core::bail!(
                "[IMG] rows `{IMG_ROWS_NAME}` have width {d}, the LLM's embeddings {}",
                lm.embed_dim()
            )
        }
        let rows = rows.to_device(lm.device())?;
        Ok(Self {
            rows: Var::from_tensor(&rows)?,
            first_id,
            frozen_mean_norm: Self::frozen_norm(lm, first_id)?,
        })
    }

    fn frozen_norm(lm: &CausalLm, first_id: u32) -> Result<f64> {
        let n = first_id as usize;
        if n == 0 || n > lm.vocab_size() {
            candle_core::bail!(
                "first [IMG] id {first_id} must be in 1..={} (the LLM's vocabulary)",
                lm.vocab_size()
            )
        }
        mean_row_norm(lm.embedding_weight(), n)
    }

    /// Registers the rows in `varmap` under [`IMG_ROWS_NAME`] so that `all_vars()` hands them
    /// to the optimiser and `save()` writes them.
    pub fn register(&self, varmap: &VarMap) {
        varmap
            .data()
            .lock()
            .expect("VarMap mutex poisoned")
            .insert(IMG_ROWS_NAME.to_string(), self.rows.clone());
    }

    /// The trainable `(R, d)` rows.
    pub fn rows(&self) -> &Var {
        &self.rows
    }

    /// R, the number of `[IMG]` tokens.
    pub fn num_tokens(&self) -> usize {
        self.rows.dims()[0]
    }

    /// The id of `[IMG0]`.
    pub fn first_id(&self) -> u32 {
        self.first_id
    }

    /// The ids of `[IMG0]..[IMG{R-1}]`.
    pub fn ids(&self) -> Vec<u32> {
        (0..self.num_tokens() as u32)
            .map(|i| self.first_id + i)
            .collect()
    }

    /// Size of the extended vocabulary (`first_id + R`), the width of [`Self::extend_logits`].
    pub fn extended_vocab_size(&self) -> usize {
        self.first_id as usize + self.num_tokens()
    }

    /// Mean norm of the frozen rows `0..first_id` (the renormalisation target).
    pub fn frozen_mean_norm(&self) -> f64 {
        self.frozen_mean_norm
    }

    /// Embeds ids `(b, s)` of the extended vocabulary: `[IMG]` ids take the trainable rows,
    /// the others the frozen table. Differentiable in the rows. Output in the LLM dtype.
    pub fn embed(&self, lm: &CausalLm, ids: &Tensor) -> Result<Tensor> {
        let dims = ids.dims().to_vec();
        let flat: Vec<i64> = ids.flatten_all()?.to_dtype(DType::I64)?.to_vec1()?;
        let r = self.num_tokens() as i64;
        let first = self.first_id as i64;
        if let Some(bad) = flat.iter().find(|&&i| i < 0 || i >= first + r) {
            candle_core::bail!(
                "token id {bad} is outside the extended vocabulary 0..{} ({} base + {r} [IMG])",
                first + r,
                first
            )
        }
        let dev = ids.device();
        let base_ids: Vec<i64> = flat.iter().map(|&i| i.min(first - 1)).collect();
        let base = lm.embed_ids(&Tensor::from_vec(base_ids, flat.len(), dev)?)?;
        let out = if flat.iter().any(|&i| i >= first) {
            let img_ids: Vec<i64> = flat.iter().map(|&i| (i - first).clamp(0, r - 1)).collect();
            let img = self
                .rows
                .as_tensor()
                .to_dtype(lm.dtype())?
                .index_select(&Tensor::from_vec(img_ids, flat.len(), dev)?, 0)?;
            let sel: Vec<f32> = flat.iter().map(|&i| (i >= first) as u8 as f32).collect();
            let sel = Tensor::from_vec(sel, (flat.len(), 1), dev)?.to_dtype(lm.dtype())?;
            let keep = sel.affine(-1.0, 1.0)?;
            (base.broadcast_mul(&keep)? + img.broadcast_mul(&sel)?)?
        } else {
            base
        };
        let mut shape = dims;
        shape.push(lm.embed_dim());
        out.reshape(shape)
    }

    /// The input embeddings of the R `[IMG]` tokens, `(R, d)` in `dtype` (differentiable).
    pub fn embeddings(&self, dtype: DType) -> Result<Tensor> {
        self.rows.as_tensor().to_dtype(dtype)
    }

    /// Logits over the extended vocabulary `(b, s, first_id + R)`: the base logits of ids
    /// `0..first_id` followed by `last_hidden_state @ rows^T` for the `[IMG]` tokens.
    pub fn extend_logits(&self, logits: &Tensor, last_hidden_state: &Tensor) -> Result<Tensor> {
        let v = logits.dim(D::Minus1)?;
        if self.first_id as usize > v {
            candle_core::bail!(
                "first [IMG] id {} exceeds the logits width {v}",
                self.first_id
            )
        }
        let base = logits.narrow(D::Minus1, 0, self.first_id as usize)?;
        let rows = self.rows.as_tensor().to_dtype(last_hidden_state.dtype())?;
        let img = nn::Linear::from_tensors(rows, None).forward(last_hidden_state)?;
        Tensor::cat(&[&base, &img.to_dtype(base.dtype())?], D::Minus1)
    }

    /// The authors' trick after each optimiser step: scale the rows so that their mean norm
    /// equals the mean norm of the frozen rows (one common factor, as in GILL / StoryGPT-V).
    pub fn renormalise(&self) -> Result<()> {
        let w = self.rows.as_tensor().detach();
        let n = self.num_tokens();
        let current = mean_row_norm(&w, n)?;
        if current == 0.0 {
            return Ok(());
        }
        self.rows.set(&(w * (self.frozen_mean_norm / current))?)
    }

    /// The device of the rows.
    pub fn device(&self) -> &Device {
        self.rows.device()
    }
}
