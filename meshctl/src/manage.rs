//! Steering: enrolling namespaces and declaring waypoints. These write the
//! same Kubernetes objects a user would (`Namespace` labels, a `Gateway` of
//! class `istio-waypoint`); in a lab they are applied through the lab, which
//! plays the API server, kubelet and CNI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use mesh_core::lab_file::LabState;
use serde_json::{Value, json};

use crate::output::Table;
use crate::source::{Mesh, SourceError};

pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";

/// A namespace's labels as the lab knows them.
fn lab_namespace_labels(lab: &Path, ns: &str) -> Result<BTreeMap<String, String>, SourceError> {
    let state = LabState::read(lab).map_err(|e| SourceError::Lab {
        dir: lab.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(state.namespaces.get(ns).cloned().unwrap_or_default())
}

/// The `lab` binary next to this one (both are built into the same target
/// directory).
fn lab_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("lab")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("lab"))
}

/// Applies objects through the lab (`lab --dir DIR apply FILE`).
fn lab_apply(lab: &Path, docs: &[Value]) -> Result<(), SourceError> {
    let yaml: Vec<String> = docs
        .iter()
        .map(|d| serde_yaml::to_string(d).unwrap_or_default())
        .collect();
    let file = lab.join(format!("meshctl-apply-{}.yaml", std::process::id()));
    std::fs::write(&file, yaml.join("---\n"))
        .map_err(|e| SourceError::Other(format!("{}: {e}", file.display())))?;
    let out = std::process::Command::new(lab_binary())
        .arg("--dir")
        .arg(lab)
        .arg("apply")
        .arg(&file)
        .output();
    let _ = std::fs::remove_file(&file);
    let out = out.map_err(|e| SourceError::Other(format!("running lab: {e}")))?;
    if !out.status.success() {
        return Err(SourceError::Other(format!(
            "lab apply failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

fn namespace_doc(ns: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
}

/// Where changes go: a lab (through `lab apply`) or a cluster's API server.
enum Target<'a> {
    Lab(PathBuf),
    Kube(&'a kube::Client),
}

fn target<'a>(mesh: &'a Mesh, what: &str) -> Result<Target<'a>, SourceError> {
    if let Some(c) = &mesh.kube {
        return Ok(Target::Kube(c));
    }
    mesh.lab.clone().map(Target::Lab).ok_or_else(|| {
        SourceError::Other(format!(
            "{what} changes the cluster's objects: use --lab DIR or --kube (a single ztunnel's --addr cannot)"
        ))
    })
}

fn kube_err(what: &str) -> impl Fn(kube::Error) -> SourceError + '_ {
    move |e| SourceError::Other(format!("{what} through the API server: {e}"))
}

/// Merges `labels` (a null value removes one) into a namespace.
async fn kube_label(client: &kube::Client, ns: &str, labels: Value) -> Result<(), SourceError> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, Patch, PatchParams};
    let api: Api<Namespace> = Api::all(client.clone());
    api.patch(
        ns,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": labels}})),
    )
    .await
    .map_err(kube_err(&format!("labelling namespace {ns}")))?;
    Ok(())
}

fn gateways(client: &kube::Client, ns: &str) -> kube::Api<kube::api::DynamicObject> {
    use kube::api::{ApiResource, GroupVersionKind};
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
        "gateways",
    );
    kube::Api::namespaced_with(client.clone(), ns, &ar)
}

/// `meshctl enroll NS` / `unenroll NS`: the namespace's dataplane-mode label.
pub async fn enroll(mesh: &Mesh, ns: &str, on: bool) -> Result<String, SourceError> {
    match target(mesh, if on { "enroll" } else { "unenroll" })? {
        Target::Kube(c) => {
            let v = if on { json!("ambient") } else { Value::Null };
            // Each node's agent captures or releases the running pods.
            kube_label(c, ns, json!({ DATAPLANE_MODE: v })).await?;
        }
        Target::Lab(lab) => {
            let mut labels = lab_namespace_labels(&lab, ns)?;
            if on {
                labels.insert(DATAPLANE_MODE.into(), "ambient".into());
            } else {
                labels.remove(DATAPLANE_MODE);
            }
            lab_apply(&lab, &[namespace_doc(ns, &labels)])?;
        }
    }
    Ok(format!(
        "namespace {ns} {}\n",
        if on {
            "enrolled: its pods are captured and tunnelled (HBONE)"
        } else {
            "unenrolled: its pods are released from capture"
        }
    ))
}

