//! The ztunnel L4 data path with real processes, real sockets and real TLS:
//! client -> ztunnel A (outbound) -> HBONE -> ztunnel B (inbound) -> server.

use std::net::SocketAddr;
use std::time::Duration;

use e2e::ca::TestCa;
use e2e::mesh::{
    Echo, Pod, Subnet, Svc, Ztunnel, ZtunnelSpec, ca_for, echo_roundtrip, eventually, state_yaml,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Mesh {
    _dir: tempfile::TempDir,
    _ca: TestCa,
    net: Subnet,
    client: Pod,
    server: Pod,
    echo: Echo,
    za: Ztunnel,
    zb: Ztunnel,
    /// The client's captured path to the server.
    out: SocketAddr,
}

const APP_PORT: u16 = 8080;

fn allow_only(principal: &str) -> String {
    format!(
        "- name: allow-one\n  namespace: default\n  scope: NAMESPACE\n  action: ALLOW\n  rules:\n  - clauses:\n    - matches:\n      - principals: [{{exact: {principal}}}]\n"
    )
}

const STRICT: &str = "- name: strict\n  namespace: istio-system\n  scope: GLOBAL\n  action: DENY\n  rules:\n  - clauses:\n    - matches:\n      - not_principals: [{presence: {}}]\n";

async fn mesh(policies: &str, extra_b: &str) -> Mesh {
    build(policies, "", extra_b, false).await
}

/// Client on node-a; the server on node-b, or with `same_node` on node-a
/// too, where node-a's ztunnel serves both (node-b's then serves nobody).
async fn build(policies: &str, extra_a: &str, extra_b: &str, same_node: bool) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let server_node = if same_node { "node-a" } else { "node-b" };
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let server = Pod::new("server", "default", "server", net.ip(2), server_node);
    let ca = ca_for(dir.path(), &[&client, &server]).await;
    let echo = Echo::start(net.addr(2, APP_PORT)).await;
    let state = state_yaml(&[&client, &server], &[], policies);
    let out = net.addr(1, 15001);
    let (a_serves, b_serves) = if same_node {
        (vec![client.ip, server.ip], vec![])
    } else {
        (vec![client.ip], vec![server.ip])
    };
    let b_plain = if same_node {
        vec![]
    } else {
        vec![(net.addr(2, 15006), net.addr(2, APP_PORT))]
    };
    let za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state.clone())
            .inbound(a_serves)
            .outbound(vec![(out, client.uid.clone(), net.addr(2, APP_PORT))])
            .extra(extra_a),
    )
    .await;
    let zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("zb", "node-b", net.ip(11), state)
            .inbound(b_serves)
            .plaintext(b_plain)
            .extra(extra_b),
    )
    .await;
    Mesh {
        _dir: dir,
        _ca: ca,
        net,
        client,
        server,
        echo,
        za,
        zb,
        out,
    }
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn metric_sum(text: &str, name: &str, must_contain: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && must_contain.iter().all(|s| l.contains(s)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn bytes_cross_the_mesh_both_ways_with_half_close() {
    let m = mesh("", "").await;
    for size in [1usize, 64 * 1024, 100 * 1024 * 1024] {
        let payload = pattern(size);
        let back =
            match tokio::time::timeout(Duration::from_secs(120), echo_roundtrip(m.out, &payload))
                .await
            {
                Ok(r) => r.expect("round trip"),
                Err(_) => panic!(
                    "{size} bytes did not come back within 120 s\n{}\n{}",
                    m.za.diagnosis().await,
                    m.zb.diagnosis().await
                ),
            };
        assert_eq!(back.len(), payload.len(), "size {size}");
        assert!(back == payload, "bytes differ for size {size}");
    }
    // Both sides saw it as mutual TLS between the two identities. The
    // proxies record a connection when they finish it, which may be just
    // after the client has its bytes.
    let src = format!("source_principal=\"{}\"", m.client.identity());
    let dst = format!("destination_principal=\"{}\"", m.server.identity());
    eventually(
        "metrics and access log record the transfer",
        Duration::from_secs(10),
        || async {
            let text = m.zb.metrics_text().await;
            let sent = metric_sum(
                &text,
                "istio_tcp_sent_bytes_total",
                &[&src, &dst, "reporter=\"destination\"", "mutual_tls"],
            );
            let log = m.za.log_text();
            sent >= 100 * 1024 * 1024
                && log.contains("connection complete")
                && log.contains("bytes_sent=104857600")
        },
    )
    .await;
}

/// A process's CPU time so far (utime + stime, clock ticks).
fn cpu_ticks(pid: Option<u32>) -> u64 {
    let pid = pid.expect("the ztunnel runs");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("its stat");
    // The fields after the command's closing parenthesis; utime and stime
    // are the 14th and 15th of the line.
    let rest = &stat[stat.rfind(')').expect("a comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[tokio::test]
async fn busy_polling_shards_carry_requests_and_answers() {
    // Both ends spin after each HBONE turn (`busy_poll_us`): a connection's
    // exchanges still arrive whole and in order, and the spin ends.
    let extra = "worker_threads: 2\nbusy_poll_us: 150\n";
    let m = build("", extra, extra, false).await;
    let mut s = TcpStream::connect(m.out).await.unwrap();
    for i in 0..200u32 {
        let msg = format!("request {i:05}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, msg.as_bytes());
    }
    drop(s);
    // Idle again, the shards sleep: each ztunnel's CPU time stops growing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ticks = || [cpu_ticks(m.za.pid()), cpu_ticks(m.zb.pid())];
    let before = ticks();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = ticks();
    for (b, a) in before.iter().zip(after) {
        assert!(a - b <= 10, "an idle ztunnel used {} ticks in 0.5 s", a - b);
    }
}

#[tokio::test]
async fn concurrent_connections_share_a_few_pooled_connections() {
    // Two shards, whatever the machine: the pool's 4 connections per
    // destination are split over them, 2 each.
    let m = build("", "worker_threads: 2\n", "", false).await;
    assert_eq!(m.za.config_dump().await["process"]["runtime"], "sharded");
    let mut held = Vec::new();
    let mut opens = Vec::new();
    for _ in 0..200 {
        let out = m.out;
        opens.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(out).await.unwrap();
            s.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.unwrap();
            s
        }));
    }
    for o in opens {
        held.push(o.await.unwrap());
    }
    let dump = m.za.config_dump().await;
    let pooled = dump["pool"]["connections"].as_u64().unwrap();
    assert!(
        (2..=4).contains(&pooled),
        "200 streams over {pooled} HTTP/2 connections"
    );
    // Each shard dialled its own: a stream never rides a connection that
    // another thread drives (all on one shard: 1 in 2^199).
    let per_shard = dump["pool"]["per_shard"].as_array().unwrap();
    assert_eq!(per_shard.len(), 2, "{dump}");
    assert!(
        per_shard
            .iter()
            .all(|n| (1..=2).contains(&n.as_u64().unwrap())),
        "pooled connections per shard: {per_shard:?}"
    );
    let inbound = m.zb.config_dump().await["connections"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(inbound, 200);
    drop(held);
}

#[tokio::test]
async fn a_vip_spreads_connections_over_its_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let svc = Svc {
        name: "echo".into(),
        namespace: "default".into(),
        vip: net.ip(100),
        port: 80,
        target_port: APP_PORT,
    };
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let mut s1 = Pod::new("echo-1", "default", "echo", net.ip(2), "node-b");
    let mut s2 = Pod::new("echo-2", "default", "echo", net.ip(3), "node-b");
    s1.services.push((svc.key(), 80, APP_PORT));
    s2.services.push((svc.key(), 80, APP_PORT));
    let ca = ca_for(dir.path(), &[&client, &s1, &s2]).await;
    let (e1, e2) = (
        Echo::start(net.addr(2, APP_PORT)).await,
        Echo::start(net.addr(3, APP_PORT)).await,
    );
    let state = state_yaml(&[&client, &s1, &s2], &[&svc], "");
    let out = net.addr(1, 15001);
    let _za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state.clone()).outbound(vec![(
            out,
            client.uid.clone(),
            SocketAddr::new(svc.vip, 80),
        )]),
    )
    .await;
    let _zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("zb", "node-b", net.ip(11), state).inbound(vec![s1.ip, s2.ip]),
    )
    .await;
    for _ in 0..20 {
        assert_eq!(echo_roundtrip(out, b"hello").await.unwrap(), b"hello");
    }
    assert_eq!(
        (e1.count(), e2.count()),
        (10, 10),
        "round robin over two endpoints"
    );
}

