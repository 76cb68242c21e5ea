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
pub mod dns;
pub mod hbone;
pub mod identity;
pub mod inpod;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod state;
pub mod tls;
pub mod xds;

/// Logging for every binary of the mesh: `RUST_LOG` filters, default info.
pub fn init_logging() {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        // Plain text when logging to a file or pipe.
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}
