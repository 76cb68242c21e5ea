//! The lab cluster suite's helpers: kubectl against the API server the
//! recipe started (or a running one), that control plane's restart, and
//! the lab whose kubelet runs the pods.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::lab::{Down, KubeState, Lab, PodState, TEST_IDS};

/// Polls `f` every 200 ms; fails the test after `secs`.
pub fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The API server, and the lab that is the kubelet of its nodes.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    root: PathBuf,
    /// (script, dir, port) of a control plane the recipe started.
    plane: Option<(PathBuf, PathBuf, String)>,
    pub lab: Down,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The cluster the recipe gives, with a two-node lab as its kubelet;
    /// None when the suite is not asked for.
    pub fn from_env() -> Option<Cluster> {
        env("MESH_CLUSTER_TEST")?;
        let kubeconfig = env("MESH_CLUSTER_KUBECONFIG")
            .or_else(|| env("MESH_TEST_KUBECONFIG"))
            .expect("MESH_CLUSTER_TEST is set, but neither MESH_CLUSTER_KUBECONFIG nor MESH_TEST_KUBECONFIG names an API server");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("root")
            .to_path_buf();
        let plane = match (
            env("MESH_CONTROL_PLANE"),
            env("MESH_CLUSTER_DIR"),
            env("MESH_CLUSTER_PORT"),
        ) {
            (Some(s), Some(d), Some(p)) => Some((PathBuf::from(s), PathBuf::from(d), p)),
            _ => None,
        };
        let dir = tempfile::tempdir().expect("a directory");
        let mut lab = Lab::create_in(dir.path(), TEST_IDS, 2).expect("the lab's network");
        lab.state.kube = Some(KubeState {
            kubeconfig: kubeconfig.clone(),
            ..Default::default()
        });
        lab.save().expect("the lab's state");
        // Taken down (kubelet, pods, netns) however the test ends.
        let mut lab = Down(lab);
        e2e::kubelet::start(&mut lab.0, Path::new(&kubeconfig)).expect("lab kubelet");
        eprintln!(
            "lab cluster suite: {kubeconfig}, lab {} at {}",
            lab.0.state.id,
            dir.path().display()
        );
        Some(Cluster {
            kubeconfig: PathBuf::from(kubeconfig),
            root,
            plane,
            lab,
            _dir: dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.lab.0.dir
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

    /// `meshctl --kube ARGS` (through the API server's port-forward to the
    /// lab's kubelet): (passed, output).
    pub fn meshctl(&self, args: &[&str]) -> (bool, String) {
        let out = self
            .command(&e2e::mesh::binary("meshctl").display().to_string())
            .arg("--kube")
            .args(args)
            .output()
            .expect("running meshctl");
        (out.status.success(), Self::text(&out))
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

    /// A shell script as a user types it (docs/install.md); must succeed.
    pub fn sh(&self, script: &str) -> String {
        eprintln!("$ {script}");
        let out = self
            .command("sh")
            .args(["-c", script])
            .output()
            .expect("running sh");
        let text = Self::text(&out);
        eprintln!("{text}");
        assert!(out.status.success(), "{script}:\n{text}");
        text
    }

    pub fn apply(&self, yaml: &str) {
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
        let out = child.wait_with_output().expect("kubectl apply");
        assert!(
            out.status.success(),
            "kubectl apply:\n{yaml}\n{}",
            Self::text(&out)
        );
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

    /// The lab's state as the kubelet wrote it last.
    pub fn state(&self) -> Lab {
        Lab::load(self.dir()).expect("the lab's state")
    }

    /// The running pod of `ns` whose name starts with `prefix` (and, when
    /// given, on `node`).
    pub fn pod(&self, ns: &str, prefix: &str, node: Option<&str>) -> Option<PodState> {
        self.state()
            .state
            .pods
            .values()
            .find(|p| {
                p.namespace == ns && p.name.starts_with(prefix) && node.is_none_or(|n| p.node == n)
            })
            .cloned()
    }

    pub fn pods(&self, ns: &str, prefix: &str) -> Vec<PodState> {
        let mut v: Vec<PodState> = self
            .state()
            .state
            .pods
            .values()
            .filter(|p| p.namespace == ns && p.name.starts_with(prefix))
            .cloned()
            .collect();
        v.sort_by(|a, b| a.node.cmp(&b.node));
        v
    }

    /// `labapp ARGS` in a pod: (succeeded, stdout).
    pub fn labapp(&self, pod: &PodState, args: &[&str]) -> (bool, String) {
        let mut cmd = vec!["labapp"];
        cmd.extend(args);
        // A pod gone meanwhile (replaced by its controller) answers nothing.
        match self
            .state()
            .exec(&format!("{}/{}", pod.namespace, pod.name), &cmd)
        {
            Ok(out) => (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ),
            Err(_) => (false, String::new()),
        }
    }

    /// GET `url` from a pod: the answer's text, or None.
    pub fn get(&self, pod: &PodState, url: &str, headers: &[&str]) -> Option<String> {
        let mut args = vec!["get", url];
        for h in headers {
            args.extend(["--header", h]);
        }
        let (ok, out) = self.labapp(pod, &args);
        (ok && !out.is_empty()).then_some(out)
    }

    /// The log of one container of a pod the lab's kubelet runs.
    pub fn log(&self, pod: &PodState, container: &str) -> String {
        let f = self.dir().join("logs").join(format!(
            "pod-{}-{}-{container}.log",
            pod.namespace, pod.name
        ));
        std::fs::read_to_string(f).unwrap_or_default()
    }

    pub fn can_restart(&self) -> bool {
        self.plane.is_some()
    }

    /// SIGKILL to the API server and its etcd.
    pub fn kill_control_plane(&self) {
        let (_, dir, _) = self
            .plane
            .as_ref()
            .expect("a control plane the recipe started");
        for f in ["apiserver.pid", "etcd.pid"] {
            let pid = std::fs::read_to_string(dir.join(f)).expect("a pid file");
            let pid = pid.trim().to_string();
            let _ = Command::new("kill").args(["-9", &pid]).status();
            eventually(&format!("process {pid} gone"), 10, || {
                !Path::new(&format!("/proc/{pid}")).exists()
            });
        }
    }

    /// `control-plane up`; when it returns the API server is ready.
    pub fn start_control_plane(&self) -> Instant {
        let (script, dir, port) = self
            .plane
            .as_ref()
            .expect("a control plane the recipe started");
        let out = Command::new(script)
            .arg("up")
            .arg(dir)
            .arg(port)
            .output()
            .expect("control-plane up");
        assert!(out.status.success(), "{}", Self::text(&out));
        Instant::now()
    }
}