#[tokio::test]
async fn a_denied_source_is_closed_with_401_and_a_deny_flag() {
    let m = mesh(&allow_only("cluster.local/ns/default/sa/someone-else"), "").await;
    let r = echo_roundtrip(m.out, b"secret").await;
    assert!(
        r.map(|b| b.is_empty()).unwrap_or(true),
        "denied connection got data back"
    );
    assert_eq!(m.echo.count(), 0, "the app never saw the connection");
    eventually(
        "DENY flag on both sides",
        Duration::from_secs(5),
        || async {
            let deny = ["response_flags=\"DENY\""];
            let b = m.zb.metrics_text().await;
            let a = m.za.metrics_text().await;
            metric_sum(&b, "istio_tcp_connections_closed_total", &deny) >= 1
                && metric_sum(&a, "istio_tcp_connections_closed_total", &deny) >= 1
                && m.za.log_text().contains("401 Unauthorized")
        },
    )
    .await;
    let log = m.zb.log_text();
    assert!(
        log.contains("denied: no ALLOW policy matched (default/allow-one)"),
        "{log}"
    );
}

#[tokio::test]
async fn an_allowed_principal_passes_and_strict_refuses_plaintext() {
    let m = mesh(&allow_only("cluster.local/ns/default/sa/client"), "").await;
    assert_eq!(echo_roundtrip(m.out, b"ok").await.unwrap(), b"ok");

    // Plaintext from outside the mesh: no identity, so the ALLOW does not match.
    let plain = m.net.addr(2, 15006);
    assert!(
        echo_roundtrip(plain, b"x")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    );

    // Without policies plaintext passes; with STRICT it is refused.
    m.zb.write_state(&state_yaml(&[&m.client, &m.server], &[], ""));
    eventually("policy removed", Duration::from_secs(5), || async {
        echo_roundtrip(plain, b"plain")
            .await
            .map(|b| b == b"plain")
            .unwrap_or(false)
    })
    .await;
    m.zb.write_state(&state_yaml(&[&m.client, &m.server], &[], STRICT));
    eventually("STRICT applied", Duration::from_secs(5), || async {
        echo_roundtrip(plain, b"plain")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    })
    .await;
    // mTLS traffic still passes under STRICT.
    assert_eq!(echo_roundtrip(m.out, b"mtls").await.unwrap(), b"mtls");
}

