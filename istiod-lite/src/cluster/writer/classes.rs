//! The GatewayClasses the mesh implements, `istio-waypoint` and
//! `mesh-ingress`: the leader creates them where the cluster serves
//! GatewayClass (upstream's Gateway API CRDs or ours), and marks each
//! `Accepted`. A class of that name that another controller owns is left
//! alone and reported.

use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

use super::{Report, WriteError, Writer, managed_labels};
use crate::cluster::FIELD_MANAGER;
use crate::cluster::conditions::{condition, same_conditions, with_times};
use crate::model::cluster::ClusterView;
use crate::model::{INGRESS_CLASS, WAYPOINT_CLASS};

pub use crate::model::CONTROLLER_NAME;

/// Each class and what it is.
const CLASSES: [(&str, &str); 2] = [
    (
        WAYPOINT_CLASS,
        "Waypoints: L7 policy and routing for a namespace's services, deployed by istiod-lite.",
    ),
    (
        INGRESS_CLASS,
        "Ingress gateways: a LoadBalancer Service into the mesh, deployed by istiod-lite.",
    ),
];

impl Writer {
    pub(super) async fn gateway_classes(&mut self, view: &ClusterView, report: &mut Report) {
        if !view.gateway_class_served {
            return;
        }
        for (name, description) in CLASSES {
            let current = view
                .gateway_classes
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(name));
            if let Some(c) = current
                && c.spec.controller_name != CONTROLLER_NAME
            {
                // Once per resync: the log is not flooded.
                let key = format!("GatewayClass/{name}/not-ours");
                if self.applied.insert(key, 0).is_none() {
                    report.errors.push(format!(
                        "GatewayClass {name} belongs to controller {:?}, not {CONTROLLER_NAME:?}: istiod-lite leaves it alone (delete it to let istiod-lite create its own)",
                        c.spec.controller_name
                    ));
                }
                continue;
            }
            let api: Api<GatewayClass> = Api::all(self.client.clone());
            let obj = json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "GatewayClass",
                "metadata": {"name": name, "labels": managed_labels(None)},
                "spec": {"controllerName": CONTROLLER_NAME, "description": description},
            });
            let key = format!("GatewayClass/{name}");
            if let Err(e) = self.apply(&api, key, name, obj, report).await {
                report.errors.push(e.to_string());
                continue;
            }
            // Its status once the watch shows it.
            if let Some(c) = current
                && let Err(e) = class_status(&api, c, report).await
            {
                report.errors.push(e.to_string());
            }
        }
    }
}

/// Marks one of our classes Accepted, unless it already says so.
async fn class_status(
    api: &Api<GatewayClass>,
    c: &GatewayClass,
    report: &mut Report,
) -> Result<(), WriteError> {
    let name = c.name_any();
    let want = vec![condition(
        "Accepted",
        "True",
        "Accepted",
        "implemented by istiod-lite",
        c.metadata.generation,
    )];
    let current = serde_json::to_value(&c.status).unwrap_or(Value::Null);
    let held = current["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if same_conditions(&held, &want) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": name},
        "status": {"conditions": with_times(&held, want)},
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(WriteError::status(format!("GatewayClass {name}")))?;
    report.statuses += 1;
    Ok(())
}
