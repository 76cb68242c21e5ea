//! The app sees its client's address: the destination's ztunnel dials the
//! app inside the pod from the client's IP (a transparent socket, with the
//! app's replies routed back to it inside the pod), so the app's
//! getpeername names the client pod on a cross-node HBONE connection, on
//! the same-node fast path, and for a plaintext client outside the mesh.
//! With `original_source: false` the app sees its own pod's address, as
//! before.

use std::time::Duration;

use e2e::ca::{TRUST_DOMAIN, write_lab_cert};
use e2e::lab::Down as Guard;
use e2e::lab::{Lab, TEST_IDS};
use e2e::mesh::eventually;
use mesh_core::identity::Identity;

fn deployment(ns: &str, name: &str, replicas: u32, args: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: app, image: labapp, args: {args}}}]\n---\n"
    )
}

/// The `peer=` address the HTTP echo at `to` reports for a GET from the
/// pod `from`: its accepted socket's getpeername.
fn peer_seen(lab: &Lab, from: &str, to: &str) -> Option<String> {
    let bin = e2e::mesh::binary("labapp");
    let url = format!("http://{to}:8080/");
    let out = lab.exec(from, &[bin.to_str()?, "get", &url]).ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let peer = text.lines().find_map(|l| l.strip_prefix("peer="))?;
    let ip = peer.rsplit_once(':').map(|(ip, _)| ip)?;
    Some(ip.trim_matches(['[', ']']).to_string())
}

/// The first `peer=` the echo at `to` reports for a GET from `from`, once
/// it answers (within 30 s).
async fn peer_once_answered(lab: &Lab, what: &str, from: &str, to: &str) -> Option<String> {
    let mut seen = None;
    eventually(
        &format!("{what}: the app answers"),
        Duration::from_secs(30),
        || {
            seen = peer_seen(lab, from, to);
            std::future::ready(seen.is_some())
        },
    )
    .await;
    seen
}

/// A running lab; taken down before its directory goes.
struct Running {
    g: Guard,
    _dir: tempfile::TempDir,
}

/// A two-node lab: the HTTP echo on both nodes, a captured client and a
/// plain one (outside the mesh) on node-1.
async fn lab_with(ztunnel_extra: &str) -> Running {
    lab_with_agent(ztunnel_extra, None).await
}

/// [`lab_with`], the node agents running with this `PATH`.
async fn lab_with_agent(ztunnel_extra: &str, agent_path: Option<String>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    lab.state.ztunnel_extra = ztunnel_extra.to_string();
    lab.state.agent_path = agent_path;
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n");
    docs.push_str(&deployment("shop", "echo", 2, "[http-echo]")); // node-1, node-2
    docs.push_str(&deployment("shop", "client", 1, "[sleep]")); // node-1
    docs.push_str(&deployment("legacy", "filler", 1, "[sleep]")); // node-2
    docs.push_str(&deployment("legacy", "plain", 1, "[sleep]")); // node-1
    docs.push_str(&deployment("shop", "tcpecho", 1, "[tcp-echo]"));
    g.0.apply(e2e::lab::parse_docs(&docs).unwrap())
        .await
        .unwrap();
    Running { g, _dir: dir }
}

#[tokio::test]
async fn the_app_sees_its_clients_address() {
    let run = lab_with("").await;
    let lab = &run.g.0;
    let ip = |k: &str| lab.pod(k).unwrap().ip.clone();
    let (echo0, echo1, client, plain) = (
        ip("shop/echo-0"),
        ip("shop/echo-1"),
        ip("shop/client-0"),
        ip("legacy/plain-0"),
    );
    assert_eq!(lab.pod("shop/echo-0").unwrap().node, "node-1");
    assert_eq!(lab.pod("shop/echo-1").unwrap().node, "node-2");
    assert_eq!(lab.pod("shop/client-0").unwrap().node, "node-1");
    assert!(!lab.pod("legacy/plain-0").unwrap().captured);

    // Cross-node (HBONE into echo-1's pod) and same-node (the fast path
    // into echo-0's): the app's peer is the client pod.
    for (what, to) in [("cross-node", &echo1), ("same-node", &echo0)] {
        let seen = peer_once_answered(lab, what, "shop/client-0", to).await;
        assert_eq!(seen.as_deref(), Some(client.as_str()), "{what}");
    }
    // A plaintext client outside the mesh, in through 15006.
    assert_eq!(
        peer_seen(lab, "legacy/plain-0", &echo1).as_deref(),
        Some(plain.as_str()),
        "plaintext"
    );

    // Over IPv6 the same (the pod's reply routing is in both families):
    // cross-node, same-node and plaintext, the app's peer is the client's
    // IPv6 address.
    let ip6 = |k: &str| lab.pod_ip6(k).unwrap();
    let (client6, plain6) = (ip6("shop/client-0"), ip6("legacy/plain-0"));
    for (what, to) in [("cross-node", "shop/echo-1"), ("same-node", "shop/echo-0")] {
        let to = format!("[{}]", ip6(to));
        let seen = peer_once_answered(lab, what, "shop/client-0", &to).await;
        assert_eq!(seen.as_deref(), Some(client6.as_str()), "{what} over IPv6");
    }
    let to = format!("[{}]", ip6("shop/echo-1"));
    assert_eq!(
        peer_seen(lab, "legacy/plain-0", &to).as_deref(),
        Some(plain6.as_str()),
        "plaintext over IPv6"
    );

    // An attacker holding the client's identity (its certificate) speaks
    // HBONE by hand from the plain pod, whose address the state gives to
    // another identity, and claims the client's address in `forwarded` and
    // its pod in `baggage`. The app sees neither the claim nor the plain
    // pod's address: only its own.
    let answer = hbone_as_client(lab, "legacy/plain-0", &echo1, &client).await;
    assert!(answer.starts_with("CONNECT 200"), "{answer}");
    let seen = answer
        .lines()
        .find_map(|l| l.strip_prefix("peer="))
        .and_then(|p| p.rsplit_once(':'))
        .map(|(ip, _)| ip.to_string());
    assert_eq!(seen.as_deref(), Some(echo1.as_str()), "{answer}");
}

