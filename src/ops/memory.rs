//! How the process returns memory to the system.

/// Makes glibc serve every allocation of 256 KiB or more with its own
/// `mmap`, and give it back with `munmap` when freed. Call once at start,
/// before the threads.
///
/// Why: an argon2 password check allocates its whole memory cost (8 MiB
/// here, 19 MiB at argon2's default) in one block. glibc starts by mmapping
/// blocks above 128 KiB, but on the first free of such a block it raises
/// its threshold to that size (the "dynamic mmap threshold", up to 32 MiB),
/// so every later check's block comes from a heap arena instead — and a
/// freed arena chunk stays in RSS. With a thread per check on tokio's
/// blocking pool, each thread's arena kept one: RSS grew ~19.5 MB per
/// login. Setting `M_MMAP_THRESHOLD` explicitly turns the dynamic
/// adjustment off (and with it the dynamic trim threshold), so the block
/// goes back to the kernel at each free; an mmap + munmap of 8 MiB costs
/// microseconds next to the ~10 ms check. See BENCHMARKS.md, "Logins",
/// for the measurement.
///
/// A no-op on other C libraries (musl returns large blocks already).
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// Bytes; glibc's own initial threshold is 128 KiB.
        const THRESHOLD: libc::c_int = 256 * 1024;
        // SAFETY: mallopt only sets allocator parameters; it is safe to
        // call at any time (glibc takes its own lock).
        let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, THRESHOLD) };
        if ok != 1 {
            tracing::warn!(
                "mallopt(M_MMAP_THRESHOLD) failed; memory after logins may not be returned"
            );
        }
    }
}

/// Resident memory of this process in bytes (`VmRSS` in
/// `/proc/self/status`), for tests and benchmarks; `None` off Linux.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
