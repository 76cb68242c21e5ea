//! The ztunnel's configuration: one typed struct, every default in one place.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use mesh_core::config::{
    ADMIN_PORT, CaConfig, ConfigError, DNS_PORT, H2Config, HBONE_PORT, INBOUND_PLAINTEXT_PORT,
    INPOD_MARK, METRICS_PORT, OUTBOUND_PORT, PROXY_PORTS, PoolConfig, READINESS_PORT, RuntimeKind,
    load_yaml,
};

/// The longest `busy_poll_us` accepted: a millisecond of spinning per
/// burst of traffic is already most of a core on a busy node.
pub const MAX_BUSY_POLL_US: u64 = 1_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The node this ztunnel serves (a DaemonSet passes it in NODE_NAME
    /// instead; see the binary's --node).
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub network: String,
    #[serde(default = "d::trust_domain")]
    pub trust_domain: String,
    /// Policies of scope GLOBAL live here.
    #[serde(default = "d::root_namespace")]
    pub root_namespace: String,
    pub ca: CaConfig,
    pub state: StateSource,
    #[serde(default)]
    pub listeners: Listeners,
    /// Node mode: take captured pods from the node agent over ZDS.
    #[serde(default)]
    pub node_mode: Option<NodeMode>,
    #[serde(default = "d::admin")]
    pub admin_addr: SocketAddr,
    #[serde(default = "d::metrics")]
    pub metrics_addr: SocketAddr,
    #[serde(default = "d::readiness")]
    pub readiness_addr: SocketAddr,
    /// Mark on the proxy's own upstream sockets so redirect rules skip them.
    #[serde(default)]
    pub socket_mark: Option<u32>,
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
    /// A connection between two workloads this ztunnel serves skips the
    /// tunnel: the outbound side hands it to the inbound side in memory,
    /// which checks policy and dials the app as for HBONE. No byte leaves
    /// the node, and this process holds both identities' keys, so TLS to
    /// itself would add cost and no protection.
    #[serde(default = "d::yes")]
    pub same_node_fast_path: bool,
    /// Node mode: the inbound side dials the app from the client's
    /// address (a transparent socket inside the pod; the node agent's
    /// rules route the app's replies back to it), so the app's
    /// getpeername, access logs and rate limits see the client, as with
    /// Istio's ztunnel. Off: the app sees its own pod's address. Also
    /// `--original-source` / `ENABLE_ORIG_SRC`.
    #[serde(default = "d::yes")]
    pub original_source: bool,
    /// Threads that carry the traffic (shards, or the work-stealing
    /// runtime's workers). Unset: one per CPU the process may use. A node's ztunnel shares the node with
    /// its pods, so it is sized to the share it should take (Istio's
    /// ztunnel defaults to 2).
    #[serde(default)]
    pub worker_threads: Option<usize>,
    /// How those threads share the work (see `mesh_core::shards`).
    #[serde(default)]
    pub runtime: RuntimeKind,
    /// With `runtime: sharded`: after doing work, a shard keeps polling for
    /// this many microseconds before it sleeps (`mesh_core::spin`). 0, the
    /// default: off. Trades CPU for latency on request/response traffic.
    #[serde(default)]
    pub busy_poll_us: u64,
}

/// Where the controller is and the mesh's root namespace, given outside the
/// file (the binary's flags or environment): each, when set, replaces the
/// file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub ca_address: Option<String>,
    pub ca_server_name: Option<String>,
    pub xds_address: Option<String>,
    pub root_namespace: Option<String>,
    /// Replaces `original_source`.
    pub original_source: Option<bool>,
}

/// Where workloads, services and policies come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSource {
    /// A YAML file of workloads, services and policies, re-read on change.
    pub local_file: Option<PathBuf>,
    /// The controller's Delta ADS address (same TLS and token as the CA),
    /// e.g. https://istiod.istio-system.svc:15012.
    pub xds_address: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeMode {
    /// The node agent's ZDS socket.
    pub zds_socket: PathBuf,
    /// Serve the DNS proxy on 15053 in each pod (the agent must redirect
    /// port 53 to it).
    #[serde(default)]
    pub dns: bool,
    /// Where names outside the mesh are forwarded: one `ip:port` or a list,
    /// tried in turn; every nameserver of the node's resolv.conf when absent.
    #[serde(default, deserialize_with = "upstreams")]
    pub dns_upstream: Vec<SocketAddr>,
    /// The cluster DNS domain.
    #[serde(default = "d::trust_domain")]
    pub dns_domain: String,
    /// Each pod's share of the DNS proxy.
    #[serde(default)]
    pub dns_limits: DnsLimits,
}

