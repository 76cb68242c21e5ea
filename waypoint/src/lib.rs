//! The waypoint: the per-namespace L7 proxy. It terminates HBONE as its own
//! identity, serves HTTP per request (routes, retries, timeouts, load
//! balancing, outlier ejection, circuit breaking, L7 authorization,
//! telemetry) and sends each request on over HBONE to the chosen endpoint.
//! In its second role, the ingress gateway, it takes HTTP and HTTPS from
//! outside the mesh on the listeners of its Gateway (`ingress`) and sends
//! each request into the mesh the same way.
//!
//! Layering (a module only uses those listed before it):
//! `loglimit` -> `normalize` -> `config` -> `idle` -> `proxy_metrics` -> `authz` -> `ratelimit` -> `routes` ->
//! `telemetry` -> `extauthz` -> `ingress` -> `attach` -> `lb` -> `reqbody` -> `batch` -> `upstream`
//! -> `body` -> `h1guard` -> `proxy` -> `sink` -> `app`.
//!
//! The data path is one file per stage in `proxy/` (`sniff` and `rewrite`
//! -> `record` -> `forward` -> `mirror` -> `request` and `tcp` -> `listen`),
//! over the shared types in `proxy/mod.rs`. The HBONE, TLS, certificate,
//! state and xDS pieces are `mesh_core`'s.

/// Implements `AsyncWrite` for a stream wrapper `$ty<S>` by handing every
/// call to its field `$field` (the wrappers here change reads, not writes).
macro_rules! forward_async_write {
    ($ty:ident, $field:tt) => {
        impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<S> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.$field).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.$field).poll_shutdown(cx)
            }
        }
    };
}

pub mod app;
pub mod attach;
pub mod authz;
pub mod batch;
pub mod body;
pub mod config;
pub mod extauthz;
pub mod h1guard;
pub mod idle;
pub mod ingress;
pub mod lb;
pub mod loglimit;
pub mod normalize;
pub mod proxy;
pub mod proxy_metrics;
pub mod ratelimit;
pub mod reqbody;
pub mod routes;
pub mod sink;
pub mod telemetry;
pub mod upstream;