/// `labapp hbone` from pod `from` to `to`'s 15008 with a certificate for
/// shop/client, claiming `claimed` as the original client: the CONNECT
/// status and the whole answer of the HTTP echo on 8080.
async fn hbone_as_client(lab: &Lab, from: &str, to: &str, claimed: &str) -> String {
    let id = Identity::new(TRUST_DOMAIN, "shop", "client").unwrap();
    let certs = write_lab_cert(&lab.dir, &id, "forger").await.unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let (chain, key, root) = (path(&certs.chain), path(&certs.key), path(&certs.root));
    let (via, authority) = (format!("{to}:15008"), format!("{to}:8080"));
    let server = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/echo");
    let forwarded = format!("{claimed}:4242");
    let out = lab
        .exec(
            from,
            &[
                "labapp",
                "hbone",
                "--via",
                &via,
                "--authority",
                &authority,
                "--cert",
                &chain,
                "--key",
                &key,
                "--root",
                &root,
                "--server-identity",
                &server,
                "--request",
                "GET / HTTP/1.1\\r\\nHost: echo\\r\\nConnection: close\\r\\n\\r\\n",
                "--forwarded-for",
                &forwarded,
                "--baggage",
                "k8s.namespace.name=shop,k8s.pod.name=client-0",
                "--whole-answer",
            ],
        )
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn with_original_source_off_the_app_sees_its_own_address() {
    let run = lab_with("original_source: false").await;
    let lab = &run.g.0;
    let ip = |k: &str| lab.pod(k).unwrap().ip.clone();
    let (echo0, echo1) = (ip("shop/echo-0"), ip("shop/echo-1"));
    for (what, to) in [("cross-node", &echo1), ("same-node", &echo0)] {
        let seen = peer_once_answered(lab, what, "shop/client-0", to).await;
        assert_eq!(seen.as_deref(), Some(to.as_str()), "{what}");
    }
}

/// A pod whose reply routing is missing (its node agent could not install
/// it, or is older): the ztunnel sees so in the pod's routing and dials
/// its app from the pod's own address, rather than from the client's
/// (whose replies would leave the pod and the connection hang), and counts
/// it.
#[tokio::test]
async fn a_pod_without_reply_routing_is_dialed_from_its_own_address() {
    let run = lab_with("").await;
    let lab = &run.g.0;
    let echo1 = lab.pod("shop/echo-1").unwrap().ip.clone();
    let client = lab.pod("shop/client-0").unwrap().ip.clone();
    let seen = peer_once_answered(lab, "echo-1", "shop/client-0", &echo1).await;
    assert_eq!(seen.as_deref(), Some(client.as_str()));
    for family in ["-4", "-6"] {
        let _ = lab.exec(
            "shop/echo-1",
            &[
                "ip", family, "rule", "del", "fwmark", "0x111", "lookup", "100", "pref", "32764",
            ],
        );
    }
    // HBONE (cross-node) and plaintext from outside the mesh alike.
    for from in ["shop/client-0", "legacy/plain-0"] {
        assert_eq!(
            peer_seen(lab, from, &echo1).as_deref(),
            Some(echo1.as_str()),
            "{from}"
        );
    }
    let text = ztunnel_metrics(lab, "node-2");
    let counted = text
        .lines()
        .find(|l| {
            l.starts_with("ztunnel_original_source_fallbacks_total{reason=\"no_reply_route\"}")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n >= 2), "{text}");
}

/// The scrape of `node`'s ztunnel's metrics.
fn ztunnel_metrics(lab: &Lab, node: &str) -> String {
    let n = lab.state.nodes.iter().find(|n| n.name == node).unwrap();
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &n.netns])
        .arg(e2e::mesh::binary("labapp"))
        .args(["get", &format!("http://{}:15020/metrics", n.ip)])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Node agents that cannot run `ip` (so cannot install the reply routing)
