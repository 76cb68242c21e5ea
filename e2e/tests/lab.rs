//! The lab: a two-node mesh of network namespaces with the production
//! binaries. Pod-to-pod and pod-to-VIP traffic in an ambient namespace is
//! HBONE on the wire; plaintext enters through 15006 until STRICT; ambient
//! pods reach plain ones by passthrough; an ALLOW for one service account
//! admits it and refuses another; enrollment follows labels live.

use std::time::Duration;

use e2e::lab::{Lab, TEST_IDS};
use e2e::mesh::eventually;
use e2e::netns::capture;
use mesh_core::netns::Netns;
use serde_json::Value;

use e2e::lab::Down as Guard;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

fn deployment(ns: &str, name: &str, sa: &str, replicas: u32, args: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  replicas: {replicas}\n  selector: {{matchLabels: {{app: {name}}}}}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      serviceAccountName: {sa}\n      containers: [{{name: app, image: labapp, args: {args}}}]\n---\n"
    )
}

/// `labapp send` from inside a pod; the echoed text, or None when refused.
fn send(lab: &Lab, from: &str, to: &str, text: &str) -> Option<String> {
    let bin = e2e::mesh::binary("labapp");
    let out = lab.exec(from, &[bin.to_str()?, "send", to, text]).ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && s == text).then_some(s)
}

