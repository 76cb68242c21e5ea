//! Admitting a stream before anything of it is read: its caller is
//! authenticated from the request's headers and takes a slot of its
//! stream quota, counted from then on (a stream still waiting for its
//! first request counts as an open one). The slot is given back, and the
//! stream forgotten, however its task ends: a task that panics ends its
//! stream INTERNAL rather than with status 0, and loses no slot. A
//! quota's entry also holds its streams' shared share of requests in
//! flight, and goes (share and all) with its last stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tonic::Status;

use super::Hub;
use super::Quota;
use super::budget::Budget;
use super::wire::End;

/// Streams open per quota (counted as they are admitted), and the share
/// of requests in flight they hold together.
#[derive(Debug, Default)]
pub(super) struct Slots {
    open: Mutex<HashMap<Quota, (usize, Arc<Budget>)>>,
}

impl Slots {
    /// Streams open against `quota` now.
    #[cfg(test)]
    fn open(&self, quota: &Quota) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(quota).map_or(0, |(n, _)| *n)
    }

    /// Quotas with an entry now.
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Takes a slot; the quota's share.
    fn take(&self, quota: &Quota) -> Result<Arc<Budget>, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let (n, share) = open
            .entry(quota.clone())
            .or_insert_with(|| (0, Budget::new(quota.share_max())));
        if *n >= quota.max() {
            // Logged by the caller, limited (`AdsService::admit`).
            return Err(Status::resource_exhausted(format!(
                "{n} xDS streams open for {quota:?}; at most {} may be",
                quota.max()
            )));
        }
        *n += 1;
        Ok(share.clone())
    }

    fn give_back(&self, quota: &Quota) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((n, _)) = open.get_mut(quota) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(quota);
            }
        }
    }
}

/// One admitted stream's slot, held by whatever owns the stream (its
/// opening, then its connection's task): dropping it gives the slot back,
/// forgets the stream's connection, and, unless the stream was closed
/// with a reason of its own, ends it INTERNAL.
pub(crate) struct StreamGuard {
    hub: Arc<Hub>,
    quota: Quota,
    /// Its quota's share of requests in flight, across its streams.
    share: Arc<Budget>,
    /// The connection registered for the stream, once it is.
    pub(super) id: Option<u64>,
    /// The status the response body ends with.
    pub(super) end: End,
    closed: AtomicBool,
}

impl StreamGuard {
    /// Takes a slot of `quota`, or refuses (RESOURCE_EXHAUSTED).
    pub(super) fn take(hub: &Arc<Hub>, quota: Quota) -> Result<StreamGuard, Status> {
        let share = hub.slots.take(&quota)?;
        Ok(StreamGuard {
            hub: hub.clone(),
            quota,
            share,
            id: None,
            end: End::default(),
            closed: AtomicBool::new(false),
        })
    }

    pub(super) fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Its quota's share of requests in flight, shared by its streams.
    pub(super) fn share(&self) -> Arc<Budget> {
        self.share.clone()
    }

    /// The stream ends with `why` (None: a clean end).
    pub(super) fn close(&self, why: Option<Status>) {
        *self.end.lock().unwrap_or_else(|p| p.into_inner()) = why;
        self.closed.store(true, Ordering::Relaxed);
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Relaxed) {
            let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if end.is_none() {
                *end = Some(Status::internal("the controller's stream task failed"));
            }
        }
        if let Some(id) = self.id {
            self.hub.forget(id);
        }
        self.hub.slots.give_back(&self.quota);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Model, ModelConfig};

    /// A stream task that panics gives its slot back, is forgotten, and
    /// ends INTERNAL (not status 0).
    #[tokio::test]
    async fn a_panicking_stream_task_loses_no_slot() {
        let hub = Hub::new(Model::new(ModelConfig::default()));
        let quota = Quota::Node("n".into());
        let mut guard = StreamGuard::take(&hub, quota.clone()).expect("a slot");
        let id = hub.register_for_test(&quota);
        guard.id = Some(id);
        let end = guard.end.clone();
        assert_eq!((hub.slots.open(&quota), hub.connected()), (1, 1));
        let task = tokio::spawn(async move {
            let _guard = guard;
            tokio::task::yield_now().await;
            panic!("a bug in a stream's task");
        });
        assert!(task.await.is_err());
        assert_eq!((hub.slots.open(&quota), hub.connected()), (0, 0));
        let end = end.lock().expect("lock").clone().expect("a status");
        assert_eq!(end.code(), tonic::Code::Internal);
    }

    /// A caller's share is forgotten as soon as its last stream goes, not
    /// once a thousand others have come.
    #[test]
    fn a_callers_share_is_forgotten_with_its_last_stream() {
        let hub = Hub::new(Model::new(ModelConfig::default()));
        let one = StreamGuard::take(&hub, Quota::Node("n".into())).expect("a slot");
        let two = StreamGuard::take(&hub, Quota::Node("n".into())).expect("a slot");
        assert!(
            Arc::ptr_eq(&one.share(), &two.share()),
            "its streams share one"
        );
        drop(one);
        assert_eq!(hub.slots.kept(), 1);
        drop(two);
        assert_eq!(hub.slots.kept(), 0);
    }

    #[test]
    fn a_quota_is_counted_without_scanning_and_given_back() {
        let hub = Hub::new(Model::new(ModelConfig::default()));
        let pod = Quota::Pod("ns".into(), "p".into());
        let held: Vec<_> = (0..super::super::MAX_STREAMS_PER_POD)
            .map(|_| StreamGuard::take(&hub, pod.clone()).expect("a slot"))
            .collect();
        let refused = StreamGuard::take(&hub, pod.clone()).err().expect("refused");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Its node's quota is another.
        let node = StreamGuard::take(&hub, Quota::Node("n".into())).expect("a slot");
        drop(held);
        drop(node);
        assert_eq!(hub.slots.open(&pod), 0);
        assert!(StreamGuard::take(&hub, pod).is_ok());
    }
}
