//! The DNS proxy on real sockets: a pod's queries against the proxy's UDP
//! and TCP listeners, names outside the mesh forwarded to real (loopback)
//! nameservers that answer over UDP and TCP.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use ztunnel::dns::{DnsMetrics, DnsProxy, Limits};
use ztunnel::state::{LocalConfig, ProxyState};

const STATE: &str = r#"
workloads:
- {uid: "c//Pod/shop/db-0", name: db-0, namespace: shop, addresses: [10.1.1.10], service_account: db, node: n1,
   services: {"shop/db.shop.svc.cluster.local": [{service_port: 5432, target_port: 5432}]}}
- {uid: "c//Pod/shop/db-1", name: db-1, namespace: shop, addresses: [10.1.1.11], service_account: db, node: n1, status: UNHEALTHY,
   services: {"shop/db.shop.svc.cluster.local": [{service_port: 5432, target_port: 5432}]}}
- {uid: "c//Pod/shop/web", name: web, namespace: shop, addresses: [10.1.1.20], service_account: web, node: n1,
   services: {"shop/web.shop.svc.cluster.local": [{service_port: 80, target_port: 8080}]}}
services:
- {name: db, namespace: shop, hostname: db.shop.svc.cluster.local, addresses: [], ports: [{service_port: 5432, target_port: 5432}]}
- {name: web, namespace: shop, hostname: web.shop.svc.cluster.local, addresses: [10.2.0.5], ports: [{service_port: 80, target_port: 8080}]}
"#;

fn state(extra_workloads: &str) -> ProxyState {
    let yaml = STATE.replacen("services:\n", &format!("{extra_workloads}services:\n"), 1);
    let local: LocalConfig = serde_yaml::from_str(&yaml).expect("state yaml");
    let s = ProxyState::default();
    s.replace(local.to_updates("cluster.local", "test").expect("updates"));
    s
}

/// A nameserver on loopback, UDP and TCP on one port. `big.example.` is
/// too large for UDP (answered truncated there), `nx.example.` does not
/// exist, `slow*.example.` take a second; every question it gets is logged.
struct Upstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

fn upstream_answer(query: &Message, udp: bool) -> Message {
    let mut resp = Message::response(query.metadata.id, OpCode::Query);
    resp.metadata.recursion_available = true;
    resp.queries = query.queries.clone();
    let q = &query.queries[0];
    let name = q.name().to_ascii();
    let a = |i: u8| {
        Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A(Ipv4Addr::new(10, 9, 0, i))),
        )
    };
    match name.as_str() {
        "big.example." if udp => resp.metadata.truncation = true,
        "big.example." => {
            resp.add_answers((1..=60).map(a));
        }
        n if n == "one.example." || n.starts_with("slow") => {
            resp.add_answer(a(1));
        }
        // 2 KiB of TXT: 8 strings of 255 bytes and one of 8.
        "txt.example." if udp => resp.metadata.truncation = true,
        "txt.example." => {
            let strings: Vec<String> = (0..9)
                .map(|i| {
                    if i < 8 {
                        "t".repeat(255)
                    } else {
                        "t".repeat(8)
                    }
                })
                .collect();
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::TXT(TXT::new(strings)),
            ));
        }
        _ => {
            resp.metadata.response_code = ResponseCode::NXDomain;
            let soa = SOA::new(
                Name::from_ascii("ns.example.").expect("name"),
                Name::from_ascii("admin.example.").expect("name"),
                1,
                60,
                60,
                60,
                30,
            );
            resp.add_authority(Record::from_rdata(
                Name::from_ascii("example.").expect("name"),
                60,
                RData::SOA(soa),
            ));
        }
    }
    resp
}

async fn upstream() -> Upstream {
    let log = Arc::new(Mutex::new(Vec::new()));
    // UDP first, then TCP on the same port (retry on the rare clash).
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("addr");
    let l = log.clone();
    tokio::spawn(async move {
        let udp = Arc::new(udp);
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = udp.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let name = q.queries[0].name().to_ascii();
            l.lock().expect("log").push(format!("udp {name}"));
            let udp = udp.clone();
            tokio::spawn(async move {
                if name.starts_with("slow") {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                let bytes = upstream_answer(&q, true).to_vec().expect("encode");
                let _ = udp.send_to(&bytes, peer).await;
            });
        }
    });
    let l = log.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = tcp.accept().await {
            let l = l.clone();
            tokio::spawn(async move {
                while let Ok(len) = s.read_u16().await {
                    let mut raw = vec![0u8; len as usize];
                    if s.read_exact(&mut raw).await.is_err() {
                        return;
                    }
                    let Ok(q) = Message::from_vec(&raw) else {
                        return;
                    };
                    l.lock()
                        .expect("log")
                        .push(format!("tcp {}", q.queries[0].name().to_ascii()));
                    let bytes = upstream_answer(&q, false).to_vec().expect("encode");
                    let _ = s.write_u16(bytes.len() as u16).await;
                    let _ = s.write_all(&bytes).await;
                }
            });
        }
    });
    Upstream { addr, log }
}

