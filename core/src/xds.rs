//! The Delta ADS client: keeps the proxy state in step with the controller.
//!
//! Each response is applied to the state as one batch; resources that do
//! not convert are left out and named in a NACK, the rest still apply. When
//! the controller is gone the state stays as it was (traffic keeps flowing)
//! and the client reconnects with backoff, telling the controller which
//! versions it holds so only the difference is sent.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::envoy::config::core::v3::Node;
use mesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, Resource};
use mesh_proto::google::rpc::Status as RpcStatus;
use mesh_proto::istio::security::Authorization;
use mesh_proto::istio::workload::Address;
use mesh_proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tracing::{info, warn};

use crate::certs::Backoff;
use crate::state::{ProxyState, Update};

/// The version a refused resource is held under (see `run_stream`).
pub const NACKED_VERSION: &str = "nacked";

/// Reconnect delays: 200 ms after a stream that was healthy, doubling (with
/// jitter) to 15 s while streams keep failing.
pub const RECONNECT: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(15),
};

/// A stream that lasted this long was healthy: the failures before it are
/// forgiven.
pub const HEALTHY: Duration = Duration::from_secs(30);

/// Failures counted after a stream that `lasted` and ended cleanly or not.
/// A short stream counts as a failure even if it ended cleanly (a
/// controller that keeps closing streams at once must not be reconnected
/// to, and resent the mesh, in a hot loop); an error after a healthy
/// stream counts as the first.
pub fn failures_after(before: u32, lasted: Duration, clean: bool) -> u32 {
    match (lasted >= HEALTHY, clean) {
        (true, true) => 0,
        (true, false) => 1,
        (false, _) => before.saturating_add(1),
    }
}

/// What a ztunnel subscribes to.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// Where a client's resources go. The client owns the protocol (nonces,
/// versions, reconnects); the sink owns the meaning of each type.
pub trait XdsSink: Send + Sync + 'static {
    /// The types to subscribe to, all wildcard.
    fn types(&self) -> &'static [&'static str];
    /// Converts and applies one response as one batch. Returns the resources
    /// it rejected, by name, with why; the others must still apply.
    fn apply(
        &self,
        type_url: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Vec<(String, String)>;
}

/// Converts `istio.workload.Address` and `istio.security.Authorization`
/// resources into state updates; the rejected ones are returned by name.
pub fn state_updates(
    trust_domain: &str,
    type_url: &str,
    resources: &[Resource],
    removed: &[String],
) -> (Vec<Update>, Vec<(String, String)>) {
    let mut updates = Vec::with_capacity(resources.len() + removed.len());
    let mut rejected = Vec::new();
    for r in resources {
        let converted = match (type_url, &r.resource) {
            (_, None) => Err("resource has no body".to_string()),
            (ADDRESS_TYPE_URL, Some(any)) => Address::decode(any.value.as_slice())
                .map_err(|e| e.to_string())
                .and_then(|a| Update::from_address(&a, trust_domain).map_err(|e| e.to_string())),
            (AUTHORIZATION_TYPE_URL, Some(any)) => {
                let decoded = Authorization::decode(any.value.as_slice());
                match decoded
                    .as_ref()
                    .map_err(|e| e.to_string())
                    .and_then(|a| Update::from_authorization(a).map_err(|e| e.to_string()))
                {
                    Ok(u) => Ok(u),
                    Err(e) => {
                        // Fail closed: a policy that cannot be read is
                        // enforced as its stand-in, never simply absent
                        // (a missing DENY denies nothing, a missing ALLOW
                        // allows what it was meant to limit).
                        warn!(policy = %r.name, error = %e, "policy refused; enforcing its fail-closed stand-in");
                        updates.push(Update::Policy(
                            crate::state::Authorization::fail_closed_from_proto(
                                &r.name,
                                decoded.as_ref().ok(),
                                e.clone(),
                            ),
                        ));
                        Err(e)
                    }
                }
            }
            (t, Some(_)) => Err(format!("type {t} is not a state type")),
        };
        match converted {
            Ok(u) => updates.push(u),
            Err(e) => rejected.push((r.name.clone(), e)),
        }
    }
    for name in removed {
        updates.push(match type_url {
            ADDRESS_TYPE_URL => Update::RemoveAddress(name.clone()),
            _ => Update::RemovePolicy(name.clone()),
        });
    }
    (updates, rejected)
}

