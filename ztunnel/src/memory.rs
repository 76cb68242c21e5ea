//! The ztunnel's heap: glibc's thresholds set once at start, and freed
//! memory handed back to the kernel every few seconds.

use std::time::Duration;

/// How often freed heap memory is handed back to the kernel.
pub const TICK: Duration = Duration::from_secs(5);

/// A bulk flow reads into a fresh buffer of up to 256 KiB per read
/// (`copy::tcp_to_h2`). With glibc's defaults, a free that leaves more than
/// the trim threshold on top of an arena hands those pages back at once, so
/// the next buffer faults them in and zeroes them again: 6% of the ztunnels'
/// time in scenario 1 went to page faults. Freed memory now stays in the
/// heap until [`keep_lean`] returns it, and buffers below 4 MiB never get a
/// mapping of their own. One arena, because `malloc_trim` can give back the
/// top of the main arena only: with a trim threshold this high, the top of
/// a per-thread arena would keep a bulk flow's buffers for good (50 MiB in
/// scenario 6 after the bulk scenarios). Small allocations still come from
/// each thread's cache without the arena's lock. Called by the binary
/// before any other thread starts: a thread that has allocated keeps the
/// arena it got.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn tune_heap() {
    // SAFETY: mallopt only changes the allocator's thresholds.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
    }
}

/// glibc keeps what a burst freed (HTTP/2 receive buffers of bulk flows, a
/// thousand connections' state) for the life of the process, so a node
/// proxy's RSS would stay at its largest burst (`just bench`, scenario 6
/// after the bulk scenarios). Every [`TICK`] the free pages go back to the
/// kernel; with nothing to free this costs a walk of the free lists and no
/// syscall.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub async fn keep_lean() {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim only releases the allocator's own free pages.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
