//! Busy polling on a shard (`busy_poll_us`, off by default).
//!
//! On a request/response exchange each ztunnel thread otherwise goes to
//! sleep in `epoll_wait` after every hop and is woken by the next packet:
//! two sleeps and two wake-ups per request and ztunnel, which on a virtual
//! machine (an idle vCPU halts, and waking it is an interrupt through the
//! hypervisor) are most of a hop's cost (`docs/performance.md`, issue 27).
//! With a budget, a shard that just did work keeps polling its epoll
//! without blocking until the budget has passed with nothing to do, and
//! gives the CPU to any other runnable thread between polls
//! (`sched_yield`), so an app woken on this CPU is not kept waiting. The
//! price is CPU: up to the budget after every burst of traffic.

use std::cell::Cell;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

thread_local! {
    /// This thread's budget; zero where no spinner runs.
    static BUDGET: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// Keep polling until then.
    static UNTIL: Cell<Option<Instant>> = const { Cell::new(None) };
    /// The spinner, while it waits for work to follow.
    static SPINNER: Cell<Option<Waker>> = const { Cell::new(None) };
    /// Polls made while spinning (for tests).
    static POLLS: Cell<u64> = const { Cell::new(0) };
}

/// Called by the data path when a turn does work: keeps this thread
/// polling for its budget from now (nothing where no spinner runs).
pub fn note_work() {
    let budget = BUDGET.with(Cell::get);
    if budget.is_zero() {
        return;
    }
    UNTIL.with(|u| u.set(Some(Instant::now() + budget)));
    if let Some(w) = SPINNER.with(Cell::take) {
        w.wake();
    }
}

/// Polls made by this thread's spinner so far.
pub fn polls() -> u64 {
    POLLS.with(Cell::get)
}

/// The spinner: spawn it once on a single-threaded runtime, which it keeps
/// polling its I/O driver for `budget` after each [`note_work`] (each of
/// its yields makes that runtime check its epoll without blocking).
pub async fn run(budget: Duration) {
    BUDGET.with(|b| b.set(budget));
    loop {
        std::future::poll_fn(|cx| {
            if UNTIL.with(Cell::get).is_some() {
                Poll::Ready(())
            } else {
                SPINNER.with(|s| s.set(Some(cx.waker().clone())));
                Poll::Pending
            }
        })
        .await;
        while let Some(until) = UNTIL.with(Cell::get) {
            if Instant::now() >= until {
                UNTIL.with(|u| u.set(None));
                break;
            }
            POLLS.with(|p| p.set(p.get() + 1));
            std::thread::yield_now();
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work starts the spin, the spin ends when the budget has passed with
    /// no more work, and an idle shard does not spin.
    #[test]
    fn spins_after_work_for_the_budget_then_sleeps() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            tokio::spawn(run(Duration::from_millis(20)));
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(polls(), 0, "no work, no spin");
            note_work();
            tokio::time::sleep(Duration::from_millis(10)).await;
            let spinning = polls();
            assert!(spinning > 0, "work started the spin");
            tokio::time::sleep(Duration::from_millis(40)).await;
            let stopped = polls();
            assert!(stopped > spinning, "it spun to the end of its budget");
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert_eq!(polls(), stopped, "the budget passed: it sleeps");
        });
    }

    /// Off (no spinner on the thread), work costs nothing and arms nothing.
    #[test]
    fn without_a_spinner_work_arms_nothing() {
        std::thread::spawn(|| {
            note_work();
            assert_eq!(UNTIL.with(Cell::get), None);
        })
        .join()
        .expect("thread");
    }
}
