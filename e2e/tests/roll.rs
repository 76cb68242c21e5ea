//! A hitless ztunnel roll, in the lab: while node-1's ztunnel is replaced
//! (a second one starts beside it, takes the node agent's pods and binds
//! their listeners beside the first one's, then the first drains), new
//! connections through node-1, outbound from its client and inbound to its
//! echo server, over IPv4 and IPv6, keep being served, and connections already open run on
//! until the old ztunnel's drain deadline.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use std::io::{Read, Write};

use e2e::lab::{Down as Guard, Lab, TEST_IDS};
use e2e::mesh::{binary, eventually};
use mesh_core::netns::Netns;
use serde_json::Value;

#[path = "roll/dump.rs"]
mod dump;
#[path = "roll/fence.rs"]
mod fence;

/// New connections per second through node-1 during the roll.
const RATE: u32 = 50;
/// Long-lived streams through node-1, opened before the roll.
const STREAMS: usize = 10;
/// The lab ztunnels' `drain_timeout` (e2e/src/lab/control.rs).
const DRAIN: Duration = Duration::from_secs(3);
/// Bounds on the load: it never runs longer, nor opens more.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const LOAD_MAX: u32 = RATE * 60;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

fn pod(name: &str, node: &str, args: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: roll, labels: {{app: {name}}}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers: [{{name: app, image: labapp, args: {args}}}]\n---\n"
    )
}

/// During the overlap: a pod added (`late`) and one released (`gone`, by
/// its label, as `kubectl label` would) on node-1. What the agent holds
/// then, or why it could not be done (asserted once the counts are out).
async fn change_pods_during_the_overlap(lab: &mut Lab) -> Result<(), String> {
    lab.apply(yaml(&pod("late", "node-1", "[tcp-echo, --port, \"9000\"]")))
        .await
        .map_err(|e| format!("adding a pod: {e}"))?;
    let path = lab.dir.join("config/pod-roll-gone.yaml");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{e}"))?;
    let mut obj = yaml(&text).pop().ok_or("no pod object")?;
    obj["metadata"]["labels"]["istio.io/dataplane-mode"] = "none".into();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, obj.to_string()).map_err(|e| format!("{e}"))?;
    std::fs::rename(tmp, path).map_err(|e| format!("{e}"))?;
    let control = lab.dir.join("node-1-cni.sock");
    let held = mesh_cni::agent::call(&control, &mesh_cni::agent::Request::Sync)
        .await
        .map_err(|e| format!("sync: {e}"))?;
    let names: Vec<&str> = held["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    if names.contains(&"late") && !names.contains(&"gone") {
        Ok(())
    } else {
        Err(format!("the agent holds {names:?}"))
    }
}

/// Whether a ztunnel's log shows `what` (`pod captured`, `pod released`)
/// for the pod named `name`.
fn logged(lab: &Lab, process: &str, what: &str, name: &str) -> bool {
    let log =
        std::fs::read_to_string(lab.dir.join(format!("logs/{process}.log"))).unwrap_or_default();
    log.lines()
        .any(|l| l.contains(what) && l.contains(&format!("name={name}")))
}

fn netns_of(lab: &Lab, key: &str) -> Arc<Netns> {
    Arc::new(Netns::open(&format!("/var/run/netns/{}", lab.pod(key).unwrap().netns)).unwrap())
}

/// `labapp send` from inside a pod; whether the text came back.
fn send(lab: &Lab, from: &str, to: &str, text: &str) -> bool {
    let bin = binary("labapp");
    let Ok(out) = lab.exec(from, &[bin.to_str().unwrap(), "send", to, text]) else {
        return false;
    };
    out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == text
}

/// A path through node-1: the pod connecting (its socket made in its netns,
/// so captured as the app's would be) and where to.
#[derive(Clone)]
struct Path {
    name: &'static str,
    from: Arc<Netns>,
    to: SocketAddr,
}

fn connect(p: &Path) -> std::io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sock = p
        .from
        .run(|| Socket::new(Domain::for_address(p.to), Type::STREAM, None))??;
    sock.connect_timeout(&p.to.into(), Duration::from_secs(2))?;
    let s = TcpStream::from(sock);
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.set_write_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

fn echo(s: &mut TcpStream, text: &[u8]) -> std::io::Result<()> {
    s.write_all(text)?;
    let mut back = vec![0u8; text.len()];
    s.read_exact(&mut back)?;
    if back != text {
        return Err(std::io::Error::other("echo mismatch"));
    }
    Ok(())
}

