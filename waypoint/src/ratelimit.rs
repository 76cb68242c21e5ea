//! Request rate limits: token buckets per (route, key), and fixed windows
//! shared across replicas through a Redis-protocol store.
//!
//! Local buckets fill as Envoy's local rate limit does: at most `max_tokens`,
//! `tokens_per_fill` added at the end of each whole `fill_interval`. A bucket
//! is a counter under a lock (sharded by key), so concurrent requests never
//! take more tokens than there are. Routes without a limit never reach this
//! module.
//!
//! Global limits count `tokens_per_fill` requests per `fill_interval` window
//! in the store (one atomic script call: INCR, and PEXPIRE on the window's
//! first request). When the store cannot be reached in time the request
//! falls back to this replica's own bucket (fail open, the default) or is
//! refused (fail closed); either way a metric says so, and the store is not
//! asked again for a second, so an outage does not add a timeout to every
//! request.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_proto::mesh::waypoint as pb;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::warn;

const SHARDS: usize = 16;
/// Buckets kept per shard before full (idle) ones are dropped.
const MAX_BUCKETS_PER_SHARD: usize = 8192;
/// How long a store call may take before the fallback decides.
const STORE_TIMEOUT: Duration = Duration::from_millis(100);
/// After a store failure, how long requests skip it.
const STORE_BACKOFF: Duration = Duration::from_secs(1);

/// What a bucket is counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyBy {
    Route,
    SourcePrincipal,
    Header(http::HeaderName),
}

/// A rate limit as a route carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Which buckets this limit owns: the route's name, or the service's
    /// key for its namespace default.
    pub scope: Arc<str>,
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
    pub key: KeyBy,
    pub global: Option<Global>,
    /// "namespace/name" of the TrafficPolicy.
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Global {
    pub store: String,
    pub fail_closed: bool,
}

/// Why a rate limit from the controller cannot be enforced (its route is
/// refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("rate limit of {0}: tokens, burst and interval must all be above zero")]
    Zero(String),
    #[error("rate limit header {0:?}")]
    BadHeader(String),
}

/// Why the global store gave no count (the limit falls back or refuses, as
/// it says).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store marked down after a recent failure")]
    MarkedDown,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

impl Limit {
    pub fn compile(scope: &str, r: &pb::RateLimit) -> Result<Limit, LimitError> {
        if r.tokens_per_fill == 0 || r.max_tokens == 0 || r.fill_interval_ms == 0 {
            return Err(LimitError::Zero(r.source.clone()));
        }
        let key = match pb::RateLimitKey::try_from(r.key) {
            Ok(pb::RateLimitKey::SourcePrincipal) => KeyBy::SourcePrincipal,
            Ok(pb::RateLimitKey::Header) => KeyBy::Header(
                http::HeaderName::from_bytes(r.header.as_bytes())
                    .map_err(|_| LimitError::BadHeader(r.header.clone()))?,
            ),
            _ => KeyBy::Route,
        };
        Ok(Limit {
            scope: Arc::from(scope),
            max_tokens: r.max_tokens,
            tokens_per_fill: r.tokens_per_fill,
            fill_interval: Duration::from_millis(u64::from(r.fill_interval_ms)),
            key,
            global: r.global.as_ref().map(|g| Global {
                store: g.store.clone(),
                fail_closed: g.fail_closed,
            }),
            source: r.source.clone(),
        })
    }

    /// The bucket key of a request.
    pub fn key_of(&self, principal: &str, headers: &http::HeaderMap) -> String {
        match &self.key {
            KeyBy::Route => String::new(),
            KeyBy::SourcePrincipal => principal.to_string(),
            KeyBy::Header(h) => headers
                .get(h)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .unwrap_or_default(),
        }
    }
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Over the limit; a token comes back after this long.
    Limited {
        retry_after: Duration,
    },
}

struct Bucket {
    tokens: u32,
    /// Start of the current fill interval.
    since: Instant,
    /// The limit's settings the bucket was made for: a changed limit starts
    /// afresh.
    params: (u32, u32, Duration),
}

impl Bucket {
    fn new(l: &Limit, now: Instant) -> Bucket {
        Bucket {
            tokens: l.max_tokens,
            since: now,
            params: (l.max_tokens, l.tokens_per_fill, l.fill_interval),
        }
    }

