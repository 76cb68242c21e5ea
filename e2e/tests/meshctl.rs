//! meshctl against a live lab and against saved dumps: every command, with
//! the printed tables' content checked.

use std::process::Command;
use std::time::Duration;

use e2e::lab::{Down, Lab};
use e2e::mesh::{binary, eventually};
use mesh_core::netns::Netns;
use serde_json::Value;

fn yaml(text: &str) -> Vec<Value> {
    e2e::lab::parse_docs(text).unwrap()
}

/// Runs meshctl; (exit code, stdout, stderr). Only with the sources the test
/// names: none of the caller's MESHCTL_* defaults (they name their mesh).
fn meshctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary("meshctl"))
        .env_remove("MESHCTL_ADDR")
        .env_remove("MESHCTL_CONTROLLER")
        .env_remove("MESHCTL_LAB")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// meshctl against the lab; stdout, asserting success.
fn lab_ok(dir: &str, args: &[&str]) -> String {
    let mut all = vec!["--lab", dir];
    all.extend_from_slice(args);
    let (code, out, err) = meshctl(&all);
    assert_eq!(code, 0, "meshctl {args:?}: {err}\n{out}");
    out
}

/// The table rows (after the title and header lines) that contain all of `want`.
fn rows_with<'a>(table: &'a str, want: &[&str]) -> Vec<&'a str> {
    table
        .lines()
        .filter(|l| want.iter().all(|w| l.contains(w)))
        .collect()
}

