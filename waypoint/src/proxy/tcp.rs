//! Opaque TCP: a connection that is not HTTP (by the port's declared
//! protocol, or sniffed) is copied both ways to one endpoint of the service,
//! after the policies TCP can be judged by.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_core::hbone::ConnectHeaders;
use tracing::info;

use super::sniff::Rewind;
use super::{Downstream, Waypoint};
use crate::attach;
use crate::extauthz::Subject;
use crate::upstream::UpstreamError;

impl Waypoint {
    /// Opaque TCP: one endpoint of the service, bytes copied both ways.
    pub(super) async fn tcp(
        self: Arc<Self>,
        mut io: Rewind<mesh_core::hbone::H2Stream>,
        ds: Arc<Downstream>,
    ) {
        let Some(dest) = self.resolve(&ds.service_key) else {
            io.inner.reset();
            return info!(peer = %ds.peer, service = %ds.service_key, "TCP: destination is gone");
        };
        // The destination's policies apply to opaque TCP too, on what TCP has.
        {
            let svc = attach::config(
                &self.state.snapshot(),
                &self.routes,
                &self.cfg,
                &ds.service_key,
            );
            let subject = Subject {
                source: ds.src_identity.as_ref(),
                source_addr: ds.peer,
                source_addrs: &ds.src_addrs,
                destination_addr: ds.target,
                waypoint: &self.identity,
                host: "",
            };
            if let Err(decision) = self.ext_authz.authorize_tcp(&svc.policies, &subject).await {
                io.inner.reset();
                return info!(
                    target: "access",
                    protocol = "tcp",
                    src.addr = %ds.peer,
                    src.identity = %ds.principal(),
                    service = %ds.service_key,
                    response_flags = "RBAC",
                    detail = %decision.detail,
                    "connection refused"
                );
            }
        }
        let eps = &dest.endpoints;
        let policy = self
            .routes
            .get(&ds.service_key)
            .map(|s| s.backend.clone())
            .unwrap_or_default();
        let stats = self.balancer.backend(&ds.service_key);
        let Some((ep, _)) = self.balancer.pick(&stats, eps, &[], &policy) else {
            io.inner.reset();
            return info!(peer = %ds.peer, service = %ds.service_key, "TCP: no healthy endpoint");
        };
        let Some(ip) = ep.addresses.first().copied() else {
            return;
        };
        let target = SocketAddr::new(ip, dest.port_on(&ep, ds.target.port()));
        let started = Instant::now();
        let within = policy.connect_timeout.unwrap_or(self.cfg.connect_timeout);
        let headers = ConnectHeaders {
            forwarded_for: Some(ds.peer),
            ..Default::default()
        };
        // The backend's connectTimeout (DestinationRule), else the waypoint's.
        let upstream =
            match tokio::time::timeout(within, self.upstreams.dial(&ep, target, &headers)).await {
                Ok(r) => r,
                Err(_) => Err(UpstreamError::Connect(format!(
                    "no connection within {within:?}"
                ))),
            };
        let mut up = match upstream {
            Ok(u) => u,
            Err(e) => {
                io.inner.reset();
                return info!(peer = %ds.peer, %target, error = %e, "TCP: upstream connect failed");
            }
        };
        let r = tokio::io::copy_bidirectional(&mut io, &mut up).await;
        info!(
            target: "access",
            protocol = "tcp",
            src.addr = %ds.peer,
            src.identity = %ds.principal(),
            service = %ds.service_key,
            dst.addr = %target,
            dst.workload = %ep.name,
            bytes_sent = r.as_ref().map(|(a, _)| *a).unwrap_or(0),
            bytes_received = r.as_ref().map(|(_, b)| *b).unwrap_or(0),
            duration_ms = started.elapsed().as_millis() as u64,
            error = r.as_ref().err().map(|e| e.to_string()).unwrap_or_else(|| "-".into()),
            "connection complete"
        );
    }
}
