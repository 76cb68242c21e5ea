//! The ingress gateway in the lab: a Gateway of class `mesh-ingress` runs
//! the waypoint binary in its ingress role, its listener ports published
//! on the machine's loopback. A client outside the mesh (this process's
//! network namespace, with curl) reaches a mesh service over HTTPS,
//! verifying the gateway's certificate; the service sees the gateway's
//! SPIFFE identity; a policy admitting only that identity refuses a direct
//! caller; a wrong SNI name gets a TLS alert; a listener whose Secret is
//! missing or broken is reported while the others keep serving.

use std::process::Command;
use std::time::{Duration, SystemTime};

use e2e::lab::{Down, Lab, TEST_IDS};
use e2e::mesh::eventually;
use serde_json::Value;

const GATEWAY_ID: &str = "spiffe://cluster.local/ns/edge/sa/public";

/// A CA of the example.test organisation and a server certificate from it
/// (certificate PEM, key PEM), as a certificate manager would make them.
fn certificates(names: &[&str]) -> (String, Vec<(String, String)>) {
    let now = SystemTime::now();
    let ca =
        istiod_lite::ca::issue::Issuer::new_root("example.test", now, Duration::from_secs(86400))
            .unwrap();
    let leaves = names
        .iter()
        .map(|n| {
            ca.issue_server(
                &[n.to_string()],
                &[],
                now - Duration::from_secs(3600),
                now + Duration::from_secs(86400),
            )
            .unwrap()
        })
        .collect();
    (ca.cert_pem().to_string(), leaves)
}

fn indent(pem: &str) -> String {
    pem.lines().map(|l| format!("      {l}\n")).collect()
}

fn tls_secret(ns: &str, name: &str, cert: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}---\n",
        indent(cert),
        indent(key)
    )
}

struct Curl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// curl from the machine's own network namespace, bounded in time.
fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl runs");
    Curl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).to_string(),
    }
}

fn get(lab: &Lab, from: &str, url: &str) -> String {
    let out = lab.exec(from, &["labapp", "get", url]).unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test]
