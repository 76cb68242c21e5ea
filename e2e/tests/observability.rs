//! What an operator coming from Istio looks at, in a live lab: every mesh
//! program's log as JSON lines (`LOG_FORMAT=json`), the access log's fields
//! as keys; Istio's metric labels on every pod kind; the controller's own
//! metrics moving.
//!
//! Every lab of this file runs its programs with `LOG_FORMAT=json` and the
//! controller with `CLUSTER_ID=lab-east` (the lab passes its environment on
//! to the programs it starts), so the cluster labels show a real name, not
//! a default.

use std::path::Path;
use std::time::Duration;

use e2e::lab::{Down, Lab, TEST_IDS};
use e2e::mesh::eventually;
use serde_json::Value;

const CLUSTER: &str = "lab-east";

fn lab_env() {
    // SAFETY: set before any lab (or other thread of this test binary)
    // starts a process; every test here wants the same values.
    unsafe {
        std::env::set_var("LOG_FORMAT", "json");
        std::env::set_var("CLUSTER_ID", CLUSTER);
    }
}

/// A lab with the shop demo and its waypoint, answering through it.
async fn shop_with_waypoint(dir: &Path) -> Down {
    lab_env();
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
    // The demo's route sends 10% to server-v2: either backend is right.
    assert!(
        [
            "server.shop.svc.cluster.local",
            "server-v2.shop.svc.cluster.local"
        ]
        .iter()
        .any(|s| wp.1["dst.service"] == *s),
        "{}",
        wp.1
    );
}

/// Istio's labels on every `istio_*` TCP series.
const TCP_LABELS: &[&str] = &[
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_service",
    "destination_service_namespace",
    "destination_service_name",
    "destination_workload",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_cluster",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
];

/// The series of a Prometheus text exposition: (name, labels, value).
fn series(text: &str) -> Vec<(String, std::collections::BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            let mut m = std::collections::BTreeMap::new();
            // Label values here hold no `",` sequence.
            for kv in labels.split("\",").filter(|s| !s.is_empty()) {
                let (k, v) = kv.split_once("=\"")?;
                m.insert(k.to_string(), v.trim_end_matches('"').to_string());
            }
            Some((name.to_string(), m, value))
        })
        .collect()
}

