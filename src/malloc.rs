//! The C allocator's one setting that matters for bounded memory.
//!
//! glibc's malloc serves large blocks with `mmap` only until the first one is freed; then it
//! raises its threshold to that block's size (up to 32 MiB) and serves later ones from its
//! per-thread heaps, where freed blocks stay resident and fragment. The pipeline frees megabytes
//! on other threads than the ones that allocated them (parts on the runtime, compressed units on
//! the writer), so measured peak RSS ran up to twice what was live: 126 MiB against 66 MiB for
//! 16 gzip workers. A fixed threshold keeps every block of 256 KiB or more in its own mapping,
//! returned to the system when freed. Other C libraries are left as they are.

/// Fixes the `mmap` threshold at 256 KiB. Call once, before other threads start.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn bound_large_blocks() {
    const THRESHOLD: libc::c_int = 256 * 1024;
    // SAFETY: mallopt only changes the allocator's parameters; it is called at start-up,
    // before any other thread exists, and its arguments are constants glibc documents.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
    if ok != 1 {
        tracing::debug!("mallopt(M_MMAP_THRESHOLD) refused; large blocks may stay resident");
    }
}

/// Not glibc: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn bound_large_blocks() {}
