//! The ztunnel library: the node proxy, and the identity, TLS and HBONE
//! pieces the waypoint reuses.
//!
//! Layering (a module only uses those listed before it):
//! `identity` -> `clock` -> `tls` -> `ca` -> `certs` -> `config` -> `state`
//! -> `metrics` -> `hbone` -> `proxy` -> `admin` -> `app`.

pub mod admin;
pub mod app;
pub mod ca;
pub mod certs;
pub mod clock;
pub mod config;
pub mod hbone;
pub mod identity;
pub mod metrics;
pub mod proxy;
pub mod state;
pub mod tls;
