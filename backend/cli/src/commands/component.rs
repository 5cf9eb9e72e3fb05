//! `storygpt-v component`: run one network (UNet, VAE, CLIP text / vision, causal LM) from a reference
//! model directory on tensors from a safetensors file and write its outputs, for conformance
//! checks against diffusers / transformers.

use std::path::PathBuf;

use anyhow::Context;
use models::conformance::{run_component, ComponentKind};

/// Arguments of `storygpt-v component`.
#[derive(Debug, clap::Args)]
pub struct ComponentArgs {
    /// Which network: unet, vae-encode, vae-decode, clip-text, clip-vision or llm.
    #[arg(value_parser = parse_kind)]
    pub kind: ComponentKind,
    /// The model directory: a transformers `save_pretrained` directory (CLIP, Llama, OPT) or a diffusers
    /// component / pipeline directory (UNet, VAE; `text_encoder/` is found in a pipeline too).
    #[arg(long)]
    pub model: PathBuf,
    /// Input tensors (safetensors): clip-text reads `input_ids` (i64 or i32), clip-vision
    /// `pixel_values`, unet `sample` / `timestep` / `encoder_hidden_states`, vae-encode
    /// `sample`, vae-decode `latent`, llm `input_ids` or `inputs_embeds`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the outputs (safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the weights and float inputs: f32, f16 or bf16 (outputs are always f32).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

fn parse_kind(s: &str) -> Result<ComponentKind, String> {
    s.parse()
}

/// Runs the component and writes its outputs.
pub fn run(args: ComponentArgs) -> anyhow::Result<()> {
    let device = nn::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let dtype = models::bundle::parse_dtype(&args.dtype)?;
    run_component(
        args.kind,
        &args.model,
        &args.inputs,
        &args.out,
        dtype,
        &device,
    )
    .with_context(|| {
        format!(
            "component {:?} from {} on {}",
            args.kind,
            args.model.display(),
            args.inputs.display()
        )
    })?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
