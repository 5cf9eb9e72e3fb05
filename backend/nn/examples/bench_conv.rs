//! Times candle's CPU `Tensor::conv2d` against `nn::conv::conv2d`: forward, and forward +
//! backward of `sum(y * g)` (gradients for both input and kernel).
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p nn --example bench_conv [reps] [nn|candle]`
//! (the second argument times only that implementation, e.g. for `perf record`).

use std::time::Instant;

use candle_core::{DType, Device, Result, Tensor, Var};
use nn::gradcheck::seeded_uniform;

/// CPU seconds used so far by all threads of this process (`/proc/self/task/*/schedstat`).
fn cpu_seconds() -> Option<f64> {
    let ns: u64 = std::fs::read_dir("/proc/self/task")
        .ok()?
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Some(ns as f64 * 1e-9)
}

/// Milliseconds of `reps` runs of `f` after one warm-up run: the median wall time, or with
/// `BENCH_CPU=1` the minimum process CPU time (steadier on a shared machine).
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let cpu = std::env::var("BENCH_CPU").is_ok_and(|v| v == "1");
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let (s, c) = (Instant::now(), cpu_seconds());
        f()?;
        t.push(match (cpu, c, cpu_seconds()) {
            (true, Some(c0), Some(c1)) => (c1 - c0) * 1e3,
            _ => s.elapsed().as_secs_f64() * 1e3,
        });
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(if cpu { t[0] } else { t[t.len() / 2] })
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let only = std::env::args().nth(2);
    let skip = |name: &str| only.as_deref().is_some_and(|o| o != name);
    let dev = Device::Cpu;
    // (x shape, out channels, kernel, padding, stride)
    let cases = [
        ((32, 128, 8, 8), 128, 3, 1, 1),
        ((32, 64, 8, 8), 64, 3, 1, 1),
        ((32, 128, 8, 8), 128, 1, 0, 1),
        ((32, 64, 16, 16), 64, 3, 1, 2),
        ((1, 320, 32, 32), 320, 3, 1, 1),
    ];
    println!(
        "rayon threads: {}, median of {reps}",
        rayon::current_num_threads()
    );
    println!(
        "{:<34} {:>11} {:>11} {:>13} {:>13} {:>9}",
        "case", "fwd candle", "fwd nn", "fwd+bwd cand.", "fwd+bwd nn", "loss only"
    );
    // BENCH_CASE=i runs only case i (for profiling).
    let case: Option<usize> = std::env::var("BENCH_CASE")
        .ok()
        .and_then(|s| s.parse().ok());
    for (i, (xs, cout, k, pad, stride)) in cases.into_iter().enumerate() {
        if case.is_some_and(|c| c != i) {
            continue;
        }
        let x = Var::from_tensor(&seeded_uniform(xs, 1, -1.0, 1.0, DType::F32, &dev)?)?;
        let w = Var::from_tensor(&seeded_uniform(
            (cout, xs.1, k, k),
            2,
            -0.1,
            0.1,
            DType::F32,
            &dev,
        )?)?;
        let candle = |x: &Tensor, w: &Tensor| x.conv2d(w, pad, stride, 1, 1);
        let ours = |x: &Tensor, w: &Tensor| nn::conv::conv2d(x, w, pad, stride);
        let g = seeded_uniform(
            candle(x.as_tensor(), w.as_tensor())?.shape(),
            3,
            -1.0,
            1.0,
            DType::F32,
            &dev,
        )?;
        let fwd = |who: &str, f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
            if skip(who) {
                return Ok(f64::NAN);
            }
            time_ms(reps, || f(x.as_tensor(), w.as_tensor()).map(drop))
        };
        let fwd_bwd = |who: &str, f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>| {
            if skip(who) {
                return Ok(f64::NAN);
            }
            time_ms(reps, || {
                let grads = f(x.as_tensor(), w.as_tensor())?
                    .mul(&g)?
                    .sum_all()?
                    .backward()?;
                // Both gradients must exist (a silent no-op backward would look fast).
                assert!(grads.get(x.as_tensor()).is_some() && grads.get(w.as_tensor()).is_some());
                Ok(())
            })
        };
        // What fwd+bwd spends outside the convolution: the loss `sum(y * g)` and its backward
        // (plus candle's gradient accumulation), on a Var shaped like y.
        let y0 = Var::from_tensor(&g.zeros_like()?)?;
        let loss_only = time_ms(reps, || {
            y0.as_tensor().mul(&g)?.sum_all()?.backward().map(drop)
        })?;
        let name = format!("{xs:?}->{cout} {k}x{k} p{pad} s{stride}");
        println!(
            "{name:<34} {:>11.2} {:>11.2} {:>13.2} {:>13.2} {loss_only:>9.2}",
            fwd("candle", &candle)?,
            fwd("nn", &ours)?,
            fwd_bwd("candle", &candle)?,
            fwd_bwd("nn", &ours)?
        );
    }
    Ok(())
}
