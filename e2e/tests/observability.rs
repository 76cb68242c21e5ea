//! What an operator coming from Istio looks at, in a live lab: every mesh
//! program's log as JSON lines (`LOG_FORMAT=json`), the access log's fields
//! as keys; Istio's metric labels on every pod kind; the controller's own
//! metrics moving.
//!
//! Every lab of this file runs its programs with `LOG_FORMAT=json` (the lab
//! passes its environment on to the programs it starts).

use std::path::Path;
use std::time::Duration;

use e2e::lab::{Down, Lab, TEST_IDS};
use e2e::mesh::eventually;
use serde_json::Value;

fn json_logs() {
    // SAFETY: set before any lab (or other thread of this test binary)
    // starts a process; every test here wants the same value.
    unsafe { std::env::set_var("LOG_FORMAT", "json") };
}

/// A lab with the shop demo and its waypoint, answering through it.
async fn shop_with_waypoint(dir: &Path) -> Down {
    json_logs();
    let mut g = Down(Lab::create_in(dir, TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo");
    for f in ["shop.yaml", "waypoint.yaml"] {
        g.0.apply(e2e::lab::read_docs(&demo.join(f)).unwrap())
            .await
            .unwrap();
    }
    let lab = &g.0;
    // Through the waypoint once its log has a request's access line.
    eventually(
        "the shop answers through its waypoint",
        Duration::from_secs(60),
        || async {
            let ok = lab
                .exec("shop/client-0", &["labapp", "get", "http://server.shop/"])
                .is_ok_and(|o| o.status.success());
            ok && lab
                .state
                .pods
                .values()
                .filter(|p| p.image == "waypoint")
                .any(|p| {
                    std::fs::read_to_string(
                        lab.dir
                            .join("logs")
                            .join(format!("pod-{}-{}.log", p.namespace, p.name)),
                    )
                    .is_ok_and(|l| l.contains("request complete"))
                })
        },
    )
    .await;
    g
}

/// The log files of the mesh's programs: the controller, each node's
/// ztunnel and node agent, each waypoint.
fn mesh_logs(lab: &Lab) -> Vec<(String, String)> {
    let mut names: Vec<String> = lab.state.procs.values().map(|p| p.log.clone()).collect();
    for p in lab.state.pods.values().filter(|p| p.image == "waypoint") {
        names.push(format!("pod-{}-{}.log", p.namespace, p.name));
    }
    names
        .into_iter()
        .map(|n| {
            let text = std::fs::read_to_string(lab.dir.join("logs").join(&n))
                .unwrap_or_else(|e| panic!("{n}: {e}"));
            (n, text)
        })
        .collect()
}

#[tokio::test]
async fn every_mesh_program_logs_json_lines_and_the_access_log_has_its_fields_as_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let g = shop_with_waypoint(&tmp.path().join("lab")).await;
    let lab = &g.0;
    for _ in 0..5 {
        let _ = lab.exec("shop/client-0", &["labapp", "get", "http://server.shop/"]);
    }
    // Access lines are written when connections close.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs = mesh_logs(lab);
    let kinds = ["istiod-lite", "ztunnel.log", "cni.log", "waypoint"];
    for k in kinds {
        assert!(
            logs.iter().any(|(n, _)| n.contains(k)),
            "no {k} log: {:?}",
            logs.iter().map(|l| &l.0).collect::<Vec<_>>()
        );
    }
    let mut access = Vec::new();
    for (name, text) in &logs {
        assert!(!text.trim().is_empty(), "{name} is empty");
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {line}"));
            assert!(
                v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(),
                "{name}: {line}"
            );
            if v["target"] == "access" {
                access.push((name.clone(), v));
            }
        }
    }
    // The ztunnels' access lines (connections) and the waypoint's
    // (requests), their fields as keys.
    let zt = access
        .iter()
        .find(|(n, v)| n.contains("ztunnel") && v["message"] == "connection complete")
        .unwrap_or_else(|| panic!("no ztunnel access line among {}", access.len()));
    for k in [
        "src.addr",
        "dst.addr",
        "src.identity",
        "response_flags",
        "bytes_sent",
        "duration_ms",
    ] {
        assert!(!zt.1[k].is_null(), "{k}: {}", zt.1);
    }
    assert!(zt.1["bytes_sent"].is_u64(), "{}", zt.1);
    let wp = access
        .iter()
        .find(|(n, v)| n.contains("waypoint") && v["message"] == "request complete")
        .unwrap_or_else(|| panic!("no waypoint access line among {}", access.len()));
    assert_eq!(wp.1["method"], "GET", "{}", wp.1);
    assert_eq!(wp.1["response_code"], 200, "{}", wp.1);
    assert_eq!(
        wp.1["dst.service"], "server.shop.svc.cluster.local",
        "{}",
        wp.1
    );
}
