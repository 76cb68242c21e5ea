//! How long a downstream connection lives: until the client closes it, the
//! drain starts, it has had no request in flight for `limits.idle_timeout`,
//! or it has been open for `limits.max_connection_duration`. Each of the
//! last three ends it gracefully (HTTP/2: GOAWAY, the streams in flight
//! finish; HTTP/1: after the request in flight).

use std::sync::Arc;
use std::time::Duration;

use std::future::Future;
use std::pin::Pin;

use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::HttpService;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A connection's requests in flight, and since when it has had none.
#[derive(Clone)]
pub(super) struct ConnActivity(Arc<watch::Sender<Busy>>);

#[derive(Clone, Copy)]
struct Busy {
    streams: usize,
    idle_since: Instant,
}

/// One request in flight (kept until its response has been sent, or its
/// upgraded connection closed).
pub(super) struct InFlight(Arc<watch::Sender<Busy>>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|b| {
            b.streams = b.streams.saturating_sub(1);
            if b.streams == 0 {
                b.idle_since = Instant::now();
            }
        });
    }
}

impl ConnActivity {
    pub(super) fn new() -> ConnActivity {
        ConnActivity(Arc::new(watch::Sender::new(Busy {
            streams: 0,
            idle_since: Instant::now(),
        })))
    }

    pub(super) fn begin(&self) -> InFlight {
        self.0.send_modify(|b| b.streams += 1);
        InFlight(self.0.clone())
    }

    /// Resolves once the connection has had no request in flight for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let mut rx = self.0.subscribe();
        loop {
            let b = *rx.borrow_and_update();
            if b.streams == 0 {
                let deadline = b.idle_since + idle;
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {
                        if rx.borrow().streams == 0 && rx.borrow().idle_since + idle <= Instant::now() {
                            return;
                        }
                    }
                    r = rx.changed() => if r.is_err() { return std::future::pending().await },
                }
            } else if rx.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A served connection that can be told to finish (hyper's own
/// `graceful_shutdown`, on HTTP/1 with upgrades and on HTTP/2).
pub(super) trait Graceful: Future<Output = Result<(), hyper::Error>> {
    fn finish(self: Pin<&mut Self>);
}

impl<I, B, S> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, B, S, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: Read + Write + Unpin,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn finish(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Why a connection was ended by the waypoint (for the debug log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    Closed,
    Draining,
    Idle,
    MaxDuration,
}

/// Serves `conn` until it ends, or ends it gracefully at the drain, after
/// `idle` with no request in flight, or at `max_duration`.
pub(super) async fn serve_conn<C: Graceful>(
    conn: C,
    draining: &CancellationToken,
    activity: &ConnActivity,
    idle: Duration,
    max_duration: Option<Duration>,
) -> (Result<(), hyper::Error>, Ended) {
    tokio::pin!(conn);
    let max = async {
        match max_duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let why = tokio::select! {
        r = conn.as_mut() => return (r, Ended::Closed),
        _ = draining.cancelled() => Ended::Draining,
        _ = activity.idle_for(idle) => Ended::Idle,
        _ = max => Ended::MaxDuration,
    };
    conn.as_mut().finish();
    (conn.await, why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_only_with_nothing_in_flight_for_the_whole_time() {
        let a = ConnActivity::new();
        let started = Instant::now();
        let held = a.begin();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.idle_for(Duration::from_millis(100)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "idle while a request was in flight");
        drop(held);
        tokio::time::timeout(Duration::from_secs(2), waiter)
            .await
            .expect("idle after the request")
            .expect("join");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
