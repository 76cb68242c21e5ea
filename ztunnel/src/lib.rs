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

/// Logging for every binary of the mesh: `RUST_LOG` filters by target
/// (`info`, `warn,ztunnel::proxy=debug`), default info.
///
/// Target filters rather than `EnvFilter`: its span and field matching
/// brings a regex engine, a few hundred KiB of code mapped into every
/// node proxy (`docs/performance.md`, idle RSS).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let info = || tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => spec.parse().unwrap_or_else(|e| {
            eprintln!(
                "RUST_LOG={spec:?} is not a list of target=level filters ({e}); logging at info"
            );
            info()
        }),
        _ => info(),
    };
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                // Plain text when logging to a file or pipe.
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                )
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
}
