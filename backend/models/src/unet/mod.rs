//! diffusers `UNet2DConditionModel` (Stable Diffusion 1.x/2.x layout), config-driven and
//! trainable, with opt-in capture of cross-attention probabilities for StoryGPT-V's L_reg.
//!
//! Tensor names mirror diffusers' state dict (`conv_in`, `time_embedding.linear_1`,
//! `down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q`, ...), so a
//! `diffusion_pytorch_model.safetensors` loads through [`nn::Weights::var_builder`]; a
//! `VarMap`-backed builder makes every parameter a trainable `Var`. Everything is built from
//! `nn` layers (no fused candle ops), so gradients reach every parameter, including through
//! captured attention maps.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use models::unet::{AttentionCapture, UNet2DConditionModel};
//! let dev = candle_core::Device::Cpu;
//! let unet = UNet2DConditionModel::load("sd15/unet".as_ref(), candle_core::DType::F32, &dev)?;
//! let x = candle_core::Tensor::zeros((1, 4, 64, 64), candle_core::DType::F32, &dev)?;
//! let t = candle_core::Tensor::new(&[981i64], &dev)?;
//! let ctx = candle_core::Tensor::zeros((1, 77, 768), candle_core::DType::F32, &dev)?;
//! let out = unet.forward_with_capture(&x, &t, &ctx, &AttentionCapture::storygpt_v())?;
//! for m in &out.attention_probs { println!("{} {:?}", m.layer, m.probs.dims()); }
//! # Ok(()) }
//! ```

pub mod blocks;
pub mod config;
pub mod conformance;
pub mod resnet;
pub mod transformer;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use nn::{Conv2d, GroupNorm};

use blocks::{AttnParams, BlockParams, DownBlock, MidBlock, UpBlock};
pub use config::{OneOrMany, UNetConfig};
use resnet::{conv_same, timestep_embedding, TimestepEmbedding};

/// Which `attn2` layers hand back their probabilities. A request is a module path prefix
/// (`"down_blocks.1"`, `"mid_block"`, `"up_blocks.2.attentions.0"`, or a full layer name); it
/// matches a layer when the layer's name equals it or continues it after a `.`.
#[derive(Debug, Clone, Default)]
pub struct AttentionCapture {
    prefixes: Vec<String>,
    all: bool,
}

impl AttentionCapture {
    /// Capture nothing (plain forward).
    pub fn none() -> Self {
        Self::default()
    }

    /// Capture every `attn2` in the UNet.
    pub fn all() -> Self {
        Self {
            prefixes: Vec::new(),
            all: true,
        }
    }

    /// Capture the `attn2` layers under the given module paths.
    pub fn blocks<I, S>(prefixes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            prefixes: prefixes.into_iter().map(Into::into).collect(),
            all: false,
        }
    }

    /// The StoryGPT-V authors' hooked layers: `down_blocks.1`, `down_blocks.2`, `mid_block`,
    /// `up_blocks.1`, `up_blocks.2`.
    pub fn storygpt_v() -> Self {
        Self::blocks([
            "down_blocks.1",
            "down_blocks.2",
            "mid_block",
            "up_blocks.1",
            "up_blocks.2",
        ])
    }

    /// Whether the layer with this UNet-relative name is captured.
    pub fn matches(&self, layer: &str) -> bool {
        self.all
            || self.prefixes.iter().any(|p| {
                layer == p || (layer.starts_with(p.as_str()) && layer[p.len()..].starts_with('.'))
            })
    }

    /// True when nothing is captured.
    pub fn is_empty(&self) -> bool {
        !self.all && self.prefixes.is_empty()
    }
}

/// One captured cross-attention map.
#[derive(Debug, Clone)]
pub struct CapturedAttention {
    /// UNet-relative layer name, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub layer: String,
    /// `(batch, heads, h*w, tokens)` softmax probabilities, still in the autograd graph.
    pub probs: Tensor,
}

/// The capture request and what was captured so far during one forward pass.
pub(crate) struct CaptureState<'a> {
    pub spec: &'a AttentionCapture,
    pub maps: Vec<CapturedAttention>,
}

/// The result of [`UNet2DConditionModel::forward_with_capture`].
#[derive(Debug, Clone)]
pub struct UNetOutput {
    /// `(batch, out_channels, H, W)` prediction.
    pub sample: Tensor,
    /// Captured `attn2` maps in execution order (down, mid, up).
    pub attention_probs: Vec<CapturedAttention>,
}

