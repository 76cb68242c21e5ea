//! `meshctl why SRC DST[:PORT]`: one connection explained hop by hop, by
//! running the ztunnel's own decision code (`mesh_core::state::decide`:
//! `resolve`, `authorize`) on the state from its `/config_dump`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_core::identity::Identity;
use mesh_core::state::Decision;
use mesh_core::state::decide::authorize;
use mesh_core::state::decide::{Route, resolve};
use mesh_core::state::{ProxyState, Snapshot, TunnelProtocol, Workload, updates_from_dump};
use serde::Serialize;

use crate::output::Table;
use crate::source::{Dump, SourceError};

/// One hop of the explanation.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub step: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub source: String,
    pub destination: String,
    pub steps: Vec<Step>,
    /// "allowed", "denied" or "fails".
    pub outcome: String,
    /// The policy that decided, when one did.
    pub decided_by: Option<String>,
    /// Entries of the dump that could not be read (a newer version's).
    pub skipped: Vec<String>,
}

impl Explanation {
    pub fn table(&self) -> Table {
        let mut t = Table::new("steps", &["STEP", "DETAIL"]);
        for s in &self.steps {
            t.push(vec![s.step.clone(), s.detail.clone()]);
        }
        // The verdict last, as a row: the table keeps one header line.
        t.push(vec![
            "outcome".into(),
            format!(
                "{} -> {}: {}{}",
                self.source,
                self.destination,
                self.outcome.to_ascii_uppercase(),
                self.decided_by
                    .as_ref()
                    .map(|p| format!(" (decided by {p})"))
                    .unwrap_or_default()
            ),
        ]);
        t
    }
}

/// The state of one ztunnel, rebuilt from its dump.
pub fn snapshot_of(dump: &Dump) -> (Arc<Snapshot>, Vec<String>) {
    let (updates, skipped) = updates_from_dump(&dump.value);
    let state = ProxyState::default();
    state.replace(updates);
    (state.snapshot(), skipped)
}

fn find_workload(snap: &Snapshot, network: &str, what: &str) -> Option<Arc<Workload>> {
    if let Ok(ip) = what.parse::<IpAddr>() {
        return snap.workload_by_ip(network, ip).cloned();
    }
    let (ns, name) = what.split_once('/')?;
    snap.workloads()
        .find(|w| w.namespace == ns && w.name == name)
        .cloned()
}

/// Splits "host[:port]" (port defaults to 80). An IPv6 address takes a
/// port only in brackets ("[fd00::1]:8080"); bare, it is all address.
fn host_port(dst: &str) -> Result<(String, u16), SourceError> {
    if let Ok(sa) = dst.parse::<SocketAddr>() {
        return Ok((sa.ip().to_string(), sa.port()));
    }
    if let Ok(ip) = dst
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        return Ok((ip.to_string(), 80));
    }
    match dst.rsplit_once(':') {
        Some((h, p)) => p
            .parse::<u16>()
            .map(|p| (h.to_string(), p))
            .map_err(|_| SourceError::Other(format!("{dst:?}: {p:?} is not a port"))),
        None => Ok((dst.to_string(), 80)),
    }
}

/// The destination address: an IP, a pod ("ns/name"), or a service name
/// ("name", "name.ns", "name.ns.svc.<domain>", relative to the source's
/// namespace).
fn destination_ip(
    snap: &Snapshot,
    network: &str,
    host: &str,
    src_ns: &str,
) -> Result<(IpAddr, String), SourceError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok((ip, host.to_string()));
    }
    if let Some(w) = find_workload(snap, network, host) {
        let ip = w
            .addresses
            .first()
            .copied()
            .ok_or_else(|| SourceError::Other(format!("pod {host} has no address")))?;
        return Ok((ip, format!("pod {host}")));
    }
    let parts: Vec<&str> = host.split('.').collect();
    let (name, ns) = match parts.as_slice() {
        [name] => (*name, src_ns),
        [name, ns, ..] => (*name, *ns),
        [] => return Err(SourceError::Other("empty destination".into())),
    };
    let svc = snap
        .services()
        .find(|s| s.service.name == name && s.service.namespace == ns)
        .ok_or_else(|| {
            SourceError::Other(format!(
                "{host}: no service {ns}/{name} and no pod of that name in the ztunnel's state"
            ))
        })?;
    let ip = svc
        .service
        .vips
        .iter()
        .find(|(n, _)| n == network)
        .or(svc.service.vips.first())
        .map(|(_, ip)| *ip)
        .ok_or_else(|| SourceError::Other(format!("service {ns}/{name} has no VIP")))?;
    Ok((ip, format!("service {ns}/{name}")))
}

