//! Wiring: config -> state source -> certificates -> proxy -> listeners ->
//! admin endpoints, and the drain on SIGTERM.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mesh_core::app::{AppError, certificates, shutdown_signal, start_err};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::admin;
use crate::config::{Config, HBONE_PORT};
use crate::inpod::InPod;
use crate::proxy::{Proxy, inbound, inbound_plain, outbound};
use mesh_core::admin::{NotReady, Readiness};
use mesh_core::certs::CertState;
use mesh_core::identity::Identity;
use mesh_core::metrics::Metrics;
use mesh_core::state::{LocalConfig, ProxyState};
use mesh_core::xds::{StateSink, XdsClient, XdsConfig};

struct Ready {
    proxy: Arc<Proxy>,
    xds: Option<Arc<XdsClient>>,
    inpod: Option<Arc<InPod>>,
}

impl Ready {
    /// Identities of the workloads this proxy serves.
    fn local_identities(&self) -> BTreeSet<Identity> {
        let snap = self.proxy.state.snapshot();
        if let Some(inpod) = &self.inpod {
            let pods = inpod.pods();
            return snap
                .workloads()
                .filter(|w| {
                    pods.iter()
                        .any(|(_, ns, name)| *ns == w.namespace && *name == w.name)
                })
                .map(|w| w.identity.clone())
                .collect();
        }
        let l = &self.proxy.cfg.listeners;
        l.inbound_ips
            .iter()
            .filter_map(|ip| snap.workload_by_ip(&self.proxy.cfg.network, *ip))
            .chain(l.outbound.iter().filter_map(|o| snap.workload(&o.source)))
            .map(|w| w.identity.clone())
            .collect()
    }
}

impl Readiness for Ready {
    fn check(&self) -> Result<(), NotReady> {
        if self.proxy.draining.is_cancelled() {
            return Err(NotReady::Draining);
        }
        if let Some(x) = &self.xds
            && !x.synced()
        {
            return Err(NotReady::NoControllerConfig);
        }
        if let Some(p) = &self.inpod
            && !p.synced()
        {
            return Err(NotReady::NoPodSnapshot);
        }
        // A pod whose listeners cannot be bound is that pod's failure
        // (logged, `ztunnel_pods_unserved`; the node agent fences it), never
        // the ztunnel's: its other pods stay served and the roll goes on.
        if !self.proxy.state.has_config() {
            return Err(NotReady::NoConfig);
        }
        let status = self.proxy.certs.status();
        let pending: Vec<String> = self
            .local_identities()
            .into_iter()
            .filter(|id| {
                !status
                    .iter()
                    .any(|s| &s.identity == id && s.state == CertState::Available)
            })
            .map(|id| id.to_string())
            .collect();
        if pending.is_empty() {
            Ok(())
        } else {
            Err(NotReady::Certificates(pending))
        }
    }
}

