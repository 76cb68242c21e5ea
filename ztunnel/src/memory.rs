//! What an idle ztunnel keeps resident: the heap's thresholds, a trim every
//! few seconds, and letting go of the code pages nothing runs.
//!
//! Most of an idle ztunnel's RSS is not its own memory but the pages of its
//! binary and shared libraries that are mapped into it. The kernel maps
//! 64 KiB around every page of code that runs (fault-around), and start-up,
//! certificates, configuration and the data path together touch most of the
//! binary. When the ztunnel has been idle for a whole tick (no connection
//! open, none opened), [`release_code`] drops those mappings. They are
//! clean, private and unmodified, so their contents are the file's: the
//! next instruction that needs a page maps it again from the page cache
//! (a minor fault), and only the code that runs comes back.

use std::time::Duration;

/// How often freed heap memory is handed back to the kernel, and how long
/// the proxy must be idle before its code mappings are let go.
pub const TICK: Duration = Duration::from_secs(5);

/// What went wrong letting go of code mappings.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("reading /proc/self/smaps: {0}")]
    Smaps(#[source] std::io::Error),
    #[error("madvise(MADV_DONTNEED) on {start:#x}-{end:#x}: {source}")]
    Madvise {
        start: usize,
        end: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A mapping that can be dropped and mapped again from its file: private,
/// not writable, no page of it copied on write, not locked, and of a file
/// that is mapped executable somewhere (the binary or a shared library the
/// loader mapped, which stay mapped for the life of the process).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeMapping {
    pub start: usize,
    pub end: usize,
    pub path: String,
    /// Resident before it was let go.
    pub rss_kib: u64,
}

/// One mapping's header line and the fields that decide.
#[derive(Debug, Default)]
struct Entry {
    start: usize,
    end: usize,
    perms: String,
    path: String,
    rss_kib: u64,
    anonymous_kib: u64,
    locked_kib: u64,
}

fn header(line: &str) -> Option<Entry> {
    let mut f = line.split_whitespace();
    let (range, perms) = (f.next()?, f.next()?);
    let (start, end) = range.split_once('-')?;
    let (start, end) = (
        usize::from_str_radix(start, 16).ok()?,
        usize::from_str_radix(end, 16).ok()?,
    );
    if perms.len() != 4 {
        return None;
    }
    // offset, device, inode, then the path (which may hold spaces).
    let path = f.nth(3).map_or(String::new(), |first| {
        std::iter::once(first)
            .chain(f)
            .collect::<Vec<_>>()
            .join(" ")
    });
    Some(Entry {
        start,
        end,
        perms: perms.to_string(),
        path,
        ..Entry::default()
    })
}

fn kib(rest: &str) -> u64 {
    rest.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

/// The mappings in `smaps` (the text of `/proc/PID/smaps`) that
/// [`release_code`] may drop. A field it cannot read keeps its mapping.
pub fn code_mappings(smaps: &str) -> Vec<CodeMapping> {
    let mut entries: Vec<Entry> = Vec::new();
    for line in smaps.lines() {
        if let Some(e) = header(line) {
            entries.push(e);
            continue;
        }
        let (Some(e), Some((key, rest))) = (entries.last_mut(), line.split_once(':')) else {
            continue;
        };
        match key {
            "Rss" => e.rss_kib = kib(rest),
            "Anonymous" => e.anonymous_kib = kib(rest),
            "Locked" => e.locked_kib = kib(rest),
            _ => {}
        }
    }
    let executable: std::collections::HashSet<&str> = entries
        .iter()
        .filter(|e| e.perms.as_bytes()[2] == b'x')
        .map(|e| e.path.as_str())
        .collect();
    entries
        .iter()
        .filter(|e| {
            let p = e.perms.as_bytes();
            e.path.starts_with('/')
                && !e.path.ends_with(" (deleted)")
                && executable.contains(e.path.as_str())
                && p[1] == b'-'
                && p[3] == b'p'
                && e.anonymous_kib == 0
                && e.locked_kib == 0
                && e.rss_kib > 0
                && e.rss_kib != u64::MAX
        })
        .map(|e| CodeMapping {
            start: e.start,
            end: e.end,
            path: e.path.clone(),
            rss_kib: e.rss_kib,
        })
        .collect()
}

/// Drops this process's code mappings ([`code_mappings`]); returns what was
/// resident in them. Pages still in use are mapped again on their next
/// access, from the page cache.
#[cfg(target_os = "linux")]
pub fn release_code() -> Result<Vec<CodeMapping>, MemoryError> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").map_err(MemoryError::Smaps)?;
    let found = code_mappings(&smaps);
    for m in &found {
        // SAFETY: the range is a whole private mapping of a file that is
        // not writable and has no page copied on write, so every page of it
        // holds the file's contents. MADV_DONTNEED on such a mapping only
        // removes the page table entries; the next access maps the file's
        // page again, as after the kernel reclaimed it under memory
        // pressure, which it may do at any time. Such files (the binary and
        // the libraries the loader mapped) are never unmapped while the
        // process runs, so the range is still the mapping that was read.
        let rc = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.end - m.start,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Madvise {
                start: m.start,
                end: m.end,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(found)
}

/// Whether the proxy did nothing for a whole tick: no connection open now,
/// none opened since the last look (`opened` counts every connection ever
/// tracked).
#[derive(Debug, Default)]
pub struct Quiet {
    last_opened: Option<u64>,
}

impl Quiet {
    /// True when nothing is open and nothing was opened since the last call.
    pub fn observe(&mut self, open: usize, opened: u64) -> bool {
        let quiet = open == 0 && self.last_opened == Some(opened);
        self.last_opened = Some(opened);
        quiet
    }
}

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

/// Every [`TICK`]: freed heap memory goes back to the kernel (glibc would
/// keep what a burst freed, HTTP/2 receive buffers of bulk flows or a
/// thousand connections' state, for the life of the process; with nothing
/// to free this is a walk of the free lists and no syscall), and when
/// `activity` (connections open now, connections ever opened) shows a whole
/// idle tick, the code mappings are let go ([`release_code`]); the first
/// tick, as soon as this starts (when the proxy serves), lets go of them
/// too.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub async fn keep_lean(activity: impl Fn() -> (usize, u64)) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet = Quiet::default();
    // Start-up's code (the command line, the YAML config, building the
    // runtime and the listeners) at once: the proxy serves by now.
    let mut startup = true;
    loop {
        tick.tick().await;
        // SAFETY: malloc_trim only releases the allocator's own free pages.
        unsafe {
            libc::malloc_trim(0);
        }
        let (open, opened) = activity();
        if quiet.observe(open, opened) || std::mem::take(&mut startup) {
            let_go_of_code();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn let_go_of_code() {
    match release_code() {
        Ok(found) => tracing::debug!(
            mappings = found.len(),
            kib = found.iter().map(|m| m.rss_kib).sum::<u64>(),
            "code mappings let go"
        ),
        Err(e) => tracing::warn!(error = %e, "letting go of code mappings"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0a0000000-55d0a0400000 r--p 00000000 fe:00 42 /usr/bin/ztunnel
Rss:                1200 kB
Anonymous:             0 kB
Locked:                0 kB
55d0a0400000-55d0a0c00000 r-xp 00400000 fe:00 42 /usr/bin/ztunnel
Rss:                7000 kB
Anonymous:             0 kB
Locked:                0 kB
55d0a0c00000-55d0a0c40000 r--p 00c00000 fe:00 42 /usr/bin/ztunnel
Rss:                 256 kB
Anonymous:           256 kB
Locked:                0 kB
55d0a0c40000-55d0a0c46000 rw-p 00c40000 fe:00 42 /usr/bin/ztunnel
Rss:                  24 kB
Anonymous:            12 kB
Locked:                0 kB
55d0a1000000-55d0a1100000 rw-p 00000000 00:00 0 [heap]
Rss:                 160 kB
Anonymous:           160 kB
Locked:                0 kB
7f0000000000-7f0000100000 r--p 00000000 fe:00 7 /usr/lib/locale/locale-archive
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000200000-7f0000300000 r-xp 00026000 fe:00 9 /usr/lib/x86_64-linux-gnu/libc.so.6
Rss:                 948 kB
Anonymous:             0 kB
Locked:               948 kB
7f0000400000-7f0000410000 r-xp 00000000 fe:00 11 /opt/my lib/libx.so
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000410000-7f0000420000 r--p 00010000 fe:00 11 /opt/my lib/libx.so
Rss:                   0 kB
Anonymous:             0 kB
Locked:                0 kB
7f0000500000-7f0000510000 r-xp 00000000 fe:00 12 /tmp/old (deleted)
Rss:                  64 kB
Anonymous:             0 kB
Locked:                0 kB
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0 [vdso]
Rss:                   8 kB
Anonymous:             0 kB
Locked:                0 kB
7ffc00010000-7ffc00011000 r-xp 00000000 fe:00 13 /usr/lib/libunread.so
Rss:             unknown kB
Anonymous:             0 kB
Locked:                0 kB
";

    #[test]
    fn only_clean_read_only_mappings_of_loaded_objects_are_let_go() {
        let got: Vec<(usize, &str, u64)> = code_mappings(SMAPS)
            .iter()
            .map(|m| (m.start, leak(&m.path), m.rss_kib))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x55d0a0000000, "/usr/bin/ztunnel", 1200),
                (0x55d0a0400000, "/usr/bin/ztunnel", 7000),
                (0x7f0000400000, "/opt/my lib/libx.so", 64),
            ],
            "not: a page copied on write (RELRO), writable data, the heap, a \
             file never mapped executable, locked pages, nothing resident, a \
             deleted file, the vDSO, an unreadable figure"
        );
    }

    fn leak(s: &str) -> &'static str {
        Box::leak(s.to_string().into_boxed_str())
    }

    #[test]
    fn quiet_needs_a_whole_tick_with_nothing_open_and_nothing_opened() {
        let mut q = Quiet::default();
        assert!(!q.observe(0, 0), "the first look has nothing to compare");
        assert!(q.observe(0, 0));
        assert!(!q.observe(0, 3), "connections opened and closed since");
        assert!(q.observe(0, 3));
        assert!(!q.observe(1, 3), "one open");
        assert!(!q.observe(1, 3), "still open");
        assert!(q.observe(0, 3));
    }

    fn resident_kib_of_own_code() -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        code_mappings(&smaps).iter().map(|m| m.rss_kib).sum()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn letting_go_of_code_lowers_what_is_mapped_and_the_code_still_runs() {
        let before = resident_kib_of_own_code();
        let released = release_code().expect("release");
        assert!(!released.is_empty(), "the test binary's own code");
        let after = resident_kib_of_own_code();
        // The test runs on: everything it still needs maps back in.
        let text = format!("{:?}", code_mappings(SMAPS));
        assert!(text.contains("ztunnel"));
        assert!(
            after < before,
            "mapped code {before} KiB before, {after} KiB after"
        );
    }
}
