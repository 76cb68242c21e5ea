//! The waypoint's configuration: one typed struct, every default in one
//! place. The CA, pool and HTTP/2 settings are the ztunnel's own types.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use mesh_core::config::{CaConfig, ConfigError, H2Config, PoolConfig, load_yaml};
use serde::Deserialize;

use crate::normalize::PathNormalization;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Waypoint,
    Ingress,
}

impl Role {
    /// The Node.id prefix the controller recognises the role by.
    pub fn proxy_prefix(self) -> &'static str {
        match self {
            Role::Waypoint => "waypoint",
            Role::Ingress => "ingress",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What this proxy is: a namespace's waypoint (HBONE in, the default),
    /// or an ingress gateway (HTTP and HTTPS listeners from the outside).
    #[serde(default)]
    pub role: Role,
    /// The Gateway's namespace and name.
    pub namespace: String,
    pub gateway: String,
    /// This replica's pod name (the controller checks it is a pod of the
    /// Gateway on this node before sending it routes). A Deployment passes
    /// it in POD_NAME instead; see the binary's --pod-name.
    #[serde(default)]
    pub pod_name: String,
    /// The service account the waypoint runs as: its identity.
    pub service_account: String,
    #[serde(default = "d::trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub network: String,
    pub ca: CaConfig,
    /// The controller's Delta ADS address (same TLS and token as the CA).
    pub xds_address: String,
    /// Waypoint only: where HBONE is accepted.
    #[serde(default = "d::hbone")]
    pub hbone_addr: SocketAddr,
    /// Ingress only: the address listener ports are bound on (each
    /// listener's port comes from the controller).
    #[serde(default = "d::ingress_bind")]
    pub ingress_bind: IpAddr,
    #[serde(default = "d::admin")]
    pub admin_addr: SocketAddr,
    #[serde(default = "d::metrics")]
    pub metrics_addr: SocketAddr,
    #[serde(default = "d::readiness")]
    pub readiness_addr: SocketAddr,
    #[serde(default = "d::drain", with = "humantime_serde")]
    pub drain_timeout: Duration,
    #[serde(default = "d::connect", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "d::handshake", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub h2: H2Config,
    #[serde(default)]
    pub limits: Limits,
    /// Istio's mesh-wide `pathNormalization`: how request paths are
    /// normalized before policy and routing, and as sent on (`NONE`,
    /// `BASE` (the default), `MERGE_SLASHES`, `DECODE_AND_MERGE_SLASHES`).
    #[serde(default)]
    pub path_normalization: PathNormalization,
    /// The `Upgrade` protocols relayed (Envoy's `upgrade_configs`): a
    /// request asking for another is refused with 403. WebSocket, over
    /// HTTP/1.1 or HTTP/2 (RFC 8441), by default.
    #[serde(default = "d::upgrades")]
    pub upgrades: Vec<String>,
    /// OTLP/HTTP collector base URL (e.g. http://10.0.0.5:4318); spans are
    /// exported only when set.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
}

/// What one client may ask of the waypoint. Requests over a limit are
/// refused with the status HTTP assigns to it; other clients are unaffected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Request line plus headers (HTTP/1) or header list (HTTP/2): 431 beyond.
    #[serde(default = "d::max_header_bytes")]
    pub max_header_bytes: usize,
    /// A request body's size: 413 beyond. Unset (the default): no limit;
    /// bodies stream through, whatever their size.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// How much of a request's body is kept so the request can be retried
    /// or mirrored (Envoy's per-request buffer limit). A body that outgrows
    /// it goes on streaming but is neither retried nor mirrored (the access
    /// log says "not retryable: body over the retry buffer").
    #[serde(default = "d::retry_buffer_bytes")]
    pub retry_buffer_bytes: usize,
    /// Time for a client to send a request's headers (slowloris guard).
    #[serde(default = "d::header_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request stream (HTTP/1 request or HTTP/2 stream) with nothing
    /// moving either way for this long is ended: a request body still
    /// awaited gets 408, a response body is cut (Envoy's
    /// `stream_idle_timeout`, 5 min by default). `body_read_timeout` is its
    /// old name.
    #[serde(
        default = "d::stream_idle",
        with = "humantime_serde",
        alias = "body_read_timeout"
    )]
    pub stream_idle_timeout: Duration,
    /// A downstream connection (HTTP/1 or HTTP/2) with no request in flight
    /// for this long is closed (Envoy's `idle_timeout`). An HTTP/1
    /// connection also closes when it waits `header_read_timeout` for the
    /// next request's headers.
    #[serde(default = "d::idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A downstream connection open this long is closed gracefully (HTTP/2:
    /// GOAWAY, the streams in flight finish; HTTP/1: after the request in
    /// flight). Unset (the default): no limit.
    #[serde(default, with = "humantime_serde")]
    pub max_connection_duration: Option<Duration>,
    /// How long to wait for a client's first bytes on a port that is sniffed.
    #[serde(default = "d::sniff", with = "humantime_serde")]
    pub sniff_timeout: Duration,
    /// HTTP/2 streams per downstream connection.
    #[serde(default = "d::max_streams")]
    pub max_concurrent_streams: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: d::max_header_bytes(),
            max_body_bytes: None,
            retry_buffer_bytes: d::retry_buffer_bytes(),
            header_read_timeout: d::header_timeout(),
            stream_idle_timeout: d::stream_idle(),
            idle_timeout: d::idle(),
            max_connection_duration: None,
            sniff_timeout: d::sniff(),
            max_concurrent_streams: d::max_streams(),
        }
    }
}

