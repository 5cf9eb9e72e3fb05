//! StoryGPT-V's `FuseModule` (method.md, "Fused embedding"): fuses the CLIP text-encoder output
//! at a character's last name token with the CLIP image embedding of the character's portrait.
//!
//! `fused = layer_norm(mlp2(x1))`, `x1 = mlp1(cat(text_k, image_k)) + text_k`, where
//! `mlp1 = LayerNorm(2d) -> Linear(2d, d) -> GELU -> Linear(d, d)` (no residual) and
//! `mlp2 = LayerNorm(d) -> Linear(d, d) -> GELU -> Linear(d, d)` with a residual (so
//! `mlp2(x1) = fc2(gelu(fc1(ln(x1)))) + x1`, the paper's `mlp2(x1) + x1`).
//!
//! Tensor names follow the authors' `postfuse_module` (FastComposer / PhotoMaker `FuseModule`
//! with `MLP(layernorm, fc1, fc2)`): `mlp1.layernorm`, `mlp1.fc1`, `mlp1.fc2`,
//! `mlp2.layernorm`, `mlp2.fc1`, `mlp2.fc2`, `layer_norm`. Load the authors' stage-1
//! checkpoint with `weights.subset("postfuse_module")`. LayerNorm eps is PyTorch's 1e-5; GELU
//! is the exact (erf) form.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use nn::{LayerNorm, Linear};

/// At most this many characters are fused into one caption (method.md).
pub const MAX_CHARACTERS: usize = 4;

/// FastComposer's `MLP`: `fc2(gelu(fc1(layernorm(x))))`, plus `x` when `residual`.
#[derive(Debug, Clone)]
pub struct FuseMlp {
    layernorm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    residual: bool,
}

impl FuseMlp {
    /// Tensor names `layernorm`, `fc1`, `fc2`.
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        hidden: usize,
        out_dim: usize,
        residual: bool,
    ) -> Result<Self> {
        if residual && in_dim != out_dim {
            candle_core::bail!(
                "FuseMlp `{}`: residual needs in_dim == out_dim",
                vb.prefix()
            )
        }
        Ok(Self {
            layernorm: LayerNorm::new(vb.pp("layernorm"), in_dim, 1e-5)?,
            fc1: Linear::new(vb.pp("fc1"), in_dim, hidden, true)?,
            fc2: Linear::new(vb.pp("fc2"), hidden, out_dim, true)?,
            residual,
        })
    }

    /// `(..., in_dim)` -> `(..., out_dim)`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self
            .fc2
            .forward(&nn::gelu(&self.fc1.forward(&self.layernorm.forward(xs)?)?)?)?;
        if self.residual {
            h + xs
        } else {
            Ok(h)
        }
    }
}

/// The StoryGPT-V / FastComposer `FuseModule` for embedding width `d` (768 for SD 1.5).
#[derive(Debug, Clone)]
pub struct FuseModule {
    mlp1: FuseMlp,
    mlp2: FuseMlp,
    layer_norm: LayerNorm,
    dim: usize,
}

/// One character to fuse into a caption: the position of the LAST BPE token of its name in the
/// 77-token sequence, and its `(d,)` (or `(1, d)`) portrait embedding.
#[derive(Debug, Clone)]
pub struct CharacterSlot {
    /// Token index in the text-encoder output.
    pub token_index: usize,
    /// CLIP image embedding (visual projection output).
    pub image_embedding: Tensor,
}

impl FuseModule {
    /// Builds the module; `vb` reads `postfuse_module.*` weights or a `VarMap`.
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self {
            mlp1: FuseMlp::new(vb.pp("mlp1"), 2 * dim, dim, dim, false)?,
            mlp2: FuseMlp::new(vb.pp("mlp2"), dim, dim, dim, true)?,
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), dim, 1e-5)?,
            dim,
        })
    }

    /// Embedding width `d`.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Fuses text vectors with image vectors, both `(..., d)` -> `(..., d)`.
    pub fn fuse(&self, text_k: &Tensor, image_k: &Tensor) -> Result<Tensor> {
        let last = text_k.rank() - 1;
        let x = Tensor::cat(&[text_k, image_k], last)?;
        let x1 = (self.mlp1.forward(&x)? + text_k)?;
        self.layer_norm.forward(&self.mlp2.forward(&x1)?)
    }

    /// Replaces, in the text-encoder output `text (b, L, d)`, the token of each character of
    /// sample `i` (`characters[i]`, at most [`MAX_CHARACTERS`]) by the fused vector; all other
    /// positions are unchanged. Differentiable in `text`, the image embeddings and the module.
    pub fn fuse_into_text(
        &self,
        text: &Tensor,
        characters: &[Vec<CharacterSlot>],
    ) -> Result<Tensor> {
        let (b, len, d) = text.dims3()?;
        if characters.len() != b {
            candle_core::bail!(
                "fuse_into_text: {} character lists for batch {b}",
                characters.len()
            )
        }
        let total: usize = characters.iter().map(Vec::len).sum();
        if total == 0 {
            return Ok(text.clone());
        }
        let mut select = vec![0f32; total * b * len];
        let mut keep = vec![1f32; b * len];
        let mut images = Vec::with_capacity(total);
        let mut row = 0;
        for (i, chars) in characters.iter().enumerate() {
            if chars.len() > MAX_CHARACTERS {
                candle_core::bail!(
                    "fuse_into_text: sample {i} has {} characters (at most {MAX_CHARACTERS})",
                    chars.len()
                )
            }
            for c in chars {
                if c.token_index >= len {
                    candle_core::bail!(
                        "fuse_into_text: sample {i} token index {} >= sequence length {len}",
                        c.token_index
                    )
                }
                let flat = i * len + c.token_index;
                if keep[flat] == 0.0 {
                    candle_core::bail!(
                        "fuse_into_text: sample {i} names token {} twice",
                        c.token_index
                    )
                }
                keep[flat] = 0.0;
                select[row * b * len + flat] = 1.0;
                images.push(c.image_embedding.reshape(d)?);
                row += 1;
            }
        }
        let dtype = text.dtype();
        let dev = text.device();
        let select = Tensor::from_vec(select, (total, b * len), dev)?.to_dtype(dtype)?;
        let keep = Tensor::from_vec(keep, (b * len, 1), dev)?.to_dtype(dtype)?;
        let flat_text = text.reshape((b * len, d))?;
        let text_k = select.matmul(&flat_text)?;
        let image_k = Tensor::stack(&images, 0)?.to_dtype(dtype)?;
        let fused = self.fuse(&text_k, &image_k)?;
        let scattered = select.t()?.matmul(&fused)?;
        flat_text
            .broadcast_mul(&keep)?
            .add(&scattered)?
            .reshape((b, len, d))
    }
}
