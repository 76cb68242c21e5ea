//! The cluster suite's helpers: kubectl against the API server the recipe
//! started, that control plane's restart and wipe, and the istiod-lite
//! binary run out of cluster as its own ServiceAccount.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Polls `f` every 100 ms; fails the test after `secs`.
pub fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The control plane the recipe started: ../shared/kube/control-plane,
/// its state directory and port.
struct ControlPlane {
    script: PathBuf,
    dir: PathBuf,
    port: String,
}

pub struct Cluster {
    kubeconfig: PathBuf,
    root: PathBuf,
    work: PathBuf,
    plane: Option<ControlPlane>,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Cluster {
    /// The cluster the recipe gives, or None when the suite is not asked
    /// for. Asked for without a cluster is a failure.
    pub fn from_env() -> Option<Cluster> {
        env("MESH_CLUSTER_TEST")?;
        let kubeconfig = env("MESH_CLUSTER_KUBECONFIG")
            .or_else(|| env("MESH_TEST_KUBECONFIG"))
            .expect("MESH_CLUSTER_TEST is set, but neither MESH_CLUSTER_KUBECONFIG nor MESH_TEST_KUBECONFIG names a cluster");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the repository root")
            .to_path_buf();
        let plane = match (
            env("MESH_CONTROL_PLANE"),
            env("MESH_CLUSTER_DIR"),
            env("MESH_CLUSTER_PORT"),
        ) {
            (Some(script), Some(dir), Some(port)) => Some(ControlPlane {
                script: PathBuf::from(script),
                dir: PathBuf::from(dir),
                port,
            }),
            _ => None,
        };
        let work = root.join("target/kube-cluster-work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("the work directory");
        eprintln!(
            "cluster suite: kubeconfig {kubeconfig}; work directory {}",
            work.display()
        );
        Some(Cluster {
            kubeconfig: PathBuf::from(kubeconfig),
            root,
            work,
            plane,
        })
    }

    pub fn work(&self) -> &Path {
        &self.work
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .current_dir(&self.root);
        cmd
    }

    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.command("kubectl")
            .args(args)
            .output()
            .expect("running kubectl")
    }

    pub fn text(out: &Output) -> String {
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// kubectl that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}:\n{}",
            args.join(" "),
            Self::text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A shell script, as a user would type it (docs/install.md).
    pub fn sh(&self, script: &str) -> Output {
        eprintln!("$ {script}");
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("running sh")
    }

    fn apply_stdin(&self, yaml: &str) -> Output {
        let mut child = self
            .command("kubectl")
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running kubectl");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(yaml.as_bytes());
        }
        child.wait_with_output().expect("kubectl apply")
    }

    pub fn apply(&self, yaml: &str) {
        let out = self.apply_stdin(yaml);
        assert!(
            out.status.success(),
            "kubectl apply:\n{yaml}\n{}",
            Self::text(&out)
        );
    }

    pub fn apply_quiet(&self, yaml: &str) -> bool {
        self.apply_stdin(yaml).status.success()
    }

    /// `kubectl ARGS -o jsonpath=PATH`, or "" when that fails.
    pub fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let jp = format!("jsonpath={path}");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", &jp]);
        let out = self.kubectl(&all);
        if !out.status.success() {
            return String::new();
        }
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The API server answers, or the suite fails (it was asked for).
    pub fn reachable(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "MESH_CLUSTER_TEST is set, but the API server of {} does not answer:\n{}",
                self.kubeconfig.display(),
                Self::text(&out)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    pub fn can_restart(&self) -> bool {
        self.plane.is_some()
    }

    fn plane(&self) -> &ControlPlane {
        self.plane
            .as_ref()
            .expect("a control plane the suite started")
    }

    /// SIGKILL to the API server and its etcd (the recipe started them;
    /// their PIDs are in the control plane's directory).
    pub fn kill_control_plane(&self) {
        for f in ["apiserver.pid", "etcd.pid"] {
            let path = self.plane().dir.join(f);
            let pid = std::fs::read_to_string(&path).expect("a pid file");
            let pid = pid.trim();
            let _ = Command::new("kill").args(["-9", pid]).status();
            eventually(&format!("process {pid} gone"), 10, || {
                !Command::new("kill")
                    .args(["-0", pid])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            });
        }
    }

    /// `control-plane up`; when it returns the API server is ready.
    pub fn start_control_plane(&self) -> Instant {
        let p = self.plane();
        let out = Command::new(&p.script)
            .args(["up"])
            .arg(&p.dir)
            .arg(&p.port)
            .output()
            .expect("control-plane up");
        assert!(out.status.success(), "{}", Self::text(&out));
        Instant::now()
    }

    /// A fresh API server: stopped, its etcd data removed, started again.
    pub fn wipe(&self) {
        eprintln!("=== a fresh API server");
        let p = self.plane();
        // Killed, not stopped: its data goes anyway, and a graceful stop
        // waits for open watches to drain.
        self.kill_control_plane();
        std::fs::remove_dir_all(p.dir.join("etcd-data")).expect("removing etcd's data");
        self.start_control_plane();
        self.reachable();
    }

    /// A kustomize overlay installing `manifests/` into `ns`; its path
    /// from the repository root.
    pub fn overlay(&self, ns: &str) -> String {
        let dir = self.work.join(format!("overlay-{ns}"));
        std::fs::create_dir_all(&dir).expect("overlay directory");
        let rel = dir.strip_prefix(&self.root).expect("under the root");
        let up = "../".repeat(rel.components().count());
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!("namespace: {ns}\nresources:\n- {up}manifests\n"),
        )
        .expect("overlay");
        rel.display().to_string()
    }

    /// A kubeconfig for ServiceAccount `ns/sa` (a token from the
    /// TokenRequest API), on the same API server.
    pub fn token_kubeconfig(&self, ns: &str, sa: &str) -> PathBuf {
        let token = self.ok(&["create", "token", sa, "-n", ns, "--duration=2h"]);
        let admin: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(&self.kubeconfig).expect("the kubeconfig"),
        )
        .expect("kubeconfig YAML");
        let cluster = admin["clusters"][0]["cluster"].clone();
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "c", "cluster": serde_json::to_value(cluster).expect("cluster")}],
            "users": [{"name": sa, "user": {"token": token.trim()}}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": sa}}],
            "current-context": "x",
        });
        let path = self.work.join(format!("{ns}-{sa}.kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
        path
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GET over HTTP/1.0: (status, body).
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The istiod-lite binary in cluster mode, out of cluster.
pub struct Istiod {
    child: Mutex<Option<Child>>,
    debug: String,
    grpc: u16,
    log: PathBuf,
    pod: String,
}

impl Istiod {
    /// Runs as ServiceAccount `ns/istiod-lite`, the replica `pod`. The
    /// binary is this build's, or `MESH_TEST_ISTIOD` (an older build, to
    /// show what it did).
    pub fn start(c: &Cluster, ns: &str, pod: &str) -> Istiod {
        let kubeconfig = c.token_kubeconfig(ns, "istiod-lite");
        let (grpc, debug) = (free_port(), free_port());
        let log = c.work().join(format!("{pod}.log"));
        let data = c.work().join(format!("{pod}-data"));
        std::fs::create_dir_all(&data).expect("data dir");
        let bin =
            env("MESH_TEST_ISTIOD").unwrap_or_else(|| env!("CARGO_BIN_EXE_istiod-lite").into());
        eprintln!("istiod-lite {pod} in {ns}: log {}", log.display());
        let child = Command::new(bin)
            .args([
                "--kube",
                &format!("--grpc-addr=127.0.0.1:{grpc}"),
                &format!("--debug-addr=127.0.0.1:{debug}"),
                "--poll-ms=50",
            ])
            .arg(format!("--data-dir={}", data.display()))
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAME", pod)
            .env("POD_NAMESPACE", ns)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("starting istiod-lite");
        Istiod {
            child: Mutex::new(Some(child)),
            debug: format!("127.0.0.1:{debug}"),
            grpc,
            log,
            pod: pod.to_string(),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/ready`: (status, body); (0, "") when it does not answer.
    pub fn ready(&self) -> (u16, String) {
        http_get(&self.debug, "/ready").unwrap_or((0, String::new()))
    }

    pub fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while self.ready().0 != 200 {
            assert!(
                Instant::now() < deadline,
                "istiod-lite {} not ready within {within:?}: {:?}\n{}",
                self.pod,
                self.ready(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn get_json(&self, path: &str) -> Value {
        http_get(&self.debug, path)
            .and_then(|(_, b)| serde_json::from_str(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// The kinds that are not listed now (all of them when it does not
    /// answer).
    pub fn not_listed(&self) -> Vec<String> {
        let config = self.get_json("/debug/config");
        let Some(kinds) = config["sources"].as_object() else {
            return vec!["(no answer)".into()];
        };
        kinds
            .iter()
            .filter(|(_, s)| s["state"] != "listed")
            .map(|(k, s)| format!("{k}: {}", s["state"]))
            .collect()
    }

    /// `meshctl --controller ... check`: (passed, output).
    pub fn meshctl_check(&self) -> (bool, String) {
        let bin = Path::new(env!("CARGO_BIN_EXE_istiod-lite")).with_file_name("meshctl");
        let out = Command::new(&bin)
            .args(["--controller", &self.debug, "check"])
            .output()
            .unwrap_or_else(|e| {
                panic!("{}: {e} (build it: cargo build -p meshctl)", bin.display())
            });
        (out.status.success(), Cluster::text(&out))
    }

    /// A certificate for `identity` from the CA, presenting `token`.
    pub fn certificate(&self, root: &str, token: &str, identity: &str) -> Result<(), String> {
        use mesh_core::ca::{CaClient, CaClientConfig, IstioCaClient};
        mesh_core::tls::install_default_provider();
        let id: mesh_core::identity::Identity = identity.parse().map_err(|e| format!("{e:?}"))?;
        let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
        rt.block_on(async {
            let client = IstioCaClient::new(CaClientConfig {
                address: format!("https://127.0.0.1:{}", self.grpc),
                ca_root_pem: root.to_string(),
                server_name: "istiod-lite.istio-system.svc".into(),
                token: Some(token.to_string().into()),
                validity: Duration::ZERO,
                request_timeout: Duration::from_secs(10),
            })
            .map_err(|e| e.to_string())?;
            let cert = client
                .fetch_certificate(&id)
                .await
                .map_err(|e| e.to_string())?;
            if cert.identity() != &id {
                return Err(format!("issued for {}", cert.identity()));
            }
            Ok(())
        })
    }

    /// SIGTERM, and wait for it to exit (it releases its Lease).
    pub fn stop(self) {
        let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().ok().and_then(|mut c| c.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
