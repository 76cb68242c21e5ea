//! The controller bench's objects, loaded into a real API server: the CRDs
//! of manifests/ (the mesh's and the Gateway API's), the same 20 ambient
//! namespaces, S services, P AuthorizationPolicies and N pods as the folder
//! (each pod created, then made Running with an IP through the status
//! subresource, as a kubelet reports it), the pods' service accounts (the
//! API server refuses a pod whose account does not exist), and a ztunnel
//! pod per proxy with a projected token bound to it (audience `istio-ca`),
//! which the proxies present. One client, at most `--kube-concurrency`
//! requests in flight at once.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::{Args, Error};

const NAMESPACES: usize = 20;
/// The mesh's namespace: the ztunnels' pods and account, the CA Secret.
pub(crate) const MESH_NS: &str = "istio-system";

/// What was loaded.
pub(crate) struct Loaded {
    /// A token per proxy, bound to its node's ztunnel pod.
    pub(crate) tokens: Vec<String>,
    /// Resources each proxy is sent: the pods, every Service (the API
    /// server's own `kubernetes` one too) and the policies.
    pub(crate) expected: usize,
    pub(crate) took: Duration,
}

/// Loads everything; pods and services as fast as the API server takes
/// them.
pub(crate) async fn load(client: &Client, a: &Args) -> Result<Loaded, Error> {
    let t0 = Instant::now();
    let n = a.kube_concurrency.max(1);
    crds(client).await?;
    let pp = PostParams::default();
    let mut names: Vec<String> = (0..NAMESPACES).map(|i| format!("ns-{i}")).collect();
    names.push(MESH_NS.into());
    let nss: Api<Namespace> = Api::all(client.clone());
    for name in &names {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.clone());
        if name != MESH_NS {
            ns.metadata.labels = Some(std::collections::BTreeMap::from([(
                "istio.io/dataplane-mode".to_string(),
                "ambient".to_string(),
            )]));
        }
        nss.create(&pp, &ns).await?;
    }
    eprintln!("loading: {} service accounts", a.services + 1);
    each(n, (0..=a.services).collect(), |i| async move {
        let (ns, name) = match i {
            0 => (MESH_NS.to_string(), "ztunnel".to_string()),
            i => (
                format!("ns-{}", (i - 1) % NAMESPACES),
                format!("sa-{}", i - 1),
            ),
        };
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some(name);
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &sa)
            .await?;
        Ok(())
    })
    .await?;
    eprintln!(
        "loading: {} services ({:.1} s)",
        a.services,
        t0.elapsed().as_secs_f64()
    );
    each(n, (0..a.services).collect(), |i| service(client, i)).await?;
    eprintln!("loading: {} policies", a.policies);
    each(n, (0..a.policies).collect(), |p| policy(client, p)).await?;
    eprintln!(
        "loading: {} pods ({:.1} s)",
        a.pods,
        t0.elapsed().as_secs_f64()
    );
    let services = a.services.max(1);
    each(n, (0..a.pods).collect(), |i| pod(client, i, services)).await?;
    eprintln!(
        "loading: {} ztunnel pods and their tokens ({:.1} s)",
        a.proxies,
        t0.elapsed().as_secs_f64()
    );
    let tokens = stream::iter((0..a.proxies).map(|i| ztunnel(client, i)))
        .buffered(n)
        .try_collect::<Vec<String>>()
        .await?;
    let all = Api::<Service>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await?;
    Ok(Loaded {
        tokens,
        expected: a.pods + all.items.len() + a.policies,
        took: t0.elapsed(),
    })
}

/// Runs `f` on every item, at most `n` at once; the first error.
async fn each<F, Fut>(n: usize, items: Vec<usize>, f: F) -> Result<(), Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    stream::iter(items.into_iter().map(f))
        .buffer_unordered(n)
        .try_collect::<()>()
        .await
}

