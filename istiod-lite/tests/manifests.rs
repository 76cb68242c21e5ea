//! Every manifest in `manifests/` is valid offline: Kubernetes kinds against
//! the Kubernetes schemas (PyPI `kubernetes-validate`, strict: unknown
//! fields fail), and our custom resources against the types the CRDs are
//! generated from, read the way the controller reads them (unknown fields
//! fail too).

use std::path::{Path, PathBuf};
use std::process::Command;

use istiod_lite::config::objects::Object;

/// The validator's version, pinned so a new release cannot turn CI red.
const VALIDATOR: &str = "kubernetes-validate==1.37.0";

/// The API groups whose kinds the mesh's CRDs define.
const OUR_GROUPS: [&str; 4] = [
    "gateway.networking.k8s.io",
    "security.istio.io",
    "networking.istio.io",
    "extensions.mesh.dev",
];

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            yaml_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "yaml")
            && p.file_name().is_some_and(|n| n != "kustomization.yaml")
        {
            out.push(p);
        }
    }
}

fn validator() -> PathBuf {
    let found = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if let Some(p) = found {
        return p;
    }
    let ok = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            VALIDATOR,
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "installing {VALIDATOR} with pip failed");
    let o = Command::new("sh")
        .args(["-c", "command -v kubernetes-validate"])
        .output()
        .unwrap();
    PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())
}

#[test]
fn every_manifest_validates_offline() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    files.sort();
    assert!(!files.is_empty());

    // Our custom resources, parsed as the controller parses them.
    let mut custom = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v.is_null() {
                continue;
            }
            let api = v["apiVersion"].as_str().unwrap_or_default();
            let group = api.split_once('/').map(|(g, _)| g).unwrap_or("");
            if OUR_GROUPS.contains(&group) {
                custom += 1;
                let kind = v["kind"].clone();
                match Object::parse(v) {
                    Ok(Some(_)) => {}
                    Ok(None) => panic!("{}: {kind} is not a kind the mesh serves", f.display()),
                    Err(e) => panic!("{}: {e}", f.display()),
                }
            }
        }
    }
    assert!(custom > 0, "no custom resources found to check");

    // Everything else against the Kubernetes schemas, strictly.
    let out = Command::new(validator())
        .arg("--strict")
        .args(&files)
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    // The only warnings allowed are "no schema" for our own kinds.
    for line in report.lines().filter(|l| l.starts_with("WARN")) {
        assert!(
            OUR_GROUPS
                .iter()
                .any(|g| line.contains(&format!("api version {g}/"))),
            "{line}"
        );
    }
}

/// The controller's debug port (the whole model, every proxy connection)
/// listens on loopback in the shipped manifest; the kubelet's probes reach
/// a health listener that serves only `/ready` and `/healthz`.
#[test]
fn the_installed_controller_keeps_its_debug_port_on_loopback() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install/istiod-lite.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .map(|d| <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap())
        .find(|v| v["kind"] == "Deployment")
        .expect("a Deployment");
    let c = &deployment["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .map(|v| v.parse::<std::net::SocketAddr>().unwrap())
    };
    // The binary's default, when the flag is left out.
    let debug = flag("debug-addr").unwrap_or_else(|| "127.0.0.1:15014".parse().unwrap());
    assert!(debug.ip().is_loopback(), "--debug-addr={debug}");
    assert!(
        !args.iter().any(|a| a.starts_with("--debug-token-file")),
        "{args:?}"
    );
    let health = flag("health-addr").expect("--health-addr for the probes");
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            c[probe]["httpGet"]["port"].as_u64(),
            Some(u64::from(health.port())),
            "{probe}"
        );
    }
}

/// Prometheus' annotation-based discovery finds every pod the install runs
/// that serves metrics: each annotated port is one of its containers'.
#[test]
fn every_installed_pod_with_metrics_is_annotated_for_scraping() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install");
    let mut annotated = Vec::new();
    for f in ["istiod-lite.yaml", "ztunnel.yaml"] {
        let text = std::fs::read_to_string(dir.join(f)).unwrap();
        for d in serde_yaml::Deserializer::from_str(&text) {
            let v = <serde_json::Value as serde::Deserialize>::deserialize(d).unwrap();
            if !matches!(v["kind"].as_str(), Some("Deployment" | "DaemonSet")) {
                continue;
            }
            let t = &v["spec"]["template"];
            let a = &t["metadata"]["annotations"];
            assert_eq!(a["prometheus.io/scrape"], "true", "{f}: {a}");
            assert_eq!(a["prometheus.io/path"], "/metrics", "{f}: {a}");
            let port: u64 = a["prometheus.io/port"].as_str().unwrap().parse().unwrap();
            let ports: Vec<u64> = t["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .filter_map(|p| p["containerPort"].as_u64())
                .collect();
            assert!(ports.contains(&port), "{f}: {port} not in {ports:?}");
            annotated.push(
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
    }
    assert_eq!(annotated, ["istiod-lite", "ztunnel"]);
}