    /// Adds the tokens of the whole intervals since the last fill.
    fn refill(&mut self, now: Instant) {
        let (max, per_fill, interval) = self.params;
        let elapsed = now.saturating_duration_since(self.since);
        let whole = elapsed.as_nanos() / interval.as_nanos().max(1);
        if whole > 0 {
            let add = u64::try_from(whole)
                .unwrap_or(u64::MAX)
                .saturating_mul(u64::from(per_fill));
            self.tokens = u64::from(self.tokens)
                .saturating_add(add)
                .min(u64::from(max)) as u32;
            let step = interval
                .checked_mul(u32::try_from(whole).unwrap_or(u32::MAX))
                .unwrap_or(elapsed);
            self.since += step.min(elapsed);
        }
    }
}

type Shard = Mutex<HashMap<(Arc<str>, String), Bucket>>;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitedLabels {
    pub policy: String,
    /// "local" or "global".
    pub counted: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: String,
    /// What a failed store call led to: "local_fallback" or "refused".
    pub outcome: &'static str,
}

pub struct RateLimitMetrics {
    pub limited: Family<LimitedLabels, Counter>,
    pub store_failures: Family<StoreLabels, Counter>,
}

impl RateLimitMetrics {
    pub fn register(registry: &mut Registry) -> RateLimitMetrics {
        let m = RateLimitMetrics {
            limited: Family::default(),
            store_failures: Family::default(),
        };
        registry.register(
            "waypoint_rate_limited_requests",
            "Requests refused with 429 by a rate limit",
            m.limited.clone(),
        );
        registry.register(
            "waypoint_rate_limit_store_failures",
            "Global rate limit checks the store did not answer in time, by what followed",
            m.store_failures.clone(),
        );
        m
    }
}

/// A store connection (made on first use, and again after a failed first
/// connect; once made, it reconnects by itself), and until when the store is
/// not to be asked.
struct Store {
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    down_until: Mutex<Option<Instant>>,
}

pub struct RateLimiter {
    shards: Vec<Shard>,
    stores: Mutex<HashMap<String, Arc<Store>>>,
    script: redis::Script,
    metrics: RateLimitMetrics,
}

