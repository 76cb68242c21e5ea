//! A policy the ztunnel cannot read denies, with real processes, real
//! sockets and real TLS: client -> ztunnel A (local file) -> HBONE ->
//! ztunnel B -> echo server, where ztunnel B takes its state over Delta ADS
//! from a control plane of the test's own (`e2e::fake_ads`), standing for a
//! foreign or newer one: ours never emits such a policy.
//!
//! Why each step fails on the code before 949e729: that code also NACKed
//! an `istio.security.Authorization` it could not read (an unknown action,
//! a StringMatch with no match type, bytes that do not decode), but left it
//! out of the state, so a policy meant to limit access simply was not
//! there. In (b) the only ALLOW policy in the namespace is then absent, so
//! "no ALLOW policy applies" lets the client through; in (c) and (c2) the
//! readable allow-all is the only policy left, so the client is let through
//! again. Each asserts that the client is refused and the app never sees
//! it, and so fails there. (The reconnect in (c), which checks that the
//! ztunnel says it holds the refused policy as "nacked", fails on the code
//! before f5b82a7 too.) Checked by making `state_updates` skip the stand-in:
//! see the commit message.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::ca::{TestCa, token_for};
use e2e::fake_ads::{self, FakeAds, Reply};
use e2e::mesh::{Echo, Pod, Subnet, Ztunnel, ZtunnelSpec, ca_for, echo_roundtrip, state_yaml};
use mesh_proto::istio::security::{Action, Authorization, Clause, Match, Rule, Scope, StringMatch};
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// The workloads' namespace (the policies are of namespace scope).
const NS: &str = "nack";
const APP_PORT: u16 = 8080;

struct Mesh {
    ads: FakeAds,
    echo: Echo,
    za: Ztunnel,
    zb: Ztunnel,
    /// The client's captured path to the server.
    out: SocketAddr,
    // Dropped last: the CA and the directory the ztunnels' files are in.
    _ca: TestCa,
    _dir: tempfile::TempDir,
}

/// The l4 mesh, with ztunnel B on the fake control plane, which serves the
/// same workloads ztunnel A has in its file and no policy.
async fn mesh() -> Mesh {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Subnet::unique();
    let client = Pod::new("client", NS, "client", net.ip(1), "node-a");
    let server = Pod::new("server", NS, "server", net.ip(2), "node-b");
    let ca = ca_for(dir.path(), &[&client, &server]).await;
    let ads = FakeAds::start(&ca.ca).await.expect("fake ADS starts");
    let state = state_yaml(&[&client, &server], &[], "");
    ads.push(
        ADDRESS_TYPE_URL,
        fake_ads::addresses(&state).expect("address resources"),
    );
    ads.push(AUTHORIZATION_TYPE_URL, vec![]);
    let echo = Echo::start(net.addr(2, APP_PORT)).await;
    let out = net.addr(1, 15001);
    let za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state.clone())
            .inbound(vec![client.ip])
            .outbound(vec![(out, client.uid.clone(), net.addr(2, APP_PORT))]),
    )
    .await;
    // Ready only once it has had both types from the fake control plane.
    let zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("zb", "node-b", net.ip(11), String::new())
            .inbound(vec![server.ip])
            .xds(ads.url()),
    )
    .await;
    Mesh {
        ads,
        echo,
        za,
        zb,
        out,
        _ca: ca,
        _dir: dir,
    }
}

fn policy(name: &str, action: i32, rules: Vec<Rule>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: NS.into(),
        scope: Scope::Namespace as i32,
        action,
        rules,
        dry_run: false,
    }
}

/// One rule with no clauses: matches every connection.
fn everything() -> Vec<Rule> {
    vec![Rule { clauses: vec![] }]
}

/// An ALLOW whose only match is a StringMatch with no match type.
fn unreadable_match() -> Authorization {
    let m = Match {
        principals: vec![StringMatch { match_type: None }],
        ..Default::default()
    };
    policy(
        "bad-match",
        Action::Allow as i32,
        vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
    )
}

/// A policy of an action this ztunnel does not know (a newer control plane's).
fn unknown_action() -> Authorization {
    policy("unknown-action", 7, everything())
}

fn allow_all(name: &str) -> Authorization {
    policy(name, Action::Allow as i32, everything())
}

fn metric_sum(text: &str, name: &str, must_contain: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn denials(z: &Ztunnel) -> u64 {
    metric_sum(
        &z.metrics_text().await,
        "istio_tcp_connections_closed_total",
        &["response_flags=\"DENY\"", "reporter=\"destination\""],
    )
}

/// A NACK whose error names `name`.
fn assert_nack(r: &Reply, name: &str, why: &str) {
    let error = r.error.as_deref().unwrap_or_default();
    assert!(
        error.contains(name) && error.contains(why),
        "expected a NACK naming {name} ({why}), got {r:?}"
    );
}

/// A new connection from the client is refused by ztunnel B as a DENY
/// (flagged so, logged with `decision`) and never reaches the app.
async fn assert_refused(m: &Mesh, step: &str, decision: &str) {
    let seen = m.echo.count();
    let denied = denials(&m.zb).await;
    let r = tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(m.out, b"secret"))
        .await
        .expect("refused in time");
    assert!(
        r.as_ref().map(|b| b.is_empty()).unwrap_or(true),
        "{step}: a connection the policy should refuse got {r:?}\n{}\n{}",
        m.za.diagnosis().await,
        m.zb.diagnosis().await
    );
    assert_eq!(
        m.echo.count(),
        seen,
        "{step}: the app saw a refused connection"
    );
    e2e::mesh::eventually(
        &format!("{step}: ztunnel B records a DENY: {decision}"),
        Duration::from_secs(5),
        || async { denials(&m.zb).await > denied && m.zb.log_text().contains(decision) },
    )
    .await;
}

