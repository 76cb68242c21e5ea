//! meshctl's manners, as istioctl's and kubectl's users expect them: the
//! cluster of the current kubeconfig by default, `--kubeconfig`,
//! `--context`, `-n`, `-i/--istio-namespace`, `-o short|wide|json|yaml`
//! (JSON and YAML the objects, not rows of strings), one header line,
//! singular subcommand names, `version` with a skew warning, and the
//! documented exit codes. Against the fake API server of `common`.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

async fn cluster() -> (Arc<Mutex<Seen>>, std::net::SocketAddr) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let admin = recorded_admin().await;
    let api = fake_api(seen.clone(), admin).await;
    (seen, api)
}

async fn run(
    kc: Option<std::path::PathBuf>,
    home: std::path::PathBuf,
    args: &[&str],
) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        meshctl_env(kc.as_deref(), &home, &a)
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_current_kubeconfig_is_the_default_and_every_output_form_prints() {
    let (_, api) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let kc = Some(kubeconfig(dir.path(), api, &[]));

    // No source flag: the cluster of KUBECONFIG, like kubectl.
    let (code, short, err) = run(kc.clone(), home.clone(), &["ztunnel-config", "workloads"]).await;
    assert_eq!(code, 0, "{err}");
    let header = short.lines().next().unwrap();
    assert!(
        header.starts_with("NAMESPACE") && header.ends_with("PROTOCOL"),
        "one header line, no title: {short}"
    );
    assert!(short.contains("client-0"), "{short}");
    assert!(!header.contains("IDENTITY"), "{header}");

    // -o table is short by another name; wide has more columns.
    let (_, table, _) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-o", "table"],
    )
    .await;
    assert_eq!(table, short);
    let (code, wide, err) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-o", "wide"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let wh = wide.lines().next().unwrap();
    assert!(
        wh.starts_with("NAMESPACE") && wh.contains("IDENTITY") && wh.contains("HEALTHY"),
        "{wide}"
    );
    assert!(
        wide.contains("spiffe://cluster.local/ns/shop/sa/client"),
        "{wide}"
    );

    // JSON and YAML: the ztunnel's objects, typed.
    let (code, json, err) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-o", "json"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&json).unwrap();
    let client = v
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "client-0")
        .unwrap_or_else(|| panic!("{json}"));
    assert!(client["addresses"].is_array(), "{client}");
    assert_eq!(client["healthy"], true, "{client}");
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    let (_, yaml, _) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-o", "yaml"],
    )
    .await;
    let y: Value = serde_yaml::from_str(&yaml).unwrap();
    assert_eq!(y, v);
    let (_, all, _) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "all", "-o", "json"],
    )
    .await;
    let all: Value = serde_json::from_str(&all).unwrap();
    for k in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "connections",
    ] {
        assert!(all[k].is_array(), "{k}: {all}");
    }
    assert!(
        all["services"][0]["ports"][0]["service_port"].is_u64(),
        "{all}"
    );

    // Singular names, as istioctl has them.
    for (one, many) in [
        ("workload", "workloads"),
        ("service", "services"),
        ("policy", "policies"),
        ("certificate", "certificates"),
        ("connection", "connections"),
    ] {
        let (c1, o1, e1) = run(kc.clone(), home.clone(), &["ztunnel-config", one]).await;
        let (_, o2, _) = run(kc.clone(), home.clone(), &["ztunnel-config", many]).await;
        assert_eq!(c1, 0, "{one}: {e1}");
        assert_eq!(o1, o2, "{one}");
    }

    // -n narrows a listing.
    let (_, shop, _) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-n", "shop"],
    )
    .await;
    let rows: Vec<&str> = shop.lines().skip(1).collect();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r.starts_with("shop ")),
        "{shop}"
    );
    assert!(short.lines().any(|l| l.starts_with("legacy ")), "{short}");

    // Exit codes: 2 for a command line that is wrong.
    let (code, _, _) = run(
        kc.clone(),
        home.clone(),
        &["ztunnel-config", "workloads", "-o", "bogus"],
    )
    .await;
    assert_eq!(code, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubeconfig_context_and_namespace_flags_pick_the_cluster() {
    let (seen, api) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    // The current context (x) is the fake API server; `dead` answers
    // nothing; `live` is the same server with namespace shop.
    let server = format!("http://{api}");
    let kc = kubeconfig(
        dir.path(),
        api,
        &[
            ("dead", "http://127.0.0.1:9", None),
            ("live", &server, Some("shop")),
        ],
    );
    let kcs = kc.to_str().unwrap();

    // --kubeconfig without KUBECONFIG.
    let (code, out, err) = run(
        None,
        home.clone(),
        &["--kubeconfig", kcs, "ztunnel-config", "workload"],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("client-0"), "{out}");
    // --context picks another cluster: one that does not answer is exit 2.
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "--context",
            "dead",
            "ztunnel-config",
            "workload",
        ],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "--context",
            "nope",
            "ztunnel-config",
            "workload",
        ],
    )
    .await;
    assert_eq!(code, 2);
    assert!(err.contains("nope"), "{err}");

    // -i: the install namespace (its ztunnels are the ones forwarded to).
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "-i",
            "mesh-2",
            "ztunnel-config",
            "workload",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(
        seen.lock()
            .unwrap()
            .forwards
            .iter()
            .any(|f| f.starts_with("/api/v1/namespaces/mesh-2/pods/ztunnel-x7k2p/portforward")),
        "{:?}",
        seen.lock().unwrap().forwards
    );
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "--istio-namespace",
            "mesh",
            "ztunnel-config",
            "workload",
        ],
    )
    .await;
    assert_eq!(code, 2);
    assert!(
        err.contains("no ztunnel pods") && err.contains("mesh"),
        "{err}"
    );

    // A change goes to the context's namespace when -n is not given, and
    // to -n when it is.
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "--context",
            "live",
            "waypoint",
            "apply",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = run(
        None,
        home.clone(),
        &[
            "--kubeconfig",
            kcs,
            "--context",
            "live",
            "-n",
            "legacy",
            "enroll",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let patches: Vec<String> = seen
        .lock()
        .unwrap()
        .patches
        .iter()
        .map(|p| p.1.clone())
        .collect();
    assert!(
        patches[0]
            .starts_with("/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint?"),
        "{patches:?}"
    );
    assert_eq!(patches[1], "/api/v1/namespaces/legacy?", "{patches:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_names_every_component_and_warns_on_skew() {
    let (_, api) = cluster().await;
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().to_path_buf();
    let kc = Some(kubeconfig(dir.path(), api, &[]));
    let me = env!("CARGO_PKG_VERSION");

    let (code, out, err) = run(kc.clone(), home.clone(), &["version"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["COMPONENT", "NAME", "VERSION"]
    );
    let row = |c: &str, n: &str| {
        lines
            .iter()
            .find(|l| l.starts_with(c) && l.contains(n))
            .map(|l| l.split_whitespace().last().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("no {c} {n}: {out}"))
    };
    assert_eq!(row("client", "meshctl"), me);
    assert_eq!(row("control plane", "istiod-lite"), "0.0.9");
    assert_eq!(row("ztunnel", "node-1"), me);
    assert!(
        err.contains("version skew") && err.contains("istiod-lite runs 0.0.9"),
        "{err}"
    );
    assert!(
        !err.contains("node-1"),
        "no warning for a ztunnel on our version: {err}"
    );

    let (_, json, _) = run(kc.clone(), home.clone(), &["version", "-o", "json"]).await;
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        v[0],
        serde_json::json!({"component": "client", "name": "meshctl", "version": me})
    );
    assert!(
        v.as_array()
            .unwrap()
            .iter()
            .any(|c| c["component"] == "ztunnel" && c["name"] == "node-1"),
        "{v}"
    );

    // With no mesh to ask, the client's own version still prints.
    let (code, out, err) = run(None, home.clone(), &["version"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(me) && err.contains("no mesh to ask"),
        "{out}{err}"
    );
}
