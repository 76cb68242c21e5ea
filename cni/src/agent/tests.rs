use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use mesh_proto::istio::workload::zds::workload_request::Payload;
use tokio::sync::Mutex;
use tokio_seqpacket::{UnixSeqpacket, UnixSeqpacketListener};
use tokio_util::sync::CancellationToken;

use super::*;

fn config(dir: &Path) -> AgentConfig {
    AgentConfig {
        zds_socket: dir.join("run/ztunnel.sock"),
        control_socket: dir.join("run/cni.sock"),
        state_file: dir.join("run/pods.json"),
        dns: false,
        host_netns: None,
        finder: find::Finder::default(),
        watch: Watch::None,
        uninstall: Default::default(),
    }
}

/// An agent holding `uids`, each in a netns of its own (nothing is
/// installed in it: only the snapshot is exercised).
pub(super) fn agent(dir: &Path, uids: &[&str]) -> Arc<Agent> {
    let mut pods = BTreeMap::new();
    for uid in uids {
        let spec = PodSpec {
            uid: uid.to_string(),
            name: uid.to_string(),
            namespace: "default".into(),
            service_account: "default".into(),
            netns: fresh_netns(),
            ips: Vec::new(),
            bypass_inbound: false,
        };
        let netns = Netns::open(&spec.netns).expect("a fresh netns");
        pods.insert(
            uid.to_string(),
            Pod {
                spec,
                netns,
                no_orig_src: None,
            },
        );
    }
    Arc::new(Agent {
        cfg: config(dir),
        host: None,
        source: None,
        reconciling: Mutex::new(()),
        ops: Mutex::new(()),
        pods: Mutex::new(pods),
        ztunnels: Ztunnels::default(),
        fenced: Mutex::new(Default::default()),
        deleted: Default::default(),
    })
}

/// A ZDS connection: the agent's end and the ztunnel's, which said hello.
pub(super) async fn connected(dir: &Path) -> (UnixSeqpacket, UnixSeqpacket) {
    let path = dir.join(format!("zds-{}.sock", rand_suffix()));
    let mut l = UnixSeqpacketListener::bind(&path).expect("bound");
    let theirs = zds::connect(&path).await.expect("connected");
    let ours = l.accept().await.expect("accepted");
    (ours, theirs)
}

fn rand_suffix() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What a ztunnel end got, in order: "add p1", "snapshot", ...
pub(super) type Log = Arc<StdMutex<Vec<String>>>;

/// Binds a pod's listener ports in `netns` as a ztunnel would (this
/// process holds them: the agent sees them as its ZDS peer's).
pub(super) fn bind_pod_ports(netns: &Netns) -> Vec<std::net::TcpListener> {
    holders::ports(false)
        .into_iter()
        .map(|port| {
            let addr = std::net::SocketAddr::from(([0, 0, 0, 0], port));
            netns
                .run(|| mesh_core::listen::shared_tcp(addr))
                .expect("in the pod's netns")
                .expect("bound")
        })
        .collect()
}

/// A ztunnel that refuses `uid` the first `refusals` times, and binds the
/// ports of each pod it acks (`bind`).
fn refusing_ztunnel(sock: UnixSeqpacket, uid: &'static str, refusals: usize) -> Log {
    ztunnel_binding(sock, uid, refusals, |_| true)
}

pub(super) fn ztunnel_binding(
    sock: UnixSeqpacket,
    uid: &'static str,
    refusals: usize,
    bind: fn(&str) -> bool,
) -> Log {
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        let mut left = refusals;
        let mut held = Vec::new();
        while let Ok(r) = zds::recv_request(&sock).await {
            if let (Payload::Add(a), Some(fd)) = (&r.request, r.netns)
                && bind(&a.uid)
            {
                let netns = Netns::from_fd(fd).expect("a netns");
                held.push(bind_pod_ports(&netns));
            }
            let (what, error) = match r.request {
                Payload::Add(a) if a.uid == uid && left > 0 => {
                    left -= 1;
                    (
                        format!("add {} refused", a.uid),
                        Some("no listeners".into()),
                    )
                }
                Payload::Add(a) => (format!("add {}", a.uid), None),
                Payload::SnapshotSent(_) => ("snapshot".into(), None),
                other => (format!("{other:?}"), None),
            };
            seen.lock().unwrap().push(what);
            if zds::send_ack(&sock, error).await.is_err() {
                return;
            }
        }
    });
    log
}

