//! Request mirroring: a copy of a request sent to the route's mirror
//! backend, its answer dropped. The copy goes once the request's body is
//! whole in the retry buffer; a body that outgrows it is not mirrored.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use mesh_core::hbone::ConnectHeaders;
use tracing::debug;

use super::forward::{Outgoing, conn_limits};
use super::{Downstream, Waypoint};
use crate::reqbody::{Buffered, Progress, RetryBuffer};
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
        // Holds none of the request's body while it waits: a request that
        // ends without reading its body leaves nothing waiting here.
        let progress = out.body.progress();
        out.body = RetryBuffer::complete(&Buffered::default());
        let Some(whole) = whole_body(progress).await else {
            return debug!("request not mirrored: its body is not whole in the retry buffer");
        };
        out.body = RetryBuffer::complete(&whole);
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

/// The request's body once it has been read whole; None when it outgrew
/// the retry buffer, failed, or was abandoned.
async fn whole_body(mut progress: tokio::sync::watch::Receiver<Progress>) -> Option<Arc<Buffered>> {
    loop {
        match &*progress.borrow_and_update() {
            Progress::Complete(b) => return Some(b.clone()),
            Progress::Gone => return None,
            Progress::Reading => {}
        }
        progress.changed().await.ok()?;
    }
}
