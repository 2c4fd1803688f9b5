//! How the process returns memory to the system.

/// Makes glibc serve every allocation of 256 KiB or more with its own
/// `mmap`, and give it back with `munmap` when freed. Call once at start,
/// before the threads.
///
/// Why: glibc starts by mmapping blocks above 128 KiB, but on the first
/// free of such a block it raises its threshold to that block's size (the
/// "dynamic mmap threshold", up to 32 MiB), so later blocks of that size
/// come from a heap arena, and a freed arena chunk stays in RSS — one per
/// thread's arena. That is how argon2's 19 MiB buffers on tokio's blocking
/// pool grew RSS by ~19.5 MB per login. Password checks now keep one buffer
/// per pool thread (see `access/users.rs`) and no longer depend on this;
/// it stays as the safety net for every other large, short-lived buffer
/// (a hash with a cost above the kept size, big MQTT payloads): measured
/// with the pool but without the kept buffer, 1,000 logins grew RSS by
/// 96 MiB without this setting and 0.7 MiB with it (BENCHMARKS.md,
/// "Logins"). Setting `M_MMAP_THRESHOLD` explicitly turns the dynamic
/// adjustment off (and the dynamic trim threshold with it). The cost is a
/// page fault per 4 KiB page of such a block each time it is allocated.
///
/// A no-op on other C libraries.
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
/// It reads a file: async code calls it through [`super::blocking`].
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