/// One new connection: connect, round-trip, close.
fn one_connection(p: &Path, n: u32) -> Result<(), String> {
    let mut s = connect(p).map_err(|e| format!("connect: {e}"))?;
    echo(&mut s, format!("conn-{n:06}").as_bytes()).map_err(|e| format!("echo: {e}"))
}

/// What one long-lived stream saw.
struct Stream {
    path: &'static str,
    /// The last round-trip that succeeded.
    last_ok: Instant,
    /// Why it ended, if it did before being told to stop.
    ended: Option<String>,
}

/// Opens a stream on `p`, then round-trips every 100 ms until `stop`.
fn long_lived(p: Path, stop: Arc<AtomicBool>, opened: mpsc::Sender<()>) -> Stream {
    let mut st = Stream {
        path: p.name,
        last_ok: Instant::now(),
        ended: None,
    };
    let mut s = match connect(&p).and_then(|mut s| echo(&mut s, b"open").map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            st.ended = Some(format!("open: {e}"));
            let _ = opened.send(());
            return st;
        }
    };
    st.last_ok = Instant::now();
    let _ = opened.send(());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        match echo(&mut s, b"tick") {
            Ok(()) => st.last_ok = Instant::now(),
            Err(e) => {
                st.ended = Some(e.to_string());
                break;
            }
        }
    }
    st
}

