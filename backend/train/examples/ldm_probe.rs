//! Diagnoses a bundle's Char-LDM on validation frames, one image of rows:
//! ground truth; VAE reconstruction; reconstruction of latents perturbed by Gaussian noise
//! (sigma 0.1, 0.3 in scaled-latent units: how forgiving the decoder is); the UNet's one-step
//! `x0` estimate from `t` = 250 / 500 / 750 (fused condition); full samples at several guidance
//! scales (fused condition from step 0). Prints the per-timestep epsilon MSE.
//!
//! ```sh
//! cargo run --release -p train --example ldm_probe -- models/toy /tmp/toy 6 /tmp/probe.png
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use data::dataset::{DatasetKind, DatasetReader, Split};
use image::RgbImage;
use models::char_ldm::{seeded_normal, to_rgb_image, SampleOptions};
use models::pipeline::StoryPipeline;
use models::schedulers::{DdpmScheduler, PredictionType, SchedulerKind};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: ldm_probe BUNDLE DATA N OUT.png [GUIDANCE,...]"
    );
    let (bundle, data) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let n: usize = args[2].parse()?;
    let out = PathBuf::from(&args[3]);
    let guidances: Vec<f64> = args
        .get(4)
        .map(|s| s.split(',').map(|g| g.parse()).collect())
        .transpose()?
        .unwrap_or_else(|| vec![1.0, 2.0, 3.5, 5.0, 7.5]);
    let dev = Device::Cpu;
    let p = StoryPipeline::load(&bundle, &dev)?;
    let ldm = p.char_ldm();
    let cast = train::stages::load_cast(&data, "probe")?;
    let reader = DatasetReader::open(&data, DatasetKind::Auto, 4)?;
    let mut frames = Vec::new();
    for id in reader.story_ids(Split::Val) {
        for f in reader.load_story(&id, 0)?.frames {
            if !f.characters.is_empty() {
                frames.push(f);
            }
        }
        if frames.len() >= n {
            break;
        }
    }
    frames.truncate(n);
    let scale = ldm.vae.config().scaling_factor;
    let sched = DdpmScheduler::new(ldm.scheduler_config.clone())?;
    let v_pred = ldm.scheduler_config.prediction_type == PredictionType::VPrediction;
    let negative = ldm.negative_condition()?;
    let mut rows: Vec<Vec<RgbImage>> = vec![Vec::new(); 6 + guidances.len()];
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let probe_ts = [50usize, 250, 500, 750, 950];
    let mut mse_sum = vec![0f64; probe_ts.len()];
    for f in &frames {
        let img = f.image.as_ref().context("images")?;
        let (w, h) = img.dimensions();
        let x = Tensor::from_vec(
            train::stages::pixels_of(&[img]),
            (1, 3, h as usize, w as usize),
            &dev,
        )?;
        let z = (ldm.vae.encode(&x)?.mode().clone() * scale)?;
        let decode = |z: &Tensor| -> Result<RgbImage> {
            let im = ldm.vae.decode(&(z / scale)?)?.squeeze(0)?;
            to_rgb_image(&((im + 1.0)? / 2.0)?.clamp(0f32, 1f32)?)
        };
        rows[0].push(img.clone());
        rows[1].push(decode(&z)?);
        for (r, sigma) in [(2, 0.1), (3, 0.3)] {
            let nz = seeded_normal(&mut rng, z.dims4()?, &dev, z.dtype())?;
            rows[r].push(decode(&(&z + (nz * sigma)?)?)?);
        }
        let chars: Vec<(String, Tensor)> = f
            .characters
            .iter()
            .filter_map(|name| {
                let k = cast.iter().position(|(c, _)| &c.name == name)?;
                Some(
                    ldm.portrait_embedding(&cast[k].1)
                        .map(|e| (name.clone(), e)),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<(&str, &Tensor)> = chars.iter().map(|(n, e)| (n.as_str(), e)).collect();
        let fused = ldm.fused_condition(&f.caption, &refs)?;
        for (k, &t) in probe_ts.iter().enumerate() {
            let eps = seeded_normal(&mut rng, z.dims4()?, &dev, z.dtype())?;
            let xt = sched.add_noise_batch(&z, &eps, &[t])?;
            let pred = ldm
                .unet
                .forward(&xt, &Tensor::new(t as f32, &dev)?, &fused)?;
            let target = sched.training_target(&z, &eps, &[t])?;
            mse_sum[k] += (&pred - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
            if (1..=3).contains(&k) {
                let a = sched.alphas_cumprod()[t] as f64;
                let x0 = if v_pred {
                    ((&xt * a.sqrt())? - (pred * (1.0 - a).sqrt())?)?
                } else {
                    ((xt - (pred * (1.0 - a).sqrt())?)? / a.sqrt())?
                };
                rows[3 + k].push(decode(&x0)?);
            }
        }
        let text = ldm.text_condition(&f.caption)?;
        for (g, &guidance) in guidances.iter().enumerate() {
            let opts = SampleOptions {
                steps: 30,
                guidance_scale: guidance,
                start_merge_step: 0,
                seed: 3,
                height: h as usize,
                width: w as usize,
                scheduler: SchedulerKind::Pndm,
            };
            let s = ldm.sample(
                &text,
                Some(&fused),
                &negative,
                &opts,
                &mut |_, _| {},
                &|| false,
            )?;
            rows[6 + g].push(to_rgb_image(&s)?);
        }
        eprintln!("{}: {}", f.id, f.caption);
    }
    for (k, t) in probe_ts.iter().enumerate() {
        eprintln!(
            "prediction mse at t={t}: {:.4}",
            mse_sum[k] / frames.len() as f64
        );
    }
    let tiles: Vec<RgbImage> = rows.into_iter().flatten().collect();
    let up: Vec<RgbImage> = tiles
        .iter()
        .map(|i| {
            image::imageops::resize(
                i,
                i.width() * 2,
                i.height() * 2,
                image::imageops::FilterType::Nearest,
            )
        })
        .collect();
    train::stages::grid(&up, frames.len()).save(&out)?;
    eprintln!(
        "rows: gt, recon, recon+0.1, recon+0.3, x0@250, x0@500, x0@750, guidance {guidances:?}"
    );
    Ok(())
}
