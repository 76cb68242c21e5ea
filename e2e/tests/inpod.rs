//! Node mode with real network namespaces: two pods joined by a veth pair,
//! each on its own "node" (an agent plus a ztunnel in node mode). The agents
//! hand the pods to the ztunnels over ZDS (netns fd over SCM_RIGHTS) and
//! install nftables redirects inside the pods; traffic between the pods is
//! HBONE on the wire, and a released pod's traffic is no longer captured.
//! Node A's ztunnel runs sharded: each pod listener is bound once per
//! shard, and a released pod's listeners close on every shard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use e2e::mesh::{
    Pod, Subnet, Ztunnel, ZtunnelSpec, binary, ca_for, eventually, http_get, state_yaml,
};
use e2e::netns::{Namespaces, capture, unique, veth};
use mesh_cni::agent::{self, PodSpec, Request};
use mesh_core::netns::Netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Agent {
    child: Child,
    control: PathBuf,
    zds: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn agent(dir: &Path, node: &str) -> Agent {
    let control = dir.join(format!("{node}-cni.sock"));
    let zds = dir.join(format!("{node}-zds.sock"));
    let log = std::fs::File::create(dir.join(format!("{node}-cni.log"))).unwrap();
    let child = Command::new(binary("ztunnel-cni"))
        .arg("--control-socket")
        .arg(&control)
        .arg("serve")
        .arg("--zds-socket")
        .arg(&zds)
        .arg("--state-file")
        .arg(dir.join(format!("{node}-pods.json")))
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if control.exists() && zds.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Agent {
        child,
        control,
        zds,
    }
}

/// An echo server whose socket lives in `netns`.
fn echo_in(netns: &Netns, addr: std::net::SocketAddr) -> tokio::task::JoinHandle<()> {
    let std = netns
        .run(|| {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(l)
        })
        .unwrap()
        .unwrap();
    let l = tokio::net::TcpListener::from_std(std).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// Connects from inside `netns` (as the pod's app would) and round-trips.
async fn roundtrip_from(
    netns: &Netns,
    to: std::net::SocketAddr,
    payload: &[u8],
) -> std::io::Result<Vec<u8>> {
    roundtrip_bound(netns, None, to, payload).await
}

/// As [`roundtrip_from`], from source address `from` when given.
async fn roundtrip_bound(
    netns: &Netns,
    from: Option<std::net::IpAddr>,
    to: std::net::SocketAddr,
    payload: &[u8],
) -> std::io::Result<Vec<u8>> {
    let sock = netns.run(tokio::net::TcpSocket::new_v4)??;
    if let Some(ip) = from {
        sock.bind(std::net::SocketAddr::new(ip, 0))?;
    }
    let mut s = tokio::time::timeout(Duration::from_secs(5), sock.connect(to)).await??;
    s.write_all(payload).await?;
    s.shutdown().await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await??;
    Ok(out)
}

/// Two nodes, each with one captured pod joined by a veth pair: the client
/// on node A (whose ztunnel runs sharded), the server (a TCP echo on 8080)
/// on node B. `extra` names further pods on node A (service account of the
/// same name), captured too, each in its own netns joined to the server's
/// by a veth pair of its own /24; their addresses are in `extra_ips`.
struct TwoNodes {
    // Dropped in this order: the ztunnels and agents before the netns.
    za: Ztunnel,
    zb: Ztunnel,
    agent_a: Agent,
    _agent_b: Agent,
    _app: tokio::task::JoinHandle<()>,
    _ca: e2e::ca::TestCa,
    _dir: tempfile::TempDir,
    na: String,
    netns_a: Netns,
    netns_b: Arc<Netns>,
    ip_b: String,
    extra_ips: Vec<String>,
    _spaces: Namespaces,
}

async fn two_nodes(extra: &[&str]) -> TwoNodes {
    let dir = tempfile::tempdir().unwrap();
    let mut spaces = Namespaces::default();
    let (na, nb) = (unique("a"), unique("b"));
    let netns_a = spaces.add(&na);
    let netns_b = spaces.add(&nb);
    let sub = (std::process::id() % 50 + 200) as u8;
    let third = (e2e::mesh::Subnet::unique()
        .ip(1)
        .to_string()
        .split('.')
        .nth(2)
        .unwrap()
        .parse::<u8>()
        .unwrap())
        % 250;
    let (ip_a, ip_b) = (format!("10.{sub}.{third}.1"), format!("10.{sub}.{third}.2"));
    veth(&na, "eth0", &ip_a, &nb, "eth0", &ip_b);

    let client = Pod::new(
        "client",
        "default",
        "client",
        ip_a.parse().unwrap(),
        "node-a",
    );
    let server = Pod::new(
        "server",
        "default",
        "server",
        ip_b.parse().unwrap(),
        "node-b",
    );
    let mut extra_ns = Vec::new();
    let mut extra_ips = Vec::new();
    for i in 0..extra.len() {
        let (n, third) = (unique("x"), (third as usize + 1 + i) % 250);
        let ip = format!("10.{sub}.{third}.2");
        spaces.add(&n);
        let gw = format!("10.{sub}.{third}.1");
        veth(&n, "eth0", &ip, &nb, &format!("eth{}", i + 1), &gw);
        let ok = Command::new("ip")
            .args(["-n", &n, "route", "add", "default", "via", &gw])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "default route in {n}");
        extra_ns.push(n);
        extra_ips.push(ip);
    }
    let extra: Vec<Pod> = extra
        .iter()
        .zip(&extra_ips)
        .map(|(name, ip)| Pod::new(name, "default", name, ip.parse().unwrap(), "node-a"))
        .collect();
    let mut pods = vec![&client, &server];
    pods.extend(extra.iter());
    let ca = ca_for(dir.path(), &pods).await;
    let state = state_yaml(&pods, &[], "");
    let (agent_a, agent_b) = (
        agent(dir.path(), "node-a").await,
        agent(dir.path(), "node-b").await,
    );
    let lo = Subnet::unique();
    let node = |name, node, host, agent: &Agent, runtime: &str| ZtunnelSpec {
        name,
        node,
        ip: lo.ip(host),
        inbound_ips: vec![],
        outbound: vec![],
        plaintext: vec![],
        state_yaml: state.clone(),
        xds_address: None,
        extra: Box::leak(
            format!(
                "node_mode: {{zds_socket: \"{}\"}}\n{runtime}",
                agent.zds.display()
            )
            .into_boxed_str(),
        ),
    };
    // A node-mode ztunnel is ready only once it has the agent's snapshot.
    let sharded = "runtime: sharded\nworker_threads: 2\n";
    let za = Ztunnel::start(dir.path(), &ca, node("za", "node-a", 10, &agent_a, sharded)).await;
    let zb = Ztunnel::start(
        dir.path(),
        &ca,
        node("zb", "node-b", 11, &agent_b, "runtime: work_stealing\n"),
    )
    .await;

    let add = |pod: &Pod, ns: &str| {
        Request::Add(PodSpec {
            uid: format!("uid-{}", pod.name),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: pod.service_account.clone(),
            netns: format!("/var/run/netns/{ns}"),
            ips: Vec::new(),
            bypass_inbound: false,
        })
    };
    agent::call(&agent_a.control, &add(&client, &na))
        .await
        .expect("capture client");
    agent::call(&agent_b.control, &add(&server, &nb))
        .await
        .expect("capture server");
    for (p, n) in extra.iter().zip(&extra_ns) {
        agent::call(&agent_a.control, &add(p, n))
            .await
            .expect("capture an extra pod");
    }
    let app = echo_in(&netns_b, format!("{ip_b}:8080").parse().unwrap());
    for z in [&za, &zb] {
        eventually(
            "ready with its pod's certificate",
            Duration::from_secs(10),
            || async {
                http_get(z.readiness, "/healthz/ready")
                    .await
                    .is_some_and(|(c, _)| c == 200)
            },
        )
        .await;
    }
    TwoNodes {
        za,
        zb,
        agent_a,
        _agent_b: agent_b,
        _app: app,
        _ca: ca,
        _dir: dir,
        na,
        netns_a,
        netns_b: Arc::new(netns_b),
        ip_b,
        extra_ips,
        _spaces: spaces,
    }
}

#[tokio::test]
async fn captured_pods_talk_hbone_and_released_pods_do_not() {
    let t = two_nodes(&[]).await;
    let (za, zb, netns_a, netns_b) = (&t.za, &t.zb, &t.netns_a, &t.netns_b);
    let process = za.config_dump().await["process"].clone();
    assert_eq!(process["runtime"], "sharded", "{process}");
    assert_eq!(process["worker_threads"], 2, "{process}");
    assert_eq!(
        zb.config_dump().await["process"]["runtime"],
        "work_stealing"
    );

    // Traffic between the pods, captured on the server pod's interface.
    let marker = b"PLAINTEXT-MARKER-7f3a";
    let to = format!("{}:8080", t.ip_b).parse().unwrap();
    let cap = {
        let n = netns_b.clone();
        std::thread::spawn(move || capture(&n, "eth0", Duration::from_millis(1500), marker))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Enough connections that the kernel hands some to each of node A's
    // shards (all on one: 1 in 2^11): a shard not serving its listener
    // would leave them unanswered.
    for _ in 0..12 {
        assert_eq!(roundtrip_from(netns_a, to, marker).await.unwrap(), marker);
    }
    let seen = cap.join().unwrap().unwrap();
    assert!(seen.hbone > 0, "no HBONE on the wire: {seen:?}");
    assert_eq!(
        seen.marker, 0,
        "the application's bytes crossed the wire in the clear: {seen:?}"
    );
    let m = zb.metrics_text().await;
    assert!(
        m.lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\"")
                && l.contains("reporter=\"destination\"")),
        "{m}"
    );

    // Release the client pod: its traffic is no longer captured, and what it
    // sends crosses the wire as it is (the server still accepts plaintext).
    agent::call(
        &t.agent_a.control,
        &Request::Del {
            uid: "uid-client".into(),
        },
    )
    .await
    .expect("release client");
    // Its listeners close on both shards: one left open would take every
    // new connection to its port.
    for port in [15001, 15006, 15008] {
        let at = format!("127.0.0.1:{port}").parse().unwrap();
        eventually(
            "the released pod's listener closed",
            Duration::from_secs(5),
            || async {
                let sock = netns_a.run(tokio::net::TcpSocket::new_v4).unwrap().unwrap();
                sock.connect(at)
                    .await
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
            },
        )
        .await;
    }
    let cap = {
        let n = netns_b.clone();
        std::thread::spawn(move || capture(&n, "eth0", Duration::from_millis(1500), marker))
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(roundtrip_from(netns_a, to, marker).await.unwrap(), marker);
    let seen = cap.join().unwrap().unwrap();
    assert!(
        seen.marker > 0,
        "released traffic should be plain: {seen:?}"
    );
    assert_eq!(
        seen.hbone, 0,
        "released traffic should not be HBONE: {seen:?}"
    );
}

/// A captured pod's outbound traffic gets that pod's identity, whatever
/// source address it sends from: a connection from another workload's
/// address (a spoofed source, or an address the pod should no longer have)
/// is refused, never sent with the other workload's identity.
#[tokio::test]
async fn a_pod_sending_from_another_workloads_address_does_not_get_its_identity() {
    // The victim: another captured pod on the client's node.
    let t = two_nodes(&["victim"]).await;
    let victim_ip = t.extra_ips[0].clone();
    let to = format!("{}:8080", t.ip_b).parse().unwrap();
    // The client, as itself: served.
    assert_eq!(
        roundtrip_from(&t.netns_a, to, b"as-myself").await.unwrap(),
        b"as-myself"
    );
    // The client adds the victim's address and sends from it.
    let out = Command::new("ip")
        .args([
            "-n",
            &t.na,
            "addr",
            "add",
            &format!("{victim_ip}/32"),
            "dev",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let got = roundtrip_bound(
        &t.netns_a,
        Some(victim_ip.parse().unwrap()),
        to,
        b"as-the-victim",
    )
    .await;
    assert!(
        !matches!(&got, Ok(b) if b.as_slice() == b"as-the-victim"),
        "a connection from the victim's address was carried: {got:?}"
    );
    let m = t.zb.metrics_text().await;
    assert!(
        !m.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/victim\""),
        "the server's ztunnel saw the victim's identity:\n{m}"
    );
    // Refused where it was captured, and logged there.
    let log = std::fs::read_to_string(&t.za.log).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("not this pod's")),
        "{log}"
    );
}
