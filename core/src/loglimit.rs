//! Log lines a flood could multiply: an ingress writes one line per
//! refused connection (a source that names no workload, a failed or slow
//! TLS handshake), the controller one per refused xDS stream. Each kind
//! of line is written at most once per
//! [`EVERY`]; the next one written says how many were left out since, and
//! [`LogLimit::due`] gives the counts nothing has written once a period
//! has passed (a periodic task logs them).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of line is written at most.
pub const EVERY: Duration = Duration::from_secs(10);

/// When each kind of line was last written, and how many were left out
/// since. The kinds are the program's own (`&'static str`), so the map
/// stays as small as their number.
pub struct LogLimit {
    every: Duration,
    seen: Mutex<HashMap<&'static str, Window>>,
}

struct Window {
    written: Instant,
    suppressed: u64,
}

impl LogLimit {
    pub fn new(every: Duration) -> Self {
        LogLimit {
            every,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Whether a line of kind `reason` is written at `now`: `Some(n)`,
    /// with `n` the lines of that kind left out since the last one written;
    /// `None` when this one is left out (and counted).
    pub fn admit(&self, reason: &'static str, now: Instant) -> Option<u64> {
        // A poisoned lock (a panic while holding it) writes every line:
        // losing lines is worse than writing too many.
        let Ok(mut seen) = self.seen.lock() else {
            return Some(0);
        };
        match seen.get_mut(reason) {
            Some(w) if now.saturating_duration_since(w.written) < self.every => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                w.written = now;
                Some(std::mem::take(&mut w.suppressed))
            }
            None => {
                seen.insert(
                    reason,
                    Window {
                        written: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }

    /// The kinds whose period has passed with lines left out and none
    /// written since, with how many: a periodic task logs them, so a burst
    /// followed by silence still has its count written. Each one's period
    /// starts again at `now`, with nothing left out.
    pub fn due(&self, now: Instant) -> Vec<(&'static str, u64)> {
        let Ok(mut seen) = self.seen.lock() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (reason, w) in seen.iter_mut() {
            if w.suppressed > 0 && now.saturating_duration_since(w.written) >= self.every {
                w.written = now;
                out.push((*reason, std::mem::take(&mut w.suppressed)));
            }
        }
        out.sort_unstable();
        out
    }
}

impl Default for LogLimit {
    fn default() -> Self {
        Self::new(EVERY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One line per period per kind, the next carrying the count left out.
    /// Failed first: every line was written.
    #[test]
    fn one_line_per_period_per_kind_with_the_count_left_out() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.admit("tls", t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.admit("tls", t0 + Duration::from_secs(i)), None, "{i}");
        }
        // Another kind has a window of its own.
        assert_eq!(
            l.admit("unattributable", t0 + Duration::from_secs(1)),
            Some(0)
        );
        assert_eq!(l.admit("tls", t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(l.admit("tls", t0 + Duration::from_secs(11)), None);
        assert_eq!(l.admit("tls", t0 + Duration::from_secs(25)), Some(1));
        // A clock that goes back leaves the line out rather than panic.
        assert_eq!(l.admit("tls", t0), None);
    }

    /// A burst followed by silence: its count is due once the period has
    /// passed (not before, not twice), with no later line needed. Failed
    /// first: the count was written only with the next line admitted.
    #[test]
    fn a_burst_followed_by_silence_has_its_count_due() {
        let l = LogLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.admit("tls", t0), Some(0));
        assert_eq!(l.admit("quiet", t0), Some(0));
        for i in 1..=3 {
            assert_eq!(l.admit("tls", t0 + Duration::from_secs(i)), None);
        }
        assert!(l.due(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(l.due(t0 + Duration::from_secs(10)), vec![("tls", 3)]);
        assert!(l.due(t0 + Duration::from_secs(30)).is_empty());
        // Its period started again when it was due.
        assert_eq!(l.admit("tls", t0 + Duration::from_secs(15)), None);
        assert_eq!(l.admit("tls", t0 + Duration::from_secs(20)), Some(1));
    }
}
