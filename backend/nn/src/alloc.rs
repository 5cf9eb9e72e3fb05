//! Process-wide allocator tuning for CPU training and inference.
//!
//! candle gives every op's result a fresh `Vec`. glibc serves blocks above its mmap threshold
//! (128 KiB, raised dynamically up to 32 MiB) with a fresh `mmap` and unmaps them on free, so a
//! training step that allocates and frees thousands of multi-megabyte activations and gradients
//! pays a page fault and a kernel page-clear per 4 KiB every time: 15-20% of a UNet step in
//! `perf` on this project's machine. Keeping freed blocks in the heap lets the next op reuse
//! them.

/// Makes glibc keep freed memory for reuse: blocks up to 32 MiB (glibc's maximum) come from
/// the heap instead of `mmap`, and the heap is trimmed back to the system only beyond 1 GiB of
/// free space at its top. Call once at the start of a process that trains or generates on the
/// CPU; it changes only where memory comes from (peak resident memory may stay higher). A no-op
/// off glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; the values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}
