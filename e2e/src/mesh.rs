//! A small mesh on loopback: real `ztunnel` processes, an in-process CA,
//! echo servers on workload addresses. Each test gets its own 127.x.y.0/24,
//! so tests run in parallel without meeting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use mesh_core::clock::SystemClock;
use mesh_core::identity::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::ca::{TRUST_DOMAIN, TestCa, token_for};

/// A private /24 inside 127.0.0.0/8.
#[derive(Debug, Clone, Copy)]
pub struct Subnet {
    a: u8,
    b: u8,
}

impl Subnet {
    /// Unique per process and call: second octet from the pid, third from a counter.
    pub fn unique() -> Subnet {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        Subnet {
            a: 10 + (pid % 200) as u8,
            b: (n % 250) as u8 + 1,
        }
    }

    pub fn ip(&self, host: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, self.a, self.b, host))
    }

    pub fn addr(&self, host: u8, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip(host), port)
    }
}

/// A workload in the local state file.
#[derive(Debug, Clone)]
pub struct Pod {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub ip: IpAddr,
    pub node: String,
    pub hbone: bool,
    /// (service key "ns/host", service port, target port)
    pub services: Vec<(String, u16, u16)>,
}

impl Pod {
    pub fn new(name: &str, ns: &str, sa: &str, ip: IpAddr, node: &str) -> Pod {
        Pod {
            uid: format!("Kubernetes//Pod/{ns}/{name}"),
            name: name.into(),
            namespace: ns.into(),
            service_account: sa.into(),
            ip,
            node: node.into(),
            hbone: true,
            services: Vec::new(),
        }
    }

    pub fn identity(&self) -> Identity {
        Identity::new(TRUST_DOMAIN, &self.namespace, &self.service_account).expect("identity")
    }

    fn yaml(&self) -> String {
        let mut s = format!(
            "- uid: {}\n  name: {}\n  namespace: {}\n  service_account: {}\n  addresses: [{}]\n  node: {}\n  tunnel_protocol: {}\n  canonical_name: {}\n",
            self.uid,
            self.name,
            self.namespace,
            self.service_account,
            self.ip,
            self.node,
            if self.hbone { "HBONE" } else { "NONE" },
            self.name
        );
        if !self.services.is_empty() {
            s.push_str("  services:\n");
            for (k, sp, tp) in &self.services {
                s.push_str(&format!(
                    "    {k}: [{{service_port: {sp}, target_port: {tp}}}]\n"
                ));
            }
        }
        s
    }
}

/// A service in the local state file.
#[derive(Debug, Clone)]
pub struct Svc {
    pub name: String,
    pub namespace: String,
    pub vip: IpAddr,
    pub port: u16,
    pub target_port: u16,
}

impl Svc {
    pub fn key(&self) -> String {
        format!(
            "{}/{}.{}.svc.cluster.local",
            self.namespace, self.name, self.namespace
        )
    }
}

/// Renders a local state file.
pub fn state_yaml(pods: &[&Pod], services: &[&Svc], policies_yaml: &str) -> String {
    let mut s = String::from("workloads:\n");
    for p in pods {
        s.push_str(&p.yaml());
    }
    s.push_str("services:\n");
    for v in services {
        s.push_str(&format!(
            "- name: {}\n  namespace: {}\n  hostname: {}.{}.svc.cluster.local\n  addresses: [{}]\n  ports: [{{service_port: {}, target_port: {}}}]\n",
            v.name, v.namespace, v.name, v.namespace, v.vip, v.port, v.target_port
        ));
    }
    s.push_str("policies:\n");
    s.push_str(policies_yaml);
    s
}

/// Path of a binary built from this workspace, from the same profile as the
/// running program: next to it (a binary in `target/<profile>/`), or one up
/// (a test in `target/<profile>/deps/`). So the release bench runs release
/// binaries and the tests debug ones.
pub fn binary(name: &str) -> PathBuf {
    let p = locate(name);
    assert!(
        p.exists(),
        "{} is not built; run `cargo build --workspace --bins` (just test does; \
         `just bench` builds the release ones)",
        p.display()
    );
    p
}

/// Where [`binary`] looks for a binary (which may not be built).
pub fn locate(name: &str) -> PathBuf {
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let beside = std::env::current_exe().ok().and_then(|exe| {
        let dir = exe.parent()?;
        let dir = if dir.file_name() == Some(std::ffi::OsStr::new("deps")) {
            dir.parent()?
        } else {
            dir
        };
        Some(dir.join(name)).filter(|p| p.exists())
    });
    beside.unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target")
            .join(profile)
            .join(name)
    })
}