fn who(snap: &Snapshot, network: &str, ip: IpAddr) -> String {
    if let Some(w) = snap.workload_by_ip(network, ip) {
        return format!("{}/{}", w.namespace, w.name);
    }
    if let Some(s) = snap.service_by_vip(network, ip) {
        return format!("service {}/{}", s.service.namespace, s.service.name);
    }
    ip.to_string()
}

/// Explains a connection from `src` to `dst` on the ztunnel state in `dumps`
/// (one per node; the source's node is used when there are several).
///
/// `l7` names the L7 policies each service's waypoint applies (service key
/// -> policy names), when the controller could be asked.
pub fn explain(
    dumps: &[Dump],
    src: &str,
    dst: &str,
    root_namespace: &str,
    network: &str,
    l7: Option<&BTreeMap<String, Vec<String>>>,
) -> Result<Explanation, SourceError> {
    let first = dumps
        .first()
        .ok_or_else(|| SourceError::Other("no ztunnel state to explain with".into()))?;
    let (snap, mut skipped) = snapshot_of(first);
    let src_w = find_workload(&snap, network, src).ok_or_else(|| {
        SourceError::Other(format!(
            "source {src:?} is not a workload the ztunnel knows (give ns/pod or a pod IP)"
        ))
    })?;
    // The source's own ztunnel holds the live view for it.
    let (snap, src_w, src_dump) = match dumps
        .iter()
        .find(|d| d.node == src_w.node && d.node != first.node)
    {
        Some(d) => {
            let (s, sk) = snapshot_of(d);
            skipped = sk;
            let w = find_workload(&s, network, src).unwrap_or(src_w);
            (s, w, d)
        }
        None => (snap, src_w, first),
    };
    // Only a ztunnel that says so hands same-node connections over in
    // memory (an older one, or Istio's, always tunnels).
    let fast_path = src_dump.node == src_w.node
        && src_dump.value["same_node_fast_path"].as_bool() == Some(true);
    let (host, port) = host_port(dst)?;
    let (dst_ip, dst_desc) = destination_ip(&snap, network, &host, &src_w.namespace)?;
    let src_ip = src_w
        .addresses
        .first()
        .copied()
        .ok_or_else(|| SourceError::Other(format!("source {src} has no address")))?;
    let mut walk = Walk {
        snap: &snap,
        network,
        root_namespace,
        l7,
        src_w: &src_w,
        src_ip,
        dst_ip,
        port,
        target: SocketAddr::new(dst_ip, port),
        fast_path,
        steps: Vec::new(),
        outcome: "allowed",
        decided_by: None,
    };
    walk.start(&dst_desc);
    if src_w.protocol == TunnelProtocol::Hbone {
        walk.tunnelled();
    } else {
        walk.plaintext();
    }
    Ok(Explanation {
        source: src.into(),
        destination: dst.into(),
        steps: walk.steps,
        outcome: walk.outcome.into(),
        decided_by: walk.decided_by,
        skipped,
    })
}

/// One explanation being written: what it runs on, and the steps, outcome
/// and deciding policy so far.
struct Walk<'a> {
    snap: &'a Snapshot,
    network: &'a str,
    root_namespace: &'a str,
    l7: Option<&'a BTreeMap<String, Vec<String>>>,
    src_w: &'a Workload,
    src_ip: IpAddr,
    dst_ip: IpAddr,
    port: u16,
    target: SocketAddr,
    fast_path: bool,
    steps: Vec<Step>,
    /// "allowed", "denied" or "fails".
    outcome: &'static str,
    decided_by: Option<String>,
}