#[tokio::test]
async fn the_lab_runs_an_ambient_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let lab = Lab::create_in(dir.path(), TEST_IDS, 2).unwrap();
    let mut g = Guard(lab);
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n---\n");
    docs.push_str(&deployment(
        "shop",
        "echo",
        "echo",
        2,
        "[tcp-echo, --port, \"9000\"]",
    )); // node-1, node-2
    docs.push_str(&deployment("shop", "client", "client", 1, "[sleep]")); // node-1
    docs.push_str(&deployment("shop", "other", "other", 1, "[sleep]")); // node-2
    docs.push_str(&deployment("legacy", "lclient", "legacy", 1, "[sleep]")); // node-1
    docs.push_str(&deployment(
        "legacy",
        "lecho",
        "legacy",
        1,
        "[tcp-echo, --port, \"9000\"]",
    )); // node-2
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: shop}\nspec: {selector: {app: echo}, ports: [{port: 80, targetPort: 9000}]}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: echo-peers, namespace: shop}\nspec: {clusterIP: None, selector: {app: echo}, ports: [{port: 9000}]}\n");
    g.0.apply(yaml(&docs)).await.unwrap();
    let lab = &g.0;
    let ip = |k: &str| lab.pod(k).unwrap().ip.clone();
    let (echo0, echo1, lecho) = (ip("shop/echo-0"), ip("shop/echo-1"), ip("legacy/lecho-0"));
    assert_eq!(lab.pod("shop/echo-0").unwrap().node, "node-1");
    assert_eq!(lab.pod("shop/echo-1").unwrap().node, "node-2");
    assert!(lab.pod("shop/client-0").unwrap().captured);
    assert!(!lab.pod("legacy/lclient-0").unwrap().captured);

    // The mesh comes up: the first connection may wait for certificates.
    eventually(
        "client reaches echo-1 across nodes",
        Duration::from_secs(30),
        || async { send(lab, "shop/client-0", &format!("{echo1}:9000"), "hello").is_some() },
    )
    .await;

    // Cross-node traffic is HBONE on the wire. Same-node traffic is handed
    // over inside the ztunnel (the same-node fast path): nothing of it
    // reaches the destination pod's eth0, in plaintext or tunnelled.
    let marker = "PLAINTEXT-MARKER-lab";
    for (to_pod, to_ip, tunnelled) in [
        ("shop/echo-1", &echo1, true),
        ("shop/echo-0", &echo0, false),
    ] {
        let netns = Netns::open(&format!(
            "/var/run/netns/{}",
            lab.pod(to_pod).unwrap().netns
        ))
        .unwrap();
        let cap = std::thread::spawn(move || {
            capture(
                &netns,
                "eth0",
                Duration::from_millis(1500),
                marker.as_bytes(),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            send(lab, "shop/client-0", &format!("{to_ip}:9000"), marker).is_some(),
            "to {to_pod}"
        );
        let seen = cap.join().unwrap().unwrap();
        assert!(
            (seen.hbone > 0) == tunnelled && seen.marker == 0,
            "to {to_pod}: {seen:?}"
        );
    }

    // A service VIP reaches both endpoints, and its names resolve to it.
    let vip = lab.state.services["shop/echo"].vip.clone();
    let labapp = e2e::mesh::binary("labapp");
    let resolve = |name: &str| {
        let out = lab
            .exec(
                "shop/client-0",
                &[labapp.to_str().unwrap(), "resolve", name],
            )
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // The lab is dual-stack: a name has its IPv4 address and its IPv6 twin.
    let both = |ip: &str| {
        let mut v = [ip.to_string(), e2e::lab::ipv6_twin(ip).unwrap()];
        v.sort();
        Some(v.join("\n"))
    };
    let resolve = |name: &str| {
        resolve(name).map(|r| {
            let mut v: Vec<&str> = r.lines().collect();
            v.sort();
            v.join("\n")
        })
    };
    for name in ["echo", "echo.shop", "echo.shop.svc.cluster.local"] {
        assert_eq!(resolve(name), both(&vip), "{name}");
    }
    assert_eq!(resolve("nope.shop.svc.cluster.local"), None);
    // A headless Service resolves to its endpoints, and each endpoint by its
    // per-pod name under it (a StatefulSet's peers find each other so).
    let mut peers: Vec<String> = resolve("echo-peers")
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    peers.sort();
    let mut want: Vec<String> = [&echo0, &echo1]
        .iter()
        .flat_map(|ip| [ip.to_string(), e2e::lab::ipv6_twin(ip).unwrap()])
        .collect();
    want.sort();
    assert_eq!(peers, want, "echo-peers");
    assert_eq!(resolve("echo-1.echo-peers"), both(&echo1));
    for _ in 0..4 {
        assert!(send(lab, "shop/client-0", &format!("{vip}:80"), "via-vip").is_some());
    }

    // Ambient to plain: passthrough. Plain to ambient: in through 15006.
    assert!(send(lab, "shop/client-0", &format!("{lecho}:9000"), "out").is_some());
    assert!(send(lab, "legacy/lclient-0", &format!("{echo0}:9000"), "in").is_some());
    // ...until STRICT.
    let mut g = g;
    g.0.apply(yaml("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}\n"))
        .await
        .unwrap();
    eventually(
        "STRICT refuses plaintext",
        Duration::from_secs(10),
        || async { send(&g.0, "legacy/lclient-0", &format!("{echo0}:9000"), "in").is_none() },
    )
    .await;
    assert!(send(&g.0, "shop/client-0", &format!("{echo0}:9000"), "mtls").is_some());

    // An ALLOW for one service account: client in, other out, same run.
    g.0.apply(yaml("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: only-client, namespace: shop}\nspec:\n  selector: {matchLabels: {app: echo}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n"))
        .await
        .unwrap();
    eventually("other is refused", Duration::from_secs(10), || async {
        send(&g.0, "shop/other-0", &format!("{echo1}:9000"), "x").is_none()
    })
    .await;
    assert!(send(&g.0, "shop/client-0", &format!("{echo1}:9000"), "allowed").is_some());

    // Enrollment follows labels live; a pod labelled none stays out.
    g.0.apply(yaml("apiVersion: v1\nkind: Pod\nmetadata: {name: optout, namespace: legacy, labels: {istio.io/dataplane-mode: none}}\nspec: {containers: [{name: app, image: labapp, args: [sleep]}]}\n"))
        .await
        .unwrap();
    g.0.apply(yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {istio.io/dataplane-mode: ambient}}\n"))
        .await
        .unwrap();
    assert!(g.0.pod("legacy/lclient-0").unwrap().captured);
    assert!(!g.0.pod("legacy/optout").unwrap().captured);
    g.0.apply(yaml(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: legacy}\n",
    ))
    .await
    .unwrap();
    assert!(!g.0.pod("legacy/lclient-0").unwrap().captured);
}

/// Round-trips `text` on an open connection.
async fn echo_on(s: &mut tokio::net::TcpStream, text: &[u8]) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(text).await?;
    let mut buf = vec![0u8; text.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await??;
    if buf != text {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

#[tokio::test]
async fn the_mesh_rides_out_controller_and_ztunnel_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    docs.push_str(&deployment(
        "shop",
        "echo",
        "echo",
        2,
        "[tcp-echo, --port, \"9000\"]",
    )); // node-1, node-2
    docs.push_str(&deployment("shop", "client", "client", 1, "[sleep]")); // node-1
    g.0.apply(yaml(&docs)).await.unwrap();
    let echo1 = g.0.pod("shop/echo-1").unwrap().ip.clone();
    let to = format!("{echo1}:9000");
    eventually("the mesh is up", Duration::from_secs(30), || async {
        send(&g.0, "shop/client-0", &to, "up").is_some()
    })
    .await;

    // A long-lived connection from the client pod (its socket lives in the
    // pod's netns, so it is captured like the app's would be).
    let client_ns = Netns::open(&format!(
        "/var/run/netns/{}",
        g.0.pod("shop/client-0").unwrap().netns
    ))
    .unwrap();
    let sock = client_ns
        .run(tokio::net::TcpSocket::new_v4)
        .unwrap()
        .unwrap();
    let mut long = sock.connect(to.parse().unwrap()).await.unwrap();
    echo_on(&mut long, b"before").await.unwrap();

    // The controller dies: established and new connections keep working.
    g.0.stop("istiod-lite", true).unwrap();
    echo_on(&mut long, b"during").await.unwrap();
    assert!(send(&g.0, "shop/client-0", &to, "new-while-down").is_some());

    // It comes back: the long-lived connection is still there.
    g.0.restart("istiod-lite").unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    echo_on(&mut long, b"after").await.unwrap();
    assert!(send(&g.0, "shop/client-0", &to, "new-after").is_some());

    // A ztunnel restarts: it re-captures its pods from the agent's snapshot.
    g.0.stop("node-2-ztunnel", false).unwrap();
    g.0.restart("node-2-ztunnel").unwrap();
    eventually(
        "node-2's pods are captured again",
        Duration::from_secs(30),
        || async { send(&g.0, "shop/client-0", &to, "recaptured").is_some() },
    )
    .await;
    let log = std::fs::read_to_string(dir.path().join("logs/node-2-ztunnel.log")).unwrap();
    // The node agent restarts: it reloads its pods, the ztunnel re-syncs from
    // its snapshot, and traffic is unaffected, a connection open across the
    // restart included (neither the pods' rules nor their listeners change).
    let sock = client_ns
        .run(tokio::net::TcpSocket::new_v4)
        .unwrap()
        .unwrap();
    let mut across = sock.connect(to.parse().unwrap()).await.unwrap();
    echo_on(&mut across, b"before-agent-restart").await.unwrap();
    g.0.stop("node-2-cni", false).unwrap();
    g.0.restart("node-2-cni").unwrap();
    eventually(
        "the ztunnel re-synced with the restarted agent",
        Duration::from_secs(15),
        || async {
            std::fs::read_to_string(dir.path().join("logs/node-2-ztunnel.log"))
                .unwrap_or_default()
                .matches("ZDS snapshot reconciled pods=1")
                .count()
                >= 2
        },
    )
    .await;
    assert!(send(&g.0, "shop/client-0", &to, "after-agent-restart").is_some());
    echo_on(&mut across, b"across-agent-restart").await.unwrap();

    // The restarted ztunnel got its pod from the agent's snapshot.
    assert!(log.contains("ZDS snapshot reconciled pods=1"), "{log}");
    assert!(
        !log.contains("HBONE connection to an address with no workload"),
        "{log}"
    );
}

/// Sweeps a lab id when dropped (what this test made of it).
struct Sweep(u8);

impl Drop for Sweep {
    fn drop(&mut self) {
        e2e::lab::sweep(self.0);
    }
}

#[test]
fn a_crashed_tests_lab_is_swept_and_nobody_elses_is() {
    use e2e::lab::{Keeper, Owner, SWEEP_TEST_ID, claim, release};
    let tmp = tempfile::tempdir().unwrap();
    // An id no other test takes: once the record below names a process
    // that is gone, any lab taking a free id would sweep it and take it.
    let ours = claim(SWEEP_TEST_ID, &tmp.path().join("a"), Keeper::Process).unwrap();
    let id = ours.id;
    let _sweep = Sweep(id);
    let ns = |tag: &str| format!("lab{id}-{tag}");

    let lab_down_id = || {
        std::process::Command::new(e2e::mesh::binary("lab"))
            .arg("--dir")
            .arg(tmp.path().join("none"))
            .args(["down", "--id", &id.to_string()])
            .output()
            .unwrap()
    };

    // While this process runs, its id is refused, naming it, and `lab down
    // --id` leaves it alone.
    let why = Lab::create(&tmp.path().join("b"), id, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(why.contains("which is still running"), "{why}");
    let down = lab_down_id();
    let why = String::from_utf8_lossy(&down.stderr);
    assert!(
        !down.status.success() && why.contains("which is still running"),
        "{why}"
    );

    // What a crashed test run leaves: namespaces, a process inside, and a
    // record naming a process that is gone.
    for tag in ["sw", "n1"] {
        e2e::netns::run(&["ip", "netns", "add", &ns(tag)]);
    }
    std::fs::create_dir_all(format!("/etc/netns/{}", ns("n1"))).unwrap();
    let mut inside = std::process::Command::new("ip")
        .args(["netns", "exec", &ns("n1"), "sleep", "600"])
        .spawn()
        .unwrap();
    let mut gone = std::process::Command::new("sleep")
        .arg("0.1")
        .spawn()
        .unwrap();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", gone.id())).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    gone.wait().unwrap();
    let crashed = Owner {
        pid: gone.id(),
        start,
        ..ours.clone()
    };
    // Our record becomes the crashed run's in one rename (released first,
    // the id would be free for a moment).
    let record = std::path::Path::new(e2e::lab::RECORDS).join(format!("lab{id}.json"));
    let aside = record.with_extension("crashed");
    std::fs::write(&aside, serde_json::to_vec(&crashed).unwrap()).unwrap();
    std::fs::rename(&aside, &record).unwrap();
    assert_eq!(
        e2e::lab::owner_of(id).unwrap().map(|o| o.pid),
        Some(crashed.pid)
    );

    // The next lab of the id sweeps it.
    drop(Guard(Lab::create(&tmp.path().join("c"), id, 1).unwrap()));
    let ended = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        inside.try_wait().unwrap().is_some()
    });
    assert!(ended, "the crashed run's process is still running");
    assert!(!std::path::Path::new(&format!("/etc/netns/{}", ns("n1"))).exists());

    // Namespaces no lab recorded making are left alone...
    let held = claim(id, &tmp.path().join("d"), Keeper::Process).unwrap();
    e2e::netns::run(&["ip", "netns", "add", &ns("sw")]);
    release(id, &held.token);
    let why = Lab::create(&tmp.path().join("e"), id, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(why.contains("no lab recorded making them"), "{why}");
    assert_eq!(e2e::lab::namespaces_of(id).unwrap(), vec![ns("sw")]);

    // ...until `lab down --id` is asked to remove them.
    let down = lab_down_id();
    assert!(down.status.success(), "{down:?}");
    assert!(e2e::lab::namespaces_of(id).unwrap().is_empty());
}

/// The MAC address of `dev` in `netns`.
fn mac_of(netns: &str, dev: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-br", "link", "show", dev])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_string()
}

/// A node's bridge keeps its address when a pod is plugged in. A bridge
/// without an address of its own takes the lowest of its ports' ones, so a
/// new pod could change the gateway's MAC under the pods already there;
/// each pod's IPv6 neighbour entry for the gateway's global address keeps
/// the old one (the node re-resolves them from its link-local address), and
/// its frames to the node are then dropped as not for the node: all of a
/// pod's IPv6 beyond its node stopped while a ztunnel roll added a pod.
#[test]
fn plugging_a_pod_into_a_nodes_bridge_keeps_the_bridges_address() {
    let dir = tempfile::tempdir().unwrap();
    let g = Guard(Lab::create_in(dir.path(), TEST_IDS, 1).unwrap());
    let node = g.0.state.nodes[0].netns.clone();
    let before = mac_of(&node, "cbr0");
    // A port whose address is below any the bridge could have.
    let run = |args: &[&str]| {
        let st = std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap();
        assert!(st.success(), "ip {args:?}");
    };
    run(&[
        "-n",
        &node,
        "link",
        "add",
        "plow",
        "address",
        "00:00:00:00:00:01",
        "type",
        "veth",
        "peer",
        "plow-peer",
    ]);
    run(&["-n", &node, "link", "set", "plow", "master", "cbr0", "up"]);
    let after = mac_of(&node, "cbr0");
    assert!(!before.is_empty());
    assert_eq!(after, before, "the bridge took a new port's address");
}