#[tokio::test]
async fn meshctl_explains_lists_and_steers_a_live_lab() {
    let tmp = tempfile::tempdir().unwrap();
    let dir_path = tmp.path().join("lab");
    let dir = dir_path.to_str().unwrap().to_string();
    let mut g = Down(Lab::create_in(&dir_path, e2e::lab::TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let manifests =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo/shop.yaml");
    g.0.apply(e2e::lab::read_docs(&manifests).unwrap())
        .await
        .unwrap();
    let lab = &g.0;
    let server1 = lab.pod("shop/server-1").unwrap().clone();
    let client = lab.pod("shop/client-0").unwrap().clone();
    eventually("the mesh is up", Duration::from_secs(30), || async {
        let out = lab
            .exec("shop/client-0", &["labapp", "get", "http://server.shop/"])
            .unwrap();
        out.status.success()
    })
    .await;

    // Workloads and services, as the tunnel sees them (once the ztunnels
    // hold every pod: the legacy namespace's arrive on their own push).
    eventually(
        "every workload in the ztunnels",
        Duration::from_secs(30),
        || async {
            let w = lab_ok(&dir, &["ztunnel-config", "workloads"]);
            !rows_with(&w, &["legacy", "legacy-client-0"]).is_empty()
                && !rows_with(&w, &["shop", "client-0", &client.ip]).is_empty()
        },
    )
    .await;
    let w = lab_ok(&dir, &["ztunnel-config", "workloads"]);
    assert_eq!(
        rows_with(&w, &["shop", "client-0", &client.ip, "node-1", "HBONE"]).len(),
        1,
        "{w}"
    );
    assert_eq!(
        rows_with(&w, &["legacy", "legacy-client-0", "TCP"]).len(),
        1,
        "{w}"
    );
    let only = lab_ok(
        &dir,
        &["ztunnel-config", "workloads", "--address", &server1.ip],
    );
    assert_eq!(only.lines().count(), 2, "one header line, one row: {only}");
    let s = lab_ok(&dir, &["ztunnel-config", "services", "-n", "shop"]);
    assert_eq!(rows_with(&s, &["shop", "server", "2/2"]).len(), 1, "{s}");

    // Certificates: each pod on node-1 has its identity there, and the root.
    let c = lab_ok(
        &dir,
        &["ztunnel-config", "certificates", "--node", "node-1"],
    );
    for sa in ["client", "server"] {
        let id = format!("spiffe://cluster.local/ns/shop/sa/{sa}");
        assert_eq!(
            rows_with(&c, &["node-1", &id, "leaf", "available"]).len(),
            1,
            "{c}"
        );
    }
    assert_eq!(rows_with(&c, &["root", "trusted"]).len(), 1, "{c}");
    assert!(!c.contains("node-2"), "{c}");

    // A connection the test holds open, from the client pod to server-1.
    let ns = Netns::open(&format!("/var/run/netns/{}", client.netns)).unwrap();
    let sock = ns.run(tokio::net::TcpSocket::new_v4).unwrap().unwrap();
    let target = format!("{}:8080", server1.ip);
    let held = sock.connect(target.parse().unwrap()).await.unwrap();
    let mut conns = String::new();
    for _ in 0..40 {
        conns = lab_ok(&dir, &["ztunnel-config", "connections"]);
        if conns.contains("INBOUND") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows_with(
            &conns,
            &["node-1", "client-0", "OUTBOUND", &target, "HBONE"]
        )
        .len(),
        1,
        "{conns}"
    );
    assert_eq!(
        rows_with(
            &conns,
            &[
                "node-2",
                "server-1",
                "INBOUND",
                &target,
                "spiffe://cluster.local/ns/shop/sa/client"
            ]
        )
        .len(),
        1,
        "{conns}"
    );
    let inbound = lab_ok(
        &dir,
        &["ztunnel-config", "connections", "--direction", "inbound"],
    );
    assert!(!inbound.contains("OUTBOUND"), "{inbound}");
    drop(held);

    // why: allowed, then denied by the policy just applied, which it names.
    let ok = lab_ok(&dir, &["why", "shop/client-0", "server.shop"]);
    assert!(ok.starts_with("STEP"), "one header line: {ok}");
    assert_eq!(
        rows_with(&ok, &["outcome", "shop/client-0 -> server.shop: ALLOWED"]).len(),
        1,
        "{ok}"
    );
    assert!(
        ok.contains("presents spiffe://cluster.local/ns/shop/sa/client"),
        "{ok}"
    );
    g.0.apply(yaml("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-client, namespace: shop}\nspec:\n  action: DENY\n  selector: {matchLabels: {app: server}}\n  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/client]}}]}]\n"))
        .await
        .unwrap();
    let lab = &g.0;
    let mut denied = String::new();
    for _ in 0..50 {
        denied = lab_ok(&dir, &["why", "shop/client-0", "server.shop:80"]);
        if denied.contains("DENIED") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows_with(
            &denied,
            &[
                "outcome",
                "shop/client-0 -> server.shop:80: DENIED (decided by shop/no-client)"
            ]
        )
        .len(),
        1,
        "{denied}"
    );
    // And the real connection is refused, as explained.
    let refused = lab
        .exec("shop/client-0", &["labapp", "get", "http://server.shop/"])
        .unwrap();
    assert!(!refused.status.success());
    let json = lab_ok(&dir, &["why", "shop/client-0", "server.shop", "-o", "json"]);
    let v: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["decided_by"], "shop/no-client");
    // YAML (and JSON): the ztunnel's policy objects themselves.
    let p = lab_ok(&dir, &["ztunnel-config", "policy", "-o", "yaml"]);
    let p: Value = serde_yaml::from_str(&p).unwrap();
    let no_client = p
        .as_array()
        .and_then(|ps| ps.iter().find(|x| x["name"] == "no-client"))
        .unwrap_or_else(|| panic!("{p}"));
    assert!(
        no_client["action"]
            .as_str()
            .is_some_and(|a| a.eq_ignore_ascii_case("deny")),
        "{no_client}"
    );
    assert!(no_client["rules"].is_array(), "{no_client}");

    // Saved dumps: the same answers offline, and a newer dump's unknown
    // fields or unreadable entries do not stop it.
    let dump_path = tmp.path().join("node-1.json");
    let ns1 = Netns::open(&format!("/var/run/netns/{}", lab.state.nodes[0].netns)).unwrap();
    let text = {
        let sock = ns1.run(tokio::net::TcpSocket::new_v4).unwrap().unwrap();
        let mut s = sock
            .connect("127.0.0.1:15000".parse().unwrap())
            .await
            .unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"GET /config_dump HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let mut saved: Value = serde_json::from_str(&text).unwrap();
    std::fs::write(&dump_path, saved.to_string()).unwrap();
    let f = dump_path.to_str().unwrap();
    let (code, offline, err) = meshctl(&["--file", f, "why", "shop/client-0", "server.shop"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        offline.contains("DENIED (decided by shop/no-client)"),
        "{offline}"
    );
    saved["workloads"][0]["added_in_a_later_version"] = serde_json::json!({"x": 1});
    saved["policies"][0]["rules"] = serde_json::json!("a shape we do not know");
    saved["something_new"] = serde_json::json!([1, 2]);
    std::fs::write(&dump_path, saved.to_string()).unwrap();
    let (code, newer, err) = meshctl(&["--file", f, "ztunnel-config", "all"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        newer.contains("client-0") && newer.contains("NOT AFTER"),
        "{newer}"
    );
    let (code, _, why_newer) = meshctl(&["--file", f, "why", "shop/client-0", "server.shop"]);
    assert_eq!(code, 0);
    assert!(why_newer.contains("could not be read"), "{why_newer}");

    // top: the edge from the client to the servers under some traffic.
    std::fs::remove_file(dir_path.join("config/authorizationpolicy-shop-no-client.yaml")).unwrap();
    eventually("the deny is gone", Duration::from_secs(10), || async {
        lab_ok(&dir, &["why", "shop/client-0", "server.shop"]).contains("ALLOWED")
    })
    .await;
    let load = {
        let netns = client.netns.clone();
        std::thread::spawn(move || {
            Command::new("ip")
                .args(["netns", "exec", &netns])
                .arg(binary("labapp"))
                .args([
                    "load",
                    "http://server.shop/",
                    "--requests",
                    "4000",
                    "--concurrency",
                    "2",
                ])
                .env(
                    "LOCALDOMAIN",
                    "shop.svc.cluster.local svc.cluster.local cluster.local",
                )
                .output()
                .map(|o| o.status.success())
        })
    };
    let top = lab_ok(&dir, &["top", "--once", "--interval", "1"]);
    assert!(load.join().unwrap().unwrap(), "the load ran");
    assert!(
        !rows_with(&top, &["shop/client-0", "shop/server-"]).is_empty(),
        "{top}"
    );

    // check: all good; then a ztunnel down is named with its address.
    let (code, good, summary) = meshctl(&["--lab", &dir, "check"]);
    assert_eq!(code, 0, "{summary}{good}");
    assert!(summary.starts_with("all "), "{summary}");
    assert!(good.starts_with("CHECK"), "one header line: {good}");
    assert!(
        rows_with(&good, &["config", "ztunnel~node-2", "acknowledged"]).len() >= 2,
        "{good}"
    );
    g.0.stop("node-2-ztunnel", false).unwrap();
    let (code, bad, _) = meshctl(&["--lab", &dir, "check"]);
    assert_eq!(code, 1, "{bad}");
    assert!(
        !rows_with(&bad, &["ztunnel on node-2", "FAIL"]).is_empty(),
        "{bad}"
    );
    g.0.restart("node-2-ztunnel").unwrap();

    // Steering: a waypoint for shop, listed with the service it serves,
    // then deleted; enrollment by label.
    let applied = lab_ok(
        &dir,
        &["waypoint", "apply", "-n", "shop", "--enroll-namespace"],
    );
    assert!(
        applied.contains("waypoint shop/waypoint applied"),
        "{applied}"
    );
    let mut listed = String::new();
    for _ in 0..100 {
        listed = lab_ok(&dir, &["waypoint", "list"]);
        if listed.contains("shop/server.shop.svc.cluster.local") && listed.contains("ready") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows_with(
            &listed,
            &[
                "shop/waypoint",
                "shop/server.shop.svc.cluster.local",
                "80/Http1"
            ]
        )
        .len(),
        1,
        "{listed}"
    );
    assert_eq!(
        rows_with(&listed, &["shop/waypoint-0", "ready"]).len(),
        1,
        "{listed}"
    );
    // The waypoint's endpoint reaches the ztunnels on its own push.
    let mut via = String::new();
    for _ in 0..100 {
        let (_, out, _) = meshctl(&["--lab", &dir, "why", "shop/client-0", "server.shop"]);
        via = out;
        if via.contains("has a waypoint") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        via.contains("has a waypoint") && via.contains("no L7 policy applies"),
        "{via}"
    );
    lab_ok(&dir, &["waypoint", "delete", "-n", "shop"]);
    eventually(
        "traffic no longer goes to the waypoint",
        Duration::from_secs(10),
        || async {
            !lab_ok(&dir, &["why", "shop/client-0", "server.shop"]).contains("has a waypoint")
        },
    )
    .await;
    // version: the client, the controller and every proxy, on one version.
    let (code, v, warnings) = meshctl(&["--lab", &dir, "version"]);
    assert_eq!(code, 0, "{warnings}");
    let me = env!("CARGO_PKG_VERSION");
    for (c, n) in [
        ("client", "meshctl"),
        ("control plane", "istiod-lite"),
        ("ztunnel", "node-1"),
        ("ztunnel", "node-2"),
    ] {
        assert_eq!(rows_with(&v, &[c, n, me]).len(), 1, "{c} {n}: {v}");
    }
    assert!(!warnings.contains("skew"), "{warnings}");
    let captured = || {
        Lab::load(&dir_path)
            .unwrap()
            .pod("legacy/legacy-client-0")
            .unwrap()
            .captured
    };
    assert!(!captured());
    lab_ok(&dir, &["enroll", "legacy"]);
    assert!(captured());
    lab_ok(&dir, &["unenroll", "legacy"]);
    assert!(!captured());
}

#[test]
fn meshctl_names_what_it_cannot_reach_and_prints_completions() {
    let (code, _, err) = meshctl(&["--addr", "127.0.0.1:9", "ztunnel-config", "workloads"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("cannot reach ztunnel admin at 127.0.0.1:9") && err.contains("check:"),
        "{err}"
    );
    let (code, _, err) = meshctl(&["--file", "/nonexistent/dump.json", "why", "a/b", "c"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/dump.json"), "{err}");
    let (code, script, _) = meshctl(&["completion", "bash"]);
    assert_eq!(code, 0);
    assert!(script.contains("meshctl") && script.contains("ztunnel-config"));
}
