//! A waypoint serves only destinations that name it. A mesh identity does
//! not let its holder send traffic for service B through service A's
//! waypoint (past B's policies, arriving at B as A's waypoint); and the
//! policies attached to a waypoint's Gateway hold for traffic addressed to
//! a pod's IP as they do for a service's name.

use std::time::Duration;

use e2e::ca::{CertFiles, TRUST_DOMAIN, write_lab_cert};
use e2e::lab::Lab;
use e2e::mesh::eventually;
use mesh_core::identity::Identity;

use super::{echo, load, served, service, yaml};

/// A client that speaks HBONE by hand from a pod, with a certificate from
/// the lab's CA for an identity of its choosing.
pub struct Intruder {
    pod: String,
    certs: CertFiles,
}

impl Intruder {
    /// Runs as `from`, holding `namespace/service_account`'s identity.
    pub async fn new(lab: &Lab, from: &str, namespace: &str, service_account: &str) -> Intruder {
        let id = Identity::new(TRUST_DOMAIN, namespace, service_account).unwrap();
        let name = format!("intruder-{namespace}-{service_account}");
        let certs = write_lab_cert(&lab.dir, &id, &name).await.unwrap();
        Intruder {
            pod: from.to_string(),
            certs,
        }
    }

    /// `labapp hbone` to `waypoint`'s pod on 15008 with `:authority` set to
    /// `authority`: "CONNECT <status>", then the answer's first line.
    fn connect(&self, lab: &Lab, waypoint: &str, authority: &str, host: &str) -> String {
        let wp = lab.pod(waypoint).unwrap();
        let via = format!("{}:15008", wp.ip);
        let server = format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            wp.namespace, wp.service_account
        );
        let request = format!("GET / HTTP/1.1\\r\\nHost: {host}\\r\\n\\r\\n");
        let path = |p: &std::path::Path| p.display().to_string();
        let (chain, key, root) = (
            path(&self.certs.chain),
            path(&self.certs.key),
            path(&self.certs.root),
        );
        let out = lab
            .exec(
                &self.pod,
                &[
                    "labapp",
                    "hbone",
                    "--via",
                    &via,
                    "--authority",
                    authority,
                    "--cert",
                    &chain,
                    "--key",
                    &key,
                    "--root",
                    &root,
                    "--server-identity",
                    &server,
                    "--request",
                    &request,
                ],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "labapp hbone failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Through `waypoint` this client reaches `own` (a service of that
    /// waypoint, ip:port and Host): the tunnel works, so a refusal below
    /// is the waypoint's choice. Each of `foreign` (ip:port, and the pod
    /// behind it) is refused with 401, its pod sees nothing, and the
    /// waypoint logs why.
    pub fn reaches_only_its_own(
        &self,
        lab: &Lab,
        waypoint: &str,
        own: (&str, &str),
        foreign: &[(&str, &str)],
    ) {
        let answer = self.connect(lab, waypoint, own.0, own.1);
        assert_eq!(answer, "CONNECT 200\nHTTP/1.1 200 OK", "{}", own.0);
        for (target, pod) in foreign {
            let before = served(lab, &self.pod, pod);
            let answer = self.connect(lab, waypoint, target, "b");
            assert_eq!(answer, "CONNECT 401", "{target} through {waypoint}");
            assert_eq!(
                served(lab, &self.pod, pod),
                before,
                "nothing reaches {pod} through {waypoint}"
            );
            let log = waypoint_log(lab, waypoint);
            assert!(
                log.lines().any(|l| l.contains("HBONE target refused (401)")
                    && l.contains(&format!("target={target}"))),
                "{target}: {log}"
            );
        }
    }
}

fn waypoint_log(lab: &Lab, waypoint: &str) -> String {
    let file = format!("logs/pod-{}.log", waypoint.replace('/', "-"));
    std::fs::read_to_string(lab.dir.join(file)).unwrap()
}

/// An AuthorizationPolicy that targets the waypoint's Gateway (in `shop`,
/// a waypoint for services and workloads) DENYs a path and a header: both
/// are refused whether the client names the service or the pod's IP
/// (which its ztunnel sends to the waypoint); other requests pass both ways.
pub async fn gateway_policy_holds_for_pod_ips(lab: &mut Lab, client: &str) {
    let mut docs = echo("shop", "gatekept", 1, "", "");
    docs.push_str(&service("shop", "gatekept", "app: gatekept"));
    docs.push_str(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: gateway-deny-secret, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: DENY
  rules:
  - to: [{operation: {paths: [\"/gw-secret*\"]}}]
  - when: [{key: \"request.headers[x-gw-block]\", values: [\"yes\"]}]
",
    );
    lab.apply(yaml(&docs)).await.unwrap();
    let lab = &*lab;
    let pod_ip = lab.pod("shop/gatekept-0").unwrap().ip.clone();
    let by_pod = |path: &str| format!("http://{pod_ip}:8080{path}");
    let by_name = |path: &str| format!("http://gatekept.shop{path}");
    eventually(
        "the waypoint has the Gateway's policy and the new pod",
        Duration::from_secs(60),
        || async {
            load(lab, client, &by_name("/gw-secret"), 1, 1, &[])
                .status
                .contains_key(&403)
                && load(lab, client, &by_pod("/open"), 1, 1, &[]).ok() == 1
        },
    )
    .await;
    // The Gateway's resource comes with the same push; allow it a moment.
    eventually(
        "pod-addressed traffic gets the Gateway's policy",
        Duration::from_secs(10),
        || async {
            load(lab, client, &by_pod("/gw-secret"), 1, 1, &[])
                .status
                .contains_key(&403)
        },
    )
    .await;
    let before = served(lab, client, "shop/gatekept-0");
    for url in [by_pod("/gw-secret/x"), by_name("/gw-secret/x")] {
        let denied = load(lab, client, &url, 5, 1, &[]);
        assert_eq!(
            denied.status.get(&403).copied(),
            Some(5),
            "{url}: {denied:?}"
        );
        let header = load(
            lab,
            client,
            &url.replace("/gw-secret/x", "/open"),
            5,
            1,
            &["--header", "x-gw-block: yes"],
        );
        assert_eq!(
            header.status.get(&403).copied(),
            Some(5),
            "{url}: {header:?}"
        );
    }
    for url in [by_pod("/open"), by_name("/open")] {
        let open = load(lab, client, &url, 5, 1, &[]);
        assert_eq!(open.ok(), 5, "{url}: {open:?}");
    }
    assert_eq!(
        served(lab, client, "shop/gatekept-0") - before,
        10,
        "denied requests never reach the pod"
    );
}
