//! The cluster suites' shared harness (`just test-cluster`): istiod-lite's
//! (`istiod-lite/tests/kube_cluster.rs`) and the lab's
//! (`e2e/tests/kube_cluster.rs`) run against the same real API server, and
//! drive it the same way.
//!
//! - [`Kube`]: the API server the environment names (the recipe's
//!   `MESH_CLUSTER_KUBECONFIG`, or a running cluster's
//!   `MESH_TEST_KUBECONFIG`), and kubectl and sh against it from the
//!   repository root, as a user types them.
//! - [`ControlPlane`]: the etcd and kube-apiserver the recipe started with
//!   ../shared/kube/control-plane (`MESH_CONTROL_PLANE`, `MESH_CLUSTER_DIR`,
//!   `MESH_CLUSTER_PORT`), which a suite may kill, start and wipe. Without
//!   them (a running cluster) the stages that need it say they did not run.
//!
//! Asked for (`MESH_CLUSTER_TEST`) without an API server is a failure, never
//! a silent pass. A dev-dependency only: no binary links it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` every 100 ms; fails the test after `secs`.
pub fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// An environment variable that is set and not empty.
pub fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The repository root (where kubectl and sh run, so `manifests/` is found):
/// the parent of the running test's package, which cargo names at run time.
/// Not this crate's build-time path: a build from another checkout of the
/// same files (`.ci/clone-check` shares the target/) would point there.
pub fn root() -> PathBuf {
    let package = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    package
        .parent()
        .expect("the test's package is inside the repository")
        .to_path_buf()
}

/// A process's stdout then stderr, as text.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// GET over HTTP/1.0: (status, body); None when there is no answer.
pub fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
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

/// The control plane the recipe started: ../shared/kube/control-plane, its
/// state directory (with `apiserver.pid`, `etcd.pid`, `etcd-data/`) and
/// the API server's port.
pub struct ControlPlane {
    script: PathBuf,
    dir: PathBuf,
    port: String,
}

impl ControlPlane {
    /// The one the environment names, if any.
    fn from_env() -> Option<ControlPlane> {
        Some(ControlPlane {
            script: PathBuf::from(env("MESH_CONTROL_PLANE")?),
            dir: PathBuf::from(env("MESH_CLUSTER_DIR")?),
            port: env("MESH_CLUSTER_PORT")?,
        })
    }

    /// SIGKILL to the API server and its etcd; returns once both are gone.
    pub fn kill(&self) {
        for f in ["apiserver.pid", "etcd.pid"] {
            let path = self.dir.join(f);
            let pid = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").args(["-9", &pid]).status();
            // Not our child: init reaps it, and its /proc entry goes.
            eventually(&format!("process {pid} gone"), 10, || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }

    /// `control-plane up DIR PORT`; when it returns the API server is ready.
    pub fn start(&self) -> Instant {
        let out = Command::new(&self.script)
            .arg("up")
            .arg(&self.dir)
            .arg(&self.port)
            .output()
            .expect("control-plane up");
        assert!(out.status.success(), "control-plane up:\n{}", text(&out));
        Instant::now()
    }

    /// Killed, its etcd data removed, started again: a fresh API server.
    /// Killed rather than stopped: the data goes anyway, and a graceful
    /// stop waits for open watches to drain.
    pub fn wipe(&self) {
        self.kill();
        let data = self.dir.join("etcd-data");
        std::fs::remove_dir_all(&data).unwrap_or_else(|e| panic!("{}: {e}", data.display()));
        self.start();
    }
}

/// The API server a cluster suite runs against.
pub struct Kube {
    pub kubeconfig: PathBuf,
    root: PathBuf,
    plane: Option<ControlPlane>,
}

impl Kube {
    /// The API server the environment names; None when the suite is not
    /// asked for (`MESH_CLUSTER_TEST` unset). Asked for without one is a
    /// failure.
    pub fn from_env() -> Option<Kube> {
        env("MESH_CLUSTER_TEST")?;
        let kubeconfig = env("MESH_CLUSTER_KUBECONFIG")
            .or_else(|| env("MESH_TEST_KUBECONFIG"))
            .expect("MESH_CLUSTER_TEST is set, but neither MESH_CLUSTER_KUBECONFIG nor MESH_TEST_KUBECONFIG names an API server");
        Some(Kube {
            kubeconfig: PathBuf::from(kubeconfig),
            root: root(),
            plane: ControlPlane::from_env(),
        })
    }

    /// `program` with KUBECONFIG set, run from the repository root.
    pub fn command(&self, program: &str) -> Command {
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

    /// kubectl that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {}:\n{}",
            args.join(" "),
            text(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A shell script as a user types it (docs/install.md); must succeed.
    /// Its output, which is also shown.
    pub fn sh(&self, script: &str) -> String {
        eprintln!("$ {script}");
        let out = self
            .command("sh")
            .args(["-c", script])
            .output()
            .expect("running sh");
        let text = text(&out);
        eprintln!("{text}");
        assert!(out.status.success(), "{script}:\n{text}");
        text
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

    /// `kubectl apply -f -` of `yaml`, which must succeed.
    pub fn apply(&self, yaml: &str) {
        let out = self.apply_stdin(yaml);
        assert!(
            out.status.success(),
            "kubectl apply:\n{yaml}\n{}",
            text(&out)
        );
    }

    /// `kubectl apply -f -` of `yaml`: whether the API server took it.
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

    /// The API server answers within 30 s, or the suite fails (it was
    /// asked for).
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
                text(&out)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Whether the suite started the control plane (and so may restart it).
    pub fn can_restart(&self) -> bool {
        self.plane.is_some()
    }

    fn plane(&self) -> &ControlPlane {
        self.plane
            .as_ref()
            .expect("a control plane the recipe started")
    }

    /// SIGKILL to the API server and its etcd.
    pub fn kill_control_plane(&self) {
        self.plane().kill();
    }

    /// `control-plane up`; when it returns the API server is ready.
    pub fn start_control_plane(&self) -> Instant {
        self.plane().start()
    }

    /// A fresh API server (no objects): killed, wiped, started, answering.
    pub fn wipe(&self) {
        eprintln!("=== a fresh API server");
        self.plane().wipe();
        self.reachable();
    }

    /// A kubeconfig, written in `dir`, for ServiceAccount `ns/sa` (a token
    /// from the TokenRequest API) on the same API server.
    pub fn token_kubeconfig(&self, dir: &Path, ns: &str, sa: &str) -> PathBuf {
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
        let path = dir.join(format!("{ns}-{sa}.kubeconfig"));
        std::fs::write(&path, serde_yaml::to_string(&config).expect("yaml")).expect("write");
        path
    }
}