/// One real ztunnel process.
pub struct Ztunnel {
    pub name: String,
    child: Option<Child>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
    pub config: PathBuf,
    pub state: PathBuf,
    pub log: PathBuf,
}

/// Settings for a ztunnel in the test mesh.
pub struct ZtunnelSpec<'a> {
    pub name: &'a str,
    pub node: &'a str,
    /// This ztunnel's own address (admin, metrics, readiness bind here).
    pub ip: IpAddr,
    pub inbound_ips: Vec<IpAddr>,
    /// (bind, source uid, fixed target)
    pub outbound: Vec<(SocketAddr, String, SocketAddr)>,
    /// (bind, fixed target)
    pub plaintext: Vec<(SocketAddr, SocketAddr)>,
    /// The local state file; unused (not written) when `xds_address` is set.
    pub state_yaml: String,
    /// Take state from this Delta ADS server instead of the file (the
    /// config's `state: {xds_address: ...}`); the ztunnel reaches it with
    /// the CA's root, server name and token (see `crate::fake_ads`).
    pub xds_address: Option<String>,
    pub extra: &'a str,
}

impl<'a> ZtunnelSpec<'a> {
    /// A ztunnel with no listeners; add what the test needs.
    pub fn new(name: &'a str, node: &'a str, ip: IpAddr, state_yaml: String) -> Self {
        ZtunnelSpec {
            name,
            node,
            ip,
            inbound_ips: Vec::new(),
            outbound: Vec::new(),
            plaintext: Vec::new(),
            state_yaml,
            xds_address: None,
            extra: "",
        }
    }

    /// State from a Delta ADS server at `url` instead of the local file.
    pub fn xds(mut self, url: String) -> Self {
        self.xds_address = Some(url);
        self
    }

    pub fn inbound(mut self, ips: Vec<IpAddr>) -> Self {
        self.inbound_ips = ips;
        self
    }

    pub fn outbound(mut self, listeners: Vec<(SocketAddr, String, SocketAddr)>) -> Self {
        self.outbound = listeners;
        self
    }

    pub fn plaintext(mut self, listeners: Vec<(SocketAddr, SocketAddr)>) -> Self {
        self.plaintext = listeners;
        self
    }

    pub fn extra(mut self, extra: &'a str) -> Self {
        self.extra = extra;
        self
    }
}

impl Ztunnel {
    pub async fn start(dir: &Path, ca: &TestCa, spec: ZtunnelSpec<'_>) -> Ztunnel {
        let root = dir.join("ca-root.pem");
        std::fs::write(&root, ca.ca.root_bundle_pem()).expect("write root");
        let token = dir.join(format!("{}.token", spec.name));
        std::fs::write(&token, token_for(spec.node)).expect("write token");
        let state = dir.join(format!("{}.state.yaml", spec.name));
        let source = match &spec.xds_address {
            Some(url) => format!("xds_address: \"{url}\""),
            None => {
                std::fs::write(&state, &spec.state_yaml).expect("write state");
                format!("local_file: {}", state.display())
            }
        };
        let mut listeners = String::from("listeners:\n  inbound_ips: [");
        listeners.push_str(
            &spec
                .inbound_ips
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        );
        listeners.push_str("]\n  outbound:\n");
        for (bind, src, target) in &spec.outbound {
            listeners.push_str(&format!(
                "  - {{bind: \"{bind}\", source: \"{src}\", target: \"{target}\"}}\n"
            ));
        }
        listeners.push_str("  inbound_plaintext:\n");
        for (bind, target) in &spec.plaintext {
            listeners.push_str(&format!("  - {{bind: \"{bind}\", target: \"{target}\"}}\n"));
        }
        let config = dir.join(format!("{}.yaml", spec.name));
        let ip = spec.ip;
        std::fs::write(
            &config,
            format!(
                "node: {node}\nca:\n  address: {ca}\n  root_cert: {root}\n  token_file: {token}\nstate:\n  {source}\n{listeners}admin_addr: \"{ip}:0\"\nmetrics_addr: \"{ip}:0\"\nreadiness_addr: \"{ip}:0\"\n{extra}",
                node = spec.node,
                ca = ca.url(),
                root = root.display(),
                token = token.display(),
                extra = spec.extra,
            ),
        )
        .expect("write config");
        let log = dir.join(format!("{}.log", spec.name));
        let mut z = Ztunnel {
            name: spec.name.to_string(),
            child: None,
            admin: "0.0.0.0:0".parse().expect("addr"),
            metrics: "0.0.0.0:0".parse().expect("addr"),
            readiness: "0.0.0.0:0".parse().expect("addr"),
            config,
            state,
            log,
        };
        z.spawn().await;
        z
    }