impl RateLimiter {
    pub fn new(metrics: RateLimitMetrics) -> RateLimiter {
        RateLimiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            stores: Mutex::new(HashMap::new()),
            script: redis::Script::new(
                "local n = redis.call('INCR', KEYS[1]) \
                 if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
                 return n",
            ),
            metrics,
        }
    }

    /// Takes a token from this replica's bucket for `key`, if there is one.
    pub fn check_local(&self, limit: &Limit, key: &str, now: Instant) -> Verdict {
        let mut h = DefaultHasher::new();
        (&*limit.scope, key).hash(&mut h);
        let shard = &self.shards[(h.finish() as usize) % SHARDS];
        let mut buckets = shard.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_BUCKETS_PER_SHARD {
            // A bucket that is full again is the same as no bucket.
            buckets.retain(|_, b| {
                b.refill(now);
                b.tokens < b.params.0
            });
        }
        let b = buckets
            .entry((limit.scope.clone(), key.to_string()))
            .or_insert_with(|| Bucket::new(limit, now));
        if b.params != (limit.max_tokens, limit.tokens_per_fill, limit.fill_interval) {
            *b = Bucket::new(limit, now);
        }
        b.refill(now);
        if b.tokens > 0 {
            b.tokens -= 1;
            Verdict::Admit
        } else {
            Verdict::Limited {
                retry_after: (b.since + limit.fill_interval).saturating_duration_since(now),
            }
        }
    }

    /// The limit's verdict for a request: the store's count when the limit
    /// is global and the store answers, this replica's bucket otherwise.
    pub async fn check(&self, limit: &Limit, key: &str) -> Verdict {
        let verdict = match &limit.global {
            None => self.check_local(limit, key, Instant::now()),
            Some(g) => match self.check_store(g, limit, key).await {
                Ok(v) => v,
                Err(e) => {
                    let outcome = if g.fail_closed {
                        "refused"
                    } else {
                        "local_fallback"
                    };
                    self.metrics
                        .store_failures
                        .get_or_create(&StoreLabels {
                            store: shown(&g.store),
                            outcome,
                        })
                        .inc();
                    warn!(store = %shown(&g.store), error = %e, outcome, "rate limit store");
                    if g.fail_closed {
                        Verdict::Limited {
                            retry_after: limit.fill_interval,
                        }
                    } else {
                        self.check_local(limit, key, Instant::now())
                    }
                }
            },
        };
        if verdict != Verdict::Admit {
            self.metrics
                .limited
                .get_or_create(&LimitedLabels {
                    policy: limit.source.clone(),
                    counted: if limit.global.is_some() {
                        "global"
                    } else {
                        "local"
                    },
                })
                .inc();
        }
        verdict
    }

    fn store(&self, url: &str) -> Arc<Store> {
        self.stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(url.to_string())
            .or_insert_with(|| {
                Arc::new(Store {
                    conn: tokio::sync::Mutex::new(None),
                    down_until: Mutex::new(None),
                })
            })
            .clone()
    }

    async fn check_store(
        &self,
        g: &Global,
        limit: &Limit,
        key: &str,
    ) -> Result<Verdict, StoreError> {
        let store = self.store(&g.store);
        {
            let down = store.down_until.lock().unwrap_or_else(|p| p.into_inner());
            if down.is_some_and(|t| Instant::now() < t) {
                return Err(StoreError::MarkedDown);
            }
        }
        let result = tokio::time::timeout(STORE_TIMEOUT, self.count(&store, g, limit, key)).await;
        let result = match result {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(STORE_TIMEOUT)),
        };
        if result.is_err() {
            *store.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + STORE_BACKOFF);
        }
        result
    }

    async fn count(
        &self,
        store: &Store,
        g: &Global,
        limit: &Limit,
        key: &str,
    ) -> Result<Verdict, StoreError> {
        let conn = {
            let mut slot = store.conn.lock().await;
            match slot.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let client = redis::Client::open(g.store.as_str())?;
                    let c = redis::aio::ConnectionManager::new(client).await?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        // Windows are aligned to the wall clock, so every replica counts
        // the same window.
        let interval_ms = limit.fill_interval.as_millis().max(1);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        let window = now_ms / interval_ms;
        let store_key = format!("mesh-rl:{}:{}:{key}:{window}", limit.source, limit.scope);
        let mut conn = conn;
        let n: u64 = self
            .script
            .key(store_key)
            // Twice the window: a late replica still finds the count.
            .arg((interval_ms * 2) as u64)
            .invoke_async(&mut conn)
            .await?;
        if n <= u64::from(limit.tokens_per_fill) {
            Ok(Verdict::Admit)
        } else {
            let next = (window + 1) * interval_ms;
            Ok(Verdict::Limited {
                retry_after: Duration::from_millis((next - now_ms) as u64),
            })
        }
    }
}

/// `retry-after` in whole seconds, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    (d.as_millis().div_ceil(1000) as u64).max(1)
}