#[tokio::test]
async fn a_policy_change_closes_connections_it_now_denies() {
    let m = mesh("", "").await;
    let mut s = TcpStream::connect(m.out).await.unwrap();
    s.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();

    m.zb.write_state(&state_yaml(&[&m.client, &m.server], &[], DENY_CLIENT));
    assert_closed(&mut s).await;
    eventually("revocation recorded", Duration::from_secs(5), || async {
        m.zb.log_text()
            .contains("now denied by DENY policy default/deny-client")
    })
    .await;
}

#[tokio::test]
async fn an_unknown_destination_passes_through() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let ca = ca_for(dir.path(), &[&client]).await;
    let outside = Echo::start(net.addr(50, 9000)).await;
    let out = net.addr(1, 15001);
    let za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state_yaml(&[&client], &[], ""))
            .outbound(vec![(out, client.uid.clone(), outside.addr)]),
    )
    .await;
    assert_eq!(echo_roundtrip(out, b"out").await.unwrap(), b"out");
    let text = za.metrics_text().await;
    assert!(
        metric_sum(
            &text,
            "istio_tcp_connections_opened_total",
            &["connection_security_policy=\"unknown\""]
        ) >= 1
    );
}

#[tokio::test]
async fn a_peer_with_the_wrong_identity_is_refused() {
    let m = mesh("", "").await;
    // ztunnel A now believes the server runs as another service account.
    let mut impostor = m.server.clone();
    impostor.service_account = "payments".into();
    m.za.write_state(&state_yaml(&[&m.client, &impostor], &[], ""));
    eventually("handshake refused", Duration::from_secs(5), || async {
        echo_roundtrip(m.out, b"x")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
            && m.za.log_text().contains("is not one of the expected")
    })
    .await;
    // From then on nothing reaches the app.
    let before = m.echo.count();
    assert!(
        echo_roundtrip(m.out, b"y")
            .await
            .map(|b| b.is_empty())
            .unwrap_or(true)
    );
    assert_eq!(m.echo.count(), before);
}

/// A stream that echoes 64 KiB chunks until told to stop; Err if it breaks.
async fn long_stream(
    addr: SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let chunk = vec![7u8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..1_000_000 {
        if stop.is_cancelled() {
            return Ok(());
        }
        s.write_all(&chunk).await?;
        let mut got = 0;
        while got < chunk.len() {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(std::io::Error::other("closed"));
            }
            got += n;
        }
    }
    Ok(())
}

