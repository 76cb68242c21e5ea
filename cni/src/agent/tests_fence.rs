//! The fences' own failures: a fence that cannot go up, one a process of
//! the pod's took down, an agent that starts with no ztunnel.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::tests::{agent, connected, fresh_netns, ztunnel_binding};
use super::*;
use crate::fence;

/// A table of the fence's name made first by a process of the pod's
/// with NET_ADMIN, owned by it (`flags owner`): nobody else can change
/// or delete it while it runs. Killed on drop.
struct OwnedTable(Child);

impl OwnedTable {
    fn make(netns_path: &str) -> OwnedTable {
        let child = Command::new("nsenter")
            .arg(format!("--net={netns_path}"))
            .args(["nft", "-i"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nsenter nft -i");
        // Killed and waited for on drop, a failed assertion below included.
        let mut owned = OwnedTable(child);
        let mut stdin = owned.0.stdin.take().expect("its stdin");
        writeln!(stdin, "add table inet {} {{ flags owner; }}", fence::TABLE).expect("written");
        // Kept open: the table lives as long as its owner.
        std::mem::forget(stdin);
        let netns = Netns::open(netns_path).expect("the netns");
        for _ in 0..50 {
            if rules::nft(&netns, &format!("list table inet {}\n", fence::TABLE)).is_ok() {
                return owned;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the owned table never showed");
    }
}

impl Drop for OwnedTable {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pod whose fence cannot go up (its table is someone else's) while no
/// ztunnel's socket is on its ports is not captured: its rules would hand
/// its connections to whoever holds them. The ztunnel is told to let it
/// go. Failed first: the warning was logged and the rules went in.
#[tokio::test]
async fn a_pod_that_cannot_be_fenced_is_not_captured() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &[]);
    let (ours, theirs) = connected(dir.path()).await;
    let log = ztunnel_binding(theirs, "none", 0, |_| false);
    tokio::time::timeout(Duration::from_secs(10), agent.clone().snapshot(ours))
        .await
        .expect("the snapshot ends")
        .expect("the snapshot is served");
    let path = fresh_netns();
    let _owned = OwnedTable::make(&path);
    let spec = PodSpec {
        uid: "p1".into(),
        name: "p1".into(),
        namespace: "default".into(),
        service_account: "default".into(),
        netns: path.clone(),
        ips: vec!["10.9.9.9".parse().unwrap()],
        bypass_inbound: false,
    };
    let netns = Netns::open(&path).unwrap();
    let r = agent
        .add_opened(spec, netns, crate::agent::Origin::Cni)
        .await;
    assert!(r.is_err(), "captured unfenced: {r:?}");
    assert!(!agent.pods.lock().await.contains_key("p1"));
    let check = Netns::open(&path).unwrap();
    let listed = rules::nft(&check, &format!("list table inet {}\n", rules::TABLE));
    assert!(listed.is_err(), "its redirect table went in");
    let got = log.lock().unwrap().clone();
    assert!(got.iter().any(|l| l.contains("Del")), "{got:?}");
}

/// A fence a process of the pod's deleted (NET_ADMIN) goes up again at
/// the next round, with no ztunnel connected too. Failed first: a round
/// with none connected did nothing, and one with a ztunnel never looked.
#[tokio::test]
async fn a_deleted_fence_goes_up_again_with_no_ztunnel() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1"]);
    let pods = agent.pods.lock().await;
    let p = &pods["p1"];
    {
        let mut fenced = agent.fenced.lock().await;
        fenced::put_up(&p.spec, &p.netns, "test".into(), &mut fenced);
    }
    fence::lift(&p.netns).unwrap();
    assert!(!fence::present(&p.netns));
    drop(pods);
    agent.recheck().await;
    let pods = agent.pods.lock().await;
    assert!(fence::present(&pods["p1"].netns), "the fence stays down");
}

/// A fence's table replaced by an empty one a process of the pod's owns
/// is not taken for the fence: the pod is reported unfenced. Failed
/// first: the table's name was enough.
#[tokio::test]
async fn a_table_of_the_fences_name_is_not_a_fence() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1"]);
    let pods = agent.pods.lock().await;
    let p = &pods["p1"];
    {
        let mut fenced = agent.fenced.lock().await;
        fenced::put_up(&p.spec, &p.netns, "test".into(), &mut fenced);
    }
    fence::lift(&p.netns).unwrap();
    let _owned = OwnedTable::make(&p.spec.netns);
    assert!(
        !fence::present(&p.netns),
        "an empty table passes for a fence"
    );
    drop(pods);
    agent.recheck().await;
    let fenced = agent.fenced.lock().await.clone();
    assert!(!fenced["p1"].up, "{fenced:?}");
}

/// An agent that starts while no ztunnel runs (a gap: none connects
/// within its grace) fences every pod it holds. Failed first: it fenced
/// only when a ztunnel it had seen went away.
#[tokio::test]
async fn an_agent_started_in_a_gap_fences_every_pod() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent(dir.path(), &["p1", "p2"]);
    let stop = CancellationToken::new();
    tokio::spawn(agent.clone().fence_loop(stop.clone()));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    stop.cancel();
    let pods = agent.pods.lock().await;
    for p in pods.values() {
        assert!(fence::present(&p.netns), "{} unfenced", p.spec.uid);
    }
}
