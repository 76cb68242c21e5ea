//! One TokenReview per token at a time: callers presenting a token whose
//! review is already in flight wait for that review's answer instead of
//! sending their own (a ztunnel asks for a certificate per local identity
//! at once, all with its one token). Only the caller that sends the review
//! counts against its address's bound; the waiters cost a watch each.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// Reviews in flight by key, each with the channel its answer comes on.
pub struct Flights<K, V> {
    map: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for Flights<K, V> {
    fn default() -> Self {
        Flights {
            map: Mutex::new(HashMap::new()),
        }
    }
}

/// The caller sending the review for a key: its answer goes to every
/// waiter, and the key is free again once this is dropped (answered or
/// not: a leader whose caller went away leaves its waiters to try again).
struct Leader<'a, K: Hash + Eq, V> {
    flights: &'a Flights<K, V>,
    key: K,
    tx: watch::Sender<Option<V>>,
}

impl<K: Hash + Eq, V> Drop for Leader<'_, K, V> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.key);
    }
}

enum Turn<'a, K: Hash + Eq, V> {
    Lead(Leader<'a, K, V>),
    Wait(watch::Receiver<Option<V>>),
}

impl<K: Hash + Eq + Clone, V: Clone> Flights<K, V> {
    /// Keys in flight now.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn turn(&self, key: &K) -> Turn<'_, K, V> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = map.get(key) {
            return Turn::Wait(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.clone(), rx);
        Turn::Lead(Leader {
            flights: self,
            key: key.clone(),
            tx,
        })
    }

    /// The answer for `key`: that of the review in flight for it if there
    /// is one, else of `send` (run by this caller, its answer shared).
    pub async fn once<F, Fut>(&self, key: K, send: F) -> V
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = V>,
    {
        let mut send = Some(send);
        loop {
            match self.turn(&key) {
                Turn::Lead(leader) => {
                    let Some(send) = send.take() else {
                        unreachable!("a caller leads at most once: it returns after");
                    };
                    let answer = send().await;
                    let _ = leader.tx.send(Some(answer.clone()));
                    return answer;
                }
                Turn::Wait(mut rx) => {
                    if let Ok(answer) = rx.wait_for(Option::is_some).await
                        && let Some(answer) = answer.clone()
                    {
                        return answer;
                    }
                    // Its leader went away unanswered: try again.
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn callers_of_one_key_share_one_send_and_its_answer() {
        let flights: Arc<Flights<u8, u32>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (f, s) = (flights.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                f.once(1, || async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    7
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.expect("joined"), 7);
        }
        assert_eq!(sent.load(Ordering::SeqCst), 1);
        assert!(flights.is_empty());
    }

    #[tokio::test]
    async fn a_leader_gone_unanswered_leaves_a_waiter_to_send() {
        let flights: Arc<Flights<u8, u32>> = Arc::default();
        let f = flights.clone();
        let leader = tokio::spawn(async move { f.once(1, std::future::pending::<u32>).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let f = flights.clone();
        let waiter = tokio::spawn(async move { f.once(1, || async { 9 }).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        leader.abort();
        let got = tokio::time::timeout(Duration::from_secs(2), waiter).await;
        assert_eq!(got.expect("in time").expect("joined"), 9);
    }
}