/// The new ztunnel of a roll refuses a pod of its snapshot: SnapshotSent
/// (its readiness) waits until the pod is sent again and acked.
#[tokio::test]
async fn snapshot_sent_waits_until_every_pod_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1", "p2"]);
    let (ours, theirs) = connected(dir.path()).await;
    let log = refusing_ztunnel(theirs, "p1", 2);
    tokio::time::timeout(Duration::from_secs(10), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    assert_eq!(
        *log.lock().unwrap(),
        [
            "add p1 refused",
            "add p2",
            "add p1 refused",
            "add p1",
            "snapshot"
        ]
    );
    assert!(agent.ztunnels.pending().await.is_empty());
}

/// A ztunnel that acks a pod of its snapshot without its ports being held
/// by it (nothing listens there, or, as here, it bound nothing): the pod
/// is fenced and reported, and SnapshotSent (its readiness) goes all the
/// same, so the node's other pods are served. Failed first: the pod stayed
/// owed and the ztunnel unready.
#[tokio::test]
async fn an_ack_without_the_ztunnels_own_listeners_fences_the_pod() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1", "p2"]);
    let (ours, theirs) = connected(dir.path()).await;
    let log = ztunnel_binding(theirs, "p1", 0, |uid| uid != "p1");
    tokio::time::timeout(Duration::from_secs(10), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    assert_eq!(*log.lock().unwrap(), ["add p1", "add p2", "snapshot"]);
    assert!(agent.ztunnels.pending().await.is_empty());
    let fenced = agent.fenced.lock().await.clone();
    let f = fenced.get("p1").expect("p1 fenced");
    assert!(f.up && f.why.contains("15001"), "{f:?}");
    let pods = agent.pods.lock().await;
    assert!(crate::fence::present(&pods["p1"].netns));
}

/// A ztunnel that holds none of its pods' ports (its sockets cannot be
/// read, or it bound nothing) is failing itself: it is kept unready (its
/// pods owed, no SnapshotSent) and nothing is fenced, rather than every
/// pod of the node fenced while the older ztunnel still serves them.
/// Failed first: SnapshotSent went and every pod was fenced.
#[tokio::test]
async fn a_ztunnel_that_holds_no_pods_ports_is_kept_unready() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1", "p2"]);
    let (ours, theirs) = connected(dir.path()).await;
    let log = ztunnel_binding(theirs, "p1", 0, |_| false);
    let served = tokio::spawn(agent.clone().snapshot(ours));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got = log.lock().unwrap().clone();
    assert!(!got.iter().any(|l| l == "snapshot"), "{got:?}");
    assert!(agent.fenced.lock().await.is_empty());
    assert!(!agent.ztunnels.pending().await.is_empty());
    served.abort();
}

/// A pod whose ports the ztunnel holds is not fenced, and a fenced one's
/// fence is lifted once they are.
#[tokio::test]
async fn a_pod_the_ztunnel_holds_is_not_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1"]);
    {
        let pods = agent.pods.lock().await;
        let p = &pods["p1"];
        let mut fenced = agent.fenced.lock().await;
        crate::agent::fenced::put_up(&p.spec, &p.netns, "test".into(), &mut fenced);
        assert!(crate::fence::present(&p.netns));
    }
    let (ours, theirs) = connected(dir.path()).await;
    let log = refusing_ztunnel(theirs, "p1", 0);
    tokio::time::timeout(Duration::from_secs(10), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    assert_eq!(*log.lock().unwrap(), ["add p1", "snapshot"]);
    assert!(agent.fenced.lock().await.is_empty());
    let pods = agent.pods.lock().await;
    assert!(!crate::fence::present(&pods["p1"].netns));
}

