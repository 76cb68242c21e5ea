//! A pod whose ports a process of its own holds where a redirect lands is
//! fenced (its captured openings rejected) and reported, and the roll goes
//! on for the node; a socket no redirect reaches holds nothing back.

use super::*;

/// The agent's List answer.
async fn list(lab: &Lab) -> Value {
    let control = lab.dir.join("node-1-cni.sock");
    mesh_cni::agent::call(&control, &mesh_cni::agent::Request::List)
        .await
        .unwrap()
}

/// Whether the agent lists pod `uid` as fenced.
pub(super) async fn fenced(lab: &Lab, uid: &str) -> bool {
    list(lab).await["fenced"].get(uid).is_some()
}

/// Connections accepted by `l` (non-blocking) within `d`.
fn accepted_within(l: &std::net::TcpListener, d: Duration) -> usize {
    let deadline = Instant::now() + d;
    let mut n = 0;
    while Instant::now() < deadline {
        match l.accept() {
            Ok(_) => n += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    n
}

/// Sockets of a pod's process where no redirect lands (UDP on the HBONE
/// port, TCP on a loopback address but 127.0.0.1) are no holders: the
/// next ztunnel becomes ready and serves the pod. Failed first: the agent
/// counted them as foreign and kept the next ztunnel unready.
#[tokio::test(flavor = "multi_thread")]
async fn sockets_no_redirect_reaches_do_not_hold_back_the_next_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, to) = echo_and_client(dir.path()).await;
    let echo = netns_of(&g.0, "roll/echo");
    let udp = echo
        .run(|| std::net::UdpSocket::bind("0.0.0.0:15008"))
        .unwrap()
        .unwrap();
    let tcp = echo
        .run(|| std::net::TcpListener::bind("127.0.0.2:15001"))
        .unwrap()
        .unwrap();
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the new ztunnel is ready beside sockets no redirect reaches",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    let held = list(&g.0).await;
    assert!(
        held["fenced"].as_object().is_some_and(|f| f.is_empty()),
        "{held}"
    );
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", false)).unwrap();
    assert!(send(&g.0, "roll/client", &to, "after"));
    drop((udp, tcp));
}

/// A ztunnel crashes; in the gap a process of the client pod binds
/// 127.0.0.1:15001, where the pod's outbound redirect lands: it gets no
/// connection (the agent fenced the pod's captured openings when the last
/// ztunnel went). The next ztunnel is ready all the same, the pod stays
/// fenced and reported while the process holds the port, and is served
/// again once it lets go. Failed first: the process got the client's
/// connections.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_process_in_a_crash_gap_gets_no_redirected_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, to) = echo_and_client(dir.path()).await;
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", true)).unwrap();
    let client = netns_of(&g.0, "roll/client");
    let thief = bind_when_free(&client, "127.0.0.1:15001".parse().unwrap(), false).await;
    thief.set_nonblocking(true).unwrap();
    let path = Path {
        name: "outbound from the client",
        from: client.clone(),
        to: to.parse().unwrap(),
    };
    // The agent notices the ztunnel's end within a fifth of a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tried: Vec<_> = (0..5).map(|_| connect(&path)).collect();
    let stolen = accepted_within(&thief, Duration::from_millis(500));
    assert_eq!(stolen, 0, "in the gap: {tried:?}");
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the next ztunnel is ready while the client pod is fenced",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    let client_uid = g.0.pod("roll/client").unwrap().uid.clone();
    let held = list(&g.0).await;
    assert!(
        held["fenced"].get(&client_uid).is_some(),
        "not reported: {held}"
    );
    let tried: Vec<_> = (0..5).map(|_| connect(&path)).collect();
    let stolen = accepted_within(&thief, Duration::from_millis(500));
    assert_eq!(stolen, 0, "fenced: {tried:?}");
    // Another pod of the node is served by the new ztunnel.
    g.0.apply(yaml(&pod("other", "node-1", "[sleep]")))
        .await
        .unwrap();
    eventually("another pod is served", Duration::from_secs(15), || async {
        send(&g.0, "roll/other", &to, "other")
    })
    .await;
    drop(thief);
    eventually(
        "the client is served once the process lets go",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "after") },
    )
    .await;
    let held = list(&g.0).await;
    assert!(held["fenced"].get(&client_uid).is_none(), "{held}");
}

/// Processes of a pod that hold its inbound port where the redirects land,
/// in each family, bound in a gap (no ztunnel on the node: a crash) so the
/// next ztunnel cannot bind it: the agent fences the pod (its inbound
/// openings refused, none reaching the processes) and reports it, the
/// next ztunnel is ready all the same, and the fence stays while either
/// process holds its port (the IPv6 table read as the IPv4 one). Failed
/// first: the next ztunnel stayed unready.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_a_pod_process_holds_fences_its_pod_not_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, to) = echo_and_client(dir.path()).await;
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", true)).unwrap();
    let echo = netns_of(&g.0, "roll/echo");
    let ip = g.0.pod("roll/echo").unwrap().ip.clone();
    let ip6 = g.0.pod_ip6("roll/echo").unwrap();
    let echo_uid = g.0.pod("roll/echo").unwrap().uid.clone();
    let logs = g.0.dir.join("logs");
    let log =
        |name: &str| std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
    let v4 = bind_when_free(&echo, format!("{ip}:15006").parse().unwrap(), false).await;
    let v6 = bind_when_free(&echo, format!("[{ip6}]:15006").parse().unwrap(), false).await;
    for l in [&v4, &v6] {
        l.set_nonblocking(true).unwrap();
    }
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the next ztunnel is ready while a pod process holds a port",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    assert!(fenced(&g.0, &echo_uid).await, "{}", list(&g.0).await);
    assert!(
        log("node-1-cni").contains("no connected ztunnel holds"),
        "{}",
        log("node-1-cni")
    );
    assert!(log("node-1-ztunnel-surge").contains("in use"));
    assert!(!send(&g.0, "roll/client", &to, "fenced"));
    let to6 = format!("[{ip6}]:9000");
    assert!(!send(&g.0, "roll/client", &to6, "fenced6"));
    let got = accepted_within(&v4, Duration::from_millis(300))
        + accepted_within(&v6, Duration::from_millis(300));
    assert_eq!(got, 0, "a fenced pod's connection reached a pod process");
    // One lets go: the other still holds its port.
    drop(v4);
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(fenced(&g.0, &echo_uid).await, "{}", list(&g.0).await);
    assert!(!send(&g.0, "roll/client", &to, "fenced"));
    drop(v6);
    eventually(
        "the echo pod is served once the processes let go",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "after") },
    )
    .await;
    // (The client's ztunnel reaches it on the node itself once it serves
    // it; the fence on its inbound goes at the agent's next round.)
    eventually(
        "the echo pod's fence is lifted",
        Duration::from_secs(10),
        || async { !fenced(&g.0, &echo_uid).await },
    )
    .await;
}