/// The ztunnel's sink: everything goes into its proxy state.
pub struct StateSink {
    pub state: ProxyState,
    pub trust_domain: String,
}

impl XdsSink for StateSink {
    fn types(&self) -> &'static [&'static str] {
        &TYPES
    }

    fn apply(
        &self,
        type_url: &str,
        resources: &[Resource],
        removed: &[String],
    ) -> Vec<(String, String)> {
        let (updates, rejected) = state_updates(&self.trust_domain, type_url, resources, removed);
        self.state.apply(updates);
        rejected
    }
}

#[derive(Debug, Clone)]
pub struct XdsConfig {
    /// e.g. https://istiod.istio-system.svc:15012
    pub address: String,
    pub ca_root_pem: String,
    pub server_name: String,
    pub token: Option<crate::ca::Token>,
    /// Proxy id sent in the Node.
    pub proxy_id: String,
    /// Sent as the Node's user agent, e.g. "ztunnel".
    pub user_agent: String,
}

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("xDS address {0}: {1}")]
    Config(String, String),
    #[error("xDS connect: {0}")]
    Connect(String),
    #[error("xDS stream: {0}")]
    Stream(#[from] tonic::Status),
}

/// Counters for tests and the admin view.
#[derive(Debug, Default)]
pub struct XdsStats {
    pub responses: AtomicU64,
    pub resources: AtomicU64,
    pub nacks: AtomicU64,
    pub connects: AtomicU64,
}

pub struct XdsClient {
    cfg: XdsConfig,
    sink: Arc<dyn XdsSink>,
    types: &'static [&'static str],
    known: Mutex<HashMap<&'static str, HashMap<String, String>>>,
    synced: watch::Sender<BTreeSet<&'static str>>,
    pub stats: XdsStats,
}

impl XdsClient {
    pub fn new(cfg: XdsConfig, sink: Arc<dyn XdsSink>) -> Arc<Self> {
        Arc::new(XdsClient {
            cfg,
            types: sink.types(),
            sink,
            known: Mutex::new(HashMap::new()),
            synced: watch::Sender::new(BTreeSet::new()),
            stats: XdsStats::default(),
        })
    }

