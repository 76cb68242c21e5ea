use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_proto::istio::workload::zds::{DelWorkload, workload_request::Payload};
use tokio_seqpacket::UnixSeqpacket;

use super::*;

/// A ztunnel end on a real ZDS socket pair: answers each request with the
/// next of `answers` (then acks), counting what it got.
fn ztunnel(answers: Vec<Option<&'static str>>) -> (UnixSeqpacket, Arc<AtomicUsize>) {
    let (agent_end, ztunnel_end) = UnixSeqpacket::pair().expect("a socket pair");
    let got = Arc::new(AtomicUsize::new(0));
    let seen = got.clone();
    tokio::spawn(async move {
        let mut answers = answers.into_iter();
        while zds::recv_request(&ztunnel_end).await.is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
            let error = answers.next().flatten().map(str::to_string);
            if zds::send_ack(&ztunnel_end, error).await.is_err() {
                return;
            }
        }
    });
    (agent_end, got)
}

fn del() -> Payload {
    Payload::Del(DelWorkload { uid: "p1".into() })
}

async fn join(z: &Ztunnels, sock: UnixSeqpacket, started: u64) {
    let a = z.admit(&sock).await.expect("a free slot");
    let born = Born {
        started: Some(started),
        id: a.born.id,
    };
    z.join(Admitted { born, ..a }, sock, BTreeSet::new()).await;
}

#[test]
fn the_start_time_is_field_22_whatever_the_command() {
    let stat =
        "4242 (zt (odd) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 987654 1000 10";
    assert_eq!(start_time(stat), Some(987654));
    assert_eq!(start_time("garbage"), None);
    let own = std::fs::read_to_string("/proc/self/stat").expect("our own stat");
    assert!(start_time(&own).is_some(), "{own}");
}

/// The old ztunnel of a roll reconnects while draining (the agent
/// restarted): its connection is the newest, but the answer that counts is
/// the newer process's.
#[tokio::test]
async fn the_newest_process_answers_not_the_newest_connection() {
    let z = Ztunnels::default();
    let (new, new_got) = ztunnel(vec![Some("no netns"); 8]);
    let (draining, _) = ztunnel(vec![]);
    join(&z, new, 200).await;
    join(&z, draining, 100).await;
    let r = z.request(del(), None).await;
    assert!(
        matches!(r, Err(AgentError::Refused(_))),
        "the draining ztunnel's ack counted: {r:?}"
    );
    // Refused, then retried after each wait.
    assert_eq!(new_got.load(Ordering::SeqCst), 1 + RETRY_BACKOFF.len());

    // And the other way round: the newer one's ack counts, not the older
    // one's refusal.
    let z = Ztunnels::default();
    let (new, _) = ztunnel(vec![]);
    let (draining, _) = ztunnel(vec![Some("draining"); 8]);
    join(&z, new, 200).await;
    join(&z, draining, 100).await;
    z.request(del(), None).await.expect("the newest acked");
}

#[tokio::test]
async fn a_refusal_by_the_newest_is_retried() {
    let z = Ztunnels::default();
    let (sock, got) = ztunnel(vec![Some("not yet"), Some("not yet")]);
    join(&z, sock, 1).await;
    z.request(del(), None)
        .await
        .expect("acked on the third try");
    assert_eq!(got.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_third_ztunnel_is_refused_until_one_leaves() {
    let z = Ztunnels::default();
    let (a, _) = ztunnel(vec![]);
    let (b, _) = ztunnel(vec![]);
    let (c, _) = ztunnel(vec![]);
    join(&z, a, 1).await;
    join(&z, b, 2).await;
    assert!(z.admit(&c).await.is_none(), "a third connection let in");
    // One hangs up: its slot is free again.
    z.conns.lock().await.remove(0);
    assert!(z.admit(&c).await.is_some());
}
