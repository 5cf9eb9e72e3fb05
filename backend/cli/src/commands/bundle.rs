//! `storygpt-v bundle`: write and inspect model bundles.

use std::path::PathBuf;

use anyhow::Context;

/// Arguments of `storygpt-v bundle`.
#[derive(Debug, clap::Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    pub command: BundleCommand,
}

/// Bundle sub-commands.
#[derive(Debug, clap::Subcommand)]
pub enum BundleCommand {
    /// Write a randomly initialised (UNTRAINED) bundle: the real layout and loader, noise-like
    /// frames. For tests and development.
    Random {
        /// Configuration: `toy` (64x64 frames, every network a few million parameters, OPT) or
        /// `toy-llama` (the same with a Llama LLM).
        #[arg(long, default_value = "toy")]
        config: String,
        /// Output directory (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the initial weights.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Copy a trained bundle without its training runs and generated data, optionally with
    /// f16 weights (how models/toy is made from `train all`'s output).
    Ship {
        /// The trained bundle (a `train all` output).
        #[arg(long)]
        from: PathBuf,
        /// Output directory (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Store f32 weights as f16 (computation stays in the manifest's dtype).
        #[arg(long)]
        f16: bool,
    },
    /// Write a bundle from the base models and the StoryGPT-V authors' released checkpoints
    /// (stage-1 `pytorch_model.bin`, stage-2 zip). Every tensor is checked against the configs
    /// before anything is written; the weights are stored as safetensors (see docs/MODELS.md,
    /// "Importing the authors' checkpoints").
    Import {
        /// diffusers Stable Diffusion 1.5 directory (tokenizer/, text_encoder/, unet/, vae/,
        /// scheduler/).
        #[arg(long)]
        sd: PathBuf,
        /// transformers CLIP ViT-L/14 directory (openai/clip-vit-large-patch14).
        #[arg(long)]
        clip: PathBuf,
        /// transformers OPT or Llama directory (facebook/opt-6.7b, Llama-2-7b-chat) with a
        /// tokenizer.json.
        #[arg(long)]
        llm: PathBuf,
        /// The authors' stage-1 checkpoint (pytorch_model.bin).
        #[arg(long)]
        stage1: PathBuf,
        /// The authors' stage-2 zip (args.json, model_args.json, pretrained_ckpt.pth.tar), or
        /// the directory it unpacks to.
        #[arg(long)]
        stage2: PathBuf,
        /// Output bundle directory (must be empty or absent).
        #[arg(long)]
        out: PathBuf,
        /// Store the weights as f16 (halves the size; default f32).
        #[arg(long)]
        f16: bool,
        /// Compute dtype written to bundle.toml: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Bundle name (bundle.toml `name`).
        #[arg(long, default_value = "storygpt-v-imported")]
        name: String,
        /// Mapper_LDM attention heads (the tensors do not tell; GILL's mapper has 4).
        #[arg(long, default_value_t = 4)]
        mapper_heads: usize,
        /// Skip loading the written bundle once before moving it into place.
        #[arg(long)]
        no_verify: bool,
    },
    /// Load a bundle and print what it is (checks every path and tensor).
    Info {
        /// The bundle directory.
        dir: PathBuf,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

/// Runs the sub-command.
pub fn run(args: BundleArgs) -> anyhow::Result<()> {
    match args.command {
        BundleCommand::Random { config, out, seed } => {
            let report = models::bundle::write_random(&config, &out, seed).with_context(|| {
                format!("writing a random `{config}` bundle to {}", out.display())
            })?;
            for (what, n) in &report.params {
                eprintln!("  {what:<32} {:>10} parameters", n);
            }
            eprintln!(
                "wrote {} ({} parameters in all; randomly initialised, UNTRAINED)",
                out.display(),
                report.total()
            );
            Ok(())
        }
        BundleCommand::Ship { from, out, f16 } => {
            let r = models::bundle::ship::ship(&from, &out, f16)?;
            eprintln!(
                "wrote {} ({} files, {:.1} MB; {} tensors as f16)",
                out.display(),
                r.files,
                r.bytes as f64 / 1e6,
                r.f16_tensors
            );
            Ok(())
        }
        BundleCommand::Import {
            sd,
            clip,
            llm,
            stage1,
            stage2,
            out,
            f16,
            dtype,
            name,
            mapper_heads,
            no_verify,
        } => {
            let opts = models::bundle::import::ImportOptions {
                sd,
                clip,
                llm,
                stage1,
                stage2,
                out: out.clone(),
                f16,
                dtype,
                name,
                mapper_heads,
                verify: !no_verify,
            };
            let r = models::bundle::import::import(&opts)
                .with_context(|| format!("importing into {}", out.display()))?;
            for n in &r.notes {
                eprintln!("  note: {n}");
            }
            let l = &r.manifest.llm;
            eprintln!(
                "wrote {} ({} tensors, {:.1} MB of safetensors{}; R = {}, m = {}, prompt {} tokens{})",
                out.display(),
                r.tensors,
                r.bytes as f64 / 1e6,
                if f16 { ", f16" } else { "" },
                l.num_img_tokens,
                l.visual_tokens,
                l.max_prompt_len,
                if l.caption_only { ", caption-only" } else { "" }
            );
            Ok(())
        }
        BundleCommand::Info { dir, device } => {
            let device = nn::parse_device(&device).map_err(anyhow::Error::msg)?;
            let p = models::pipeline::StoryPipeline::load(&dir, &device)?;
            let info = p.info();
            let o = p.default_options();
            println!("name:        {}", info.name);
            println!("trained:     {}", info.trained);
            println!("description: {}", info.description);
            println!("llm:         {}", info.llm);
            println!(
                "sampling:    {}x{} px, {} steps, guidance {}, merge step {}, {:?}",
                o.width, o.height, o.steps, o.guidance_scale, o.start_merge_step, o.scheduler
            );
            Ok(())
        }
    }
}