/// A store's address as metrics and logs show it: without the URL's
/// user information and query, where a password would be.
fn shown(store: &str) -> String {
    let Some((scheme, rest)) = store.split_once("://") else {
        return store.split('?').next().unwrap_or_default().to_string();
    };
    let rest = rest.split('?').next().unwrap_or_default();
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(max: u32, per_fill: u32, interval_ms: u64) -> Limit {
        Limit {
            scope: Arc::from("shop/r/0"),
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(interval_ms),
            key: KeyBy::Route,
            global: None,
            source: "shop/limit".into(),
        }
    }

    fn limiter() -> RateLimiter {
        RateLimiter::new(RateLimitMetrics::register(&mut Registry::default()))
    }

    #[test]
    fn a_bucket_admits_its_size_then_fills_by_whole_intervals() {
        let rl = limiter();
        let l = limit(10, 10, 1000);
        let t0 = Instant::now();
        let admitted = (0..100)
            .filter(|_| rl.check_local(&l, "", t0) == Verdict::Admit)
            .count();
        assert_eq!(admitted, 10);
        // Just before the interval ends: still empty, and says when.
        match rl.check_local(&l, "", t0 + Duration::from_millis(999)) {
            Verdict::Limited { retry_after } => assert_eq!(retry_after, Duration::from_millis(1)),
            v => panic!("{v:?}"),
        }
        // After it: full again (never more than max).
        let t1 = t0 + Duration::from_millis(3500);
        let admitted = (0..100)
            .filter(|_| rl.check_local(&l, "", t1) == Verdict::Admit)
            .count();
        assert_eq!(admitted, 10);
        // Keys have their own buckets; another limit, its own too.
        assert_eq!(rl.check_local(&l, "alice", t1), Verdict::Admit);
        let other = Limit {
            scope: Arc::from("shop/r/1"),
            ..l.clone()
        };
        assert_eq!(rl.check_local(&other, "", t1), Verdict::Admit);
    }

    #[test]
    fn burst_and_fill_differ() {
        let rl = limiter();
        // 2 per 100 ms, up to 5 at once.
        let l = limit(5, 2, 100);
        let t0 = Instant::now();
        let take = |t: Instant| {
            (0..10)
                .filter(|_| rl.check_local(&l, "", t) == Verdict::Admit)
                .count()
        };
        assert_eq!(take(t0), 5);
        assert_eq!(take(t0 + Duration::from_millis(150)), 2);
        assert_eq!(take(t0 + Duration::from_millis(250)), 2);
        assert_eq!(take(t0 + Duration::from_secs(5)), 5);
    }

    #[test]
    fn a_changed_limit_starts_afresh() {
        let rl = limiter();
        let t0 = Instant::now();
        let small = limit(1, 1, 1000);
        assert_eq!(rl.check_local(&small, "", t0), Verdict::Admit);
        assert_ne!(rl.check_local(&small, "", t0), Verdict::Admit);
        let bigger = limit(3, 3, 1000);
        assert_eq!(rl.check_local(&bigger, "", t0), Verdict::Admit);
    }

    #[test]
    fn concurrent_requests_never_take_more_than_the_bucket() {
        let rl = Arc::new(limiter());
        let l = Arc::new(limit(1000, 1, 3_600_000));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (rl, l) = (rl.clone(), l.clone());
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|_| rl.check_local(&l, "", t0) == Verdict::Admit)
                        .count()
                })
            })
            .collect();
        let admitted: usize = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
        assert_eq!(admitted, 1000);
    }

    #[test]
    fn keys_come_from_the_principal_or_a_header() {
        let mut headers = http::HeaderMap::new();
        headers.insert("x-user", http::HeaderValue::from_static("bob"));
        let mut l = limit(1, 1, 1000);
        assert_eq!(l.key_of("cluster.local/ns/a/sa/b", &headers), "");
        l.key = KeyBy::SourcePrincipal;
        assert_eq!(
            l.key_of("cluster.local/ns/a/sa/b", &headers),
            "cluster.local/ns/a/sa/b"
        );
        l.key = KeyBy::Header(http::HeaderName::from_static("x-user"));
        assert_eq!(l.key_of("p", &headers), "bob");
        assert_eq!(l.key_of("p", &http::HeaderMap::new()), "");
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[tokio::test]
    async fn an_unreachable_store_falls_back_or_refuses_as_configured() {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let rl = limiter();
        let mut l = limit(1, 1, 3_600_000);
        l.global = Some(Global {
            store: format!("redis://127.0.0.1:{port}"),
            fail_closed: false,
        });
        assert_eq!(rl.check(&l, "").await, Verdict::Admit, "the local bucket");
        assert_ne!(
            rl.check(&l, "").await,
            Verdict::Admit,
            "the local bucket, empty"
        );
        let mut closed = l.clone();
        closed.scope = Arc::from("shop/r/9");
        if let Some(g) = closed.global.as_mut() {
            g.fail_closed = true;
        }
        assert_ne!(rl.check(&closed, "").await, Verdict::Admit);
        let failures = |outcome| {
            rl.metrics
                .store_failures
                .get_or_create(&StoreLabels {
                    store: format!("redis://127.0.0.1:{port}"),
                    outcome,
                })
                .get()
        };
        assert!(failures("local_fallback") >= 2);
        assert_eq!(failures("refused"), 1);
    }

    #[tokio::test]
    async fn a_store_password_is_never_in_a_metric_or_log_label() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        let mut registry = Registry::default();
        let rl = RateLimiter::new(RateLimitMetrics::register(&mut registry));
        let mut l = limit(1, 1, 3_600_000);
        l.global = Some(Global {
            store: format!("redis://user:hunter2@127.0.0.1:{port}/0?password=hunter3"),
            fail_closed: true,
        });
        assert_ne!(rl.check(&l, "").await, Verdict::Admit);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(!text.contains("hunter"), "{text}");
        assert!(
            text.contains(&format!("redis://127.0.0.1:{port}/0")),
            "{text}"
        );
        assert_eq!(shown("redis://10.0.0.1:6379"), "redis://10.0.0.1:6379");
        assert_eq!(shown("rediss://:pw@h:1"), "rediss://h:1");
    }
}