/// still capture every pod, whole: the app sees its own pod's address
/// (the ztunnel dialed it) from a plaintext client outside the mesh, where
/// an uncaptured pod would see that client; HBONE works; the agent lists
/// the pods as captured without original source.
#[tokio::test]
async fn an_agent_without_ip_captures_pods_without_original_source() {
    let bin = tempfile::tempdir().unwrap();
    let nft = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("nft is installed");
    std::os::unix::fs::symlink(nft, bin.path().join("nft")).unwrap();
    let run = lab_with_agent("", Some(bin.path().display().to_string())).await;
    let lab = &run.g.0;
    let echo1 = lab.pod("shop/echo-1").unwrap().ip.clone();
    assert!(lab.pod("shop/echo-1").unwrap().captured);
    let seen = peer_once_answered(lab, "echo-1", "shop/client-0", &echo1).await;
    assert_eq!(seen.as_deref(), Some(echo1.as_str()), "HBONE");
    assert_eq!(
        peer_seen(lab, "legacy/plain-0", &echo1).as_deref(),
        Some(echo1.as_str()),
        "plaintext, through the ztunnel"
    );
    let list = mesh_cni::agent::call(
        &lab.dir.join("node-2-cni.sock"),
        &mesh_cni::agent::Request::List,
    )
    .await
    .unwrap();
    let without = list["without_original_source"].to_string();
    assert!(without.contains("shop/echo-1"), "{list}");
    let text = ztunnel_metrics(lab, "node-2");
    assert!(
        text.contains("ztunnel_original_source_fallbacks_total{reason=\"no_reply_route\"}"),
        "{text}"
    );
}

/// Connections held from plain-0 to the TCP echo, then opened beside them.
const HELD: usize = 1500;
const FRESH: usize = 1500;

/// Opens a connection from inside `ns` to `to` and checks one echo on it.
/// The socket is bound before it connects, so its port is one the kernel
/// hands to `bind` (as a client that binds first, or a NAT, would have);
/// the ztunnel's dials take theirs at connect, from the whole range, and
/// may pick the same.
fn open(
    ns: &mesh_core::netns::Netns,
    to: std::net::SocketAddr,
) -> std::io::Result<std::net::TcpStream> {
    let sock =
        ns.run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))??;
    sock.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 0)).into())?;
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    echo_once(&s, b'o')?;
    Ok(s)
}

/// Sends one byte on `s` and reads it back.
fn echo_once(mut s: &std::net::TcpStream, b: u8) -> std::io::Result<()> {
    use std::io::{Read, Write};
    s.write_all(&[b])?;
    let mut got = [0u8; 1];
    s.read_exact(&mut got)?;
    if got[0] == b {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("echoed {} for {b}", got[0])))
    }
}

/// Many plaintext connections from one address (as from an ingress with
/// many keep-alives): each of the ztunnel's dials from that address picks
/// its own port, which may be the port of another live connection from
/// it whose connection-tracking entry the pod holds. Neither that one nor
/// the new one may break.
#[tokio::test]
async fn many_connections_from_one_address_all_live() {
    let run = lab_with("").await;
    let lab = &run.g.0;
    let echo = lab.pod("shop/tcpecho-0").unwrap().ip.clone();
    let plain = lab.pod("legacy/plain-0").unwrap().netns.clone();
    let to: std::net::SocketAddr = format!("{echo}:9000").parse().unwrap();
    let ns = mesh_core::netns::Netns::open(&format!("/var/run/netns/{plain}")).unwrap();
    eventually("the TCP echo answers", Duration::from_secs(30), || {
        std::future::ready(open(&ns, to).is_ok())
    })
    .await;
    let started = std::time::Instant::now();
    let (held, fresh, failed) = tokio::task::spawn_blocking(move || {
        let mut failed = Vec::new();
        let mut held = Vec::new();
        for i in 0..HELD {
            match open(&ns, to) {
                Ok(s) => held.push(s),
                Err(e) => failed.push(format!("held #{i}: {e}")),
            }
        }
        let mut fresh = Vec::new();
        for i in 0..FRESH {
            match open(&ns, to) {
                Ok(s) => fresh.push(s),
                Err(e) => failed.push(format!("new #{i}: {e}")),
            }
        }
        for (i, s) in held.iter().chain(fresh.iter()).enumerate() {
            if let Err(e) = echo_once(s, b'k') {
                failed.push(format!("again #{i} ({:?}): {e}", s.local_addr()));
            }
        }
        (held.len(), fresh.len(), failed)
    })
    .await
    .unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed ({held} held, {fresh} new opened) in {:?}: {:?}",
        failed.len(),
        HELD + FRESH,
        started.elapsed(),
        &failed[..failed.len().min(20)]
    );
}