async fn assert_passes(m: &Mesh, what: &str) {
    let seen = m.echo.count();
    let r = tokio::time::timeout(Duration::from_secs(10), echo_roundtrip(m.out, b"hello"))
        .await
        .expect("round trip in time");
    assert!(
        matches!(&r, Ok(b) if b == b"hello"),
        "{what}: the round trip failed: {r:?}\n{}\n{}",
        m.za.diagnosis().await,
        m.zb.diagnosis().await
    );
    assert_eq!(m.echo.count(), seen + 1, "{what}: the app saw it");
}

#[tokio::test]
async fn a_nacked_policy_denies() {
    let m = mesh().await;
    let key = |p: &Authorization| format!("{}/{}", p.namespace, p.name);

    // (a) No policy: the round trip works, and ztunnel B took its state
    // from the fake control plane (with the node's token) and ACKed it.
    assert_passes(&m, "no policy").await;
    let subs = m.ads.subscriptions();
    for t in [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL] {
        let s = subs
            .iter()
            .find(|s| s.type_url == t)
            .unwrap_or_else(|| panic!("no subscription to {t}: {subs:?}"));
        assert_eq!(s.proxy_id, "ztunnel~node-b");
        assert_eq!(
            s.token.as_deref(),
            Some(format!("Bearer {}", token_for("node-b")).as_str())
        );
    }
    assert!(
        m.ads.replies().iter().all(|r| r.error.is_none()),
        "{:?}",
        m.ads.replies()
    );

    // (b) An ALLOW for the server's namespace that cannot be read: NACKed,
    // and enforced as an ALLOW that matches nothing.
    let bad = unreadable_match();
    let g = m
        .ads
        .push(AUTHORIZATION_TYPE_URL, vec![fake_ads::policy(&bad)]);
    let r = m
        .ads
        .reply(AUTHORIZATION_TYPE_URL, g)
        .await
        .expect("answered");
    assert_nack(&r, &key(&bad), "no match type");
    assert_refused(
        &m,
        "(b) unreadable match",
        &format!("denied: no ALLOW policy matched ({})", key(&bad)),
    )
    .await;

    // (c) Next to a readable allow-all, a policy of an unknown action
    // (bad-match is removed): NACKed, and enforced as a DENY of everything
    // in its scope, which the allow-all cannot outweigh.
    let unknown = unknown_action();
    let everyone = allow_all("allow-all");
    let g = m.ads.push(
        AUTHORIZATION_TYPE_URL,
        vec![fake_ads::policy(&everyone), fake_ads::policy(&unknown)],
    );
    let r = m
        .ads
        .reply(AUTHORIZATION_TYPE_URL, g)
        .await
        .expect("answered");
    assert_nack(&r, &key(&unknown), "unknown action 7");
    assert!(
        !r.error.as_deref().unwrap_or_default().contains("allow-all"),
        "{r:?}"
    );
    let decision = format!("denied by DENY policy {}", key(&unknown));
    assert_refused(&m, "(c) unknown action", &decision).await;

    // On a new stream ztunnel B says it holds the refused policy under the
    // version "nacked" (no server sends that), so it is sent again, refused
    // again, and still denies.
    let g = m.ads.disconnect();
    let r = m
        .ads
        .reply(AUTHORIZATION_TYPE_URL, g)
        .await
        .expect("answered");
    assert_nack(&r, &key(&unknown), "unknown action 7");
    let subs = m.ads.subscriptions();
    let resub = subs
        .iter()
        .find(|s| s.type_url == AUTHORIZATION_TYPE_URL && s.generation >= g)
        .expect("resubscribed");
    assert_eq!(
        resub
            .initial_versions
            .get(&key(&unknown))
            .map(String::as_str),
        Some(mesh_core::xds::NACKED_VERSION),
        "{resub:?}"
    );
    assert_eq!(
        resub.initial_versions.get(&key(&everyone)),
        Some(&fake_ads::policy(&everyone).version),
        "{resub:?}"
    );
    assert_refused(&m, "(c) after a reconnect", &decision).await;

    // (c2) Bytes that do not decode, in the server's namespace, next to the
    // allow-all (the unknown action replaced by a second allow-all): NACKed,
    // and a DENY of everything in the namespace the name gives.
    let garbage = format!("{NS}/undecodable");
    let g = m.ads.push(
        AUTHORIZATION_TYPE_URL,
        vec![
            fake_ads::policy(&everyone),
            fake_ads::policy(&allow_all("unknown-action")),
            fake_ads::resource(&garbage, AUTHORIZATION_TYPE_URL, vec![0xff; 4]),
        ],
    );
    let r = m
        .ads
        .reply(AUTHORIZATION_TYPE_URL, g)
        .await
        .expect("answered");
    assert_nack(&r, &garbage, "");
    assert_refused(
        &m,
        "(c2) undecodable",
        &format!("denied by DENY policy {garbage}"),
    )
    .await;

    // (d) Everything readable again (the undecodable one is removed): ACKed,
    // and connections pass.
    let g = m.ads.push(
        AUTHORIZATION_TYPE_URL,
        vec![
            fake_ads::policy(&everyone),
            fake_ads::policy(&allow_all("unknown-action")),
        ],
    );
    let r = m
        .ads
        .reply(AUTHORIZATION_TYPE_URL, g)
        .await
        .expect("answered");
    assert!(r.error.is_none(), "expected an ACK, got {r:?}");
    assert_passes(&m, "all policies readable").await;

    m.ads.stop().await;
}