/// New connections at [`RATE`] per second, alternating over `paths`, each
/// on a thread of its own, until `stop` (or the bounds). Returns how many
/// were opened and the failures (when, which path, why).
fn load(paths: Vec<Path>, stop: Arc<AtomicBool>) -> (u32, Vec<(Instant, String)>) {
    let (tx, rx) = mpsc::channel();
    let started = Instant::now();
    let tick = Duration::from_secs(1) / RATE;
    let mut n = 0;
    let mut workers = Vec::new();
    while !stop.load(Ordering::Relaxed) && n < LOAD_MAX && started.elapsed() < LOAD_LIMIT {
        let p = paths[n as usize % paths.len()].clone();
        let tx = tx.clone();
        workers.push(std::thread::spawn(move || {
            let at = Instant::now();
            if let Err(e) = one_connection(&p, n) {
                let _ = tx.send((at, format!("{}: {e}", p.name)));
            }
        }));
        n += 1;
        let next = started + tick * n;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    for w in workers {
        let _ = w.join();
    }
    drop(tx);
    (n, rx.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ztunnel_roll_under_load_fails_no_new_connection_and_drains_the_old_ones() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: roll, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    let echo_args = "[tcp-echo, --port, \"9000\"]";
    docs.push_str(&pod("echo-1", "node-1", echo_args));
    docs.push_str(&pod("echo-2", "node-2", echo_args));
    docs.push_str(&pod("client-1", "node-1", "[sleep]"));
    docs.push_str(&pod("client-2", "node-2", "[sleep]"));
    docs.push_str(&pod("gone", "node-1", "[sleep]"));
    g.0.apply(yaml(&docs)).await.unwrap();
    let ip = |k: &str| g.0.pod(k).unwrap().ip.clone();
    let (echo1, echo2) = (
        format!("{}:9000", ip("roll/echo-1")),
        format!("{}:9000", ip("roll/echo-2")),
    );
    let v6 = |k: &str| format!("[{}]:9000", g.0.pod_ip6(k).unwrap());
    let (echo1_6, echo2_6) = (v6("roll/echo-1"), v6("roll/echo-2"));
    for (from, to) in [
        ("roll/client-1", &echo2),
        ("roll/client-2", &echo1),
        ("roll/client-1", &echo2_6),
        ("roll/client-2", &echo1_6),
    ] {
        eventually(
            &format!("{from} reaches {to} through the mesh"),
            Duration::from_secs(30),
            || async { send(&g.0, from, to, "up") },
        )
        .await;
    }
    // Every path crosses node-1's ztunnel: outbound from its client, inbound
    // (HBONE from node-2's ztunnel) to its echo server, in each family.
    let paths = vec![
        Path {
            name: "outbound from node-1",
            from: netns_of(&g.0, "roll/client-1"),
            to: echo2.parse().unwrap(),
        },
        Path {
            name: "inbound to node-1",
            from: netns_of(&g.0, "roll/client-2"),
            to: echo1.parse().unwrap(),
        },
        Path {
            name: "outbound from node-1 over IPv6",
            from: netns_of(&g.0, "roll/client-1"),
            to: echo2_6.parse().unwrap(),
        },
        Path {
            name: "inbound to node-1 over IPv6",
            from: netns_of(&g.0, "roll/client-2"),
            to: echo1_6.parse().unwrap(),
        },
    ];

    let stop_streams = Arc::new(AtomicBool::new(false));
    let (opened_tx, opened) = mpsc::channel();
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (p, stop, tx) = (
                paths[i % paths.len()].clone(),
                stop_streams.clone(),
                opened_tx.clone(),
            );
            std::thread::spawn(move || long_lived(p, stop, tx))
        })
        .collect();
    for _ in 0..STREAMS {
        opened.recv_timeout(Duration::from_secs(10)).unwrap();
    }
    let stop_load = Arc::new(AtomicBool::new(false));
    let loader = {
        let (p, stop) = (paths.clone(), stop_load.clone());
        std::thread::spawn(move || load(p, stop))
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The roll: the new ztunnel, ready (it has every pod's listeners and
    // certificates), then SIGTERM to the old one, which drains and exits.
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the new ztunnel on node-1 is ready",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    let changed = change_pods_during_the_overlap(&mut g.0).await;
    let term = Instant::now();
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", false)).unwrap();
    let exited = Instant::now();
    // New connections go on a while after the old one is gone.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop_load.store(true, Ordering::Relaxed);
    stop_streams.store(true, Ordering::Relaxed);
    let (opened_count, failures) = tokio::task::block_in_place(|| loader.join().unwrap());
    let streams: Vec<Stream> = streams.into_iter().map(|s| s.join().unwrap()).collect();

    let deadline = term + DRAIN;
    // Polled every 100 ms, a stream cut at the deadline last answered just
    // before it.
    let lasted = |s: &Stream| s.last_ok + Duration::from_millis(500) >= deadline;
    let lasted_count = streams.iter().filter(|s| lasted(s)).count();
    println!(
        "ztunnel roll: {} new connections, {} failed; {lasted_count} of {STREAMS} long-lived streams lasted until the old ztunnel's drain deadline ({DRAIN:?} after SIGTERM; it exited {:?} after)",
        opened_count,
        failures.len(),
        exited - term,
    );
    for (at, why) in &failures {
        let since = at.checked_duration_since(term).map(|d| format!("+{d:?}"));
        let since = since.unwrap_or_else(|| format!("-{:?}", term - *at));
        println!("  failed at SIGTERM{since}: {why}");
    }
    for s in &streams {
        println!(
            "  stream {}: last answer at SIGTERM+{:?}, ended: {}",
            s.path,
            s.last_ok.saturating_duration_since(term),
            s.ended.as_deref().unwrap_or("no (stopped by the test)")
        );
    }
    if !failures.is_empty() || lasted_count != STREAMS {
        match dump::save(&g.0, &["roll/client-1", "roll/echo-1", "node-1", "node-2"]) {
            Ok(d) => println!("logs and the pods' state: {}", d.display()),
            Err(e) => println!("could not save the logs: {e}"),
        }
    }
    assert!(opened_count >= RATE * 3, "too little load: {opened_count}");
    assert!(
        failures.is_empty(),
        "{} new connections failed",
        failures.len()
    );
    assert_eq!(
        lasted_count, STREAMS,
        "long-lived streams cut before the drain deadline"
    );
    changed.unwrap();
    // The pod added during the overlap reached both ztunnels, and so did
    // the release; the new one serves the added pod now.
    for z in ["node-1-ztunnel", "node-1-ztunnel-surge"] {
        assert!(
            logged(&g.0, z, "pod captured", "late"),
            "{z} never got the added pod"
        );
        assert!(
            logged(&g.0, z, "pod released", "gone"),
            "{z} never released the pod"
        );
    }
    let late = format!("{}:9000", g.0.pod("roll/late").unwrap().ip);
    assert!(send(&g.0, "roll/client-2", &late, "to-the-late-pod"));
    // The node agent lets the kernel move connections queued on a closing
    // listener to another of its set, in each pod of node-1.
    for key in ["roll/client-1", "roll/echo-1"] {
        let on = mesh_cni::migrate::enabled(&netns_of(&g.0, key));
        assert!(matches!(on, Ok(true)), "tcp_migrate_req in {key}: {on:?}");
    }
}

/// Of `n` connections queued on two listeners of one SO_REUSEPORT set in a
/// fresh netns, how many the second one accepts once the first is closed
/// without accepting any (those queued on the first are reset, unless the
/// kernel moves them).
fn accepted_after_a_close(migrate: bool, n: usize) -> usize {
    use mesh_core::listen::shared_tcp;
    let mut spaces = e2e::netns::Namespaces::default();
    let netns = spaces.add(&e2e::netns::unique("mig"));
    if migrate {
        mesh_cni::migrate::enable(&netns).unwrap();
    }
    assert_eq!(mesh_cni::migrate::enabled(&netns).unwrap(), migrate);
    let addr: SocketAddr = "127.0.0.1:15001".parse().unwrap();
    let (first, second) = netns
        .run(|| Ok::<_, std::io::Error>((shared_tcp(addr)?, shared_tcp(addr)?)))
        .unwrap()
        .unwrap();
    let clients: Vec<TcpStream> = (0..n)
        .map(|_| netns.run(|| TcpStream::connect(addr)).unwrap().unwrap())
        .collect();
    drop(first);
    let mut accepted = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while accepted.len() < n && Instant::now() < deadline {
        match second.accept() {
            Ok((s, _)) => accepted.push(s),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    drop(clients);
    accepted.len()
}

/// What the node agent's `tcp_migrate_req` is for: with it, a ztunnel that
/// closes its listeners (the old one of a roll) loses none of the
/// connections queued on them; without it, they are reset.
#[test]
fn a_closing_listener_hands_its_queue_to_the_next_only_with_migration_on() {
    let n = 32;
    let without = accepted_after_a_close(false, n);
    let with = accepted_after_a_close(true, n);
    println!(
        "queued connections accepted after a close: {without} of {n} without migration, {with} of {n} with"
    );
    assert!(
        without < n,
        "the kernel kept every connection without migration: the test shows nothing"
    );
    assert_eq!(with, n, "connections were lost with migration on");
}

/// A draining ztunnel, alone on its node (the new one not up), never acks
/// a pod it does not already serve: the pod's rules would redirect its
/// traffic to listeners nobody opened. (It announces its drain and leaves
/// the agent, never to reconnect; a request that crosses the notice is
/// refused.) The agent holds the pod back (its CNI ADD
/// fails and is retried) until a ztunnel that serves it is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_draining_ztunnel_alone_takes_no_new_pod() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), TEST_IDS, 1).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: roll, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    docs.push_str(&pod("first", "node-1", "[tcp-echo, --port, \"9000\"]"));
    docs.push_str(&pod("client", "node-1", "[sleep]"));
    g.0.apply(yaml(&docs)).await.unwrap();
    // An open connection through the ztunnel: it drains for its deadline.
    let to = format!("{}:9000", g.0.pod("roll/first").unwrap().ip);
    eventually(
        "the client reaches the echo pod",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "up") },
    )
    .await;
    let path = Path {
        name: "held open",
        from: netns_of(&g.0, "roll/client"),
        to: to.parse().unwrap(),
    };
    let mut open = connect(&path).unwrap();
    echo(&mut open, b"before").unwrap();
    let pid = g.0.state.procs["node-1-ztunnel"]
        .pid
        .expect("a running ztunnel");
    // SAFETY: kill(2) on the lab's ztunnel, which this test just started.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The lab retries a capture for 10 s: past the drain (3 s) and the
    // ztunnel's exit, so it gives up with the agent's error.
    let applied = g.0.apply(yaml(&pod("late", "node-1", "[sleep]"))).await;
    let log = |name: &str| {
        std::fs::read_to_string(g.0.dir.join(format!("logs/{name}.log"))).unwrap_or_default()
    };
    println!("adding a pod while the ztunnel drains: {applied:?}");
    if std::env::var_os("ROLL_DEBUG").is_some() {
        println!("{}\n{}", log("node-1-cni"), log("node-1-ztunnel"));
    }
    // What the agent holds (List: a Sync would try the capture again).
    let control = g.0.dir.join("node-1-cni.sock");
    let held = mesh_cni::agent::call(&control, &mesh_cni::agent::Request::List)
        .await
        .unwrap();
    let names: Vec<&str> = held["pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert!(names.contains(&"first"), "{names:?}");
    // It announced its drain and left the agent (which fenced the pods
    // first), or refused the pod if the request crossed its notice.
    let why = format!("{applied:?}");
    assert!(
        why.contains("not connected") || log("node-1-ztunnel").contains("pod refused: draining"),
        "{why}\n{}",
        log("node-1-ztunnel")
    );
    assert!(
        !names.contains(&"late"),
        "a pod captured on the draining ztunnel's ack alone: {names:?}\n{}\n{}",
        log("node-1-cni"),
        log("node-1-ztunnel")
    );
    assert!(applied.is_err());
}

/// A stand-in for an older ztunnel on the node: a ZDS peer (this test's
/// process, so the sockets it holds are a connected ztunnel's) that acks
/// every request, until dropped.
struct OlderZtunnel(tokio::task::JoinHandle<()>);

impl OlderZtunnel {
    async fn connect(lab: &Lab, node: &str) -> OlderZtunnel {
        let path = lab.dir.join(format!("{node}-zds.sock"));
        let sock = mesh_core::zds::connect(&path).await.unwrap();
        OlderZtunnel(tokio::spawn(async move {
            while mesh_core::zds::recv_request(&sock).await.is_ok() {
                if mesh_core::zds::send_ack(&sock, None).await.is_err() {
                    return;
                }
            }
        }))
    }
}

impl Drop for OlderZtunnel {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A one-node lab with an echo pod and a client on node-1, the client
/// reaching the echo pod; the echo pod's address and port.
async fn echo_and_client(dir: &std::path::Path) -> (Guard, String) {
    let mut g = Guard(Lab::create_in(dir, TEST_IDS, 1).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: roll, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    docs.push_str(&pod("echo", "node-1", "[tcp-echo, --port, \"9000\"]"));
    docs.push_str(&pod("client", "node-1", "[sleep]"));
    g.0.apply(yaml(&docs)).await.unwrap();
    let to = format!("{}:9000", g.0.pod("roll/echo").unwrap().ip);
    eventually(
        "the client reaches the echo pod",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "up") },
    )
    .await;
    (g, to)
}

/// Binds `addr` in `netns` once the killed ztunnel's sockets are gone.
async fn bind_when_free(netns: &Netns, addr: SocketAddr, shared: bool) -> std::net::TcpListener {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = if shared {
            netns.run(|| mesh_core::listen::shared_tcp(addr)).unwrap()
        } else {
            netns.run(|| std::net::TcpListener::bind(addr)).unwrap()
        };
        match r {
            Ok(l) => return l,
            Err(e) if Instant::now() > deadline => panic!("{addr} stays in use: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The first roll from a ztunnel whose listeners were exclusive (a version
/// from before the SO_REUSEPORT sets): the new one cannot bind beside it.
/// The pods of its snapshot are served by the old one meanwhile (the agent
/// sees the port held by that connected ztunnel's socket), so it acks them,
/// becomes ready (the roll goes on) and binds each as soon as the old one
/// lets go.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_an_older_ztunnel_holds_exclusively_does_not_stall_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, to) = echo_and_client(dir.path()).await;
    // The old ztunnel, as an older version held it: its own listeners
    // gone, the echo pod's HBONE port held by a socket of no SO_REUSEPORT
    // set, in a process connected to the agent.
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", true)).unwrap();
    let echo = netns_of(&g.0, "roll/echo");
    let older = OlderZtunnel::connect(&g.0, "node-1").await;
    let exclusive = bind_when_free(&echo, "0.0.0.0:15008".parse().unwrap(), false).await;
    // Its other ports, as it held them.
    let ip = g.0.pod("roll/echo").unwrap().ip.clone();
    let others: Vec<std::net::TcpListener> = [
        "127.0.0.1:15001".to_string(),
        format!("{ip}:15006"),
        "127.0.0.1:15053".to_string(),
    ]
    .iter()
    .map(|a| {
        echo.run(|| mesh_core::listen::shared_tcp(a.parse().unwrap()))
            .unwrap()
            .unwrap()
    })
    .collect();
    let dns = echo
        .run(|| mesh_core::listen::shared_udp("127.0.0.1:15053".parse().unwrap()))
        .unwrap()
        .unwrap();
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the new ztunnel is ready while the older one holds a port",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    // A bind that, once the port is free, fails for another reason (no
    // descriptors left) is reported and tried again, never dropped.
    let fail = std::env::var_os("ROLL_NO_FD_FAILURE").is_none();
    let pid = g.0.state.procs["node-1-ztunnel-surge"]
        .pid
        .expect("a running ztunnel") as i32;
    // Its descriptors at rest (a deferred try holds a few for a moment).
    let mut open = u64::MAX;
    for _ in 0..5 {
        let n = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count() as u64;
        open = open.min(n);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let before = set_nofile(pid, None);
    if fail {
        // Room for the DNS sockets, not for the TCP listeners after them.
        set_nofile(pid, Some(open + 2));
    }
    drop((exclusive, others, dns, older));
    let log = |name: &str| {
        std::fs::read_to_string(g.0.dir.join(format!("logs/{name}.log"))).unwrap_or_default()
    };
    if fail {
        eventually(
            "the failed bind is logged",
            Duration::from_secs(15),
            || async { log("node-1-ztunnel-surge").contains("cannot be bound") },
        )
        .await;
        // One pod without listeners is that pod's failure, never the
        // ztunnel's: it stays ready (the agent's fence covers the pod).
        // Failed first: it turned unready for as long as the bind failed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            g.0.ztunnel_ready("node-1", ready).await,
            "the new ztunnel turned unready over one pod's listeners"
        );
        set_nofile(pid, Some(before));
    }
    eventually(
        "the new ztunnel binds the port once it is free",
        Duration::from_secs(45),
        || async { send(&g.0, "roll/client", &to, "after") },
    )
    .await;
    eventually("ready again", Duration::from_secs(15), || {
        g.0.ztunnel_ready("node-1", ready)
    })
    .await;
}

/// A pod whose address is gone (a process of the pod's with NET_ADMIN
/// flushed it) when the next ztunnel of a roll comes does not hold that
/// one back: the pod is acked and bound later (the agent fences it
/// meanwhile), and the new ztunnel becomes ready. Before, it refused the
/// pod, which stayed owed: no SnapshotSent, and the roll stalled.
#[tokio::test(flavor = "multi_thread")]
async fn a_pod_without_an_address_does_not_stall_the_roll() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, _to) = echo_and_client(dir.path()).await;
    let echo = netns_of(&g.0, "roll/echo");
    let flushed = echo
        .run(|| {
            std::process::Command::new("ip")
                .args(["addr", "flush", "dev", "eth0"])
                .status()
        })
        .unwrap()
        .unwrap();
    assert!(flushed.success());
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the new ztunnel is ready though a pod has no address",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
}

/// A ztunnel stopped with no next one (no surge) closes its pods'
/// listeners as it starts to drain, while still connected to the agent.
/// The agent fences every pod before they close (the drain's notice, and
/// the agent's ack once the fences are up), so a process of a pod that
/// binds a freed port during the drain gets no connection. Failed first:
/// the agent counted the draining ztunnel as serving, and the thief got
/// the client's connections until it exited.
#[tokio::test(flavor = "multi_thread")]
async fn a_port_freed_by_a_drain_with_no_next_ztunnel_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (g, to) = echo_and_client(dir.path()).await;
    let client = netns_of(&g.0, "roll/client");
    let path = Path {
        name: "outbound from the client",
        from: client.clone(),
        to: to.parse().unwrap(),
    };
    // An open connection: the drain lasts until its deadline.
    let mut open = connect(&path).unwrap();
    echo(&mut open, b"hold").unwrap();
    let pid = g.0.state.procs["node-1-ztunnel"]
        .pid
        .expect("a running ztunnel") as i32;
    // SAFETY: a signal to the lab's ztunnel, which this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let thief = bind_when_free(&client, "127.0.0.1:15001".parse().unwrap(), false).await;
    thief.set_nonblocking(true).unwrap();
    let _tries: Vec<_> = (0..5).map(|_| connect(&path)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut stolen = 0;
    while thief.accept().is_ok() {
        stolen += 1;
    }
    assert_eq!(stolen, 0, "a port freed by the drain took connections");
}

/// Sets process `pid`'s soft limit on open descriptors (its hard limit
/// kept); the soft limit it had.
fn set_nofile(pid: i32, n: Option<u64>) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: reads the limit into `old`.
    let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    if let Some(n) = n {
        let lim = libc::rlimit {
            rlim_cur: n.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        // SAFETY: a valid limit, under the hard one.
        let r = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    }
    old.rlim_cur
}

/// A process of a captured pod under the ztunnel's uid (root) can join the
/// SO_REUSEPORT set of a pod listener (the kernel admits any socket of the
/// same effective uid: `runAsNonRoot` or a user namespace closes that), but
/// finds no more specific address to bind: the ztunnel's listeners are at
/// the addresses the redirects land on, so it takes a share of the pod's
/// connections, never all of them.
#[tokio::test(flavor = "multi_thread")]
async fn a_same_uid_bind_in_a_pod_takes_no_more_than_a_share() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), TEST_IDS, 1).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: roll, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    docs.push_str(&pod("echo", "node-1", "[tcp-echo, --port, \"9000\"]"));
    docs.push_str(&pod("client", "node-1", "[sleep]"));
    g.0.apply(yaml(&docs)).await.unwrap();
    let to = format!("{}:9000", g.0.pod("roll/echo").unwrap().ip);
    eventually(
        "the client reaches the echo pod",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "up") },
    )
    .await;
    let client = netns_of(&g.0, "roll/client");
    // Where the output chain's REDIRECT lands: the most specific address.
    let thief = client
        .run(|| mesh_core::listen::shared_tcp("127.0.0.1:15001".parse().unwrap()))
        .unwrap()
        .unwrap();
    let n = 20;
    let path = Path {
        name: "outbound from the client",
        from: client.clone(),
        to: to.parse().unwrap(),
    };
    let opened: Vec<TcpStream> = (0..n).filter_map(|_| connect(&path).ok()).collect();
    let mut stolen = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        match thief.accept() {
            Ok(_) => stolen += 1,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    println!("a same-uid listener in the pod took {stolen} of {n} connections");
    assert_eq!(opened.len(), n, "connections refused");
    assert!(stolen < n, "a bind in the pod took every connection");
}

