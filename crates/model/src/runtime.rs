//! Process-wide settings for inference: the C allocator's thresholds, and running compute on a
//! worker of rayon's pool.

/// Keeps glibc malloc from returning large blocks to the OS after every use. A decode step
/// allocates multi-megabyte buffers (logits, activations); by default glibc serves each with a
/// fresh `mmap` and unmaps it on free, so every step pays page faults and zeroing for memory it
/// just gave back (measured: ~3% of a batch-32 decode step). Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before heavy allocation begins.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// [`tune_allocator`] for training, whose every step frees and reallocates gigabytes of
/// activations (saved layers, every loop's logits): nothing is given back to the OS while the
/// process runs, so a step never pays the page faults and zeroing of the last step's memory
/// (measured: ~9% of a SmolLM2 step went to the kernel clearing pages).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Runs `f` on a worker thread of rayon's global pool and returns its result. Model code is full
/// of parallel sections; called from a thread outside the pool, each one injects its jobs and
/// sleeps until a worker picks them up and finishes, while from a worker the caller takes part
/// and the others are still spinning between sections (measured: batch-32 decode ~15% faster).
pub fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