#[tokio::test]
async fn killing_the_server_ztunnel_fails_only_its_streams() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let b = Pod::new("server-b", "default", "server", net.ip(2), "node-b");
    let c = Pod::new("server-c", "default", "other", net.ip(3), "node-c");
    let ca = ca_for(dir.path(), &[&client, &b, &c]).await;
    let (_eb, _ec) = (
        Echo::start(net.addr(2, APP_PORT)).await,
        Echo::start(net.addr(3, APP_PORT)).await,
    );
    let state = state_yaml(&[&client, &b, &c], &[], "");
    let (to_b, to_c) = (net.addr(1, 15001), net.addr(1, 15002));
    let _za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state.clone()).outbound(vec![
            (to_b, client.uid.clone(), net.addr(2, APP_PORT)),
            (to_c, client.uid.clone(), net.addr(3, APP_PORT)),
        ]),
    )
    .await;
    let node = |name: &'static str, node: &'static str, host: u8, pod: &Pod| ZtunnelSpec {
        name,
        node,
        ip: net.ip(host),
        inbound_ips: vec![pod.ip],
        outbound: vec![],
        plaintext: vec![],
        state_yaml: state.clone(),
        xds_address: None,
        extra: "",
    };
    let mut zb = Ztunnel::start(dir.path(), &ca, node("zb", "node-b", 11, &b)).await;
    let _zc = Ztunnel::start(dir.path(), &ca, node("zc", "node-c", 12, &c)).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let stream_b = tokio::spawn(long_stream(to_b, stop.clone()));
    let stream_c = tokio::spawn(long_stream(to_c, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    zb.kill();

    let r = tokio::time::timeout(Duration::from_secs(30), stream_b)
        .await
        .expect("B's stream fails promptly");
    assert!(
        r.unwrap().is_err(),
        "the stream through the dead ztunnel should fail"
    );
    // C's stream, through the same ztunnel A, is untouched.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stream_c.is_finished(),
        "the stream to C should still be running"
    );
    stop.cancel();
    stream_c
        .await
        .unwrap()
        .expect("the stream to C never broke");

    zb.spawn().await;
    eventually(
        "new connections to B succeed",
        Duration::from_secs(10),
        || async {
            echo_roundtrip(to_b, b"again")
                .await
                .map(|b| b == b"again")
                .unwrap_or(false)
        },
    )
    .await;
}

#[tokio::test]
async fn sigterm_drains_then_exits_zero() {
    let mut m = mesh("", "drain_timeout: 2s\n").await;
    let mut s = TcpStream::connect(m.out).await.unwrap();
    s.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();

    m.zb.sigterm();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The established connection keeps working during the drain...
    s.write_all(b"b").await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    // ...new ones are not accepted...
    assert!(TcpStream::connect(m.net.addr(2, 15008)).await.is_err());
    // ...and past the deadline the rest is closed and the process exits 0.
    let status =
        m.zb.wait_exit(Duration::from_secs(10))
            .await
            .expect("exited");
    assert!(status.success(), "{status}");
    let n = s.read(&mut [0u8; 4]).await;
    assert!(matches!(n, Ok(0) | Err(_)));
    let log = m.zb.log_text();
    assert!(log.contains("drain deadline passed"), "{log}");
}

#[tokio::test]
async fn a_reset_on_one_end_is_a_reset_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let net = Subnet::unique();
    let client = Pod::new("client", "default", "client", net.ip(1), "node-a");
    let server = Pod::new("server", "default", "server", net.ip(2), "node-b");
    let ca = ca_for(dir.path(), &[&client, &server]).await;
    // An app that reads one byte and then aborts its connection (RST).
    let app = tokio::net::TcpListener::bind(net.addr(2, APP_PORT))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let mut b = [0u8; 1];
            let _ = s.read_exact(&mut b).await;
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let state = state_yaml(&[&client, &server], &[], "");
    let out = net.addr(1, 15001);
    let _za = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("za", "node-a", net.ip(10), state.clone()).outbound(vec![(
            out,
            client.uid.clone(),
            net.addr(2, APP_PORT),
        )]),
    )
    .await;
    let _zb = Ztunnel::start(
        dir.path(),
        &ca,
        ZtunnelSpec::new("zb", "node-b", net.ip(11), state).inbound(vec![server.ip]),
    )
    .await;
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("in time");
    match r {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("expected a reset, got a clean read of {n} bytes"),
    }
}

/// Client and server served by one ztunnel (node-a holds both).
async fn same_node(extra_a: &str) -> Mesh {
    build("", extra_a, "", true).await
}

/// A DENY policy for the client's identity, in the destination's namespace.
const DENY_CLIENT: &str = "- name: deny-client\n  namespace: default\n  scope: NAMESPACE\n  action: DENY\n  rules:\n  - clauses:\n    - matches:\n      - principals: [{suffix: /sa/client}]\n";