/// Attaches a classic BPF program to `l`'s SO_REUSEPORT set that picks
/// socket `index` of the set for every new connection.
fn steer_all_to(l: &std::net::TcpListener, index: u32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // BPF_RET | BPF_K: return `index`.
    let mut code = [libc::sock_filter {
        code: 0x06,
        jt: 0,
        jf: 0,
        k: index,
    }];
    let prog = libc::sock_fprog {
        len: 1,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: a valid socket and a valid program of one instruction, which
    // the kernel copies.
    let r = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What a process of a captured pod that runs as the ztunnel's uid can do
/// with its listener ports (docs/security.md): join a port's SO_REUSEPORT
/// set and steer it with a BPF program (any member may attach one,
/// replacing the group's), so it takes every new connection its own pod
/// makes to that port. What holds: the set is that pod's alone (each pod's
/// netns has its own), so another pod's connections are still served; and
/// the next ztunnel of a roll is not ready while the socket is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_same_uid_process_can_steer_its_own_pods_set_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let (mut g, to) = echo_and_client(dir.path()).await;
    g.0.apply(yaml(&pod("other", "node-1", "[sleep]")))
        .await
        .unwrap();
    let client = netns_of(&g.0, "roll/client");
    let thief = client
        .run(|| mesh_core::listen::shared_tcp("127.0.0.1:15001".parse().unwrap()))
        .unwrap()
        .unwrap();
    let path = Path {
        name: "outbound from the client",
        from: client.clone(),
        to: to.parse().unwrap(),
    };
    thief.set_nonblocking(true).unwrap();
    // Its index in the set is unknown to it: it tries each (an index past
    // the set's end falls back to the hash: three in a row to be sure).
    let mut steered = None;
    for index in 0..16 {
        steer_all_to(&thief, index).unwrap();
        let _c: Vec<_> = (0..3).map(|_| connect(&path)).collect();
        std::thread::sleep(Duration::from_millis(100));
        let mut got = 0;
        while thief.accept().is_ok() {
            got += 1;
        }
        if got == 3 {
            steered = Some(index);
            break;
        }
    }
    println!("the thief's index in the set: {steered:?}");
    assert!(steered.is_some(), "no index steers to the thief");
    let n = 20;
    let opened: Vec<TcpStream> = (0..n).filter_map(|_| connect(&path).ok()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut stolen = 0;
    while thief.accept().is_ok() {
        stolen += 1;
    }
    println!("with its program attached the thief took {stolen} of {n}");
    assert_eq!(opened.len(), n);
    assert_eq!(stolen, n, "documented: a same-uid root steers all");
    // Another pod's outbound set is its own.
    assert!(
        send(&g.0, "roll/other", &to, "other"),
        "another pod's traffic"
    );
    // The next ztunnel's snapshot finds the thief's socket: the client pod
    // is fenced (the thief gets nothing more), the roll goes on, and the
    // fence is lifted once the thief is gone.
    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the next ztunnel is ready beside the thief",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    let client_uid = g.0.pod("roll/client").unwrap().uid.clone();
    assert!(fence::fenced(&g.0, &client_uid).await);
    let _c: Vec<_> = (0..5).map(|_| connect(&path)).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(thief.accept().is_err(), "the thief got a fenced connection");
    drop(thief);
    eventually(
        "the client is served once the thief is gone",
        Duration::from_secs(30),
        || async { send(&g.0, "roll/client", &to, "after") },
    )
    .await;
}

/// Binds `addr` in `netns` as a process of the pod would (exclusively).
fn try_bind(netns: &Netns, addr: &str) -> std::io::Result<std::net::TcpListener> {
    let addr: SocketAddr = addr.parse().map_err(std::io::Error::other)?;
    let l = netns.run(|| std::net::TcpListener::bind(addr))??;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// The in-pod rules redirect IPv6 as IPv4, and for each family the
/// ztunnel holds the ports the redirects land on: `[::1]:15001` (the
/// output chain's) and the pod's own IPv6 address on 15006 and 15008 (the
/// prerouting one's, and HBONE peers'), before a roll and after it. A
/// process of the pod finds them in use; what it can bind (the pod's IPv6
/// address on 15001, where no redirect lands) gets no redirected
/// connection, and IPv6 goes on being captured (HBONE over IPv6, no
/// plaintext on the wire) through the new ztunnel.
#[tokio::test(flavor = "multi_thread")]
async fn ipv6_in_a_captured_pod_reaches_the_ztunnel_through_a_roll() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = Guard(Lab::create_in(dir.path(), TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: roll, labels: {istio.io/dataplane-mode: ambient}}\n---\n",
    );
    docs.push_str(&pod("echo", "node-1", "[tcp-echo, --port, \"9000\"]"));
    docs.push_str(&pod("client", "node-1", "[sleep]"));
    docs.push_str(&pod("far", "node-2", "[tcp-echo, --port, \"9000\"]"));
    g.0.apply(yaml(&docs)).await.unwrap();
    let v6 = |k: &str| g.0.pod_ip6(k).unwrap();
    let (echo6, client6, far6) = (v6("roll/echo"), v6("roll/client"), v6("roll/far"));
    let (to_echo, to_far) = (format!("[{echo6}]:9000"), format!("[{far6}]:9000"));
    for to in [&to_echo, &to_far] {
        eventually(
            &format!("the client reaches {to} over IPv6"),
            Duration::from_secs(30),
            || async { send(&g.0, "roll/client", to, "up6") },
        )
        .await;
    }
    let (client, echo) = (netns_of(&g.0, "roll/client"), netns_of(&g.0, "roll/echo"));
    // Where the redirects land, in each pod: the ztunnel's, in use.
    let held = |when: &str| {
        for (ns, addr) in [
            (&client, "[::1]:15001".to_string()),
            (&echo, format!("[{echo6}]:15006")),
            (&echo, format!("[{echo6}]:15008")),
        ] {
            let r = try_bind(ns, &addr);
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse),
                "{when}: a pod process bound {addr}: {r:?}"
            );
        }
    };
    // Where no redirect lands, a pod process may bind, and it gets nothing
    // (while it holds the port, the node agent keeps a next ztunnel
    // unready: it is let go before the roll).
    let idle_gets_nothing = |lab: &Lab, when: &str| {
        let idle = try_bind(&client, &format!("[{client6}]:15001")).unwrap();
        assert!(send(lab, "roll/client", &to_echo, "same-node6"), "{when}");
        assert!(send(lab, "roll/client", &to_far, "across6"), "{when}");
        let got = idle.accept();
        assert!(
            got.is_err(),
            "{when}: a pod process's [{client6}]:15001 got a connection: {got:?}"
        );
    };
    held("before the roll");
    idle_gets_nothing(&g.0, "before the roll");

    let ready = g.0.surge_ztunnel("node-1").unwrap();
    eventually(
        "the new ztunnel on node-1 is ready",
        Duration::from_secs(30),
        || g.0.ztunnel_ready("node-1", ready),
    )
    .await;
    tokio::task::block_in_place(|| g.0.stop("node-1-ztunnel", false)).unwrap();
    held("after the roll");
    idle_gets_nothing(&g.0, "after the roll");

    // Through the new ztunnel alone: IPv6 across nodes as HBONE in IPv6
    // packets, never in plaintext.
    let marker = "PLAINTEXT-MARKER-roll6";
    let far = netns_of(&g.0, "roll/far");
    let cap = std::thread::spawn(move || {
        e2e::netns::capture(&far, "eth0", Duration::from_millis(1500), marker.as_bytes())
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(send(&g.0, "roll/client", &to_far, marker));
    let seen = cap.join().unwrap().unwrap();
    assert!(seen.hbone6 > 0 && seen.marker == 0, "{seen:?}");
}
