//! Global rate limits against a real Redis server (Debian's redis-server,
//! started here on a free loopback port): two limiters, as two waypoint
//! replicas, share one limit; when the store goes away they fall back to
//! their own buckets, or refuse, as configured.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use waypoint::ratelimit::{Global, KeyBy, Limit, RateLimitMetrics, RateLimiter, Verdict};

struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        Redis::start_on(port)
    }

    fn start_on(port: u16) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server; .ci/run installs it)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Redis {
            child,
            port,
            _dir: dir,
        }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn replica() -> RateLimiter {
    RateLimiter::new(RateLimitMetrics::register(&mut Registry::default()))
}

fn limit(port: u16, fail_closed: bool) -> Limit {
    Limit {
        scope: Arc::from("shop/api/0"),
        max_tokens: 20,
        tokens_per_fill: 20,
        // A long window, so the whole test falls in one.
        fill_interval: Duration::from_secs(3600),
        key: KeyBy::Route,
        global: Some(Global {
            store: format!("redis://127.0.0.1:{port}"),
            fail_closed,
        }),
        source: format!("shop/shared-{}", fastrand_suffix()),
    }
}

/// Keys must not collide with an earlier run's window in the same store.
fn fastrand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_global_limit_and_fall_back_when_the_store_goes() {
    let mut redis = Redis::start();
    let (a, b) = (Arc::new(replica()), Arc::new(replica()));
    let shared = Arc::new(limit(redis.port, false));
    // 100 requests spread over both replicas, concurrently.
    let mut tasks = Vec::new();
    for i in 0..100 {
        let r = if i % 2 == 0 { a.clone() } else { b.clone() };
        let l = shared.clone();
        tasks.push(tokio::spawn(async move { r.check(&l, "").await }));
    }
    let mut admitted = 0;
    for t in tasks {
        if t.await.expect("task") == Verdict::Admit {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 20, "together the replicas admit the shared limit");

    // The store goes away: fail open falls back to each replica's own
    // bucket (20 each here), fail closed refuses.
    redis.stop();
    let local: usize = {
        let mut n = 0;
        for _ in 0..30 {
            if a.check(&shared, "").await == Verdict::Admit {
                n += 1;
            }
        }
        n
    };
    assert_eq!(
        local, 20,
        "the local bucket decides while the store is down"
    );
    let closed = limit(redis.port, true);
    assert_ne!(b.check(&closed, "").await, Verdict::Admit);
}

/// A store that is down when the first request comes is used once it is up:
/// a failed first connect is not remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_comes_up_later_is_used() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let r = replica();
    let l = Limit {
        max_tokens: 1,
        tokens_per_fill: 1,
        ..limit(port, true)
    };
    // Down: refused (fail closed).
    assert_ne!(r.check(&l, "").await, Verdict::Admit);
    let _redis = Redis::start_on(port);
    // The failure backs the store off for a second; then it counts.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        r.check(&l, "").await,
        Verdict::Admit,
        "the store's first count"
    );
    assert_ne!(
        r.check(&l, "").await,
        Verdict::Admit,
        "the store's second count"
    );
}
