//! The ztunnel certificate manager against a real CA, with time driven by the
//! test instead of waited for.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use e2e::ca::{TRUST_DOMAIN, TestCa};
use mesh_core::certs::{Backoff, CertState, CertificateManager};
use mesh_core::clock::{Clock, ManualClock};
use mesh_core::identity::Identity;
use mesh_core::tls::TrustRoots;

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, ns, sa).unwrap()
}

fn manager(ca: &TestCa, clock: &ManualClock) -> CertificateManager {
    CertificateManager::new(
        Arc::new(ca.client("node-a")),
        Arc::new(clock.clone()),
        TrustRoots::empty(),
        Backoff::default(),
    )
}

/// Polls `f` until it is true; real time, bounded.
async fn eventually<F: Future<Output = bool>>(what: &str, mut f: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test]
async fn renews_at_half_life_and_not_before() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = TestCa::start(dir.path(), Arc::new(clock.clone())).await;
    let mgr = manager(&ca, &clock);
    let app = id("default", "app");

    let first = mgr.fetch(&app).await.unwrap();
    assert_eq!(ca.node_checks(), 1);
    // The roots came with the answer.
    assert_eq!(mgr.roots().current().certs().len(), 1);

    // Half-life is 12 h after not_before; one minute short of it nothing happens.
    let until_half = first.refresh_at().duration_since(clock.now()).unwrap();
    clock.advance(until_half - Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ca.node_checks(), 1, "renewed before half-life");
    assert_eq!(mgr.fetch(&app).await.unwrap().serial(), first.serial());

    clock.advance(Duration::from_secs(61));
    eventually("renewal at half-life", || {
        let mgr = mgr.clone();
        let app = app.clone();
        let old = first.serial().to_string();
        async move { mgr.fetch(&app).await.unwrap().serial() != old }
    })
    .await;
    assert_eq!(ca.node_checks(), 2);
    let second = mgr.fetch(&app).await.unwrap();
    assert!(second.not_after() > first.not_after());
}

#[tokio::test]
async fn concurrent_callers_share_one_request() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = TestCa::start(dir.path(), Arc::new(clock.clone())).await;
    let mgr = manager(&ca, &clock);
    let app = id("default", "app");
    let waiters: Vec<_> = (0..50)
        .map(|_| {
            let mgr = mgr.clone();
            let app = app.clone();
            tokio::spawn(async move { mgr.fetch(&app).await.map(|c| c.serial().to_string()) })
        })
        .collect();
    let mut serials = Vec::new();
    for w in waiters {
        serials.push(w.await.unwrap().unwrap());
    }
    serials.dedup();
    assert_eq!(serials.len(), 1);
    assert_eq!(ca.node_checks(), 1);
}

#[tokio::test]
async fn ca_outage_keeps_the_old_certificate_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = TestCa::start(dir.path(), Arc::new(clock.clone())).await;
    let addr = ca.addr;
    let mgr = manager(&ca, &clock);
    let app = id("default", "app");
    let first = mgr.fetch(&app).await.unwrap();

    ca.stop().await;
    clock.advance(first.refresh_at().duration_since(clock.now()).unwrap() + Duration::from_secs(1));
    eventually("a failed renewal is recorded", || {
        let mgr = mgr.clone();
        async move { mgr.status()[0].last_error.is_some() }
    })
    .await;
    let status = &mgr.status()[0];
    assert_eq!(
        status.state,
        CertState::Available,
        "a valid cert stays in service"
    );
    assert!(
        status
            .last_error
            .as_deref()
            .unwrap()
            .contains("unreachable"),
        "{status:?}"
    );
    assert_eq!(mgr.fetch(&app).await.unwrap().serial(), first.serial());

    // Retries back off: each retry is scheduled no more than 150 s out.
    for _ in 0..3 {
        let next = status_next_attempt(&mgr);
        assert!(next <= clock.now() + Duration::from_secs(150));
        clock.advance(Duration::from_secs(151));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(mgr.fetch(&app).await.unwrap().serial(), first.serial());

    // The CA comes back on the same address with the same root.
    let ca = TestCa::start_with(
        istiod_lite::ca::CaSource::SelfSigned {
            dir: dir.path().join("ca"),
        },
        Arc::new(clock.clone()),
        addr,
    )
    .await;
    clock.advance(Duration::from_secs(151));
    eventually("renewal after the CA returns", || {
        let mgr = mgr.clone();
        let app = app.clone();
        let clock = clock.clone();
        let old = first.serial().to_string();
        async move {
            clock.advance(Duration::from_secs(1));
            mgr.fetch(&app).await.unwrap().serial() != old
        }
    })
    .await;
    assert!(mgr.status()[0].last_error.is_none());
    drop(ca);
}

fn status_next_attempt(mgr: &CertificateManager) -> SystemTime {
    let s = &mgr.status()[0];
    let t = s.next_attempt.as_deref().expect("a retry is scheduled");
    let parsed =
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).unwrap();
    SystemTime::from(parsed)
}

#[tokio::test]
async fn an_identity_not_on_this_node_fails_fast_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let ca = TestCa::start(dir.path(), Arc::new(clock.clone())).await;
    let mgr = manager(&ca, &clock);
    let db = id("other", "db");
    let err = mgr.fetch(&db).await.unwrap_err();
    assert!(
        err.to_string().contains("no workload with identity"),
        "{err}"
    );
    let s = &mgr.status()[0];
    assert_eq!(s.state, CertState::Unavailable);
    assert!(s.last_error.as_deref().unwrap().contains("node-a"));

    // Identities no longer needed are dropped.
    mgr.prefetch(&id("default", "web"));
    mgr.retain(|i| i.service_account() == "web");
    let ids: Vec<_> = mgr.status().into_iter().map(|s| s.identity).collect();
    assert_eq!(ids, vec![id("default", "web")]);
    eventually("prefetched identity becomes available", || {
        let mgr = mgr.clone();
        async move { mgr.all_available() }
    })
    .await;
}