/// The proxy's UDP and TCP listeners for one pod (same port).
struct Proxy {
    addr: SocketAddr,
    metrics: DnsMetrics,
}

async fn proxy(state: ProxyState, upstreams: &[SocketAddr], limits: Limits) -> Proxy {
    let metrics = DnsMetrics::default();
    let dns = DnsProxy::new(state, "cluster.local", upstreams, metrics.clone(), limits);
    let (udp, tcp) = loop {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        let port = udp.local_addr().expect("addr").port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            break (udp, tcp);
        }
    };
    let addr = udp.local_addr().expect("addr");
    tokio::spawn(dns.clone().serve_udp(udp));
    tokio::spawn(dns.serve_tcp(tcp));
    Proxy { addr, metrics }
}

fn query(name: &str, qtype: RecordType, edns: bool) -> Message {
    let mut m = Message::new(0x4242, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
    }
    m
}

async fn ask_udp(server: SocketAddr, q: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client");
    sock.send_to(&q.to_vec().expect("encode"), server)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("a UDP answer within 10 s")
        .expect("recv");
    Message::from_vec(&buf[..n]).expect("answer parses")
}

async fn ask_tcp(server: SocketAddr, q: &Message) -> Message {
    let mut s = TcpStream::connect(server).await.expect("connect");
    let bytes = q.to_vec().expect("encode");
    s.write_u16(bytes.len() as u16).await.expect("write");
    s.write_all(&bytes).await.expect("write");
    let len = tokio::time::timeout(Duration::from_secs(10), s.read_u16())
        .await
        .expect("a TCP answer within 10 s")
        .expect("read");
    let mut raw = vec![0u8; len as usize];
    s.read_exact(&mut raw).await.expect("read");
    Message::from_vec(&raw).expect("answer parses")
}