/// Runs `cmd` inside the lab netns `ns` with `stdin`; its output.
fn in_ns(ns: &str, cmd: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The packets `nft` counted in `ns`'s table `inet leak`.
fn counted(ns: &str) -> u64 {
    let out = in_ns(ns, &["nft", "list", "table", "inet", "leak"], "");
    out.split("packets ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {out}"))
}

/// The app's replies on a live connection the ztunnel dialed from the
/// client's address never leave the pod, even while its reply routing is
/// missing (re-applied, removed): they stall until it is back. Counted on
/// the client's side: any packet from the app to the client that is not
/// of the client's own connection (its port) came out of the app's pod.
#[tokio::test]
async fn replies_never_leave_the_pod_without_reply_routing() {
    let run = lab_with("").await;
    let lab = &run.g.0;
    let echo = lab.pod("shop/tcpecho-0").unwrap().clone();
    let plain = lab.pod("legacy/plain-0").unwrap().netns.clone();
    let to: std::net::SocketAddr = format!("{}:9000", echo.ip).parse().unwrap();
    let ns = mesh_core::netns::Netns::open(&format!("/var/run/netns/{plain}")).unwrap();
    let mut conn = None;
    eventually("the TCP echo answers", Duration::from_secs(30), || {
        conn = open(&ns, to).ok();
        std::future::ready(conn.is_some())
    })
    .await;
    let s = conn.unwrap();
    let port = s.local_addr().unwrap().port();
    in_ns(
        &plain,
        &["nft", "-f", "-"],
        &format!(
            "table inet leak {{ chain in {{ type filter hook prerouting priority -300; policy accept; ip saddr {} tcp sport 9000 tcp dport != {port} counter; }}\n}}\n",
            echo.ip
        ),
    );
    // The routing goes (as it did between an `ip rule del` and `add`).
    in_ns(&echo.netns, &["ip", "rule", "del", "pref", "32764"], "");
    let s2 = s.try_clone().unwrap();
    let sent = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        (&s2).write_all(b"x")
    });
    sent.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(counted(&plain), 0, "the app's replies left its pod");
    // Back: the stalled reply arrives.
    in_ns(
        &echo.netns,
        &[
            "ip", "rule", "add", "fwmark", "273", "lookup", "100", "pref", "32764",
        ],
        "",
    );
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let got = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut b = [0u8; 1];
        (&s).read_exact(&mut b).map(|()| b[0])
    })
    .await
    .unwrap();
    assert_eq!(got.ok(), Some(b'x'), "the stalled reply");
    assert_eq!(counted(&plain), 0, "the app's replies left its pod");
}

/// A pod's plaintext listener (15006) serves its own pod only: a
/// neighbour on the same bridge that sends a connection for another pod's
/// address to this pod (a route via it) is refused, not dialed into the
/// other pod from the neighbour's address.
#[tokio::test]
async fn a_pods_listener_does_not_dial_into_another_pod() {
    let run = lab_with("").await;
    let lab = &run.g.0;
    let ip = |k: &str| lab.pod(k).unwrap().ip.clone();
    let (echo0, client) = (ip("shop/echo-0"), ip("shop/client-0"));
    let plain = lab.pod("legacy/plain-0").unwrap().netns.clone();
    assert_eq!(lab.pod("legacy/plain-0").unwrap().node, "node-1");
    eventually("the echo answers", Duration::from_secs(30), || {
        std::future::ready(peer_seen(lab, "legacy/plain-0", &echo0).is_some())
    })
    .await;
    // echo-0's address, through client-0's pod (counted there, so the
    // test shows the path was taken).
    let client_ns = lab.pod("shop/client-0").unwrap().netns.clone();
    in_ns(
        &client_ns,
        &["nft", "-f", "-"],
        &format!(
            "table inet leak {{ chain in {{ type filter hook prerouting priority -300; policy accept; ip daddr {echo0} tcp dport 8080 counter; }}\n}}\n"
        ),
    );
    in_ns(
        &plain,
        &["ip", "route", "add", &format!("{echo0}/32"), "via", &client],
        "",
    );
    let seen = peer_seen(lab, "legacy/plain-0", &echo0);
    assert!(
        counted(&client_ns) > 0,
        "the route via client-0 was not taken"
    );
    assert_eq!(seen, None, "client-0's ztunnel dialed into echo-0");
}