impl NodeMode {
    fn validate_dns(&self) -> Result<(), ConfigError> {
        let l = &self.dns_limits;
        let bad = |what: &str| {
            Err(ConfigError::Invalid(format!(
                "node_mode.dns_limits.{what} must be between 1 and 65535"
            )))
        };
        if !(1..=65535).contains(&l.qps) {
            return bad("qps");
        }
        if !(1..=65535).contains(&l.udp_in_flight) {
            return bad("udp_in_flight");
        }
        if !(1..=65535).contains(&l.tcp_connections) {
            return bad("tcp_connections");
        }
        if l.tcp_idle < Duration::from_millis(100) {
            return Err(ConfigError::Invalid(
                "node_mode.dns_limits.tcp_idle must be at least 100ms".into(),
            ));
        }
        if let Some(up) = self.dns_upstream.iter().find(|u| u.port() == 0) {
            return Err(ConfigError::Invalid(format!(
                "node_mode.dns_upstream {up}: port 0"
            )));
        }
        let domain = self.dns_domain.trim_end_matches('.');
        if domain.is_empty() || domain.split('.').any(str::is_empty) {
            return Err(ConfigError::Invalid(format!(
                "node_mode.dns_domain {:?} is not a domain name",
                self.dns_domain
            )));
        }
        Ok(())
    }
}

/// `node_mode.dns_limits`: what one pod may hold of the DNS proxy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsLimits {
    /// Queries a second (UDP and TCP), with a burst of as many.
    pub qps: u32,
    /// UDP queries waiting for the upstream at once; more are dropped (the
    /// client retries).
    pub udp_in_flight: usize,
    /// Open TCP connections; more are closed at accept.
    pub tcp_connections: usize,
    /// A TCP connection idle this long is closed.
    #[serde(with = "humantime_serde")]
    pub tcp_idle: Duration,
}

impl Default for DnsLimits {
    fn default() -> Self {
        DnsLimits {
            qps: 2000,
            udp_in_flight: 64,
            tcp_connections: 32,
            tcp_idle: Duration::from_secs(10),
        }
    }
}

/// One value or a list of them.
fn one_or_many<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(t) => vec![t],
        OneOrMany::Many(v) => v,
    })
}

/// `node_mode.dns_upstream`: an `ip:port`, or a bare IP meaning port 53;
/// one or a list.
fn upstreams<'de, D>(d: D) -> Result<Vec<SocketAddr>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let texts: Vec<String> = one_or_many(d)?;
    texts
        .iter()
        .map(|t| {
            t.parse::<SocketAddr>()
                .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| D::Error::custom(format!("dns_upstream {t:?}: not an ip or ip:port")))
        })
        .collect()
}

