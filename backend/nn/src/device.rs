//! Run-time device choice: `cpu`, `cuda` or `cuda:N`. A binary built without the `cuda`
//! feature refuses CUDA with a message that says how to get it.

use candle_core::Device;

/// Parses a device name and opens it.
pub fn parse_device(name: &str) -> Result<Device, String> {
    let name = name.trim().to_ascii_lowercase();
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match name.as_str() {
        "cuda" | "gpu" => 0,
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => return Err(format!("unknown device {name:?}: use cpu, cuda or cuda:N")),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device {name:?} needs a build with the `cuda` cargo feature (cargo build --release --features cuda) and an NVIDIA GPU"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))
}

/// Fixes the CPU thread count for the whole process by setting `RAYON_NUM_THREADS` when the
/// user has not. candle 0.11 asks for its thread count on every matmul and element-wise op,
/// and without the variable it recounts the physical cores by parsing `/proc/cpuinfo` each
/// time: 6% of a Char-LDM training step on this project's 2-core machine (perf, 2026-12-03).
/// The value is candle's own default (physical cores), so candle's behaviour is unchanged and
/// rayon's pool (our convolutions and fused kernels) uses the same count.
///
/// Call it first thing in `main`, before any thread exists (it writes the environment).
pub fn pin_cpu_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = candle_core::utils::get_num_threads();
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
}

/// Makes the calling thread worker 0 of rayon's global pool (of `RAYON_NUM_THREADS` threads,
/// so one thread is started besides it), for a process whose main thread drives CPU training or
/// generation. Otherwise every parallel kernel the main thread calls (our matrix products,
/// convolutions, fused ops) is handed to the pool while the main thread sleeps on a futex, and
/// the pool's two workers go back to sleep between ops: three threads and a wake-up per op on
/// two cores. As a worker, the main thread takes its share of each kernel itself and waits for
/// the other half by stealing work rather than sleeping. Measured on this project's 2-vCPU
/// Intel Xeon (docs/BENCHMARKS.md, "The main thread in the pool"): Char-LDM training steps
/// 1.57 -> 1.93 it/s, the same losses to the last digit (the kernels split work, not sums, so
/// the thread a part runs on does not change its result).
///
/// Returns false (and changes nothing) when the global pool already exists, e.g. when a
/// parallel op ran before this call. Call it after [`pin_cpu_threads`], from the thread that
/// will do the work, before any parallel op.
pub fn join_cpu_pool() -> bool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .use_current_thread()
        .build_global()
        .is_ok()
}

/// Runs `work` on a thread of rayon's global pool while the calling thread waits: the
/// same effect as [`join_cpu_pool`] for a thread that cannot join the pool (the service's
/// generation worker, one of several threads of a process whose pool exists already), one
/// wake-up per call instead of one per op. Runs `work` in place when the caller is a pool
/// thread already, or when the pool has one thread (nothing to share, and `work` must not hold
/// the only thread that other callers' parallel ops would wait for). For CPU work only: a CUDA
/// context belongs to the thread that made it.
pub fn on_cpu_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() || rayon::current_num_threads() < 2 {
        return work();
    }
    rayon::scope(|_| work())
}

/// The narrower pool CPU work runs on while another process shares this machine's cores
/// (see [`share_cpu_cores`]); `None` while this process has the cores to itself.
static SHARED_CORES: std::sync::RwLock<Option<std::sync::Arc<rayon::ThreadPool>>> =
    std::sync::RwLock::new(None);

/// Tells this process that another process now works beside it (`Some(threads)`: run
/// [`on_shared_cores`] work on a pool of that many threads) or has ended (`None`: back to the
/// whole global pool). `train all`'s two lanes on a 2-core machine: one thread each overlaps
/// better than two threads each, which take turns on the cores and wait at every op's join
/// (VAE + LM side by side, Zen 4: 1.13 of one stage alone's throughput against 1.02,
/// docs/TRAINING.md). A kernel's result does not depend on how many threads split it, so
/// the bits stay the same.
pub fn share_cpu_cores(threads: Option<usize>) -> Result<(), String> {
    let pool = match threads {
        Some(n) => Some(std::sync::Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n.max(1))
                .thread_name(|i| format!("shared-cores-{i}"))
                .build()
                .map_err(|e| format!("cannot start a {n}-thread CPU pool: {e}"))?,
        )),
        None => None,
    };
    match SHARED_CORES.write() {
        Ok(mut slot) => *slot = pool,
        Err(poisoned) => *poisoned.into_inner() = pool,
    }
    Ok(())
}

/// Runs `work` on the narrower pool while [`share_cpu_cores`] says the cores are shared,
/// in place otherwise. Call it around each unit of CPU work (a training step), so that the
/// next unit after the other process ends gets the whole pool again. CPU work only: a CUDA
/// context belongs to the thread that made it.
pub fn on_shared_cores<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = match SHARED_CORES.read() {
        Ok(slot) => slot.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    };
    match pool {
        Some(pool) => pool.install(work),
        None => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_refuses_unknown_names() {
        assert!(matches!(parse_device("CPU"), Ok(Device::Cpu)));
        assert!(parse_device("tpu").unwrap_err().contains("unknown device"));
        if !candle_core::utils::cuda_is_available() {
            assert!(parse_device("cuda:0")
                .unwrap_err()
                .contains("cuda` cargo feature"));
        }
    }
}