/// Waits (at most 5 s) for the mesh to close `s`: EOF or a reset.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "connection stayed open: {n:?}");
}

/// (direction, protocol) of each connection the ztunnel holds.
async fn held_connections(z: &Ztunnel) -> Vec<(String, String)> {
    let dump = z.config_dump().await;
    let mut v: Vec<(String, String)> = dump["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["direction"].as_str().unwrap_or("?").to_string(),
                c["protocol"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

async fn open_held(out: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(out).await.unwrap();
    s.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    s
}

#[tokio::test]
async fn a_same_node_connection_skips_the_tunnel_and_keeps_policy_and_telemetry() {
    let m = same_node("").await;
    let payload = pattern(4 * 1024 * 1024);
    let back = tokio::time::timeout(Duration::from_secs(60), echo_roundtrip(m.out, &payload))
        .await
        .expect("in time")
        .expect("round trip");
    assert!(back == payload, "bytes differ");

    // Held open: an outbound and an inbound half, no tunnel, no pool.
    let mut s = open_held(m.out).await;
    let conns = held_connections(&m.za).await;
    assert_eq!(
        conns,
        vec![
            ("inbound".to_string(), "LOCAL".to_string()),
            ("outbound".to_string(), "LOCAL".to_string())
        ]
    );
    assert_eq!(m.za.config_dump().await["pool"]["connections"], 0);

    // Both reporters saw mutual identities and the bytes.
    let src = format!("source_principal=\"{}\"", m.client.identity());
    let dst = format!("destination_principal=\"{}\"", m.server.identity());
    on_both_reporters(
        &m.za,
        "istio_tcp_sent_bytes_total",
        &[&src, &dst, "mutual_tls"],
        payload.len() as u64,
    )
    .await;

    // A policy that now denies the source closes the held connection...
    m.za.write_state(&state_yaml(&[&m.client, &m.server], &[], DENY_CLIENT));
    assert_closed(&mut s).await;
    // ...and refuses new ones before the app sees them, flagged DENY.
    let seen = m.echo.count();
    let r = echo_roundtrip(m.out, b"secret").await;
    assert!(r.map(|b| b.is_empty()).unwrap_or(true), "denied, got data");
    assert_eq!(m.echo.count(), seen, "the app saw a denied connection");
    on_both_reporters(
        &m.za,
        "istio_tcp_connections_closed_total",
        &["response_flags=\"DENY\""],
        1,
    )
    .await;
    let log = m.za.log_text();
    assert!(
        log.contains("now denied by DENY policy default/deny-client"),
        "{log}"
    );
    assert!(log.contains("same-node connection denied"), "{log}");
    assert!(held_connections(&m.za).await.is_empty());
}

#[tokio::test]
async fn with_the_fast_path_off_same_node_connections_use_hbone() {
    // One runtime thread as well: both ends of the tunnel then share it.
    let m = same_node("same_node_fast_path: false\nworker_threads: 1\n").await;
    assert_eq!(
        m.za.config_dump().await["process"]["worker_threads"],
        1,
        "the runtime has the configured threads"
    );
    assert_eq!(echo_roundtrip(m.out, b"hi").await.unwrap(), b"hi");
    let _s = open_held(m.out).await;
    assert_eq!(
        held_connections(&m.za).await,
        vec![
            ("inbound".to_string(), "HBONE".to_string()),
            ("outbound".to_string(), "HBONE".to_string())
        ]
    );
    assert_eq!(m.za.config_dump().await["pool"]["connections"], 1);
}

/// Waits (at most 10 s) until `metric`, summed over the series with all
/// of `labels`, reaches `min` for the source and the destination reporter
/// alike: one ztunnel reports both halves of a same-node connection.
async fn on_both_reporters(z: &Ztunnel, metric: &str, labels: &[&str], min: u64) {
    eventually(
        &format!("{metric} >= {min} for both reporters"),
        Duration::from_secs(10),
        || async {
            let text = z.metrics_text().await;
            [Reporter::Source, Reporter::Destination].iter().all(|r| {
                let mut with = labels.to_vec();
                with.push(r.label());
                metric_sum(&text, metric, &with) >= min
            })
        },
    )
    .await;
}

enum Reporter {
    Source,
    Destination,
}

impl Reporter {
    fn label(&self) -> &'static str {
        match self {
            Reporter::Source => "reporter=\"source\"",
            Reporter::Destination => "reporter=\"destination\"",
        }
    }
}
