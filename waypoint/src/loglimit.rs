//! Log lines a flood could multiply (an ingress writes one line per
//! refused connection: a source that names no workload, a failed or slow
//! TLS handshake): the limiter the controller shares,
//! [`mesh_core::loglimit`].

pub use mesh_core::loglimit::*;
