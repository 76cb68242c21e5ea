//! Stream idle time: a clock each HTTP stream shares between its request
//! body and its response body (and an upgraded connection's two
//! directions), touched whenever anything moves either way, and a timer
//! that fires only once nothing has moved for the whole idle timeout
//! (Envoy's `stream_idle_timeout`).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// When a stream last moved.
#[derive(Clone, Debug)]
pub struct StreamClock {
    base: Instant,
    /// Nanoseconds after `base`.
    last: Arc<AtomicU64>,
}

impl Default for StreamClock {
    fn default() -> Self {
        StreamClock {
            base: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl StreamClock {
    /// Something moved, now.
    pub fn touch(&self) {
        let n = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(n, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

/// Fires once its stream has been idle for `idle`.
pub struct IdleTimer {
    clock: StreamClock,
    idle: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl IdleTimer {
    pub fn new(clock: StreamClock, idle: Duration) -> IdleTimer {
        IdleTimer {
            clock,
            idle,
            sleep: None,
        }
    }

    pub fn clock(&self) -> &StreamClock {
        &self.clock
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Whether the stream has been idle for the whole timeout; if not, the
    /// task is woken when it might have been.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            let Some(deadline) = self.clock.last().checked_add(self.idle) else {
                return false;
            };
            if Instant::now() >= deadline {
                return true;
            }
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            if sleep.as_mut().poll(cx) == Poll::Pending {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_only_after_nothing_moved_for_the_whole_timeout() {
        let clock = StreamClock::default();
        let mut t = IdleTimer::new(clock.clone(), Duration::from_millis(100));
        let started = Instant::now();
        // Activity every 40 ms keeps it from firing.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_millis(40)).await;
            clock.touch();
            assert!(!std::future::poll_fn(|cx| Poll::Ready(t.poll_expired(cx))).await);
        }
        std::future::poll_fn(|cx| {
            if t.poll_expired(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
    }
}