async fn an_outside_client_reaches_a_mesh_service_through_the_ingress_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, leaves) = certificates(&["shop.example.test", "bad.example.test"]);
    let ca_file = dir.path().join("example-ca.pem");
    std::fs::write(&ca_file, &ca_pem).unwrap();
    let ca_file = ca_file.display().to_string();
    let (shop_cert, shop_key) = &leaves[0];
    // bad.example.test's certificate with shop's key: they do not match.
    let (bad_cert, _) = &leaves[1];

    let mut g = Down(Lab::create_in(dir.path(), TEST_IDS, 2).unwrap());
    g.0.start_mesh().await.unwrap();
    let mut docs = String::new();
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: edge}\n---\n");
    // The app on node-2, the gateway on node-1 (pods go to nodes in turn).
    docs.push_str("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec:\n  replicas: 1\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      serviceAccountName: web\n      nodeName: node-2\n      containers: [{name: app, image: labapp, args: [http-echo, --port, \"8080\"]}]\n---\n");
    docs.push_str("apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\n");
    docs.push_str("apiVersion: v1\nkind: Pod\nmetadata: {name: direct, namespace: shop}\nspec:\n  serviceAccountName: direct\n  nodeName: node-1\n  containers: [{name: app, image: labapp}]\n---\n");
    docs.push_str(&tls_secret("edge", "shop-cert", shop_cert, shop_key));
    docs.push_str(&tls_secret("edge", "bad-cert", bad_cert, shop_key));
    docs.push_str(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: public, namespace: edge}\nspec:\n  gatewayClassName: mesh-ingress\n  listeners:\n  - {name: https-shop, port: 8443, protocol: HTTPS, hostname: shop.example.test, tls: {mode: Terminate, certificateRefs: [{name: shop-cert}]}, allowedRoutes: {namespaces: {from: All}}}\n  - {name: https-bad, port: 8443, protocol: HTTPS, hostname: bad.example.test, tls: {certificateRefs: [{name: bad-cert}]}, allowedRoutes: {namespaces: {from: All}}}\n  - {name: https-missing, port: 8443, protocol: HTTPS, hostname: missing.example.test, tls: {certificateRefs: [{name: no-such-secret}]}, allowedRoutes: {namespaces: {from: All}}}\n  - {name: http, port: 8080, protocol: HTTP, hostname: shop.example.test, allowedRoutes: {namespaces: {from: All}}}\n---\n",
    );
    docs.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: shop, namespace: shop}\nspec:\n  parentRefs: [{name: public, namespace: edge}]\n  hostnames: [shop.example.test, bad.example.test, missing.example.test]\n  rules: [{backendRefs: [{name: web, port: 80}]}]\n---\n");
    // Only the gateway may call the app.
    docs.push_str(&format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: only-ingress, namespace: shop}}\nspec:\n  selector: {{matchLabels: {{app: web}}}}\n  action: ALLOW\n  rules: [{{from: [{{source: {{principals: [\"{}\"]}}}}]}}]\n---\n",
        GATEWAY_ID.trim_start_matches("spiffe://")
    ));
    g.0.apply(e2e::lab::parse_docs(&docs).unwrap())
        .await
        .unwrap();
    let lab = &g.0;

    let https = lab
        .published("edge", "public", 8443)
        .expect("8443 published");
    let http = lab
        .published("edge", "public", 8080)
        .expect("8080 published");
    let https_port = https.rsplit_once(':').unwrap().1.to_string();
    let resolve = |host: &str| format!("{host}:{https_port}:127.0.0.1");
    let shop_url = format!("https://shop.example.test:{https_port}/hello");

    // HTTPS with the gateway's certificate verified against the CA.
    let mut last = None;
    eventually(
        "the gateway serves shop.example.test",
        Duration::from_secs(30),
        || {
            let r = curl(&[
                "--cacert",
                &ca_file,
                "--resolve",
                &resolve("shop.example.test"),
                &shop_url,
            ]);
            let ok = r.code == Some(0) && r.stdout.contains("pod=web-0");
            last = Some((r.code, r.stdout, r.stderr));
            async move { ok }
        },
    )
    .await;
    let (_, body, _) = last.unwrap();
    assert!(body.contains("GET /hello"), "{body}");

    // HTTP/2 over TLS (ALPN h2) too.
    let r = curl(&[
        "--http2",
        "-w",
        "\nproto=%{http_version}",
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve("shop.example.test"),
        &shop_url,
    ]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stdout.contains("proto=2"), "{}", r.stdout);

    // The destination ztunnel saw the gateway's identity.
    let node2 = lab
        .state
        .nodes
        .iter()
        .find(|n| n.name == "node-2")
        .unwrap()
        .ip
        .clone();
    let metrics = get(lab, "shop/direct", &format!("http://{node2}:15020/metrics"));
    let want = format!("source_principal=\"{GATEWAY_ID}\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total")
                && l.contains(&want)
                && l.contains("reporter=\"destination\"")),
        "{metrics}"
    );

    // A direct caller in the mesh is refused by the policy.
    let out = lab
        .exec(
            "shop/direct",
            &["labapp", "get", "http://web.shop.svc.cluster.local/"],
        )
        .unwrap();
    let direct = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        !direct.contains("pod=web-0"),
        "direct caller got through: {direct}"
    );
    // ... by the policy: the destination ztunnel closed it with DENY.
    eventually(
        "the direct caller's connection denied",
        Duration::from_secs(10),
        || {
            let m = get(lab, "shop/direct", &format!("http://{node2}:15020/metrics"));
            let denied = m.lines().any(|l| {
                l.starts_with("istio_tcp_connections_closed_total")
                    && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/direct\"")
                    && l.contains("response_flags=\"DENY\"")
            });
            async move { denied }
        },
    )
    .await;

    // A name no listener has: the handshake ends with an alert.
    let r = curl(&[
        "--cacert",
        &ca_file,
        "--resolve",
        &resolve("other.example.test"),
        &format!("https://other.example.test:{https_port}/"),
    ]);
    assert_eq!(r.code, Some(35), "{} {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("alert"), "{}", r.stderr);
    // So do the listeners whose Secrets are broken or missing: left out.
    for host in ["bad.example.test", "missing.example.test"] {
        let r = curl(&[
            "-k",
            "--resolve",
            &resolve(host),
            &format!("https://{host}:{https_port}/"),
        ]);
        assert_eq!(r.code, Some(35), "{host}: {} {}", r.stdout, r.stderr);
    }
    // ... and named in the controller's report of the Gateway.
    let model = lab.controller_debug("/debug/model").unwrap();
    let json = model.split_once('\n').map(|(_, j)| j).unwrap_or("");
    let model: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {model}"));
    let issues: Vec<String> = model["issues"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["object"] == "Gateway/edge/public")
        .map(|i| i["reason"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        issues
            .iter()
            .any(|r| r.contains("https-bad") && r.contains("bad-cert")),
        "{issues:?}"
    );
    assert!(
        issues
            .iter()
            .any(|r| r.contains("https-missing") && r.contains("no-such-secret")),
        "{issues:?}"
    );

    // The HTTP listener: by Host; a host it does not serve gets 404.
    let r = curl(&[
        "-H",
        "Host: shop.example.test",
        &format!("http://{http}/plain"),
    ]);
    assert!(
        r.stdout.contains("pod=web-0") && r.stdout.contains("GET /plain"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    // Paths are normalized as at a waypoint (the mesh's default, BASE):
    // the app gets the path the routes saw; a NUL is refused.
    let r = curl(&[
        "--path-as-is",
        "-H",
        "Host: shop.example.test",
        &format!("http://{http}/%70lain/./x/%2E%2e/y?q=/../z"),
    ]);
    assert!(
        r.stdout.contains("GET /plain/y?q=/../z\n"),
        "{} {}",
        r.stdout,
        r.stderr
    );
    let r = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: shop.example.test",
        &format!("http://{http}/a%00b"),
    ]);
    assert_eq!(r.stdout, "400", "{}", r.stderr);
    let r = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "Host: other.example.test",
        &format!("http://{http}/"),
    ]);
    assert_eq!(r.stdout, "404", "{}", r.stderr);
}
