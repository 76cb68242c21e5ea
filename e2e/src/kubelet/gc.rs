//! The garbage collector and the namespace controller, for what a lab
//! creates and deletes: an object whose owners are all gone is deleted
//! (the kinds below), and a namespace being deleted is emptied of every
//! namespaced kind the API server serves, then finalized.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::discovery::{Discovery, Scope, verbs};
use kube::{Api, Client, ResourceExt};

use super::error::{KubeletError, Result};

/// The kinds whose dependents the lab's clusters have: what controllers
/// and istiod-lite create with owner references.
const DEPENDENTS: &[(&str, &str, &str)] = &[
    ("", "v1", "Pod"),
    ("apps", "v1", "ReplicaSet"),
    ("apps", "v1", "Deployment"),
    ("apps", "v1", "DaemonSet"),
    ("", "v1", "Service"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "ServiceAccount"),
    ("", "v1", "Secret"),
    ("discovery.k8s.io", "v1", "EndpointSlice"),
];

pub async fn sync(client: &Client) -> Result<()> {
    collect(client).await?;
    finalize_namespaces(client).await
}

fn gvk_of(api_version: &str, kind: &str) -> GroupVersionKind {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// Does the owner (kind, namespace, name) still exist with this uid?
async fn owner_exists(
    client: &Client,
    ns: &str,
    r: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<bool> {
    let ar = ApiResource::from_gvk(&gvk_of(&r.api_version, &r.kind));
    // Owners of the kinds here are namespaced; a cluster-scoped owner is
    // looked for cluster-wide.
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    match api.get_opt(&r.name).await {
        Ok(Some(o)) => Ok(o.uid().as_deref() == Some(r.uid.as_str())),
        Ok(None) => Ok(false),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let all: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
            match all.get_opt(&r.name).await {
                Ok(Some(o)) => Ok(o.uid().as_deref() == Some(r.uid.as_str())),
                Ok(None) | Err(kube::Error::Api(_)) => Ok(false),
                Err(e) => Err(KubeletError::api(format!("reading owner {}", r.name), e)),
            }
        }
        Err(e) => Err(KubeletError::api(
            format!("reading owner {} {}", r.kind, r.name),
            e,
        )),
    }
}

async fn collect(client: &Client) -> Result<()> {
    let mut all: Vec<(ApiResource, DynamicObject)> = Vec::new();
    for (group, version, kind) in DEPENDENTS {
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let list = api
            .list(&ListParams::default())
            .await
            .map_err(|e| KubeletError::api(format!("listing {kind}s"), e))?;
        all.extend(list.items.into_iter().map(|o| (ar.clone(), o)));
    }
    foreground(client, &all).await?;
    let mut known: BTreeMap<String, bool> = BTreeMap::new();
    for (ar, o) in &all {
        let refs = o.metadata.owner_references.clone().unwrap_or_default();
        if refs.is_empty() || o.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ns = o.namespace().unwrap_or_default();
        let mut any = false;
        for r in &refs {
            let key = format!("{}/{}/{ns}/{}/{}", r.api_version, r.kind, r.name, r.uid);
            let exists = match known.get(&key) {
                Some(e) => *e,
                None => {
                    let e = owner_exists(client, &ns, r).await?;
                    known.insert(key, e);
                    e
                }
            };
            any |= exists;
        }
        if !any {
            tracing::info!(
                "garbage: {} {ns}/{} (its owners are gone)",
                ar.kind,
                o.name_any()
            );
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, ar);
            match api.delete(&o.name_any(), &DeleteParams::background()).await {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => return Err(KubeletError::api("deleting garbage", e)),
            }
        }
    }
    Ok(())
}

/// Owners deleted with `--cascade=foreground`: their dependents are
/// deleted, and once none is left the `foregroundDeletion` finalizer goes
/// (and with it the owner).
async fn foreground(client: &Client, all: &[(ApiResource, DynamicObject)]) -> Result<()> {
    const FOREGROUND: &str = "foregroundDeletion";
    for (ar, owner) in all {
        let finalizers = owner.metadata.finalizers.clone().unwrap_or_default();
        if owner.metadata.deletion_timestamp.is_none()
            || !finalizers.iter().any(|f| f == FOREGROUND)
        {
            continue;
        }
        let uid = owner.uid().unwrap_or_default();
        let ns = owner.namespace().unwrap_or_default();
        let mut left = 0;
        for (dar, d) in all {
            let owned = d
                .metadata
                .owner_references
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|r| r.uid == uid);
            if !owned {
                continue;
            }
            left += 1;
            if d.metadata.deletion_timestamp.is_none() {
                let dns = d.namespace().unwrap_or_default();
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &dns, dar);
                let _ = api.delete(&d.name_any(), &DeleteParams::background()).await;
            }
        }
        if left == 0 {
            let keep: Vec<String> = finalizers.into_iter().filter(|f| f != FOREGROUND).collect();
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, ar);
            let patch = serde_json::json!({"metadata": {"finalizers": keep}});
            match api
                .patch(
                    &owner.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) | Err(kube::Error::Api(_)) => {}
                Err(e) => {
                    return Err(KubeletError::api(
                        "removing the foregroundDeletion finalizer",
                        e,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Namespaces being deleted: delete what is in them; once nothing is
/// left, remove the `kubernetes` finalizer.
async fn finalize_namespaces(client: &Client) -> Result<()> {
    let nss = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| KubeletError::api("listing namespaces", e))?;
    let going: Vec<Namespace> = nss
        .items
        .into_iter()
        .filter(|n| n.metadata.deletion_timestamp.is_some())
        .collect();
    if going.is_empty() {
        return Ok(());
    }
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .map_err(|e| KubeletError::api("API discovery", e))?;
    for ns in going {
        let name = ns.name_any();
        let mut left = 0;
        for group in discovery.groups() {
            for (ar, caps) in group.recommended_resources() {
                if caps.scope != Scope::Namespaced
                    || !caps.supports_operation(verbs::LIST)
                    || !caps.supports_operation(verbs::DELETE)
                {
                    continue;
                }
                let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &name, &ar);
                let Ok(list) = api.list(&ListParams::default()).await else {
                    continue;
                };
                for o in list.items {
                    left += 1;
                    if o.metadata.deletion_timestamp.is_none() {
                        let _ = api.delete(&o.name_any(), &DeleteParams::background()).await;
                    }
                }
            }
        }
        if left > 0 {
            continue;
        }
        let mut done = ns.clone();
        if let Some(spec) = done.spec.as_mut() {
            spec.finalizers = Some(Vec::new());
        }
        match Api::<Namespace>::all(client.clone())
            .replace_subresource("finalize", &name, &PostParams::default(), &done)
            .await
        {
            Ok(_) | Err(kube::Error::Api(_)) => {
                tracing::info!("namespace {name}: empty, finalized")
            }
            Err(e) => return Err(KubeletError::api(format!("finalizing namespace {name}"), e)),
        }
    }
    Ok(())
}
