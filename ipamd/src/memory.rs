//! Giving memory back after a burst (issue 17: a burst of 110 concurrent Adds left ipamd's RSS
//! 3 MiB higher for good). glibc's allocator gives each thread that allocates while another
//! does its own arena, and keeps what was freed there for reuse. ipamd caps the arenas at two
//! ([`limit_arenas`], before any thread starts) and hands free pages back to the kernel every
//! [`TRIM_EVERY`] ([`trim_loop`]; `malloc_trim` walks the arenas, well under a millisecond at
//! ipamd's size). Other C libraries: neither is done.

use std::time::Duration;

/// How often freed memory goes back to the kernel.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// At most two malloc arenas: ipamd runs two tokio workers and a few blocking threads, and its
/// allocations are small and short-lived.
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Returns the allocator's free pages to the kernel (all arenas).
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and frees nothing in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims every [`TRIM_EVERY`] until dropped.
pub async fn trim_loop() {
    let mut tick = tokio::time::interval(TRIM_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        trim();
    }
}