/// `meshctl waypoint apply`: a Gateway of class istio-waypoint, and
/// optionally the namespace label that sends its traffic through it.
pub async fn waypoint_apply(
    mesh: &Mesh,
    ns: &str,
    name: &str,
    serves: &str,
    enroll_namespace: bool,
) -> Result<String, SourceError> {
    let gateway = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": {WAYPOINT_FOR: serves}},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    });
    match target(mesh, "waypoint apply")? {
        Target::Kube(c) => {
            use kube::api::{Patch, PatchParams};
            gateways(c, ns)
                .patch(
                    name,
                    &PatchParams::apply("meshctl"),
                    &Patch::Apply(&gateway),
                )
                .await
                .map_err(kube_err(&format!("applying Gateway {ns}/{name}")))?;
            if enroll_namespace {
                kube_label(c, ns, json!({ USE_WAYPOINT: name })).await?;
            }
        }
        Target::Lab(lab) => {
            let mut docs = vec![gateway];
            if enroll_namespace {
                let mut labels = lab_namespace_labels(&lab, ns)?;
                labels.insert(USE_WAYPOINT.into(), name.into());
                docs.insert(0, namespace_doc(ns, &labels));
            }
            lab_apply(&lab, &docs)?;
        }
    }
    Ok(format!(
        "waypoint {ns}/{name} applied (for {serves}){}\n",
        if enroll_namespace {
            format!("; namespace {ns} now uses it ({USE_WAYPOINT}={name})")
        } else {
            format!(
                "; send traffic through it with {USE_WAYPOINT}={name} on the namespace or a service"
            )
        }
    ))
}

/// `meshctl waypoint delete`: the Gateway goes, and the namespace label
/// pointing at it.
pub async fn waypoint_delete(mesh: &Mesh, ns: &str, name: &str) -> Result<String, SourceError> {
    match target(mesh, "waypoint delete")? {
        Target::Kube(c) => {
            use k8s_openapi::api::core::v1::Namespace;
            gateways(c, ns)
                .delete(name, &Default::default())
                .await
                .map_err(kube_err(&format!("deleting Gateway {ns}/{name}")))?;
            let nsobj = kube::Api::<Namespace>::all(c.clone())
                .get(ns)
                .await
                .map_err(kube_err(&format!("reading namespace {ns}")))?;
            let uses = nsobj
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(USE_WAYPOINT))
                .is_some_and(|v| v == name);
            if uses {
                kube_label(c, ns, json!({ USE_WAYPOINT: Value::Null })).await?;
            }
        }
        Target::Lab(lab) => {
            let file = lab.join("config").join(format!("gateway-{ns}-{name}.yaml"));
            std::fs::remove_file(&file).map_err(|e| {
                SourceError::Other(format!(
                    "no waypoint {ns}/{name} in the lab ({}: {e})",
                    file.display()
                ))
            })?;
            let mut labels = lab_namespace_labels(&lab, ns)?;
            if labels.get(USE_WAYPOINT).is_some_and(|v| v == name) {
                labels.remove(USE_WAYPOINT);
                lab_apply(&lab, &[namespace_doc(ns, &labels)])?;
            }
        }
    }
    Ok(format!(
        "waypoint {ns}/{name} deleted; its services' traffic goes straight to their endpoints again\n"
    ))
}

/// `meshctl waypoint list`: each waypoint, the services it serves, their
/// routes and L7 policies (from the controller), and its replicas' readiness.
pub async fn waypoint_list(mesh: &Mesh, ns: Option<&str>) -> Result<Vec<Table>, SourceError> {
    let model = mesh.controller()?.get_json("/debug/model").await?;
    let mut t = Table::new(
        "waypoints",
        &["WAYPOINT", "SERVICE", "PORTS", "ROUTES", "POLICIES"],
    );
    let mut rows: Vec<(Vec<String>, serde_json::Value)> = Vec::new();
    for r in model["waypointRoutes"].as_array().into_iter().flatten() {
        let wp = r["waypoint"].as_str().unwrap_or("-").to_string();
        if ns.is_some_and(|n| !wp.starts_with(&format!("{n}/"))) {
            continue;
        }
        let list = |k: &str| {
            let v: Vec<&str> = r[k]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x.as_str())
                .collect();
            if v.is_empty() {
                "-".to_string()
            } else {
                v.join(",")
            }
        };
        let item = serde_json::json!({
            "waypoint": r["waypoint"],
            "service": r["service"],
            "ports": r["ports"],
            "routes": r["routes"],
            "policies": r["policies"],
        });
        rows.push((
            vec![
                wp,
                r["service"].as_str().unwrap_or("-").to_string(),
                list("ports"),
                list("routes"),
                list("policies"),
            ],
            item,
        ));
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    for (row, item) in rows {
        t.push_item(row, item);
    }
    let mut replicas = Table::new("replicas", &["REPLICA", "READY"]);
    for w in &mesh.waypoints {
        if ns.is_some_and(|n| !w.name.starts_with(&format!("{n}/"))) {
            continue;
        }
        let ready = match &w.readiness {
            Some(r) => match r.get_any("/healthz/ready").await {
                Ok((200, _)) => "ready".to_string(),
                Ok((_, b)) => b.trim().to_string(),
                Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
            },
            None => "-".into(),
        };
        replicas.push_item(
            vec![w.name.clone(), ready.clone()],
            serde_json::json!({"replica": w.name, "ready": ready == "ready", "detail": ready}),
        );
    }
    if mesh.waypoints.is_empty() {
        return Ok(vec![t]);
    }
    Ok(vec![t, replicas])
}
