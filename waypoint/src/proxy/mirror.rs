//! Request mirroring: a copy of a request sent to the route's mirror
//! backend, its answer dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_core::hbone::ConnectHeaders;
use tracing::debug;

use super::forward::{Outgoing, conn_limits};
use super::{Downstream, Waypoint};
use crate::routes::Backend;
use crate::upstream::UpstreamError;

impl Waypoint {
    /// Fire and forget: a copy to the mirror backend, its answer dropped.
    pub(super) async fn mirror(
        self: Arc<Self>,
        ds: Arc<Downstream>,
        backend: Backend,
        mut out: Outgoing,
    ) {
        let Some(dest) = self.resolve(&backend.service) else {
            return;
        };
        let eps = &dest.endpoints;
        let policy = self
            .routes
            .get(&backend.service)
            .map(|s| s.backend.clone())
            .unwrap_or_default();
        let stats = self.balancer.backend(&backend.service);
        let Some((ep, _)) = self.balancer.pick(&stats, eps, &[], &policy) else {
            return;
        };
        let Some(ip) = ep.addresses.first().copied() else {
            return;
        };
        let port = if backend.port == 0 {
            ds.target.port()
        } else {
            backend.port
        };
        let target = SocketAddr::new(ip, dest.port_on(&ep, port));
        // Envoy marks shadowed requests by suffixing the host.
        out.authority = match out.authority.split_once(':') {
            Some((h, p)) => format!("{h}-shadow:{p}"),
            None => format!("{}-shadow", out.authority),
        };
        let limits = conn_limits(&policy);
        let headers = ConnectHeaders::default();
        let send = async {
            let (lease, resp) = self
                .send_once(&backend.service, &limits, &ep, target, &headers, &out)
                .await?;
            let _ = resp.into_body().collect().await;
            lease.finish(&limits);
            Ok::<_, UpstreamError>(())
        };
        match tokio::time::timeout(Duration::from_secs(30), send).await {
            Ok(Ok(())) => debug!(%target, "mirrored request sent"),
            Ok(Err(e)) => debug!(%target, error = %e, "mirrored request failed"),
            Err(_) => debug!(%target, "mirrored request timed out"),
        }
    }
}