/// A ztunnel that never answers its snapshot is dropped within the
/// deadline, and the agent's other work goes on meanwhile.
#[tokio::test]
async fn a_stuck_ztunnel_does_not_stall_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1"]);
    let (ours, theirs) = connected(dir.path()).await; // then silence
    let serving = tokio::spawn(agent.clone().snapshot(ours));
    // A second ztunnel, which never even says hello.
    let (mute, _mute_end) = UnixSeqpacket::pair().unwrap();
    let mute = tokio::spawn(agent.clone().snapshot(mute));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A release (its ZDS part goes nowhere: no ztunnel joined) goes through.
    tokio::time::timeout(3 * ZDS_TIMEOUT, agent.del("p1", Leave::Delete))
        .await
        .expect("the agent is not stalled by the stuck ztunnel")
        .expect("released");
    for t in [serving, mute] {
        let r = tokio::time::timeout(3 * ZDS_TIMEOUT, t)
            .await
            .expect("given up on")
            .unwrap();
        assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    }
    assert_eq!(agent.ztunnels.count().await, 0);
    drop(theirs);
}

/// The sockets are reachable by root only: their directory 0700 (a
/// hostPath the runtime created 0755), the sockets 0600.
#[tokio::test]
async fn the_sockets_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = config(dir.path());
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg.clone(), stop.clone()));
    for _ in 0..100 {
        if cfg.control_socket.exists() && cfg.zds_socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run_dir), 0o700);
    assert_eq!(mode(&cfg.zds_socket), 0o600);
    assert_eq!(mode(&cfg.control_socket), 0o600);
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// A ztunnel that hangs on a request holds that request (and those that
/// need the ztunnels) up to the deadline, never the agent's accepts: a
/// control request that needs no ztunnel is answered at once, even while
/// the periodic look for hang-ups comes due.
#[tokio::test]
async fn a_hung_ztunnel_does_not_hold_the_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    let (ours, _hung) = connected(dir.path()).await; // never answers
    zds::recv_hello(&ours).await.expect("hello");
    let admitted = agent.ztunnels.admit(&ours).await.expect("a slot");
    agent
        .ztunnels
        .join(admitted, ours, Default::default())
        .await;
    let release = Payload::Del(DelWorkload { uid: "p1".into() });
    let a = agent.clone();
    let hanging = tokio::spawn(async move { a.to_ztunnel(release, None).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cfg = config(dir.path());
    std::fs::create_dir_all(cfg.control_socket.parent().unwrap()).unwrap();
    let zds_listener = UnixSeqpacketListener::bind(&cfg.zds_socket).unwrap();
    let control = UnixListener::bind(&cfg.control_socket).unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(serve(agent.clone(), zds_listener, control, stop.clone()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = std::time::Instant::now();
    // Sync without a watch: answered by the agent alone.
    let answer = call(&cfg.control_socket, &Request::Sync).await;
    let took = started.elapsed();
    assert!(
        matches!(&answer, Err(AgentError::Answer(m)) if m.contains("watches nothing")),
        "{answer:?}"
    );
    assert!(
        took < ZDS_TIMEOUT / 4,
        "the control request waited {took:?}"
    );
    let r = hanging.await.unwrap();
    assert!(matches!(r, Err(AgentError::Timeout(_))), "{r:?}");
    stop.cancel();
    task.await.unwrap();
}

/// A fresh netns held by a parked thread, and its path.
pub(super) fn fresh_netns() -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: moves this thread alone into a new netns.
        let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        // SAFETY: no preconditions.
        let tid = unsafe { libc::gettid() };
        tx.send((r, tid)).unwrap();
        loop {
            std::thread::park();
        }
    });
    let (r, tid) = rx.recv().unwrap();
    assert_eq!(r, 0, "unshare (not root?)");
    format!("/proc/{}/task/{tid}/ns/net", std::process::id())
}