impl Walk<'_> {
    fn step(&mut self, s: &str, d: String) {
        self.steps.push(Step {
            step: s.to_string(),
            detail: d,
        })
    }

    fn decide(
        &self,
        dst_w: &Workload,
        from: Option<&Identity>,
        from_ip: IpAddr,
        t: SocketAddr,
    ) -> Decision {
        authorize(self.snap, self.root_namespace, dst_w, from, from_ip, t)
    }

    fn target_port(&self, service: Option<&str>, ep: &Workload) -> u16 {
        target_port(self.snap, service, ep, self.port)
    }

    /// The source, how it is captured, and the destination.
    fn start(&mut self, dst_desc: &str) {
        let w = self.src_w;
        self.step(
            "source",
            format!(
                "{}/{} ({}) on node {}",
                w.namespace, w.name, self.src_ip, w.node
            ),
        );
        if w.protocol == TunnelProtocol::Hbone {
            self.step(
                "capture",
                format!(
                    "the ztunnel on {} captures it (in the mesh) and presents {}",
                    w.node, w.identity
                ),
            );
        } else {
            self.step(
                "capture",
                "not in the mesh: nothing captures it; it connects in plaintext, with no identity"
                    .into(),
            );
        }
        self.step("destination", format!("{} ({dst_desc})", self.target));
    }

    /// Plaintext into the mesh: the destination pod's ztunnel takes it on
    /// 15006. A VIP reaches one endpoint (the cluster's service proxy
    /// picks); each is judged.
    fn plaintext(&mut self) {
        let snap = self.snap;
        let (endpoints, service) = match snap.service_by_vip(self.network, self.dst_ip) {
            Some(svc) => {
                let key = svc.service.key();
                (snap.endpoints(&key).cloned().collect::<Vec<_>>(), Some(key))
            }
            None => (
                snap.workload_by_ip(self.network, self.dst_ip)
                    .cloned()
                    .into_iter()
                    .collect(),
                None,
            ),
        };
        let mut denials = 0;
        for d in &endpoints {
            let Some(ip) = d.addresses.first().copied() else {
                continue;
            };
            if d.protocol != TunnelProtocol::Hbone {
                self.step(
                    "path",
                    format!(
                        "{}/{}: plain TCP, outside the mesh: no proxy, no policy",
                        d.namespace, d.name
                    ),
                );
                continue;
            }
            let at = SocketAddr::new(ip, self.target_port(service.as_deref(), d));
            let decision = self.decide(d, None, self.src_ip, at);
            self.step(
                "at destination",
                format!(
                    "{}/{} ({at}): the ztunnel on {} takes it on 15006 (plaintext, no identity): {decision}",
                    d.namespace, d.name, d.node
                ),
            );
            if !decision.is_allowed() {
                denials += 1;
                self.decided_by = self.decided_by.take().or(decision_policy(&decision));
            }
        }
        if endpoints.is_empty() {
            self.step(
                "path",
                "plain TCP to an address outside the mesh: no proxy, no policy".into(),
            );
        }
        if denials > 0 && denials == endpoints.len() {
            self.outcome = "denied";
        } else {
            self.decided_by = None;
        }
    }

    /// From a captured source: the route its ztunnel resolves, then what
    /// each hop decides.
    fn tunnelled(&mut self) {
        match resolve(self.snap, self.network, self.src_w, self.target) {
            Err(e) => {
                self.step("route", format!("refused by the source ztunnel: {e}"));
                self.outcome = "fails";
            }
            Ok(Route::Passthrough { addr }) => {
                self.step(
                    "route",
                    format!("{addr} is not a mesh address: passed through as plain TCP, no policy"),
                );
            }
            Ok(Route::Direct {
                addr, dst_workload, ..
            }) => {
                self.step(
                    "route",
                    format!(
                        "{}/{} is not in the mesh: plain TCP to {addr}, no policy at the destination",
                        dst_workload.namespace, dst_workload.name
                    ),
                );
            }
            Ok(Route::Hbone {
                next_hop,
                target,
                peer_identity,
                dst_workload,
                via_waypoint,
                service,
            }) => {
                let hop = Hop {
                    next_hop,
                    target,
                    peer_identity,
                    dst_workload,
                    service,
                };
                if via_waypoint {
                    self.via_waypoint(hop);
                } else {
                    self.tunnel_to_destination(hop);
                }
            }
        }
    }

    /// Through the destination's waypoint, which each endpoint's ztunnel
    /// then judges as the waypoint's identity.
    fn via_waypoint(&mut self, hop: Hop) {
        let Hop {
            next_hop,
            target: t,
            peer_identity,
            dst_workload,
            service,
        } = hop;
        let snap = self.snap;
        let why = match &service {
            Some(s) => format!("service {s} has a waypoint (istio.io/use-waypoint)"),
            None => format!(
                "pod {}/{} has a waypoint for workloads (istio.io/use-waypoint, waypoint-for workload|all)",
                dst_workload.namespace, dst_workload.name
            ),
        };
        self.step(
            "waypoint",
            format!(
                "{why}: HBONE to {} at {next_hop} (expects {peer_identity}), :authority {t}",
                who(snap, self.network, next_hop.ip())
            ),
        );
        let policies = match (self.l7, &service) {
            (Some(m), Some(k)) => match m.get(k) {
                Some(p) if !p.is_empty() => {
                    format!("L7 policies {} apply per request", p.join(", "))
                }
                _ => "no L7 policy applies".into(),
            },
            _ => "L7 policies and routes apply per request (`meshctl waypoint list` shows them)"
                .into(),
        };
        self.step(
            "at waypoint",
            format!("{policies}; it sends on over HBONE as its own identity"),
        );
        // Past the waypoint: each endpoint's ztunnel sees the waypoint.
        let endpoints: Vec<Arc<Workload>> = match &service {
            Some(key) => snap.endpoints(key).cloned().collect(),
            None => snap
                .workload_by_ip(self.network, self.dst_ip)
                .cloned()
                .into_iter()
                .collect(),
        };
        if endpoints.is_empty() {
            self.step(
                "at waypoint",
                "no healthy endpoint behind it: the waypoint answers 503 (UH)".into(),
            );
            self.outcome = "fails";
        }
        let mut all_denied = !endpoints.is_empty();
        for ep in &endpoints {
            let Some(ip) = ep.addresses.first().copied() else {
                continue;
            };
            if ep.protocol != TunnelProtocol::Hbone {
                self.step(
                    "at destination",
                    format!(
                        "{}/{} is not in the mesh: the waypoint connects in plain TCP, no policy there",
                        ep.namespace, ep.name
                    ),
                );
                all_denied = false;
                continue;
            }
            let at = SocketAddr::new(ip, self.target_port(service.as_deref(), ep));
            let d = self.decide(ep, Some(&peer_identity), next_hop.ip(), at);
            self.step(
                "at destination",
                format!(
                    "{}/{} ({at}) on {}: its ztunnel sees {peer_identity} (the waypoint): {d}",
                    ep.namespace, ep.name, ep.node
                ),
            );
            if d.is_allowed() {
                all_denied = false;
            } else if self.decided_by.is_none() {
                self.decided_by = decision_policy(&d);
            }
        }
        if all_denied {
            self.outcome = "denied";
        } else if self.outcome != "fails" {
            self.decided_by = None;
        }
    }

    /// Straight to the destination's ztunnel (or, on the same node with the
    /// fast path, handed over in memory), which judges the source.
    fn tunnel_to_destination(&mut self, hop: Hop) {
        let Hop {
            next_hop,
            target: t,
            peer_identity,
            dst_workload,
            service,
        } = hop;
        let (snap, src_w) = (self.snap, self.src_w);
        let picked = service
            .as_ref()
            .map(|s| format!(" (one endpoint of {s}, picked per connection)"))
            .unwrap_or_default();
        if self.fast_path && dst_workload.node == src_w.node {
            self.step(
                "route",
                format!(
                    "same node: the ztunnel on {} hands it to its own inbound side for {}/{} at {t}{picked}, with no tunnel (same_node_fast_path); {peer_identity} is the destination identity",
                    src_w.node, dst_workload.namespace, dst_workload.name,
                ),
            );
        } else {
            self.step(
                "route",
                format!(
                    "HBONE (mTLS) to {}/{} via its ztunnel at {next_hop}, :authority {t}, expecting {peer_identity}{picked}",
                    dst_workload.namespace, dst_workload.name,
                ),
            );
        }
        // A service's connections go to any of its endpoints (picked per
        // connection), and policies may differ between them: each is
        // judged, the one picked first.
        let mut judged: Vec<Arc<Workload>> = vec![dst_workload.clone()];
        if let Some(key) = &service {
            judged.extend(
                snap.endpoints(key)
                    .filter(|e| e.uid != dst_workload.uid && e.protocol == TunnelProtocol::Hbone)
                    .cloned(),
            );
        }
        let mut denials = 0;
        for ep in &judged {
            let at = if ep.uid == dst_workload.uid {
                t
            } else {
                let Some(ip) = ep.addresses.first().copied() else {
                    continue;
                };
                SocketAddr::new(ip, self.target_port(service.as_deref(), ep))
            };
            let d = self.decide(ep, Some(&src_w.identity), self.src_ip, at);
            self.step(
                "at destination",
                format!(
                    "the ztunnel on {} checks {} against {}/{}'s policies: {d}",
                    ep.node, src_w.identity, ep.namespace, ep.name
                ),
            );
            if !d.is_allowed() {
                denials += 1;
                self.decided_by = self.decided_by.take().or(decision_policy(&d));
            } else if judged.len() == 1 {
                self.decided_by = decision_policy(&d);
            }
        }
        if denials > 0 && denials == judged.len() {
            self.outcome = "denied";
        } else if denials > 0 {
            self.outcome = "allowed";
            self.decided_by = None;
            self.step(
                "note",
                format!(
                    "{denials} of {} endpoints deny it: the outcome depends on the endpoint picked",
                    judged.len()
                ),
            );
        }
    }
}