    /// Starts (or restarts) the process and waits until it is ready.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(binary("ztunnel"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn ztunnel");
        self.child = Some(child);
        // Find the bound addresses in the start-up log line, then wait ready.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not start:\n{}",
                self.name,
                self.log_text()
            );
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!("{} exited with {status}:\n{}", self.name, self.log_text());
            }
            let text = self.log_text();
            if let Some(line) = text.lines().rev().find(|l| l.contains("ztunnel started")) {
                let field = |k: &str| -> SocketAddr {
                    let i = line.find(&format!("{k}=")).expect("field") + k.len() + 1;
                    line[i..]
                        .split_whitespace()
                        .next()
                        .expect("value")
                        .parse()
                        .expect("addr")
                };
                self.admin = field("admin_addr");
                self.metrics = field("metrics_addr");
                self.readiness = field("readiness_addr");
                if http_get(self.readiness, "/healthz/ready")
                    .await
                    .is_some_and(|(code, _)| code == 200)
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn sigterm(&self) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of a child we started and have not reaped.
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(s)) = c.try_wait()
            {
                self.child = None;
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub async fn config_dump(&self) -> serde_json::Value {
        let (_, body) = http_get(self.admin, "/config_dump")
            .await
            .expect("config_dump");
        serde_json::from_str(&body).expect("config_dump is JSON")
    }

    /// What a failed test should print about this ztunnel: its connection
    /// and pool view (when the admin port still answers), its threads' CPU
    /// time (a spinning worker shows), and the end of its log.
    pub async fn diagnosis(&self) -> String {
        let dump =
            tokio::time::timeout(Duration::from_secs(5), http_get(self.admin, "/config_dump"))
                .await
                .ok()
                .flatten()
                .map_or_else(
                    || "(admin port did not answer)".to_string(),
                    |(_, body)| {
                        serde_json::from_str::<serde_json::Value>(&body)
                            .map(|v| {
                                format!("connections: {}\npool: {}", v["connections"], v["pool"])
                            })
                            .unwrap_or(body)
                    },
                );
        let threads = self.pid().map_or_else(String::new, |pid| {
            let dir = format!("/proc/{pid}/task");
            let mut out = Vec::new();
            for t in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let f = crate::procfs::stat_fields(t.path().join("stat")).unwrap_or_default();
                out.push(format!(
                    "{} state {} cpu ticks {}",
                    t.file_name().to_string_lossy(),
                    f.first().map_or("?", String::as_str),
                    crate::procfs::cpu_ticks(&f)
                ));
            }
            out.join("; ")
        });
        let log = self.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- {} (pid {:?})\n{dump}\nthreads: {threads}\nlog tail:\n{}",
            self.name,
            self.pid(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    pub async fn process(&self) -> (u64, u64) {
        let (_, body) = http_get(self.admin, "/debug/process")
            .await
            .expect("process stats");
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        (
            v["tasks"].as_u64().unwrap_or(0),
            v["open_fds"].as_u64().unwrap_or(0),
        )
    }

    pub async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics").await.expect("metrics").1
    }

    /// Replaces the state file; the ztunnel picks it up within a second.
    pub fn write_state(&self, yaml: &str) {
        std::fs::write(&self.state, yaml).expect("write state");
    }
}

impl Drop for Ztunnel {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal HTTP/1.0 GET; (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// An echo server: echoes everything, half-closes after the client does.
/// Counts accepted connections.
pub struct Echo {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start(addr: SocketAddr) -> Echo {
        let l = TcpListener::bind(addr).await.expect("bind echo");
        let addr = l.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Echo {
            addr,
            accepted,
            task,
        }
    }

    pub fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends `payload`, half-closes, and reads everything back until EOF.
pub async fn echo_roundtrip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut out = Vec::with_capacity(payload.len());
    let read = r.read_to_end(&mut out);
    tokio::try_join!(write, read)?;
    Ok(out)
}

/// Starts a CA that lets each node have the identities of its pods.
pub async fn ca_for(dir: &Path, pods: &[&Pod]) -> TestCa {
    let mut placement: Vec<(String, Vec<Identity>)> = Vec::new();
    for p in pods {
        match placement.iter_mut().find(|(n, _)| *n == p.node) {
            Some((_, ids)) => ids.push(p.identity()),
            None => placement.push((p.node.clone(), vec![p.identity()])),
        }
    }
    TestCa::start_placed(
        istiod_lite::ca::CaSource::SelfSigned {
            dir: dir.join("ca"),
        },
        Arc::new(SystemClock),
        "127.0.0.1:0".parse().expect("addr"),
        placement,
    )
    .await
}

/// Polls `f` until true, bounded in time.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}
