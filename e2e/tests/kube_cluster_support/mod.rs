//! The lab cluster suite's helpers: the API server and its control plane
//! (`testkube`, shared with istiod-lite's cluster suite), and the lab whose
//! kubelet runs the pods.

use std::ops::Deref;
use std::path::Path;

use e2e::lab::{Down, KubeState, Lab, PodState, TEST_IDS};
use testkube::Kube;
pub use testkube::eventually;

/// The API server, and the lab that is the kubelet of its nodes.
pub struct Cluster {
    kube: Kube,
    pub lab: Down,
    _dir: tempfile::TempDir,
}

/// kubectl, sh and the control plane: [`Kube`]'s.
impl Deref for Cluster {
    type Target = Kube;
    fn deref(&self) -> &Kube {
        &self.kube
    }
}

impl Cluster {
    /// The cluster the recipe gives, with a two-node lab as its kubelet;
    /// None when the suite is not asked for.
    pub fn from_env() -> Option<Cluster> {
        let kube = Kube::from_env()?;
        let kubeconfig = kube.kubeconfig.clone();
        let dir = tempfile::tempdir().expect("a directory");
        let mut lab = Lab::create_in(dir.path(), TEST_IDS, 2).expect("the lab's network");
        lab.state.kube = Some(KubeState {
            kubeconfig: kubeconfig.display().to_string(),
            ..Default::default()
        });
        lab.save().expect("the lab's state");
        // Taken down (kubelet, pods, netns) however the test ends.
        let mut lab = Down(lab);
        e2e::kubelet::start(&mut lab.0, &kubeconfig).expect("lab kubelet");
        eprintln!(
            "lab cluster suite: {}, lab {} at {}",
            kubeconfig.display(),
            lab.0.state.id,
            dir.path().display()
        );
        Some(Cluster {
            kube,
            lab,
            _dir: dir,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.lab.0.dir
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
        (out.status.success(), testkube::text(&out))
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
}