/// An HBONE route's hop, as the source's ztunnel resolved it.
struct Hop {
    next_hop: SocketAddr,
    target: SocketAddr,
    peer_identity: Identity,
    dst_workload: Arc<Workload>,
    service: Option<String>,
}

fn target_port(snap: &Snapshot, service: Option<&str>, ep: &Workload, port: u16) -> u16 {
    match service.and_then(|k| snap.service(k)) {
        Some(svc) => mesh_core::state::decide::target_port(svc, ep, port),
        None => port,
    }
}

fn decision_policy(d: &Decision) -> Option<String> {
    match d {
        Decision::Allowed { policy } | Decision::Denied { policy } => Some(policy.clone()),
        Decision::NotAllowed { allow_policies } => Some(format!(
            "no matching ALLOW among {}",
            allow_policies.join(", ")
        )),
        Decision::AllowNoPolicies | Decision::Unattributable { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_reads_ipv6_with_and_without_a_port() {
        let hp = |s: &str| host_port(s).map_err(|e| e.to_string());
        assert_eq!(hp("fd00::5"), Ok(("fd00::5".into(), 80)));
        assert_eq!(hp("[fd00::5]"), Ok(("fd00::5".into(), 80)));
        assert_eq!(hp("[fd00::5]:8080"), Ok(("fd00::5".into(), 8080)));
        assert_eq!(hp("10.0.0.1:9"), Ok(("10.0.0.1".into(), 9)));
        assert_eq!(hp("web.shop"), Ok(("web.shop".into(), 80)));
        assert_eq!(hp("web.shop:443"), Ok(("web.shop".into(), 443)));
        assert!(hp("web:http").is_err());
    }
}