/// Keeps certificates for exactly the local workloads: fetched ahead of the
/// first connection, dropped when a workload leaves.
async fn keep_local_certificates(ready: Arc<Ready>, state: ProxyState, stop: CancellationToken) {
    let mut rx = state.subscribe();
    loop {
        let wanted = ready.local_identities();
        for id in &wanted {
            ready.proxy.certs.prefetch(id);
        }
        ready.proxy.certs.retain(|id| wanted.contains(id));
        // State changes, and a periodic look for pods the agent added.
        tokio::select! {
            _ = stop.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// A running ztunnel.
pub struct App {
    pub proxy: Arc<Proxy>,
    pub admin_addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    pub readiness_addr: std::net::SocketAddr,
    stop_admin: CancellationToken,
    inpod: Option<Arc<InPod>>,
}

/// How long a draining ztunnel waits for the node agent's ack of its
/// notice before it closes the pods' listeners all the same.
const DRAIN_ACK_WAIT: Duration = Duration::from_secs(5);

fn load_state(cfg: &Config, state: &ProxyState) -> Result<(), AppError> {
    let Some(path) = &cfg.state.local_file else {
        return Ok(());
    };
    let local = LocalConfig::load(path).map_err(|e| start_err("local state", e))?;
    let updates = local
        .to_updates(&cfg.trust_domain, &path.display().to_string())
        .map_err(|e| start_err("local state", e))?;
    state.replace(updates);
    Ok(())
}

/// Re-reads the local state file when it changes; a bad edit is reported and
/// the last good state stays in force.
async fn watch_local_file(cfg: Arc<Config>, state: ProxyState, stop: CancellationToken) {
    let Some(path) = &cfg.state.local_file else {
        return;
    };
    let mtime = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last: Option<SystemTime> = mtime(path);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let now = mtime(path);
        if now != last {
            last = now;
            match load_state(&cfg, &state) {
                Ok(()) => info!(path = %path.display(), "local state reloaded"),
                Err(e) => {
                    warn!(error = %e, "local state not reloaded; keeping the last good state")
                }
            }
        }
    }
}

impl App {
    pub async fn start(cfg: Config) -> Result<App, AppError> {
        mesh_core::tls::install_default_provider();
        let cfg = Arc::new(cfg);
        let state = ProxyState::default();
        load_state(&cfg, &state)?;

        let (certs, root, token) = certificates(&cfg.ca)?;
        let mut metrics = Metrics::default();
        let dns_metrics = crate::dns::DnsMetrics::register(&mut metrics.registry);
        let metrics = Arc::new(metrics);
        let proxy = Proxy::new(cfg.clone(), state.clone(), certs.clone(), metrics);

        let stop_admin = CancellationToken::new();
        let xds = match &cfg.state.xds_address {
            Some(address) => {
                let client = XdsClient::new(
                    XdsConfig {
                        address: address.clone(),
                        ca_root_pem: root.clone(),
                        server_name: cfg.ca.server_name.clone(),
                        token: token.clone(),
                        proxy_id: format!("ztunnel~{}", cfg.node),
                        user_agent: "ztunnel".into(),
                    },
                    Arc::new(StateSink {
                        state: state.clone(),
                        trust_domain: cfg.trust_domain.clone(),
                    }),
                );
                tokio::spawn(client.clone().run(stop_admin.clone()));
                Some(client)
            }
            None => {
                tokio::spawn(watch_local_file(
                    cfg.clone(),
                    state.clone(),
                    stop_admin.clone(),
                ));
                None
            }
        };
        let inpod = cfg.node_mode.as_ref().map(|nm| {
            let dns = nm.dns.then(|| {
                let upstreams = if nm.dns_upstream.is_empty() {
                    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_else(|e| {
                        tracing::warn!(error = %e, "DNS proxy: reading /etc/resolv.conf");
                        String::new()
                    });
                    crate::dns::nameservers_from_resolv_conf(&conf)
                } else {
                    nm.dns_upstream.clone()
                };
                crate::dns::DnsProxy::new(
                    proxy.state.clone(),
                    nm.dns_domain.clone(),
                    &upstreams,
                    dns_metrics.clone(),
                    crate::dns::Limits::from(&nm.dns_limits),
                )
            });
            let inpod = InPod::new(proxy.clone(), dns, xds.clone());
            tokio::spawn(inpod.clone().run(nm.zds_socket.clone(), stop_admin.clone()));
            inpod
        });
        let ready = Arc::new(Ready {
            proxy: proxy.clone(),
            xds: xds.clone(),
            inpod: inpod.clone(),
        });
        tokio::spawn(keep_local_certificates(
            ready.clone(),
            state,
            stop_admin.clone(),
        ));

        // Each listener once per shard (one shard unless the runtime is
        // sharded): a connection stays on the thread that accepted it.
        let shards = mesh_core::shards::current();
        for ip in &cfg.listeners.inbound_ips {
            let addr = std::net::SocketAddr::new(*ip, HBONE_PORT);
            let p = proxy.clone();
            shards
                .serve_each(addr, None, move |l| inbound::serve(p.clone(), l))
                .map_err(|e| start_err(format!("bind {addr}"), e))?;
            info!(%addr, "serving HBONE");
        }
        for o in &cfg.listeners.outbound {
            let (p, source, target) = (proxy.clone(), o.source.clone(), o.target);
            shards
                .serve_each(o.bind, None, move |l| {
                    outbound::serve(p.clone(), l, source.clone(), target)
                })
                .map_err(|e| start_err(format!("bind {}", o.bind), e))?;
            info!(addr = %o.bind, source = o.source, "serving outbound");
        }
        for b in &cfg.listeners.inbound_plaintext {
            let (p, target) = (proxy.clone(), b.target);
            shards
                .serve_each(b.bind, None, move |l| {
                    inbound_plain::serve(p.clone(), l, target, None)
                })
                .map_err(|e| start_err(format!("bind {}", b.bind), e))?;
            info!(addr = %b.bind, "serving inbound plaintext");
        }
        let (admin_addr, metrics_addr, readiness_addr) =
            admin::start(proxy.clone(), ready, stop_admin.clone())
                .await
                .map_err(|e| start_err("admin endpoints", e))?;
        info!(%admin_addr, %metrics_addr, %readiness_addr, "ztunnel started");
        Ok(App {
            proxy,
            admin_addr,
            metrics_addr,
            readiness_addr,
            stop_admin,
            inpod,
        })
    }

    /// Stops accepting, drains open connections up to the configured
    /// deadline, closes the rest.
    pub async fn shutdown(self) {
        // The node agent first: it fences the pods if no other ztunnel
        // serves them, before their listeners close.
        if let Some(p) = &self.inpod {
            p.announce_drain(DRAIN_ACK_WAIT).await;
        }
        self.proxy.drain(self.proxy.cfg.drain_timeout).await;
        self.stop_admin.cancel();
    }
}

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(cfg: Config) -> Result<(), AppError> {
    let app = App::start(cfg).await?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(crate::memory::keep_lean());
    shutdown_signal()
        .await
        .map_err(|e| start_err("SIGTERM handler", e))?;
    app.shutdown().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::DRAIN_ACK_WAIT;
    use serde::Deserialize as _;

    /// The DaemonSet's grace period covers the wait for the node agent's
    /// ack of the drain notice, then the drain, then a margin: with less
    /// the kubelet kills a ztunnel whose ack was slow before its drain
    /// deadline. Failed first: 35 s covered the drain and its margin only.
    #[test]
    fn the_grace_period_covers_the_ack_wait_and_the_drain() {
        let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/install/ztunnel.yaml");
        let text = std::fs::read_to_string(&manifest).expect("the install manifest");
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|d| serde_yaml::Value::deserialize(d).ok())
            .collect();
        let config = docs
            .iter()
            .find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "ztunnel-config")
            .and_then(|v| v["data"]["config.yaml"].as_str())
            .expect("the ztunnel's config");
        let config: serde_yaml::Value = serde_yaml::from_str(config).expect("yaml");
        let drain: u64 = config["drain_timeout"]
            .as_str()
            .and_then(|d| d.strip_suffix('s')?.parse().ok())
            .expect("drain_timeout in seconds");
        let grace = docs
            .iter()
            .find(|v| v["kind"] == "DaemonSet")
            .and_then(|d| d["spec"]["template"]["spec"]["terminationGracePeriodSeconds"].as_u64())
            .expect("the DaemonSet's grace period");
        let margin = 5;
        assert!(
            grace >= DRAIN_ACK_WAIT.as_secs() + drain + margin,
            "grace {grace} s < ack wait {:?} + drain {drain} s + {margin} s",
            DRAIN_ACK_WAIT
        );
    }
}
