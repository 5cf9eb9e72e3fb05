//! Resident memory of this process, for the benchmarks' peak-memory columns.

/// A `/proc/self/status` memory field (`VmRSS:`, `VmHWM:`) in MiB (0 where unavailable).
pub fn status_mib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
