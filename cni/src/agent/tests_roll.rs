//! The roll's leftovers: a node whose every pod has a process of its own
//! on its ports, and a ztunnel's drain notice against the agent's work.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use super::tests::{agent, connected, ztunnel_binding};
use super::*;
use crate::fence;

/// A process other than the test (the ZDS peer) holding a TCP listener
/// at `addr` in `netns`: a pod's own process on a ztunnel port. Killed on
/// drop.
pub(super) struct Thief(Child);

impl Thief {
    pub(super) fn bind(netns: &Netns, addr: std::net::SocketAddr) -> Thief {
        let l = netns
            .run(|| std::net::TcpListener::bind(addr))
            .expect("in the pod's netns")
            .expect("bound");
        let fd = l.as_raw_fd();
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        // SAFETY: only async-signal-safe fcntl calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("sleep");
        // The child's copy alone holds it now.
        drop(l);
        Thief(child)
    }
}

impl Drop for Thief {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A node whose only pod has a process of its own on its port 15001 (it
/// bound it in a crash gap): the new ztunnel acks the pod (its bind
/// waits) and holds nothing of it. That is the pod's fault, not the
/// ztunnel's: the pod is fenced and the ztunnel made ready. Failed first:
/// the circuit breaker took it for a failing ztunnel and kept it unready
/// for good.
#[tokio::test]
async fn a_node_whose_pods_all_have_thieves_still_gets_a_ready_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1"]);
    let _thief = {
        let pods = agent.pods.lock().await;
        Thief::bind(&pods["p1"].netns, ([127, 0, 0, 1], 15001).into())
    };
    let (ours, theirs) = connected(dir.path()).await;
    let log = ztunnel_binding(theirs, "none", 0, |_| false);
    tokio::time::timeout(Duration::from_secs(5), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    assert_eq!(*log.lock().unwrap(), ["add p1", "snapshot"]);
    let fenced = agent.fenced.lock().await.clone();
    let f = fenced.get("p1").expect("p1 fenced");
    assert!(
        f.up && f.why.contains("no connected ztunnel holds"),
        "{f:?}"
    );
    let pods = agent.pods.lock().await;
    assert!(fence::present(&pods["p1"].netns));
}

/// The drain notice a ztunnel sends.
const NOTICE: &str = "draining: this ztunnel takes no new pod";

/// When a draining ztunnel sends its notice, and whether its pod was
/// fenced when its connection closed (the agent's ack).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum NoticeAt {
    /// Between requests.
    Idle,
    /// In place of the ack of the next request (they crossed).
    Crossing,
}

/// A ztunnel that acks each request (binding the ports of each pod it is
/// added), then, once `go` fires, sends its drain notice (`at`) and waits
/// for the agent to close the connection. Gives whether every pod it held
/// was fenced at that close, and how long after the notice it came.
fn draining_ztunnel(
    sock: tokio_seqpacket::UnixSeqpacket,
    go: tokio::sync::oneshot::Receiver<()>,
    at: NoticeAt,
) -> tokio::task::JoinHandle<(bool, Duration)> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        let mut go = Some(go);
        loop {
            let r = tokio::select! {
                r = zds::recv_request(&sock) => r.expect("a request"),
                _ = async { go.as_mut().expect("not yet").await }, if go.is_some() && at == NoticeAt::Idle => {
                    break;
                }
            };
            if let Some(fd) = r.netns {
                let netns = Netns::from_fd(fd).expect("a netns");
                let ports = super::tests::bind_pod_ports(&netns);
                held.push((netns, ports));
            }
            if let Some(g) = go.as_mut().filter(|_| at == NoticeAt::Crossing)
                && g.try_recv().is_ok()
            {
                break;
            }
            zds::send_ack(&sock, None).await.expect("acked");
        }
        zds::send_ack(&sock, Some(NOTICE.into()))
            .await
            .expect("notice sent");
        let sent = std::time::Instant::now();
        while zds::recv_request(&sock).await.is_ok() {}
        let fenced = held.iter().all(|(n, _)| fence::present(n));
        (fenced, sent.elapsed())
    })
}

/// A node's only ztunnel (joined, holding its pod) and the agent's fence
/// watch; `go` makes the ztunnel announce its drain.
async fn one_ztunnel(
    dir: &std::path::Path,
    at: NoticeAt,
) -> (
    Arc<Agent>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<(bool, Duration)>,
    tokio_util::sync::CancellationToken,
) {
    let agent = agent(dir, &["p1"]);
    let (ours, theirs) = connected(dir).await;
    let (go, rx) = tokio::sync::oneshot::channel();
    let z = draining_ztunnel(theirs, rx, at);
    tokio::time::timeout(Duration::from_secs(5), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    assert_eq!(agent.ztunnels.count().await, 1);
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(agent.clone().fence_loop(stop.clone()));
    (agent, go, z, stop)
}

/// A drain notice that crosses a request of the agent's (the request
/// reads it as its answer): the agent takes it for the notice, fences the
/// pod at once and only then closes the connection. Failed first: the
/// newest ztunnel's "refusal" was retried, unanswered until the request's
/// deadline, and the connection dropped before any fence went up (the
/// ztunnel, done waiting, closes its listeners with the pod unfenced).
#[tokio::test]
async fn a_drain_notice_crossing_a_request_is_fenced_before_its_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, go, z, stop) = one_ztunnel(dir.path(), NoticeAt::Crossing).await;
    go.send(()).unwrap();
    let del = Payload::Del(mesh_proto::istio::workload::zds::DelWorkload { uid: "x".into() });
    let answer = agent.ztunnels.request(del, None).await;
    assert!(answer.is_err(), "a draining ztunnel's answer: {answer:?}");
    let (fenced, took) = tokio::time::timeout(Duration::from_secs(5), z)
        .await
        .expect("the agent closes the connection")
        .unwrap();
    stop.cancel();
    assert!(fenced, "the connection closed before the pod was fenced");
    assert!(took < Duration::from_millis(900), "the ack took {took:?}");
}

/// A drain notice while the agent's operations lock is held (a long
/// snapshot of another ztunnel, an add waiting on one): the agent fences
/// and acks without waiting for it. Failed first: the fence waited for the
/// lock, and the ack with it, past the ztunnel's wait.
#[tokio::test]
async fn a_drain_notice_is_acked_without_the_operations_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, go, z, stop) = one_ztunnel(dir.path(), NoticeAt::Idle).await;
    let op = agent.ops.lock().await;
    go.send(()).unwrap();
    let (fenced, took) = tokio::time::timeout(Duration::from_secs(3), z)
        .await
        .expect("the agent closes the connection with its operations lock held")
        .unwrap();
    drop(op);
    stop.cancel();
    assert!(fenced, "the connection closed before the pod was fenced");
    assert!(took < Duration::from_millis(900), "the ack took {took:?}");
}
