//! The ztunnel: the node proxy. Everything it shares with the other
//! components (identity, TLS, certificates, HBONE, state, xDS) is in
//! `mesh_core`; this crate is the proxy's own data path and wiring.
//!
//! Layering (a module only uses those listed before it, and `mesh_core`):
//! `config` -> `dual_stack` -> `dns` -> `peer_meta` -> `proxy` -> `inpod` -> `admin` -> `memory` ->
//! `app`.

pub mod admin;
pub mod app;
pub mod config;
pub mod dns;
pub mod dual_stack;
pub mod inpod;
pub mod memory;
pub mod peer_meta;
pub mod proxy;
