//! The sweep for orphans: what the writer made for Gateways that are gone.

use std::collections::BTreeSet;
use std::fmt::Debug;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::info;

use super::{Report, Writer};
use crate::cluster::MANAGED_BY;
use crate::model::GATEWAY_NAME_LABEL;

impl Writer {
    /// Deletes what we made for Gateways that are gone (Kubernetes' garbage
    /// collector does the same through the owner references; this covers
    /// a Gateway that only changed class, and clusters where it lags).
    pub(super) async fn remove_orphans(
        &mut self,
        wanted: &BTreeSet<(String, String)>,
        report: &mut Report,
    ) {
        let client = self.client.clone();
        self.sweep(
            Api::<Deployment>::all(client.clone()),
            "Deployment",
            wanted,
            report,
        )
        .await;
        self.sweep(
            Api::<Service>::all(client.clone()),
            "Service",
            wanted,
            report,
        )
        .await;
        self.sweep(
            Api::<ConfigMap>::all(client.clone()),
            "ConfigMap",
            wanted,
            report,
        )
        .await;
        self.sweep(
            Api::<ServiceAccount>::all(client),
            "ServiceAccount",
            wanted,
            report,
        )
        .await;
    }

    async fn sweep<K>(
        &mut self,
        all: Api<K>,
        kind: &str,
        wanted: &BTreeSet<(String, String)>,
        report: &mut Report,
    ) where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
    {
        let selector = format!("{}={},{GATEWAY_NAME_LABEL}", MANAGED_BY.0, MANAGED_BY.1);
        let list = match all.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l,
            Err(e) => {
                report.errors.push(format!("listing {kind}s: {e}"));
                return;
            }
        };
        for o in list.items {
            let ns = o.namespace().unwrap_or_default();
            let gw = o
                .labels()
                .get(GATEWAY_NAME_LABEL)
                .cloned()
                .unwrap_or_default();
            let owned_by_gateway = o.owner_references().iter().any(|r| {
                r.kind == "Gateway"
                    && r.api_version.starts_with("gateway.networking.k8s.io/")
                    && r.controller == Some(true)
            });
            if !owned_by_gateway || wanted.contains(&(ns.clone(), gw.clone())) {
                continue;
            }
            let name = o.name_any();
            let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {
                    info!(kind, namespace = %ns, name = %name, gateway = %gw, "removed: its Gateway is gone (or is no longer ours)");
                    self.applied.remove(&format!("{kind}/{ns}/{name}"));
                    report.deleted += 1;
                }
                Err(e) if crate::cluster::status_code(&e) == Some(404) => {}
                Err(e) => report
                    .errors
                    .push(format!("deleting {kind} {ns}/{name}: {e}")),
            }
        }
    }
}
