//! Node mode: one ztunnel serves every captured pod on its node.
//!
//! The node agent hands each pod over ZDS with its netns descriptor. For each
//! pod the proxy opens its listeners inside the pod's netns (15001 outbound,
//! 15006 inbound plaintext, 15008 HBONE) and serves them on the shared
//! runtime; its upstream sockets are also made inside the pod's netns, so
//! peers see the pod's address. Removing a pod closes its listeners and its
//! connections.
//!
//! Every listener in a pod is one of a SO_REUSEPORT set, so the next
//! ztunnel of a roll binds beside this one's; this one closes them when it
//! starts to drain, and the kernel moves what was queued on them to the
//! next one's (`net.ipv4.tcp_migrate_req`, which the node agent turns on in
//! each pod).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::istio::workload::zds::{WorkloadInfo, workload_request::Payload};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

mod deferred;
mod drain;

use deferred::Deferred;

use crate::config::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::proxy::{Proxy, inbound, inbound_plain, outbound};
use mesh_core::netns::Netns;

/// Why a pod the node agent handed over is not served: the ZDS ack's
/// error, which the agent reports to the CNI plugin.
#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("DNS listeners in the pod's netns: {0}")]
    Dns(#[source] std::io::Error),
    #[error("listen on :{port} in the pod's netns: {source}")]
    Listen {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("netns descriptor unusable: {0}")]
    NetnsFd(#[source] std::io::Error),
    #[error("AddWorkload without a netns descriptor")]
    NoNetns,
    #[error("reading the pod's addresses: {0}")]
    Addresses(#[source] std::io::Error),
    #[error("the pod has no address to bind its inbound listeners at")]
    NoAddress,
    /// The agent reads this exact text as the drain notice.
    #[error("{}", mesh_core::zds::DRAINING)]
    Draining,
    #[error("KeepWorkload for {0}, which this ztunnel does not hold")]
    NotHeld(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl PodError {
    /// A port of the pod's is held by a socket outside this ztunnel's
    /// SO_REUSEPORT set: in a snapshot, an older ztunnel that bound it
    /// exclusively (a version from before the sets).
    fn in_use(&self) -> bool {
        matches!(self, PodError::Dns(e) | PodError::Listen { source: e, .. }
            if e.kind() == std::io::ErrorKind::AddrInUse)
    }
    /// In a snapshot (the pod's rules are in already), whether the pod is
    /// acked and bound later rather than refused: whatever keeps its
    /// listeners from being bound (a port in use, its address flushed or
    /// not yet usable, no descriptors), so the snapshot completes and the
    /// node's other pods are served; the node agent fences this one
    /// meanwhile (no ztunnel socket on its ports). A draining ztunnel
    /// takes nothing.
    fn waits_in_snapshot(&self) -> bool {
        !matches!(self, PodError::Draining)
    }
}

/// The pod's own addresses, IPv4 and IPv6 (link-local and loopback left
/// out), where its inbound listeners are bound. None readable is an error,
/// never the wildcard: a process of the pod could bind a more specific
/// address and take every connection.
fn pod_addresses(netns: &Netns) -> Result<Vec<IpAddr>, PodError> {
    let own = netns.addresses().map_err(PodError::Addresses)?;
    if own.is_empty() {
        return Err(PodError::NoAddress);
    }
    Ok(own)
}

/// A pod listener's accept loop.
type ServeFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
/// What serves one of a pod's listeners.
type Serve = Arc<dyn Fn(Arc<Proxy>, TcpListener) -> ServeFuture + Send + Sync>;

struct Pod {
    info: WorkloadInfo,
    netns: Arc<Netns>,
    stop: CancellationToken,
}

/// The pods this ztunnel serves, by ZDS uid.
pub struct InPod {
    proxy: Arc<Proxy>,
    /// With xDS: pods are taken only once both types are in (policies too).
    xds: Option<Arc<mesh_core::xds::XdsClient>>,
    dns: Option<Arc<crate::dns::DnsProxy>>,
    pods: Mutex<HashMap<String, Pod>>,
    /// Pods of the snapshot whose ports an older ztunnel still holds
    /// exclusively: acked (that one serves them), bound once it lets go
    /// ([`deferred`]).
    deferred: Mutex<HashMap<String, Deferred>>,
    snapshot: tokio::sync::watch::Sender<bool>,
    /// The drain's notice to the agent ([`drain`]): asked for by the
    /// shutdown, acked once the agent closed the connection.
    drain: drain::Notice,
}

impl InPod {
    pub fn new(
        proxy: Arc<Proxy>,
        dns: Option<Arc<crate::dns::DnsProxy>>,
        xds: Option<Arc<mesh_core::xds::XdsClient>>,
    ) -> Arc<InPod> {
        Arc::new(InPod {
            proxy,
            xds,
            dns,
            pods: Mutex::new(HashMap::new()),
            deferred: Mutex::new(HashMap::new()),
            snapshot: tokio::sync::watch::Sender::new(false),
            drain: drain::Notice::default(),
        })
    }

    /// The agent's snapshot has been received and reconciled.
    pub fn synced(&self) -> bool {
        *self.snapshot.borrow()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pod>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pods served now: (uid, namespace, name).
    pub fn pods(&self) -> Vec<(String, String, String)> {
        self.lock()
            .iter()
            .map(|(uid, p)| (uid.clone(), p.info.namespace.clone(), p.info.name.clone()))
            .collect()
    }

    fn deferred(&self) -> std::sync::MutexGuard<'_, HashMap<String, Deferred>> {
        self.deferred.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a pod; in a snapshot (the agent holds the pod and its rules
    /// are in) a bind that fails does not refuse it
    /// ([`PodError::waits_in_snapshot`]): it is acked, and bound as soon as
    /// it can be ([`deferred::BIND_RETRY`], then with backoff). The agent
    /// vouches for the pod only once it sees the sockets on its ports are
    /// a connected ztunnel's (an older one that held them exclusively),
    /// never a process of the pod's: it fences the pod meanwhile, and the
    /// node's other pods are served. A new pod is refused (its rules would
    /// redirect to whoever holds the port).
    fn take(
        self: &Arc<Self>,
        uid: &str,
        info: WorkloadInfo,
        netns: Arc<Netns>,
        in_snapshot: bool,
    ) -> Result<(), PodError> {
        let mut deferred = self.deferred();
        // The same pod sent again (an agent's snapshot after a restart):
        // its deferral goes on as it was, its failure and timer kept.
        if deferred.get(uid).is_some_and(|d| d.is_of(&netns)) {
            return Ok(());
        }
        if let Some(d) = deferred.remove(uid) {
            d.token.cancel();
        }
        let r = match self.add(uid, info.clone(), netns.clone()) {
            Err(e) if in_snapshot && e.waits_in_snapshot() => {
                let failed = if e.in_use() {
                    warn!(uid, namespace = %info.namespace, name = %info.name, error = %e, "a port of the pod is in use (by an older ztunnel, if the node agent finds its socket there); binding it once it is free");
                    None
                } else {
                    warn!(uid, namespace = %info.namespace, name = %info.name, error = %e, "the pod's listeners cannot be bound: acked all the same (the node agent fences the pod), tried again");
                    Some(e.to_string())
                };
                let token = CancellationToken::new();
                let d = Deferred {
                    token: token.clone(),
                    failed,
                    netns: netns.id(),
                };
                deferred.insert(uid.to_string(), d);
                tokio::spawn(self.clone().bind_later(uid.to_string(), info, netns, token));
                Ok(())
            }
            r => r,
        };
        self.count_unserved(&deferred);
        r
    }

    fn add(&self, uid: &str, info: WorkloadInfo, netns: Arc<Netns>) -> Result<(), PodError> {
        if let Some(p) = self.lock().get(uid)
            && p.netns.id() == netns.id()
        {
            return Ok(()); // already served: an agent restart re-sends it
        }
        if self.proxy.draining.is_cancelled() {
            // Draining (the next ztunnel of a roll serves the pod): nothing
            // is opened, so this ztunnel must not ack the pod: an ack is
            // what lets the agent install its rules. Its refusal is only
            // logged while a newer ztunnel takes the pod; alone, it holds
            // the pod back until one does.
            info!(uid, namespace = %info.namespace, name = %info.name, "pod refused: draining");
            return Err(PodError::Draining);
        }
        self.del(uid);
        // At the addresses the redirects land on, never a wildcard: the
        // output chain's REDIRECT goes to each family's loopback, the
        // prerouting one (and HBONE peers) to the pod's own addresses; so a
        // process of the pod finds no more specific address to bind and
        // take every connection, in either family.
        let own = pod_addresses(&netns)?;
        // The DNS proxy, when on, listens in the pod too (UDP and TCP 15053,
        // on each family's loopback, of SO_REUSEPORT sets).
        let dns = match &self.dns {
            Some(d) => {
                let pairs = netns
                    .run(crate::dual_stack::dns_sockets)
                    .and_then(|r| r)
                    .map_err(PodError::Dns)?;
                let pairs = pairs
                    .into_iter()
                    .map(|(u, t)| {
                        Ok::<_, std::io::Error>((
                            tokio::net::UdpSocket::from_std(u)?,
                            TcpListener::from_std(t)?,
                        ))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Some((d.clone(), pairs))
            }
            None => None,
        };
        let stop = CancellationToken::new();
        if let Some((d, pairs)) = dns {
            let s = stop.clone();
            // Closed with the TCP listeners when the drain starts.
            let draining = self.proxy.draining.clone();
            let pod = format!("{}/{}", info.namespace, info.name);
            tokio::spawn(async move {
                tokio::select! {
                    _ = s.cancelled() => {}
                    _ = draining.cancelled() => {}
                    _ = d.serve_all(pod, pairs) => {}
                }
            });
        }
        // Each listener once per shard; all of them end with the pod.
        let shards = mesh_core::shards::current();
        let serve = |addr: SocketAddr, f: Serve| {
            let (p, s) = (self.proxy.clone(), stop.clone());
            let port = addr.port();
            let bound = shards.serve_each(addr, Some(&netns), move |l| {
                let (p, s, f) = (p.clone(), s.clone(), f.clone());
                async move {
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = f(p, l) => {}
                    }
                }
            });
            crate::dual_stack::bound(addr, bound)
                .map_err(|source| PodError::Listen { port, source })
        };
        // The outbound listener knows its pod: the source of what it
        // accepts is that pod, never whoever owns the peer address.
        let pod = Arc::new(outbound::CapturedPod {
            uid: uid.to_string(),
            namespace: info.namespace.clone(),
            name: info.name.clone(),
        });
        let dest = pod.clone();
        let plain: Serve =
            Arc::new(move |p, l| Box::pin(inbound_plain::serve(p, l, None, Some(dest.clone()))));
        let hbone: Serve = Arc::new(|p, l| Box::pin(inbound::serve(p, l)));
        let out: Serve =
            Arc::new(move |p, l| Box::pin(outbound::serve_captured(p, l, pod.clone())));
        let served = crate::dual_stack::loopbacks(OUTBOUND_PORT)
            .into_iter()
            .try_for_each(|a| serve(a, out.clone()))
            .and_then(|_| {
                own.iter().try_for_each(|ip| {
                    serve(SocketAddr::new(*ip, INBOUND_PLAINTEXT_PORT), plain.clone())?;
                    serve(SocketAddr::new(*ip, HBONE_PORT), hbone.clone())
                })
            });
        if let Err(e) = served {
            // Whatever was bound closes with the token.
            stop.cancel();
            return Err(e);
        }
        self.proxy
            .netns
            .insert(&info.namespace, &info.name, netns.clone());
        info!(uid, namespace = %info.namespace, name = %info.name, "pod captured");
        self.lock()
            .insert(uid.to_string(), Pod { info, netns, stop });
        Ok(())
    }

    /// Tells the node agent this ztunnel drains, and waits (at most
    /// `wait`) for its ack before the caller closes the pods' listeners
    /// ([`drain`]).
    pub async fn announce_drain(&self, wait: Duration) {
        self.drain.ask(wait).await
    }

    /// Releases a pod, held or waiting for its ports.
    fn release(&self, uid: &str) {
        let mut deferred = self.deferred();
        if let Some(d) = deferred.remove(uid) {
            d.token.cancel();
        }
        self.count_unserved(&deferred);
        // Under the lock: a deferred bind cannot bind the pod again after.
        self.del(uid);
    }

    fn del(&self, uid: &str) {
        let Some(pod) = self.lock().remove(uid) else {
            return;
        };
        pod.stop.cancel();
        // Only if the registry still holds this pod's netns: a pod recreated
        // under the same name (a StatefulSet) must keep its own entry and
        // its connections.
        if self
            .proxy
            .netns
            .remove(&pod.info.namespace, &pod.info.name, &pod.netns)
        {
            let suffix = format!("/{}/{}", pod.info.namespace, pod.info.name);
            self.proxy.conns.cancel_where(|c| {
                c.local_uid
                    .as_deref()
                    .is_some_and(|u| u.ends_with(&suffix))
                    .then(|| "denied: the pod left the mesh".to_string())
            });
        }
        info!(uid, namespace = %pod.info.namespace, name = %pod.info.name, "pod released");
    }

    /// Connects to the agent and serves its requests; reconnects when the
    /// agent restarts. Pods stay served while the agent is away.
    pub async fn run(self: Arc<Self>, path: PathBuf, stop: CancellationToken) {
        // Take pods only once the config is complete, workloads and
        // policies alike: listeners opened earlier would refuse connections,
        // or worse, allow what a policy not yet received denies.
        match &self.xds {
            Some(x) => {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = x.wait_synced() => {}
                }
            }
            None => {
                let mut config = self.proxy.state.subscribe();
                while !self.proxy.state.has_config() {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        r = config.changed() => if r.is_err() { return },
                    }
                }
            }
        }
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.session(&path) => r,
            };
            // Draining: never back (the agent would count this ztunnel as
            // serving its pods again).
            if self.drain.asked() {
                return;
            }
            if let Err(e) = result {
                warn!(path = %path.display(), error = %e, "ZDS session ended; reconnecting");
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    async fn session(
        self: &Arc<Self>,
        path: &std::path::Path,
    ) -> Result<(), mesh_core::zds::ZdsError> {
        if self.drain.asked() {
            return Ok(());
        }
        let sock = mesh_core::zds::connect(path).await?;
        info!(path = %path.display(), "connected to the node agent");
        let _connected = self.drain.connected();
        let asked = self.drain.token();
        let mut seen: HashSet<String> = HashSet::new();
        let mut in_snapshot = true;
        loop {
            let got = tokio::select! {
                r = mesh_core::zds::recv_request(&sock) => r?,
                _ = asked.cancelled() => return self.drain.announce(&sock).await,
            };
            let result = match got.request {
                Payload::Add(add) => {
                    let info = add.workload_info.unwrap_or_default();
                    match got.netns.map(Netns::from_fd) {
                        Some(Ok(ns)) => {
                            seen.insert(add.uid.clone());
                            self.take(&add.uid, info, Arc::new(ns), in_snapshot)
                        }
                        Some(Err(e)) => Err(PodError::NetnsFd(e)),
                        None => Err(PodError::NoNetns),
                    }
                }
                Payload::Keep(k) => {
                    seen.insert(k.uid.clone());
                    // One lock at a time (a deferred bind takes them in
                    // the other order).
                    let deferred = self.deferred().contains_key(&k.uid);
                    if deferred || self.lock().contains_key(&k.uid) {
                        Ok(())
                    } else {
                        Err(PodError::NotHeld(k.uid))
                    }
                }
                Payload::Del(d) => {
                    self.release(&d.uid);
                    Ok(())
                }
                Payload::SnapshotSent(_) => {
                    if in_snapshot {
                        in_snapshot = false;
                        let held: Vec<String> = self.lock().keys().cloned().collect();
                        let deferred: Vec<String> = self.deferred().keys().cloned().collect();
                        let stale: Vec<String> = held
                            .into_iter()
                            .chain(deferred)
                            .filter(|u| !seen.contains(u))
                            .collect();
                        for uid in stale {
                            self.release(&uid);
                        }
                        self.snapshot.send_replace(true);
                        info!(pods = self.lock().len(), "ZDS snapshot reconciled");
                    }
                    Ok(())
                }
            };
            if let Err(e) = &result {
                warn!(error = %e, "ZDS request refused");
            }
            mesh_core::zds::send_ack(&sock, result.err().map(|e| e.to_string())).await?;
        }
    }
}
