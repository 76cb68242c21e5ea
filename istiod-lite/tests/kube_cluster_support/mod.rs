//! The cluster suite's helpers: the API server and its control plane
//! (`testkube`, shared with the lab's cluster suite), a work directory,
//! and the istiod-lite binary run out of cluster as its own ServiceAccount.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;
pub use testkube::eventually;
use testkube::{Kube, env, free_port, http_get};

/// The API server the recipe gives, and this suite's work directory.
pub struct Cluster {
    kube: Kube,
    work: PathBuf,
}

/// kubectl, sh and the control plane: [`Kube`]'s.
impl Deref for Cluster {
    type Target = Kube;
    fn deref(&self) -> &Kube {
        &self.kube
    }
}

impl Cluster {
    /// The cluster the recipe gives, or None when the suite is not asked
    /// for. Asked for without a cluster is a failure.
    pub fn from_env() -> Option<Cluster> {
        let kube = Kube::from_env()?;
        let work = testkube::root().join("target/kube-cluster-work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("the work directory");
        eprintln!(
            "cluster suite: kubeconfig {}; work directory {}",
            kube.kubeconfig.display(),
            work.display()
        );
        Some(Cluster { kube, work })
    }

    pub fn work(&self) -> &Path {
        &self.work
    }

    /// A kustomize overlay installing `manifests/` into `ns`; its path
    /// from the repository root.
    pub fn overlay(&self, ns: &str) -> String {
        let dir = self.work.join(format!("overlay-{ns}"));
        std::fs::create_dir_all(&dir).expect("overlay directory");
        let rel = dir
            .strip_prefix(testkube::root())
            .expect("under the root")
            .to_path_buf();
        let up = "../".repeat(rel.components().count());
        std::fs::write(
            dir.join("kustomization.yaml"),
            format!("namespace: {ns}\nresources:\n- {up}manifests\n"),
        )
        .expect("overlay");
        rel.display().to_string()
    }
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
        let kubeconfig = c.token_kubeconfig(c.work(), ns, "istiod-lite");
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
        (out.status.success(), testkube::text(&out))
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