fn ips(m: &Message) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A headless Service answers with its ready endpoints, and each of them
/// by its per-pod name, as the cluster DNS does for a StatefulSet.
#[tokio::test]
async fn a_headless_service_answers_with_its_ready_endpoints_and_their_pod_names() {
    let p = proxy(state(""), &[], Limits::default()).await;
    let r = ask_udp(
        p.addr,
        &query("db.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        ips(&r),
        vec![ip("10.1.1.10")],
        "the unhealthy db-1 is left out"
    );
    let r = ask_udp(
        p.addr,
        &query("db-0.db.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), vec![ip("10.1.1.10")]);
    // A Service with a VIP answers with the VIP, and publishes no pod names.
    let r = ask_udp(
        p.addr,
        &query("web.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), vec![ip("10.2.0.5")]);
    assert!(r.metadata.authoritative);
    // A search-path expansion cannot be a Service: NXDOMAIN at once.
    let r = ask_udp(
        p.addr,
        &query("example.com.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
}

/// An answer too large for UDP comes back truncated from the upstream; the
/// proxy asks again over TCP and the pod gets every record (over TCP; over
/// UDP within the size the pod advertised, else truncated).
#[tokio::test]
async fn a_truncated_upstream_answer_is_retried_over_tcp() {
    let up = upstream().await;
    let p = proxy(state(""), &[up.addr], Limits::default()).await;
    let r = ask_tcp(p.addr, &query("big.example.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&r).len(), 60, "every record, fetched over TCP");
    let log = up.log.lock().expect("log").clone();
    assert!(log.contains(&"tcp big.example.".to_string()), "{log:?}");
    // Over UDP without EDNS the 60 records do not fit 512 bytes: truncated,
    // so the pod's resolver retries on TCP.
    let r = ask_udp(p.addr, &query("big.example.", RecordType::A, false)).await;
    assert!(r.metadata.truncation, "TC set");
    assert!(r.answers.is_empty());
    // With EDNS 4096 they fit the proxy's 1232 bytes.
    let r = ask_udp(p.addr, &query("big.example.", RecordType::A, true)).await;
    assert!(!r.metadata.truncation);
    assert_eq!(ips(&r).len(), 60);
}

/// The second nameserver answers when the first does not; NXDOMAIN and its
/// SOA come through; a repeated question is answered from the cache.
#[tokio::test]
async fn every_nameserver_is_tried_and_answers_are_cached() {
    let up = upstream().await;
    // A port with nothing behind it (bound, then closed).
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        s.local_addr().expect("addr")
    };
    let p = proxy(state(""), &[dead, up.addr], Limits::default()).await;
    let r = ask_udp(p.addr, &query("one.example.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert_eq!(ips(&r), vec![ip("10.9.0.1")]);
    let r = ask_udp(p.addr, &query("nx.example.", RecordType::A, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    assert!(
        r.authorities
            .iter()
            .any(|a| a.record_type() == RecordType::SOA),
        "the SOA comes with the NXDOMAIN"
    );
    let before = up.log.lock().expect("log").len();
    let r = ask_udp(p.addr, &query("one.example.", RecordType::A, false)).await;
    assert_eq!(ips(&r), vec![ip("10.9.0.1")]);
    assert_eq!(
        up.log.lock().expect("log").len(),
        before,
        "answered from the cache"
    );
    // An unknown name under the cluster domain is the upstream's to answer
    // (an ExternalName Service, a Service the mesh does not carry).
    let r = ask_udp(
        p.addr,
        &query("legacy.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    let log = up.log.lock().expect("log").clone();
    assert!(
        log.iter()
            .any(|l| l.ends_with("legacy.shop.svc.cluster.local.")),
        "{log:?}"
    );
    assert!(p.metrics.upstream_requests.get() >= 3);
}

/// One pod cannot hold the proxy: its TCP connections and UDP queries in
/// flight are bounded, and an idle TCP connection is closed.
#[tokio::test]
async fn a_pods_share_of_the_proxy_is_bounded() {
    let up = upstream().await;
    let limits = Limits {
        udp_in_flight: 1,
        tcp_connections: 1,
        tcp_idle: Duration::from_millis(500),
    };
    let p = proxy(state(""), &[up.addr], limits).await;
    // The first connection holds the only slot; the second is closed.
    let _held = TcpStream::connect(p.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = TcpStream::connect(p.addr).await.expect("connect");
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut b))
        .await
        .expect("closed within 5 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the second connection is closed");
    // The held one goes after its idle time, and the slot is free again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let r = ask_tcp(
        p.addr,
        &query("web.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), vec![ip("10.2.0.5")]);

    // UDP: one slow query in flight; a second one at once is dropped.
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client");
    for name in ["slow.example.", "one.example."] {
        let q = query(name, RecordType::A, false);
        sock.send_to(&q.to_vec().expect("encode"), p.addr)
            .await
            .expect("send");
    }
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("the slow answer")
        .expect("recv");
    let r = Message::from_vec(&buf[..n]).expect("parses");
    assert_eq!(r.queries[0].name().to_ascii(), "slow.example.");
    assert_eq!(
        p.metrics.dropped.get(),
        2,
        "one TCP connection and one UDP query dropped"
    );
}

/// A 2 KiB TXT record: truncated by the upstream over UDP, fetched over
/// TCP, and carried whole to a pod that asks over TCP.
#[tokio::test]
async fn a_2_kib_txt_answer_comes_over_tcp() {
    let up = upstream().await;
    let p = proxy(state(""), &[up.addr], Limits::default()).await;
    let r = ask_tcp(p.addr, &query("txt.example.", RecordType::TXT, false)).await;
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    let len: usize = r
        .answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::TXT(t) => Some(t.txt_data.iter().map(|d| d.len()).sum::<usize>()),
            _ => None,
        })
        .sum();
    assert_eq!(len, 8 * 255 + 8);
}

/// One pod sends 10 000 queries within about a second (names that take
/// the upstream a second each, so they pile up); another pod on the same
/// proxy still gets its answers, and so does the flooding pod afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_pod_does_not_starve_the_others() {
    let up = upstream().await;
    let metrics = DnsMetrics::default();
    let dns = DnsProxy::new(
        state(""),
        "cluster.local",
        &[up.addr],
        metrics.clone(),
        Limits::default(),
    );
    let mut socks = Vec::new();
    for _ in 0..2 {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("udp");
        socks.push(sock.local_addr().expect("addr"));
        tokio::spawn(dns.clone().serve_udp(sock));
    }
    let (flooded, quiet) = (socks[0], socks[1]);
    let flooder = tokio::spawn(async move {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client");
        let start = std::time::Instant::now();
        for i in 0..10_000u32 {
            let q = query(&format!("slow{}.example.", i % 50), RecordType::A, false);
            let _ = sock.send_to(&q.to_vec().expect("encode"), flooded).await;
            if i % 100 == 0 {
                tokio::task::yield_now().await;
            }
        }
        start.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = std::time::Instant::now();
    let r = ask_udp(
        quiet,
        &query("web.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), vec![ip("10.2.0.5")]);
    let r = ask_udp(quiet, &query("one.example.", RecordType::A, false)).await;
    assert_eq!(ips(&r), vec![ip("10.9.0.1")]);
    let quiet_took = t.elapsed();
    let sent_in = flooder.await.expect("flooder");
    println!(
        "10 000 queries sent in {sent_in:?}; the other pod answered in {quiet_took:?}; dropped {}",
        metrics.dropped.get()
    );
    assert!(metrics.dropped.get() > 0, "the flooding pod hit its limit");
    // And the flooding pod is answered again once it stops.
    let r = ask_udp(
        flooded,
        &query("web.shop.svc.cluster.local.", RecordType::A, false),
    )
    .await;
    assert_eq!(ips(&r), vec![ip("10.2.0.5")]);
}
