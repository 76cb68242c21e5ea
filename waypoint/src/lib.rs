//! The waypoint: the per-namespace L7 proxy. It terminates HBONE as its own
//! identity, serves HTTP per request (routes, retries, timeouts, load
//! balancing, outlier ejection, circuit breaking, L7 authorization,
//! telemetry) and sends each request on over HBONE to the chosen endpoint.
//!
//! Layering: `config`, `routes` and `authz` (what to do) -> `lb` and
//! `upstream` (where and how to send) -> `telemetry`, `body` -> `proxy`
//! (the data path) -> `app` (wiring). The HBONE, TLS, certificate, state
//! and xDS pieces are the ztunnel's.

pub mod app;
pub mod authz;
pub mod body;
pub mod config;
pub mod h1guard;
pub mod lb;
pub mod proxy;
pub mod routes;
pub mod sink;
pub mod telemetry;
pub mod upstream;
