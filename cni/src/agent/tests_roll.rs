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
    assert!(f.up && f.why.contains("no connected ztunnel holds"), "{f:?}");
    let pods = agent.pods.lock().await;
    assert!(fence::present(&pods["p1"].netns));
}
