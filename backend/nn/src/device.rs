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
