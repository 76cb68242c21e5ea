//! Configuration every proxy shares: the mesh's well-known ports, the CA
//! client's settings, HBONE's HTTP/2 and pool settings, and reading a YAML
//! file into a typed struct. Each binary's own config embeds these.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Ports of the proxy itself; traffic addressed to them is never proxied.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
pub const DNS_PORT: u16 = 15053;
pub const ADMIN_PORT: u16 = 15000;
pub const METRICS_PORT: u16 = 15020;
pub const READINESS_PORT: u16 = 15021;
pub const PROXY_PORTS: [u16; 7] = [
    OUTBOUND_PORT,
    INBOUND_PLAINTEXT_PORT,
    HBONE_PORT,
    DNS_PORT,
    ADMIN_PORT,
    METRICS_PORT,
    READINESS_PORT,
];

/// The mark on a node proxy's own sockets: the redirect rules inside each
/// captured pod leave traffic carrying it alone (the node agent installs
/// them; the ztunnel marks its sockets with it in node mode).
pub const INPOD_MARK: u32 = 1337;

/// The mark the node agent's rules give an app's replies to the ztunnel's
/// dials from a client's address (as Istio's in-pod rules use); a policy
/// rule sends packets with it to [`ORIG_SRC_TABLE`].
pub const ORIG_SRC_REPLY_MARK: u32 = 0x111;
/// The pod's routing table that delivers those replies locally, to the
/// ztunnel's transparent socket.
pub const ORIG_SRC_TABLE: u32 = 100;

/// The source the node SNATs its own connections to captured pods to
/// (kubelet probes), as Istio does: never a client a ztunnel dials an app
/// from.
pub const PROBE_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
/// The IPv6 probe source (Istio's).
pub const PROBE_SOURCE_V6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(
    0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff,
);

/// The async runtime's model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// One tokio runtime whose threads steal each other's tasks.
    WorkStealing,
    /// One single-threaded runtime per thread, each with its own listeners
    /// and pool; a connection never leaves the thread that accepted it.
    #[default]
    Sharded,
}

impl RuntimeKind {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::WorkStealing => "work_stealing",
            RuntimeKind::Sharded => "sharded",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("config: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// e.g. https://istiod.istio-system.svc:15012. Required, here or from
    /// the environment (the ztunnel's `Overrides`).
    #[serde(default)]
    pub address: String,
    /// PEM root(s) that sign the CA's serving certificate.
    pub root_cert: PathBuf,
    #[serde(default = "d::ca_name")]
    pub server_name: String,
    /// File holding this node's bootstrap token.
    pub token_file: Option<PathBuf>,
    #[serde(default = "d::validity", with = "humantime_serde")]
    pub validity: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Streams per pooled HTTP/2 connection before another is opened.
    #[serde(default = "d::max_streams")]
    pub max_streams: usize,
    /// HTTP/2 connections a busy destination gets before its streams share
    /// them: each connection is driven by one task, so one connection would
    /// keep a destination's encryption on one runtime thread, and a task
    /// running many streams makes each wait for the others' turn. Default:
    /// twice the number of CPUs, at most 4.
    #[serde(default = "d::connections_per_destination")]
    pub connections_per_destination: usize,
    #[serde(default = "d::idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams: d::max_streams(),
            connections_per_destination: d::connections_per_destination(),
            idle_timeout: d::idle(),
        }
    }
}

/// HTTP/2 settings of HBONE connections.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2Config {
    #[serde(default = "d::stream_window")]
    pub stream_window: u32,
    #[serde(default = "d::conn_window")]
    pub connection_window: u32,
    #[serde(default = "d::frame_size")]
    pub max_frame_size: u32,
    #[serde(default = "d::keepalive", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "d::keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    #[serde(default = "d::header_list")]
    pub max_header_list_size: u32,
}

impl Default for H2Config {
    fn default() -> Self {
        H2Config {
            stream_window: d::stream_window(),
            connection_window: d::conn_window(),
            max_frame_size: d::frame_size(),
            keepalive_interval: d::keepalive(),
            keepalive_timeout: d::keepalive_timeout(),
            max_header_list_size: d::header_list(),
        }
    }
}

/// Defaults.
mod d {
    use std::time::Duration;

    pub fn ca_name() -> String {
        "istiod.istio-system.svc".into()
    }
    pub fn validity() -> Duration {
        Duration::from_secs(24 * 3600)
    }
    pub fn max_streams() -> usize {
        100
    }
    pub fn connections_per_destination() -> usize {
        std::thread::available_parallelism().map_or(2, |n| (2 * n.get()).min(4))
    }
    pub fn idle() -> Duration {
        Duration::from_secs(60)
    }
    // The public defaults: 4 MiB per stream, 16 MiB per connection.
    pub fn stream_window() -> u32 {
        4 * 1024 * 1024
    }
    pub fn conn_window() -> u32 {
        16 * 1024 * 1024
    }
    pub fn frame_size() -> u32 {
        1024 * 1024
    }
    pub fn keepalive() -> Duration {
        Duration::from_secs(10)
    }
    pub fn keepalive_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn header_list() -> u32 {
        16 * 1024
    }
}

/// Reads a YAML config file into `T`; errors name the file.
pub fn load_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: p.clone(),
        reason: e.to_string(),
    })?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: p,
        reason: e.to_string(),
    })
}