/// The CRDs of manifests/crds and manifests/gateway-api, created and
/// Established.
async fn crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = Vec::new();
    for dir in ["manifests/crds", "manifests/gateway-api"] {
        let mut files: Vec<_> = std::fs::read_dir(Path::new(dir))
            .map_err(|e| format!("{dir} (run the bench from the repository root): {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .filter(|p| p.file_name().is_some_and(|f| f != "kustomization.yaml"))
            .collect();
        files.sort();
        for f in files {
            let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&f)?)
                .map_err(|e| format!("{}: {e}", f.display()))?;
            api.create(&PostParams::default(), &crd).await?;
            names.push(crd.metadata.name.unwrap_or_default());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for name in names {
        loop {
            let crd = api.get(&name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("CRD {name} not Established within 60 s").into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// svc-i in ns-(i mod 20), selecting app-i; its ClusterIP allocated by
/// the API server.
async fn service(client: &Client, i: usize) -> Result<(), Error> {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}")},
        "spec": {"selector": {"app": format!("app-{i}")}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))?;
    Api::<Service>::namespaced(client.clone(), &format!("ns-{}", i % NAMESPACES))
        .create(&PostParams::default(), &svc)
        .await?;
    Ok(())
}

/// pol-p, as the folder's: app-p allows callers from the next namespace.
async fn policy(client: &Client, p: usize) -> Result<(), Error> {
    let ar = ApiResource {
        group: "security.istio.io".into(),
        version: "v1".into(),
        api_version: "security.istio.io/v1".into(),
        kind: "AuthorizationPolicy".into(),
        plural: "authorizationpolicies".into(),
    };
    let ns = format!("ns-{}", p % NAMESPACES);
    let obj: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": format!("pol-{p}"), "namespace": ns},
        "spec": {
            "selector": {"matchLabels": {"app": format!("app-{p}")}},
            "rules": [{"from": [{"source": {"namespaces": [format!("ns-{}", (p + 1) % NAMESPACES)]}}]}],
        },
    }))?;
    Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &ar)
        .create(&PostParams::default(), &obj)
        .await?;
    Ok(())
}

/// pod-i's address in generation `generation` (the folder's).
pub(crate) fn pod_ip(i: usize, generation: usize) -> String {
    format!("10.{}.{}.{}", 10 + generation, i / 250, i % 250 + 1)
}

/// pod-i's namespace.
pub(crate) fn pod_ns(i: usize, services: usize) -> String {
    format!("ns-{}", (i % services.max(1)) % NAMESPACES)
}

/// pod-i: created on node-(i mod 100) as sa-k with label app-k (k = i
/// mod S), then Running and Ready at its address.
async fn pod(client: &Client, i: usize, services: usize) -> Result<(), Error> {
    let svc = i % services;
    let ns = pod_ns(i, services);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{i}"), "labels": {"app": format!("app-{svc}")}},
        "spec": {
            "nodeName": format!("node-{}", i % 100),
            "serviceAccountName": format!("sa-{svc}"),
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "x"}],
        },
    }))?;
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &p).await?;
    set_ip(&api, i, 0).await
}

/// Reports pod-i Running and Ready at its address of `generation`, as its
/// kubelet would: through the status subresource.
pub(crate) async fn set_ip(api: &Api<Pod>, i: usize, generation: usize) -> Result<(), Error> {
    let ip = pod_ip(i, generation);
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    api.patch_status(
        &format!("pod-{i}"),
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await?;
    Ok(())
}

/// node-i's ztunnel pod (no address: it is not sent to the proxies) and a
/// token bound to it, for an hour.
async fn ztunnel(client: &Client, i: usize) -> Result<String, Error> {
    let name = format!("ztunnel-{i}");
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "ztunnel"}},
        "spec": {
            "nodeName": format!("node-{i}"),
            "serviceAccountName": "ztunnel",
            "automountServiceAccountToken": false,
            "containers": [{"name": "c", "image": "x"}],
        },
    }))?;
    let created = Api::<Pod>::namespaced(client.clone(), MESH_NS)
        .create(&PostParams::default(), &p)
        .await?;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec!["istio-ca".into()]),
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name),
                uid: created.metadata.uid,
            }),
        }),
        ..Default::default()
    };
    let answer = Api::<ServiceAccount>::namespaced(client.clone(), MESH_NS)
        .create_token_request("ztunnel", &PostParams::default(), &req)
        .await?;
    answer
        .status
        .and_then(|s| s.token)
        .ok_or_else(|| "a TokenRequest without a token".into())
}