/// diffusers `UNet2DConditionModel`.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the UNet from `config`; `vb` may read a checkpoint or a `VarMap`.
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> anyhow::Result<Self> {
        config.validate()?;
        Ok(Self::build(vb, config)?)
    }

    fn build(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let n = cfg.num_blocks();
        let ch = &cfg.block_out_channels;
        let e = |r: anyhow::Result<Vec<usize>>| r.map_err(candle_core::Error::wrap);
        let heads = e(cfg.heads_per_block())?;
        let layers = e(cfg.layers_per_block.expand(n, "layers_per_block"))?;
        let ctx = e(cfg.cross_attention_dim.expand(n, "cross_attention_dim"))?;
        let tl = e(cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block"))?;
        let temb = ch[0] * 4;
        let p = BlockParams {
            temb,
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            use_linear_projection: cfg.use_linear_projection,
        };
        let attn = |i: usize| AttnParams {
            heads: heads[i],
            transformer_layers: tl[i],
            context_dim: ctx[i],
        };
        let conv_in = conv_same(vb.pp("conv_in"), cfg.in_channels, ch[0], cfg.conv_in_kernel)?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let a = attn(i);
            let name = format!("down_blocks.{i}");
            down_blocks.push(DownBlock::new(
                vb.pp(&name),
                &name,
                in_ch,
                out_ch,
                layers[i],
                i + 1 < n,
                cfg.downsample_padding,
                &p,
                (kind == "CrossAttnDownBlock2D").then_some(&a),
            )?);
        }

        let mid_attn = AttnParams {
            heads: heads[n - 1],
            transformer_layers: tl[n - 1],
            context_dim: ctx[n - 1],
        };
        let mid_block = MidBlock::new(
            vb.pp("mid_block"),
            "mid_block",
            ch[n - 1],
            cfg.mid_block_scale_factor,
            &p,
            &mid_attn,
        )?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut out_ch = ch[n - 1];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let r = n - 1 - i;
            let prev = out_ch;
            out_ch = ch[r];
            let in_ch = ch[r.saturating_sub(1)];
            let a = attn(r);
            let name = format!("up_blocks.{i}");
            up_blocks.push(UpBlock::new(
                vb.pp(&name),
                &name,
                in_ch,
                prev,
                out_ch,
                layers[r] + 1,
                i + 1 < n,
                &p,
                (kind == "CrossAttnUpBlock2D").then_some(&a),
            )?);
        }
        let conv_norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            ch[0],
            cfg.norm_eps,
            true,
        )?;
        let conv_out = conv_same(
            vb.pp("conv_out"),
            ch[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
        )?;
        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Loads a frozen UNet from a diffusers `unet/` directory (or a pipeline directory holding
    /// `unet/`): `config.json` + `diffusion_pytorch_model.safetensors` (or sharded / `.bin`).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let dir = resolve_component_dir(dir, "unet");
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = nn::Weights::open(&dir)
            .with_context(|| format!("opening UNet weights in {}", dir.display()))?;
        Self::new(weights.var_builder(dtype, device), &config)
            .with_context(|| format!("building UNet from {}", dir.display()))
    }

    /// The config the model was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Predicts noise: `sample (B, C, H, W)`, `timestep` scalar or `(B,)` (any numeric dtype),
    /// `encoder_hidden_states (B, tokens, cross_attention_dim)`.
    pub fn forward(&self, sample: &Tensor, timestep: &Tensor, context: &Tensor) -> Result<Tensor> {
        Ok(self
            .forward_with_capture(sample, timestep, context, &AttentionCapture::none())?
            .sample)
    }

    /// [`Self::forward`] that also returns the `attn2` probabilities selected by `capture`.
    pub fn forward_with_capture(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        capture: &AttentionCapture,
    ) -> Result<UNetOutput> {
        let cfg = &self.config;
        let (b, _, _, _) = sample.dims4()?;
        let dtype = sample.dtype();
        let t = match timestep.rank() {
            0 => timestep.reshape(1)?.broadcast_as(b)?.contiguous()?,
            1 if timestep.dim(0)? == b => timestep.clone(),
            1 if timestep.dim(0)? == 1 => timestep.broadcast_as(b)?.contiguous()?,
            _ => candle_core::bail!(
                "UNet timestep has shape {:?}; expected a scalar or ({b},)",
                timestep.dims()
            ),
        };
        let t_emb = timestep_embedding(
            &t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?
        .to_dtype(dtype)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        let context = context.to_dtype(dtype)?;
        let mut cap = CaptureState {
            spec: capture,
            maps: Vec::new(),
        };

        let sample = if cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, states) = block.forward(&h, &emb, &context, &mut cap)?;
            h = out;
            skips.extend(states);
        }
        h = self.mid_block.forward(&h, &emb, &context, &mut cap)?;
        for block in &self.up_blocks {
            let k = block.num_resnets();
            let rest = skips.len() - k;
            let up_size = if rest > 0 {
                let (_, _, sh, sw) = skips[rest - 1].dims4()?;
                Some((sh, sw))
            } else {
                None
            };
            h = block.forward(&h, &skips[rest..], &emb, &context, up_size, &mut cap)?;
            skips.truncate(rest);
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(UNetOutput {
            sample: self.conv_out.forward(&h)?,
            attention_probs: cap.maps,
        })
    }
}

/// `dir/<component>` when it holds a `config.json`, else `dir` itself (so both a pipeline
/// directory and the component directory are accepted).
pub(crate) fn resolve_component_dir(dir: &Path, component: &str) -> std::path::PathBuf {
    let sub = dir.join(component);
    if sub.join("config.json").is_file() {
        sub
    } else {
        dir.to_path_buf()
    }
}