/// Where the proxy listens, outside node mode (where listeners open inside
/// each pod's network namespace instead).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listeners {
    /// Workload IPs to serve HBONE (15008) on.
    #[serde(default)]
    pub inbound_ips: Vec<IpAddr>,
    #[serde(default)]
    pub outbound: Vec<OutboundListener>,
    #[serde(default)]
    pub inbound_plaintext: Vec<PlaintextListener>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundListener {
    pub bind: SocketAddr,
    /// uid of the workload whose traffic this listener captures.
    pub source: String,
    /// Fixed destination; when absent the original destination of the
    /// redirected connection (SO_ORIGINAL_DST) is used.
    pub target: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlaintextListener {
    pub bind: SocketAddr,
    /// Fixed destination; when absent SO_ORIGINAL_DST.
    pub target: Option<SocketAddr>,
}

/// Defaults.
mod d {
    pub fn yes() -> bool {
        true
    }
    use super::*;
    pub fn trust_domain() -> String {
        "cluster.local".into()
    }
    pub fn root_namespace() -> String {
        "istio-system".into()
    }
    pub fn admin() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT))
    }
    pub fn metrics() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], METRICS_PORT))
    }
    pub fn readiness() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], READINESS_PORT))
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
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_for_node(path, None)
    }

    /// Loads the config with `node` (when given and not empty) in place of
    /// the file's own, before validating: a DaemonSet shares one config
    /// file among all nodes and passes each its name.
    pub fn load_for_node(path: &Path, node: Option<&str>) -> Result<Self, ConfigError> {
        Self::load_with(path, node, &Overrides::default())
    }

    /// The file, then what the environment says about the controller (a
    /// DaemonSet names it for its own namespace, so the file need not).
    pub fn load_with(
        path: &Path,
        node: Option<&str>,
        over: &Overrides,
    ) -> Result<Self, ConfigError> {
        let mut cfg: Config = load_yaml(path)?;
        if let Some(n) = node.filter(|n| !n.is_empty()) {
            cfg.node = n.to_string();
        }
        let set = |v: &Option<String>| v.as_ref().filter(|v| !v.is_empty()).cloned();
        if let Some(v) = set(&over.ca_address) {
            cfg.ca.address = v;
        }
        if let Some(v) = set(&over.ca_server_name) {
            cfg.ca.server_name = v;
        }
        if let Some(v) = set(&over.xds_address) {
            cfg.state.xds_address = Some(v);
        }
        if let Some(v) = set(&over.root_namespace) {
            cfg.root_namespace = v;
        }
        if let Some(v) = over.original_source {
            cfg.original_source = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The mark on the proxy's own sockets: node mode needs one (the pods'
    /// redirect rules skip it), 1337 unless configured.
    pub fn effective_mark(&self) -> Option<u32> {
        self.socket_mark
            .or(self.node_mode.as_ref().map(|_| INPOD_MARK))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.ca.address.is_empty() {
            return Err(ConfigError::Invalid(
                "ca.address is required: set it, or pass --ca-address / CA_ADDRESS".into(),
            ));
        }
        if self.node.is_empty() {
            return Err(ConfigError::Invalid(
                "node is required: set `node`, or pass --node / NODE_NAME".into(),
            ));
        }
        if self.node_mode.is_some()
            && let Some(m) = self.socket_mark
            && m != INPOD_MARK
        {
            return Err(ConfigError::Invalid(format!(
                "socket_mark {m}: in node mode the pods' redirect rules exempt mark {}, so the proxy's own \
                 traffic must carry it (leave socket_mark unset)",
                INPOD_MARK
            )));
        }
        if self.state.local_file.is_some() == self.state.xds_address.is_some() {
            return Err(ConfigError::Invalid(
                "state: give exactly one of local_file and xds_address".into(),
            ));
        }
        if let Some(nm) = &self.node_mode {
            nm.validate_dns()?;
        }
        if self.pool.connections_per_destination == 0 {
            return Err(ConfigError::Invalid(
                "pool.connections_per_destination must be at least 1".into(),
            ));
        }
        if self.worker_threads == Some(0) {
            return Err(ConfigError::Invalid(
                "worker_threads must be at least 1 (leave it unset for one per CPU)".into(),
            ));
        }
        if self.pool.max_streams == 0 {
            return Err(ConfigError::Invalid(
                "pool.max_streams must be at least 1".into(),
            ));
        }
        if self.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(ConfigError::Invalid(format!(
                "busy_poll_us must be at most {MAX_BUSY_POLL_US} (a shard spins that long after each burst)"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let path = dir.path().join("ztunnel.yaml");
        let text = format!(
            "node: n1\nca: {{address: 'https://127.0.0.1:15012', root_cert: /dev/null}}\n\
             state: {{local_file: /dev/null}}\n{extra}"
        );
        std::fs::write(&path, text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Config::load(&path)
    }

    #[test]
    fn worker_threads_default_to_the_cpus_and_zero_is_refused() {
        let cfg = load("").expect("a minimal config loads");
        assert_eq!(cfg.worker_threads, None);
        assert_eq!(cfg.runtime, RuntimeKind::Sharded);
        assert_eq!(
            load("runtime: work_stealing\n").expect("loads").runtime,
            RuntimeKind::WorkStealing
        );
        let err = load("runtime: fibers\n").expect_err("an unknown model is refused");
        assert!(
            err.to_string().contains("unknown variant `fibers`"),
            "{err}"
        );
        assert!(cfg.same_node_fast_path);
        assert_eq!(
            load("worker_threads: 1\n").expect("loads").worker_threads,
            Some(1)
        );
        let err = load("worker_threads: 0\n").expect_err("0 threads is refused");
        assert!(err.to_string().contains("worker_threads"), "{err}");
        assert_eq!(cfg.busy_poll_us, 0, "busy polling is off by default");
        assert_eq!(load("busy_poll_us: 50\n").expect("loads").busy_poll_us, 50);
        let err = load("busy_poll_us: 5000\n").expect_err("a budget over 1 ms is refused");
        assert!(err.to_string().contains("busy_poll_us"), "{err}");
    }

    /// The DNS proxy's settings: one upstream or a list, a bare IP meaning
    /// port 53; limits that would refuse every query (or panic) are refused.
    #[test]
    fn dns_settings_load_and_nonsense_is_refused() {
        let nm = |extra: &str| {
            load(&format!(
                "node_mode: {{zds_socket: /tmp/z.sock, dns: true{extra}}}\n"
            ))
        };
        let cfg = nm("").expect("defaults load");
        let m = cfg.node_mode.expect("node mode");
        assert!(m.dns_upstream.is_empty());
        assert_eq!(m.dns_limits.qps, 2000);
        let one = nm(", dns_upstream: 10.0.0.10").expect("a bare IP");
        assert_eq!(
            one.node_mode.expect("nm").dns_upstream,
            vec!["10.0.0.10:53".parse::<SocketAddr>().expect("addr")]
        );
        let many = nm(", dns_upstream: ['10.0.0.10:5353', '[fd00::a]:53']").expect("a list");
        assert_eq!(many.node_mode.expect("nm").dns_upstream.len(), 2);
        for (bad, word) in [
            (", dns_upstream: 'ten'", "dns_upstream"),
            (", dns_upstream: '10.0.0.1:0'", "port 0"),
            (", dns_limits: {udp_in_flight: 0}", "udp_in_flight"),
            (", dns_limits: {tcp_connections: 0}", "tcp_connections"),
            (", dns_limits: {qps: 0}", "qps"),
            (
                ", dns_limits: {udp_in_flight: 99999999999}",
                "udp_in_flight",
            ),
            (", dns_limits: {tcp_idle: 0s}", "tcp_idle"),
            (", dns_domain: 'a..b'", "dns_domain"),
        ] {
            let err = nm(bad).expect_err(bad);
            assert!(err.to_string().contains(word), "{bad}: {err}");
        }
    }

    /// The config the Kubernetes install ships must load as the ztunnel
    /// loads it: unknown keys are refused, so a typo there would stop every
    /// node's ztunnel.
    #[test]
    fn the_install_manifests_config_loads() {
        use serde::Deserialize as _;
        let manifest =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install/ztunnel.yaml");
        let text = std::fs::read_to_string(&manifest).expect("the install manifest");
        let config = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
            .find(|v| v["kind"] == "ConfigMap" && v["metadata"]["name"] == "ztunnel-config")
            .and_then(|v| v["data"]["config.yaml"].as_str().map(str::to_owned))
            .expect("ConfigMap ztunnel-config with data.config.yaml");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config).expect("write");
        // With what the DaemonSet's ztunnel container sets in its
        // environment, for a namespace the install was moved to.
        let env = serde_yaml::Deserializer::from_str(&text)
            .filter_map(|doc| serde_yaml::Value::deserialize(doc).ok())
            .find(|v| v["kind"] == "DaemonSet")
            .and_then(|d| {
                d["spec"]["template"]["spec"]["containers"]
                    .as_sequence()?
                    .iter()
                    .find(|c| c["name"] == "ztunnel")
                    .map(|c| c["env"].clone())
            })
            .expect("the ztunnel container's env");
        let var = |name: &str| {
            env.as_sequence()?
                .iter()
                .find(|e| e["name"] == name)?
                .get("value")?
                .as_str()
                .map(|v| v.replace("$(POD_NAMESPACE)", "mesh"))
        };
        let over = Overrides {
            ca_address: var("CA_ADDRESS"),
            ca_server_name: var("CA_SERVER_NAME"),
            xds_address: var("XDS_ADDRESS"),
            root_namespace: var("ROOT_NAMESPACE"),
            original_source: var("ENABLE_ORIG_SRC").and_then(|v| v.parse().ok()),
        };
        let cfg =
            Config::load_with(&path, Some("node-a"), &over).expect("the shipped config loads");
        assert_eq!(cfg.worker_threads, Some(2));
        assert!(cfg.node_mode.is_some());
        assert_eq!(cfg.ca.address, "https://istiod-lite.mesh.svc:15012");
        assert_eq!(cfg.ca.server_name, "istiod-lite.mesh.svc");
        assert_eq!(
            cfg.state.xds_address.as_deref(),
            Some("https://istiod-lite.mesh.svc:15012")
        );
        assert_eq!(cfg.root_namespace, "mesh");
        // And without them it names what is missing.
        let err = Config::load_for_node(&path, Some("node-a")).expect_err("no controller named");
        assert!(err.to_string().contains("CA_ADDRESS"), "{err}");
    }

    #[test]
    fn original_source_is_on_unless_the_file_or_the_environment_turns_it_off() {
        assert!(load("").expect("loads").original_source);
        assert!(
            !load("original_source: false\n")
                .expect("loads")
                .original_source
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ztunnel.yaml");
        std::fs::write(
            &path,
            "node: n1\nca: {address: 'https://127.0.0.1:15012', root_cert: /dev/null}\n\
             state: {local_file: /dev/null}\n",
        )
        .expect("write");
        for (over, want) in [(None, true), (Some(false), false), (Some(true), true)] {
            let o = Overrides {
                original_source: over,
                ..Default::default()
            };
            let cfg = Config::load_with(&path, None, &o).expect("loads");
            assert_eq!(cfg.original_source, want, "{over:?}");
        }
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = load("worker_thread: 2\n").expect_err("a misspelt key is refused");
        assert!(
            err.to_string().contains("unknown field `worker_thread`"),
            "{err}"
        );
    }
}