/// GET `url` from inside network namespace `netns` (the body).
fn get_in(netns: &str, url: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(e2e::mesh::binary("labapp"))
        .args(["get", url])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn value(text: &str, name: &str, label: Option<(&str, &str)>) -> f64 {
    series(text)
        .into_iter()
        .filter(|(n, l, _)| {
            n == name && label.is_none_or(|(k, v)| l.get(k).map(String::as_str) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test]
async fn every_pod_kind_exports_istios_labels_with_real_values_and_the_controller_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut g = shop_with_waypoint(&tmp.path().join("lab")).await;
    let before = g.0.controller_debug("/metrics").unwrap();
    // The mesh may still be taking its config: wait for one answer, then
    // send five that must all be answered, so every proxy on the way has
    // carried traffic before it is scraped.
    let get = |g: &Down| {
        g.0.exec("shop/client-0", &["labapp", "get", "http://server.shop/"])
            .is_ok_and(|o| o.status.success())
    };
    eventually(
        "the client reaches the server",
        Duration::from_secs(30),
        || {
            let ok = get(&g);
            async move { ok }
        },
    )
    .await;
    for i in 0..5 {
        assert!(get(&g), "request {i} through the mesh failed");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let lab = &g.0;

    // Every ztunnel and every waypoint: the full label set on every
    // istio_* series.
    let mut scraped: Vec<(String, String)> = lab
        .state
        .nodes
        .iter()
        .map(|n| {
            (
                format!("ztunnel on {}", n.name),
                get_in(&n.netns, &format!("http://{}:15020/metrics", n.ip)),
            )
        })
        .collect();
    for p in lab.state.pods.values().filter(|p| p.image == "waypoint") {
        scraped.push((
            format!("waypoint {}", p.name),
            get_in(&p.netns, &format!("http://{}:15020/metrics", p.ip)),
        ));
    }
    let mut all = Vec::new();
    for (what, text) in &scraped {
        let istio: Vec<_> = series(text)
            .into_iter()
            .filter(|(n, _, _)| n.starts_with("istio_"))
            .collect();
        assert!(!istio.is_empty(), "{what}: no istio_* series:\n{text}");
        for (name, labels, _) in &istio {
            if name.starts_with("istio_build") {
                continue;
            }
            for l in TCP_LABELS {
                assert!(
                    labels.contains_key(*l),
                    "{what}: {name} lacks {l}: {labels:?}"
                );
            }
            if name.starts_with("istio_request") {
                assert!(
                    labels.contains_key("response_code"),
                    "{what}: {name}: {labels:?}"
                );
            }
        }
        all.extend(istio.into_iter().map(|s| (what.clone(), s)));
    }
    let find = |what: &str, name: &str, want: &[(&str, &str)]| {
        all.iter().any(|(w, (n, l, _))| {
            w.starts_with(what)
                && n.starts_with(name)
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    };
    // The client's side, as its ztunnel reports it.
    assert!(
        find(
            "ztunnel",
            "istio_tcp_connections_opened",
            &[
                ("reporter", "source"),
                ("source_app", "client"),
                ("source_version", "latest"),
                ("source_cluster", CLUSTER),
                ("source_workload_namespace", "shop"),
            ]
        ),
        "{all:#?}"
    );
    // The server's side, as its ztunnel reports it.
    assert!(
        find(
            "ztunnel",
            "istio_tcp_connections_opened",
            &[
                ("reporter", "destination"),
                ("destination_app", "server"),
                ("destination_version", "latest"),
                ("destination_cluster", CLUSTER),
            ]
        ),
        "{all:#?}"
    );
    // Behind the waypoint, the server's ztunnel names the service the
    // waypoint asked for (its `forwarded` host).
    assert!(
        find(
            "ztunnel",
            "istio_tcp_connections_opened",
            &[
                ("reporter", "destination"),
                ("destination_service", "server.shop.svc.cluster.local"),
                ("destination_service_name", "server"),
                ("destination_service_namespace", "shop"),
            ]
        ),
        "{all:#?}"
    );
    // The waypoint's requests: both ends named.
    assert!(
        find(
            "waypoint",
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("source_app", "client"),
                ("source_cluster", CLUSTER),
                ("destination_app", "server"),
                ("destination_version", "latest"),
                ("destination_cluster", CLUSTER),
                ("destination_service", "server.shop.svc.cluster.local"),
                ("response_code", "200"),
            ]
        ),
        "{all:#?}"
    );

    controller_counts_and_they_move(&mut g, &before).await;
}

#[tokio::test]
async fn both_ends_of_a_tunnel_name_the_service_and_the_workloads() {
    lab_env();
    let tmp = tempfile::tempdir().unwrap();
    let mut g = Down(Lab::create_in(&tmp.path().join("lab"), TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo/shop.yaml");
    g.0.apply(e2e::lab::read_docs(&demo).unwrap())
        .await
        .unwrap();
    let lab = &g.0;
    let server1 = lab.pod("shop/server-1").unwrap().clone();
    let node = |name: &str| {
        lab.state
            .nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap()
            .clone()
    };
    let (n1, n2) = (node("node-1"), node("node-2"));
    assert_eq!(server1.node, "node-2");
    // Until a connection has reached server-1 (on the other node: HBONE).
    eventually(
        "a request reaches server-1 over HBONE",
        Duration::from_secs(60),
        || async {
            let _ = lab.exec("shop/client-0", &["labapp", "get", "http://server.shop/"]);
            let m = get_in(&n2.netns, &format!("http://{}:15020/metrics", n2.ip));
            series(&m).iter().any(|(n, l, _)| {
                n == "istio_tcp_connections_opened_total"
                    && l.get("reporter").map(String::as_str) == Some("destination")
                    && l.get("destination_workload")
                        .is_some_and(|w| w.starts_with("server"))
            })
        },
    )
    .await;
    let src = get_in(&n1.netns, &format!("http://{}:15020/metrics", n1.ip));
    let dst = get_in(&n2.netns, &format!("http://{}:15020/metrics", n2.ip));
    let has = |text: &str, want: &[(&str, &str)]| {
        series(text).iter().any(|(n, l, _)| {
            n == "istio_tcp_connections_opened_total"
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
    };
    let both = [
        ("source_workload_namespace", "shop"),
        ("source_app", "client"),
        ("source_cluster", CLUSTER),
        ("destination_service", "server.shop.svc.cluster.local"),
        ("destination_service_name", "server"),
        ("destination_service_namespace", "shop"),
        ("destination_app", "server"),
        ("destination_cluster", CLUSTER),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/shop/sa/server",
        ),
        (
            "source_principal",
            "spiffe://cluster.local/ns/shop/sa/client",
        ),
    ];
    let mut at_source = both.to_vec();
    at_source.push(("reporter", "source"));
    assert!(has(&src, &at_source), "node-1 (source side):\n{src}");
    // The destination learns the service from the client's `forwarded`
    // host: it has no VIP of its own to go by.
    let mut at_dest = both.to_vec();
    at_dest.push(("reporter", "destination"));
    at_dest.push(("destination_workload", &server1.name));
    assert!(has(&dst, &at_dest), "node-2 (destination side):\n{dst}");
}

/// Metrics a lab run cannot give a series, and why: their names must
/// still be declared, but their labels cannot be checked here.
const NO_SERIES_IN_A_LAB: &[(&str, &str)] = &[(
    "istiod_lite_watch_restarts_total",
    "folder mode watches no API server",
)];

/// Labels Prometheus adds to every scraped series (not the mesh's).
const SCRAPE_LABELS: &[&str] = &["instance", "job"];

#[tokio::test]
async fn every_dashboard_query_names_metrics_and_labels_the_mesh_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let g = shop_with_waypoint(&tmp.path().join("lab")).await;
    let lab = &g.0;
    for _ in 0..5 {
        let _ = lab.exec("shop/client-0", &["labapp", "get", "http://server.shop/"]);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Everything the mesh exports: every ztunnel, waypoint and the controller.
    let mut texts: Vec<String> = lab
        .state
        .nodes
        .iter()
        .map(|n| get_in(&n.netns, &format!("http://{}:15020/metrics", n.ip)))
        .collect();
    for p in lab.state.pods.values().filter(|p| p.image == "waypoint") {
        texts.push(get_in(&p.netns, &format!("http://{}:15020/metrics", p.ip)));
    }
    texts.push(lab.controller_debug("/metrics").unwrap());
    let mut labels_of: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    let mut declared = std::collections::BTreeSet::new();
    for t in &texts {
        for (name, labels, _) in series(t) {
            labels_of
                .entry(name)
                .or_default()
                .extend(labels.into_keys());
        }
        for l in t.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                declared.extend(rest.split_whitespace().next().map(str::to_string));
            }
        }
    }

    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/dashboards");
    let mut checked = 0;
    let mut problems = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let titles: Vec<String> = files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "json"))
        .map(|f| {
            let d: Value = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            let mut queries: Vec<String> = Vec::new();
            for p in d["panels"].as_array().unwrap() {
                for t in p["targets"].as_array().into_iter().flatten() {
                    queries.extend(t["expr"].as_str().map(str::to_string));
                }
            }
            for v in d["templating"]["list"].as_array().unwrap() {
                queries.extend(v["query"]["query"].as_str().map(str::to_string));
            }
            for q in &queries {
                let (metrics, labels) = e2e::promql::names(q);
                assert!(!metrics.is_empty(), "{}: no metric in {q}", f.display());
                for m in &metrics {
                    // A counter's family is declared without `_total`, a
                    // histogram's without `_bucket`/`_sum`/`_count`.
                    let family = ["_total", "_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|s| m.strip_suffix(s))
                        .unwrap_or(m);
                    if !labels_of.contains_key(m)
                        && !declared.contains(m)
                        && !declared.contains(family)
                    {
                        problems.push(format!("{}: {m} is not exported ({q})", f.display()));
                    }
                }
                let unchecked = metrics
                    .iter()
                    .all(|m| NO_SERIES_IN_A_LAB.iter().any(|(n, _)| n == m));
                for l in &labels {
                    let ok = SCRAPE_LABELS.contains(&l.as_str())
                        || (l == "le" && metrics.iter().any(|m| m.ends_with("_bucket")))
                        || unchecked
                        || metrics
                            .iter()
                            .any(|m| labels_of.get(m).is_some_and(|ls| ls.contains(l)));
                    if !ok {
                        problems.push(format!(
                            "{}: label {l} is on none of {metrics:?} ({q})",
                            f.display()
                        ));
                    }
                }
                checked += 1;
            }
            d["title"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    assert_eq!(titles, ["Control plane", "Mesh", "Waypoint", "Workload"]);
    assert!(checked > 50, "{checked} queries");
}

/// The controller's metrics: proxies connected, pushes, certificates,
/// objects; and they move when a new workload arrives.
async fn controller_counts_and_they_move(g: &mut Down, before: &str) {
    // The controller: proxies connected, pushes, certificates, objects.
    let m = g.0.controller_debug("/metrics").unwrap();
    assert!(
        value(&m, "pilot_xds", None) >= 3.0,
        "2 ztunnels and a waypoint:\n{m}"
    );
    assert!(
        value(&m, "pilot_xds_pushes", Some(("type", "address"))) > 0.0,
        "{m}"
    );
    assert!(value(&m, "citadel_server_csr_count", None) > 0.0, "{m}");
    assert!(
        value(&m, "citadel_server_success_cert_issuance_count", None) > 0.0,
        "{m}"
    );
    assert!(
        value(&m, "istiod_lite_config_objects", Some(("kind", "Pod"))) >= 5.0,
        "{m}"
    );
    assert!(
        value(&m, "istiod_lite_model_build_seconds_count", None) > 0.0,
        "{m}"
    );
    assert!(
        value(&m, "istio_build", Some(("component", "istiod-lite"))) == 1.0,
        "{m}"
    );
    assert!(
        m.contains("pilot_total_xds_rejects") && m.contains("pilot_proxy_convergence_time_bucket"),
        "{m}"
    );
    // They move: a new workload with an identity of its own is pushed to
    // every proxy and its ztunnel asks for its certificate.
    let pushes = value(&m, "pilot_xds_pushes", None);
    let csrs = value(&m, "citadel_server_csr_count", None);
    let converged = value(&m, "pilot_proxy_convergence_time_count", None);
    assert!(value(before, "pilot_xds_pushes", None) <= pushes);
    g.0.apply(e2e::lab::parse_docs("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: extra, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: extra}}\n  template:\n    metadata: {labels: {app: extra}}\n    spec:\n      serviceAccountName: extra\n      containers: [{name: app, image: labapp, args: [http-echo, --port, \"8080\"]}]\n").unwrap())
        .await
        .unwrap();
    let lab = &g.0;
    eventually(
        "the controller's counters move",
        Duration::from_secs(30),
        || async {
            let m = lab.controller_debug("/metrics").unwrap();
            value(&m, "pilot_xds_pushes", None) > pushes
                && value(&m, "citadel_server_csr_count", None) > csrs
                && value(&m, "pilot_proxy_convergence_time_count", None) > converged
        },
    )
    .await;
}
