//! Time per AdamW step: candle_nn::AdamW vs nn::optim::AdamW (in place and tensor-ops path),
//! 3.3M f32 parameters in 150 vars (a mix of matrices and biases).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p nn --example bench_optim`

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW};
use nn::optim::{AdamW, Backend};

const STEPS: usize = 20;

/// 75 (matrix, bias) pairs: 75 * (208*208 + 208) = 3.26M parameters.
fn make() -> candle_core::Result<(Vec<(String, Var)>, GradStore)> {
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    let mut grads = GradStore::default();
    for i in 0..75 {
        for (name, shape) in [("weight", vec![208, 208]), ("bias", vec![208])] {
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?)?;
            grads.insert(
                v.as_tensor(),
                Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?,
            );
            vars.push((format!("l{i}.{name}"), v));
        }
    }
    Ok((vars, grads))
}

fn time(mut step: impl FnMut() -> candle_core::Result<()>) -> candle_core::Result<f64> {
    step()?; // warm-up (allocations, thread pool)
    let t = Instant::now();
    for _ in 0..STEPS {
        step()?;
    }
    Ok(t.elapsed().as_secs_f64() / STEPS as f64 * 1e3)
}

fn main() -> candle_core::Result<()> {
    let hp = ParamsAdamW::default();
    let (vars, grads) = make()?;
    let n: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    println!("{n} f32 parameters in {} vars, {STEPS} steps", vars.len());

    let mut candle =
        candle_nn::AdamW::new(vars.iter().map(|(_, v)| v.clone()).collect(), hp.clone())?;
    let ms = time(|| candle.step(&grads))?;
    println!("candle_nn::AdamW           {ms:8.2} ms/step");

    let mut ours = AdamW::new(vars.clone(), hp.clone())?;
    let ms = time(|| ours.step(&grads))?;
    println!("nn::AdamW (in place)       {ms:8.2} ms/step");

    let mut ops = AdamW::with_backend(vars.clone(), hp, Backend::TensorOps)?;
    let ms = time(|| ops.step(&grads))?;
    println!("nn::AdamW (tensor ops)     {ms:8.2} ms/step");
    Ok(())
}