/// The node's own netns is never a pod's: an add naming it (a compromised
/// ztunnel or plugin asking for the node's traffic) is refused before
/// anything is changed in it, and so is a state file entry naming it.
#[tokio::test]
async fn the_nodes_own_netns_is_never_captured() {
    let dir = tempfile::tempdir().unwrap();
    let node = fresh_netns();
    let mut cfg = config(dir.path());
    cfg.host_netns = Some(node.clone());
    let agent = Arc::new(Agent {
        cfg,
        host: None,
        source: None,
        reconciling: Mutex::new(()),
        ops: Mutex::new(()),
        pods: Mutex::new(BTreeMap::new()),
        ztunnels: Ztunnels::default(),
        fenced: Mutex::new(Default::default()),
        deleted: Default::default(),
    });
    let spec = |netns: &str| PodSpec {
        uid: "evil".into(),
        name: "evil".into(),
        namespace: "default".into(),
        service_account: "default".into(),
        netns: netns.into(),
        ips: vec!["10.0.0.9".parse().unwrap()],
        bypass_inbound: false,
    };
    let r = agent.add(spec(&node)).await;
    assert!(matches!(r, Err(AgentError::NodeNetns(_))), "{r:?}");
    let on = crate::migrate::enabled(&Netns::open(&node).unwrap());
    assert!(
        matches!(on, Ok(false)),
        "the node's netns was changed: {on:?}"
    );
    // The agent's own (here: this test's).
    let own = agent.add(spec("/proc/self/ns/net")).await;
    assert!(matches!(own, Err(AgentError::NodeNetns(_))), "{own:?}");
    // At a restart, from the state file.
    let state = vec![spec(&node)];
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::write(&agent.cfg.state_file, serde_json::to_vec(&state).unwrap()).unwrap();
    let loaded = load_state(&agent.cfg);
    assert!(loaded.is_empty(), "{:?}", loaded.keys());
}

/// Never two agents on a node: one started while another answers on the
/// control socket (the first roll from the agent inside the ztunnel pod,
/// whose sockets have the same paths) leaves that one's sockets alone and
/// waits; it takes over once the other is gone.
#[tokio::test]
async fn an_agent_waits_while_another_holds_the_control_socket() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(cfg.control_socket.parent().unwrap()).unwrap();
    let other = UnixListener::bind(&cfg.control_socket).unwrap();
    let inode = std::fs::metadata(&cfg.control_socket).unwrap().ino();
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        std::fs::metadata(&cfg.control_socket).unwrap().ino(),
        inode,
        "the other agent's socket was replaced"
    );
    assert!(
        !cfg.zds_socket.exists(),
        "the ZDS socket was bound beside the other agent"
    );
    drop(other);
    let mut up = false;
    for _ in 0..50 {
        if call(&cfg.control_socket, &Request::List).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the agent did not take over once the other was gone");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// An agent that another one locks out of the state file (one whose
/// control socket it cannot reach: another mount, a hung process) waits,
/// binding nothing and writing nothing, until that one is gone.
#[tokio::test]
async fn an_agent_waits_while_another_holds_the_state_file() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    std::fs::create_dir_all(cfg.state_file.parent().unwrap()).unwrap();
    let lock = std::fs::File::create(cfg.state_file.with_extension("lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
        0
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(run(cfg.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !cfg.zds_socket.exists() && !cfg.control_socket.exists(),
        "an agent started beside the one holding the state file"
    );
    drop(lock);
    let mut up = false;
    for _ in 0..50 {
        if call(&cfg.control_socket, &Request::List).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "the agent did not start once the other was gone");
    stop.cancel();
    task.await.unwrap().unwrap();
}

/// The state file's lock is made in a private directory, 0600, and never
/// through a link planted at its path. Failed first: 0644, and the link
/// was followed.
#[tokio::test]
async fn the_state_lock_is_private_and_never_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = run_dir.join("pods.json");
    let lock = lock_state(&state).await.expect("locked");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode(&run_dir), 0o700);
    assert_eq!(mode(&state.with_extension("lock")), 0o600);
    drop(lock);
    let other = dir.path().join("elsewhere");
    std::fs::create_dir(&other).unwrap();
    let target = other.join("victim");
    let linked = other.join("pods.json");
    std::os::unix::fs::symlink(&target, linked.with_extension("lock")).unwrap();
    let r = lock_state(&linked).await;
    assert!(r.is_err(), "a planted link was followed");
    assert!(!target.exists(), "the link's target was created");
}

/// A pid counts as a ztunnel's only while it is the process that
/// connected (its start time): a pid reused by another process does not.
/// Failed first: no such check.
#[test]
fn a_reused_pid_is_not_a_ztunnels() {
    use crate::agent::ztunnels::{live_pid, start_time};
    let me = std::process::id() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
    let started = start_time(&stat).expect("a start time");
    assert_eq!(live_pid(Some(me), Some(started)), Some(me));
    assert_eq!(live_pid(Some(me), Some(started + 1)), None);
    assert_eq!(live_pid(Some(me), None), None);
}
