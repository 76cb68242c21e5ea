//! The ztunnel library: the node proxy, and the identity, TLS and HBONE
//! pieces the waypoint reuses.
//!
//! Layering (a module only uses those listed before it):
//! `identity` -> `clock` -> `tls` -> `ca` -> `certs`.

pub mod ca;
pub mod certs;
pub mod clock;
pub mod identity;
pub mod tls;