mod d {
    use super::*;
    pub fn upgrades() -> Vec<String> {
        vec!["websocket".into()]
    }
    pub fn trust_domain() -> String {
        "cluster.local".into()
    }
    pub fn ingress_bind() -> IpAddr {
        IpAddr::V4(Ipv4Addr::UNSPECIFIED)
    }
    pub fn hbone() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], mesh_core::config::HBONE_PORT))
    }
    pub fn admin() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], mesh_core::config::ADMIN_PORT))
    }
    pub fn metrics() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], mesh_core::config::METRICS_PORT))
    }
    pub fn readiness() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], mesh_core::config::READINESS_PORT))
    }
    pub fn drain() -> Duration {
        Duration::from_secs(30)
    }
    pub fn connect() -> Duration {
        Duration::from_secs(5)
    }
    pub fn handshake() -> Duration {
        Duration::from_secs(10)
    }
    // Envoy's default (max_request_headers_kb = 60).
    pub fn max_header_bytes() -> usize {
        60 * 1024
    }
    // Envoy's default is 1 MiB (its connection buffer limit); 4 MiB keeps
    // every request that was retried when bodies were read whole (up to
    // 4 MiB) retriable.
    pub fn retry_buffer_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub fn header_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn stream_idle() -> Duration {
        Duration::from_secs(300)
    }
    pub fn idle() -> Duration {
        Duration::from_secs(60)
    }
    pub fn sniff() -> Duration {
        Duration::from_millis(500)
    }
    pub fn max_streams() -> u32 {
        100
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_for_pod(path, None)
    }

    /// Loads the config with `pod_name` (when given and not empty) in place
    /// of the file's own, before validating: a Deployment's replicas share
    /// one config file and each learns its name from POD_NAME.
    pub fn load_for_pod(path: &Path, pod_name: Option<&str>) -> Result<Self, ConfigError> {
        let mut cfg: Config = load_yaml(path)?;
        if let Some(p) = pod_name.filter(|p| !p.is_empty()) {
            cfg.pod_name = p.to_string();
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (what, v) in [
            ("namespace", &self.namespace),
            ("gateway", &self.gateway),
            ("pod_name", &self.pod_name),
            ("service_account", &self.service_account),
        ] {
            if v.is_empty() {
                let hint = if what == "pod_name" {
                    " (or pass --pod-name / POD_NAME)"
                } else {
                    ""
                };
                return Err(ConfigError::Invalid(format!("{what} is required{hint}")));
            }
        }
        if self.limits.max_header_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "limits.max_header_bytes must be at least 1024".into(),
            ));
        }
        if self.pool.max_streams == 0 {
            return Err(ConfigError::Invalid(
                "pool.max_streams must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The proxy id the controller recognises a replica by:
    /// `<role>~<namespace>~<pod>`.
    pub fn proxy_id(&self) -> String {
        format!(
            "{}~{}~{}",
            self.role.proxy_prefix(),
            self.namespace,
            self.pod_name
        )
    }
}