    /// Every type has had at least one response (since start; a reconnect
    /// does not make the proxy unready, its state is still good).
    pub fn synced(&self) -> bool {
        self.synced.borrow().len() == self.types.len()
    }

    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let n = self.types.len();
        let _ = rx.wait_for(|s| s.len() == n).await;
    }

    /// Runs until `stop`, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let started = std::time::Instant::now();
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.session() => r,
            };
            failures = failures_after(failures, started.elapsed(), result.is_ok());
            match result {
                Ok(()) => info!(failures, "xDS stream ended; reconnecting"),
                Err(e) => {
                    warn!(error = %e, failures, "xDS stream failed; keeping the last good state")
                }
            }
            let wait = RECONNECT.delay(failures.max(1));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn lock_known(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<&'static str, HashMap<String, String>>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn session(&self) -> Result<(), XdsError> {
        let bad = |e: String| XdsError::Config(self.cfg.address.clone(), e);
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.cfg.ca_root_pem))
            .domain_name(self.cfg.server_name.clone());
        let channel = Endpoint::from_shared(self.cfg.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| XdsError::Connect(format!("{e}: {:?}", std::error::Error::source(&e))))?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        for (i, t) in self.types.iter().enumerate() {
            let held = self.lock_known().get(t).cloned().unwrap_or_default();
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    node: (i == 0).then(|| Node {
                        id: self.cfg.proxy_id.clone(),
                        user_agent_name: self.cfg.user_agent.clone(),
                        ..Default::default()
                    }),
                    type_url: t.to_string(),
                    resource_names_subscribe: vec!["*".into()],
                    initial_resource_versions: held.into_iter().collect(),
                    ..Default::default()
                })
                .await;
        }
        let mut req = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(t) = &self.cfg.token {
            req.metadata_mut()
                .insert("authorization", t.header().map_err(|e| bad(e.to_string()))?);
        }
        let mut stream = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024)
            .delta_aggregated_resources(req)
            .await?
            .into_inner();
        self.stats.connects.fetch_add(1, Ordering::Relaxed);
        info!(address = %self.cfg.address, "xDS stream open");
        while let Some(resp) = stream.message().await? {
            let Some(t) = self.types.iter().copied().find(|t| *t == resp.type_url) else {
                warn!(type_url = %resp.type_url, "response for an unknown type ignored");
                continue;
            };
            let rejected = self.sink.apply(t, &resp.resources, &resp.removed_resources);
            let errors: Vec<String> = rejected.iter().map(|(n, e)| format!("{n}: {e}")).collect();
            let accepted = resp
                .resources
                .iter()
                .filter(|r| !rejected.iter().any(|(n, _)| *n == r.name))
                .map(|r| (r.name.clone(), r.version.clone()));
            {
                let mut known = self.lock_known();
                let held = known.entry(t).or_default();
                for (n, v) in accepted {
                    held.insert(n, v);
                }
                // A refused resource is held too (as its fail-closed
                // stand-in), under a version no server sends: on reconnect
                // the server then resends it, or removes it if it is gone,
                // so a stand-in never outlives its resource.
                for (n, _) in &rejected {
                    held.insert(n.clone(), NACKED_VERSION.to_string());
                }
                for n in &resp.removed_resources {
                    held.remove(n);
                }
            }
            self.stats.responses.fetch_add(1, Ordering::Relaxed);
            self.stats
                .resources
                .fetch_add(resp.resources.len() as u64, Ordering::Relaxed);
            let error_detail = (!errors.is_empty()).then(|| {
                self.stats.nacks.fetch_add(1, Ordering::Relaxed);
                let message = errors.join("; ");
                warn!(type_url = t, error = %message, "rejecting resources (NACK)");
                RpcStatus {
                    code: tonic::Code::InvalidArgument as i32,
                    message,
                    details: vec![],
                }
            });
            let _ = tx
                .send(DeltaDiscoveryRequest {
                    type_url: t.to_string(),
                    response_nonce: resp.nonce.clone(),
                    error_detail,
                    ..Default::default()
                })
                .await;
            self.synced.send_modify(|s| {
                s.insert(t);
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest of many draws of the delay before retry `failures`.
    fn longest_delay(failures: u32) -> Duration {
        (0..200)
            .map(|_| RECONNECT.delay(failures.max(1)))
            .max()
            .unwrap_or_default()
    }

    /// A controller that cuts a proxy off at once, again and again (with
    /// an error status, or even a clean end), is not reconnected to in a
    /// hot loop: the delay grows. A stream that was healthy for a while
    /// resets it.
    #[test]
    fn repeated_short_streams_back_off() {
        for clean in [false, true] {
            let mut failures = 0;
            for _ in 0..6 {
                failures = failures_after(failures, Duration::from_millis(50), clean);
            }
            assert!(
                longest_delay(failures) >= Duration::from_secs(3),
                "clean={clean}: {failures} failures, {:?}",
                longest_delay(failures)
            );
        }
        let healed = failures_after(6, HEALTHY, true);
        assert!(longest_delay(healed) <= RECONNECT.initial, "{healed}");
        let healed = failures_after(6, HEALTHY + Duration::from_secs(1), false);
        assert!(longest_delay(healed) <= RECONNECT.initial, "{healed}");
    }
}
