//! The leader's writes, reconciled from the model:
//!
//! - the root bundle in a ConfigMap `istio-ca-root-cert` (key `root-cert.pem`)
//!   in the root namespace and every enrolled namespace;
//! - for each waypoint Gateway, a ServiceAccount, a ConfigMap holding the
//!   waypoint's config, a Deployment and a Service, all owned by the Gateway
//!   (so Kubernetes removes them with it) and removed by us too when the
//!   Gateway is gone or changes class;
//! - for each ingress Gateway (class `mesh-ingress`), the same, running the
//!   waypoint binary in its ingress role, with a LoadBalancer Service on the
//!   listeners' ports;
//! - Gateway status (Accepted, Programmed, addresses; for ingresses, each
//!   listener's too);
//! - AuthorizationPolicy status (`ZtunnelAccepted` / `WaypointAccepted`,
//!   with the warnings the model found, e.g. L7 rules a ztunnel drops);
//! - HTTPRoute and GRPCRoute status: our entries of `status.parents`
//!   (`writer/routes.rs`).
//!
//! Writes are server-side apply with our field manager, so they are
//! idempotent and leave fields other managers own alone. What was applied is
//! remembered by content hash and not sent again until a periodic resync,
//! which also repairs drift (an object deleted by hand). Status is written
//! only when it differs from what the watch shows. An object of ours that
//! exists but was not made by us is never taken over: the Gateway's status
//! says so instead.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::conditions::{
    condition, listener_status, not_valid, same_conditions, same_listeners, with_times,
};
use super::{FIELD_MANAGER, MANAGED_BY, now_rfc3339};
use crate::config::crds::{AuthorizationPolicy, PolicyCondition};
use crate::model::cluster::{ClusterView, IngressView, PolicyView};
use crate::model::{DATAPLANE_MODE, GATEWAY_NAME_LABEL};
use crate::xds::Hub;

mod classes;
mod error;
mod orphans;
mod routes;

pub use error::WriteError;

pub const ROOT_CONFIGMAP: &str = "istio-ca-root-cert";
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
/// Where the waypoint's pod finds what it needs (matching the ztunnel's).
const TOKEN_DIR: &str = "/var/run/secrets/tokens";
const ROOT_DIR: &str = "/var/run/secrets/istio";
const CONFIG_DIR: &str = "/etc/waypoint";

#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub waypoint_image: String,
    /// The CA and xDS address waypoints are given, and the name its
    /// certificate is checked against.
    pub ca_address: String,
    pub ca_server_name: String,
    pub trust_domain: String,
    pub token_audience: String,
    /// The mesh's `pathNormalization`, written into every waypoint config.
    pub path_normalization: String,
    /// `LOG_FORMAT` for the waypoints and ingresses (the controller's own,
    /// when set): `json` or `plain`.
    pub proxy_log_format: Option<String>,
    /// Forget what was applied and apply everything again this often.
    pub resync: Duration,
    /// At most one reconcile per this interval (a burst of changes costs one).
    pub min_interval: Duration,
}

/// What one reconcile did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub applied: usize,
    pub deleted: usize,
    pub statuses: usize,
    pub errors: Vec<String>,
}

pub struct Writer {
    client: Client,
    cfg: WriterConfig,
    root_pem: String,
    /// Object key -> hash of what we last applied to it.
    applied: HashMap<String, u64>,
    /// The waypoint Gateways of the last clean sweep for orphans: the sweep
    /// lists four kinds cluster-wide, so it runs only when this set changes
    /// (and on every resync).
    swept: Option<BTreeSet<(String, String)>>,
}

fn hash_of(v: &Value) -> u64 {
    let mut h = DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

/// What a Gateway's pods do: the same binary, told its role by its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Waypoint,
    Ingress,
}

fn managed_labels(gateway: Option<&str>) -> Value {
    let mut l = json!({ MANAGED_BY.0: MANAGED_BY.1 });
    if let Some(g) = gateway {
        l[GATEWAY_NAME_LABEL] = json!(g);
    }
    l
}

impl Writer {
    pub fn new(client: Client, cfg: WriterConfig, root_pem: String) -> Self {
        Writer {
            client,
            cfg,
            root_pem,
            applied: HashMap::new(),
            swept: None,
        }
    }

    /// Forgets what was written, so the next reconcile checks everything.
    fn forget(&mut self) {
        self.applied.clear();
        self.swept = None;
    }

    /// Server-side apply, skipped when the same content was applied before.
    async fn apply<K>(
        &mut self,
        api: &Api<K>,
        key: String,
        name: &str,
        obj: Value,
        report: &mut Report,
    ) -> Result<(), WriteError>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        let h = hash_of(&obj);
        if self.applied.get(&key) == Some(&h) {
            return Ok(());
        }
        api.patch(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .map_err(WriteError::apply(&key))?;
        self.applied.insert(key, h);
        report.applied += 1;
        Ok(())
    }

    pub async fn reconcile(&mut self, view: &ClusterView) -> Report {
        let mut report = Report::default();
        self.root_configmaps(view, &mut report).await;
        self.gateway_classes(view, &mut report).await;
        let mut wanted = BTreeSet::new();
        for wp in &view.waypoints {
            let ns = wp.gateway.namespace().unwrap_or_default();
            wanted.insert((ns.clone(), wp.gateway.name_any()));
            let outcome = self
                .deploy(&wp.gateway, Role::Waypoint, &mut report)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &outcome {
                report.errors.push(e.clone());
            }
            let name = wp.gateway.name_any();
            let addresses: Vec<(String, String)> = wp
                .cluster_ip
                .iter()
                .map(|ip| ("IPAddress".to_string(), ip.clone()))
                .collect();
            let reached = wp
                .cluster_ip
                .as_ref()
                .map(|ip| format!("deployed; reached at {ip}:15008 ({name}.{ns}.svc)"));
            let want = GatewayStatus {
                problem: outcome.err(),
                addresses,
                reached,
                listeners: None,
            };
            if let Err(e) = self.gateway_status(&wp.gateway, want, &mut report).await {
                report.errors.push(e.to_string());
            }
        }
        for ing in &view.ingresses {
            wanted.insert((
                ing.gateway.namespace().unwrap_or_default(),
                ing.gateway.name_any(),
            ));
            let outcome = self
                .deploy(&ing.gateway, Role::Ingress, &mut report)
                .await
                .map_err(|e| e.to_string());
            if let Err(e) = &outcome {
                report.errors.push(e.clone());
            }
            if let Err(e) = self.ingress_status(ing, outcome.err(), &mut report).await {
                report.errors.push(e.to_string());
            }
        }
        if self.swept.as_ref() != Some(&wanted) {
            let errors = report.errors.len();
            self.remove_orphans(&wanted, &mut report).await;
            if report.errors.len() == errors {
                self.swept = Some(wanted);
            }
        }
        for p in &view.policies {
            if let Err(e) = self.policy_status(p, &mut report).await {
                report.errors.push(e.to_string());
            }
        }
        self.route_statuses(&view.routes, &mut report).await;
        report
    }

    async fn root_configmaps(&mut self, view: &ClusterView, report: &mut Report) {
        for ns in &view.root_cert_namespaces {
            let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
            let obj = json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": ROOT_CONFIGMAP, "namespace": ns, "labels": managed_labels(None)},
                "data": {ROOT_CONFIGMAP_KEY: self.root_pem},
            });
            let key = format!("ConfigMap/{ns}/{ROOT_CONFIGMAP}");
            if let Err(e) = self.apply(&api, key, ROOT_CONFIGMAP, obj, report).await {
                report.errors.push(e.to_string());
            }
        }
    }

    /// The ServiceAccount, config, Deployment and Service of one waypoint
    /// or ingress Gateway. Err names why the Gateway cannot be programmed.
    async fn deploy(
        &mut self,
        g: &Gateway,
        role: Role,
        report: &mut Report,
    ) -> Result<(), WriteError> {
        let ns = g.namespace().unwrap_or_default();
        let name = g.name_any();
        let uid = g
            .uid()
            .ok_or_else(|| WriteError::NoUid(format!("{ns}/{name}")))?;
        let owner = json!([{
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": name,
            "uid": uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }]);
        let meta = |obj_name: &str| {
            json!({
                "name": obj_name,
                "namespace": ns,
                "labels": managed_labels(Some(&name)),
                "ownerReferences": owner,
            })
        };
        // One name for both roles: a Gateway that changes class keeps
        // (and rewrites) its objects rather than leaving one behind.
        let config_name = format!("{name}-waypoint");
        let sa = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(&name)});
        let mut config = self.waypoint_config(&ns, &name);
        if role == Role::Ingress {
            config.push_str("role: ingress\n");
        }
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta(&config_name),
            "data": {"config.yaml": config},
        });
        let deploy = self.waypoint_deployment(g, role, meta(&name), &config_name);
        let mut svc_spec = json!({
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": service_ports(g, role),
        });
        if role == Role::Ingress {
            svc_spec["type"] = json!("LoadBalancer");
        }
        let svc = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta(&name),
            "spec": svc_spec,
        });
        let client = self.client.clone();
        self.owned(
            &Api::<ServiceAccount>::namespaced(client.clone(), &ns),
            "ServiceAccount",
            &ns,
            &name,
            sa,
            report,
        )
        .await?;
        self.owned(
            &Api::<ConfigMap>::namespaced(client.clone(), &ns),
            "ConfigMap",
            &ns,
            &config_name,
            cm,
            report,
        )
        .await?;
        self.owned(
            &Api::<Deployment>::namespaced(client.clone(), &ns),
            "Deployment",
            &ns,
            &name,
            deploy,
            report,
        )
        .await?;
        self.owned(
            &Api::<Service>::namespaced(client, &ns),
            "Service",
            &ns,
            &name,
            svc,
            report,
        )
        .await
    }

    /// Applies an object the Gateway owns, unless an object of that name
    /// exists that we did not make.
    async fn owned<K>(
        &mut self,
        api: &Api<K>,
        kind: &str,
        ns: &str,
        name: &str,
        obj: Value,
        report: &mut Report,
    ) -> Result<(), WriteError>
    where
        K: Resource + Clone + DeserializeOwned + Debug,
    {
        let key = format!("{kind}/{ns}/{name}");
        if self.applied.get(&key) == Some(&hash_of(&obj)) {
            return Ok(());
        }
        let existing = api.get_opt(name).await.map_err(WriteError::read(&key))?;
        if let Some(o) = existing {
            let ours = o.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1);
            if !ours {
                return Err(WriteError::NotOurs {
                    kind: kind.to_string(),
                    object: format!("{ns}/{name}"),
                });
            }
        }
        self.apply(api, key, name, obj, report).await
    }

    fn waypoint_config(&self, ns: &str, name: &str) -> String {
        // pod_name comes from the POD_NAME environment variable.
        format!(
            "namespace: {ns}\ngateway: {name}\nservice_account: {name}\ntrust_domain: {td}\n\
             ca:\n  address: {addr}\n  server_name: {sn}\n  root_cert: {ROOT_DIR}/{ROOT_CONFIGMAP_KEY}\n  token_file: {TOKEN_DIR}/istio-token\n\
             xds_address: {addr}\nhbone_addr: 0.0.0.0:15008\nadmin_addr: 127.0.0.1:15000\n\
             metrics_addr: 0.0.0.0:15020\nreadiness_addr: 0.0.0.0:15021\n\
             path_normalization: {pn}\n",
            td = self.cfg.trust_domain,
            pn = self.cfg.path_normalization,
            addr = self.cfg.ca_address,
            sn = self.cfg.ca_server_name,
        )
    }

    fn waypoint_deployment(
        &self,
        g: &Gateway,
        role: Role,
        metadata: Value,
        config_name: &str,
    ) -> Value {
        let name = g.name_any();
        let mut ports = vec![
            json!({"name": "hbone", "containerPort": 15008}),
            json!({"name": "metrics", "containerPort": 15020}),
            json!({"name": "status", "containerPort": 15021}),
        ];
        let mut pod_security = json!({
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        });
        if role == Role::Ingress {
            let listener_ports: BTreeSet<i32> = g.spec.listeners.iter().map(|l| l.port).collect();
            ports.extend(
                listener_ports
                    .into_iter()
                    .map(|p| json!({"name": format!("port-{p}"), "containerPort": p})),
            );
            // Listeners on 80 and 443 without root or a capability: the
            // sysctl is namespaced and in Kubernetes' safe set.
            pod_security["sysctls"] =
                json!([{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]);
        }
        let mut env = vec![
            json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        ];
        if let Some(f) = &self.cfg.proxy_log_format {
            env.push(json!({"name": "LOG_FORMAT", "value": f}));
        }
        // No `replicas`: an operator (or an autoscaler) owns the count.
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": metadata,
            "spec": {
                "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
                "template": {
                    "metadata": {
                        "labels": {
                            GATEWAY_NAME_LABEL: name,
                            // The waypoint speaks HBONE itself; the ztunnel
                            // must not capture it.
                            DATAPLANE_MODE: "none",
                        },
                        // Prometheus' annotation-based discovery.
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": "15020",
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "serviceAccountName": name,
                        // It talks to istiod-lite with its istio-ca token
                        // only; no API token.
                        "automountServiceAccountToken": false,
                        "terminationGracePeriodSeconds": 35,
                        "securityContext": pod_security,
                        "containers": [{
                            "name": "waypoint",
                            "image": self.cfg.waypoint_image,
                            "args": [format!("--config={CONFIG_DIR}/config.yaml")],
                            "env": env,
                            "ports": ports,
                            "readinessProbe": {"httpGet": {"path": "/healthz/ready", "port": 15021}},
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}},
                            "securityContext": {
                                "allowPrivilegeEscalation": false,
                                "readOnlyRootFilesystem": true,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
                                {"name": "istio-token", "mountPath": TOKEN_DIR, "readOnly": true},
                                {"name": "istio-root", "mountPath": ROOT_DIR, "readOnly": true},
                            ],
                        }],
                        "volumes": [
                            {"name": "config", "configMap": {"name": config_name}},
                            {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                                "audience": self.cfg.token_audience, "expirationSeconds": 43200, "path": "istio-token"}}]}},
                            {"name": "istio-root", "configMap": {"name": ROOT_CONFIGMAP}},
                        ],
                    },
                },
            },
        })
    }

    /// An ingress Gateway's status: its own conditions and addresses, and
    /// each listener's.
    async fn ingress_status(
        &mut self,
        ing: &IngressView,
        problem: Option<String>,
        report: &mut Report,
    ) -> Result<(), WriteError> {
        let generation = ing.gateway.metadata.generation;
        let reached = (!ing.addresses.is_empty()).then(|| {
            let at: Vec<&str> = ing.addresses.iter().map(|(_, v)| v.as_str()).collect();
            format!("deployed; reached at {}", at.join(", "))
        });
        let listeners = ing
            .listeners
            .iter()
            .map(|l| listener_status(l, generation))
            .collect();
        let want = GatewayStatus {
            problem,
            addresses: ing.addresses.clone(),
            reached,
            listeners: Some((listeners, not_valid(&ing.listeners))),
        };
        self.gateway_status(&ing.gateway, want, report).await
    }

    async fn gateway_status(
        &mut self,
        g: &Gateway,
        want: GatewayStatus,
        report: &mut Report,
    ) -> Result<(), WriteError> {
        let ns = g.namespace().unwrap_or_default();
        let name = g.name_any();
        let generation = g.metadata.generation;
        let (programmed, reason, message) = match (&want.problem, &want.reached) {
            (Some(p), _) => ("False", "Invalid", p.clone()),
            (None, None) => (
                "False",
                "Pending",
                format!("waiting for Service {ns}/{name} to get an address"),
            ),
            (None, Some(m)) => ("True", "Programmed", m.clone()),
        };
        // Some listeners cannot be served: still accepted (the others are).
        let (accepted_reason, accepted_message) = match want.listeners.as_ref().map(|l| &l.1) {
            Some(Some(which)) => (
                "ListenersNotValid",
                format!("accepted by istiod-lite; listeners not served: {which}"),
            ),
            _ => ("Accepted", "accepted by istiod-lite".to_string()),
        };
        let conditions_want = vec![
            condition(
                "Accepted",
                "True",
                accepted_reason,
                &accepted_message,
                generation,
            ),
            condition("Programmed", programmed, reason, &message, generation),
        ];
        let current = serde_json::to_value(&g.status).unwrap_or(Value::Null);
        let current_conditions = current["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let addresses: Vec<Value> = want
            .addresses
            .iter()
            .map(|(t, v)| json!({"type": t, "value": v}))
            .collect();
        let current_listeners = current["listeners"].as_array().cloned().unwrap_or_default();
        let same_addresses =
            current["addresses"].as_array().cloned().unwrap_or_default() == addresses;
        let same_listeners = want
            .listeners
            .as_ref()
            .is_none_or(|(l, _)| same_listeners(&current_listeners, l));
        if same_addresses
            && same_listeners
            && same_conditions(&current_conditions, &conditions_want)
        {
            return Ok(());
        }
        let conditions = with_times(&current_conditions, conditions_want);
        let mut status = json!({"conditions": conditions});
        if !addresses.is_empty() {
            status["addresses"] = json!(addresses);
        }
        if let Some((listeners, _)) = want.listeners {
            let listeners: Vec<Value> = listeners
                .into_iter()
                .map(|mut l| {
                    let held = current_listeners
                        .iter()
                        .find(|c| c["name"] == l["name"])
                        .and_then(|c| c["conditions"].as_array().cloned())
                        .unwrap_or_default();
                    let want = l["conditions"].as_array().cloned().unwrap_or_default();
                    l["conditions"] = json!(with_times(&held, want));
                    l
                })
                .collect();
            status["listeners"] = json!(listeners);
        }
        let api: Api<Gateway> = Api::namespaced(self.client.clone(), &ns);
        let patch = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": name, "namespace": ns},
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(WriteError::status(format!("Gateway {ns}/{name}")))?;
        report.statuses += 1;
        Ok(())
    }

    async fn policy_status(
        &mut self,
        p: &PolicyView,
        report: &mut Report,
    ) -> Result<(), WriteError> {
        let (ns, name) = &p.key;
        let want = PolicyCondition {
            observed_generation: p.generation,
            ..p.want.clone()
        };
        let current: Vec<PolicyCondition> = p
            .current
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        let held = current.iter().find(|c| c.type_ == want.type_);
        let unchanged = held.is_some_and(|c| {
            (
                c.status.as_str(),
                c.reason.as_str(),
                c.message.as_str(),
                c.observed_generation,
            ) == (
                want.status.as_str(),
                want.reason.as_str(),
                want.message.as_str(),
                want.observed_generation,
            )
        });
        if unchanged {
            return Ok(());
        }
        let since = held
            .filter(|c| c.status == want.status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(now_rfc3339);
        let cond = PolicyCondition {
            last_transition_time: Some(since),
            ..want
        };
        if cond.reason != "Accepted" {
            warn!(policy = %format!("{ns}/{name}"), condition = %cond.type_, reason = %cond.reason, message = %cond.message, "policy status");
        }
        let api: Api<AuthorizationPolicy> = Api::namespaced(self.client.clone(), ns);
        let patch = json!({
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "status": {"conditions": [cond]},
        });
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(WriteError::status(format!(
            "AuthorizationPolicy {ns}/{name}"
        )))?;
        report.statuses += 1;
        Ok(())
    }

    /// The leader's loop: reconcile on every applied change (at most once
    /// per `min_interval`) and on every resync; stop writing the moment the
    /// Lease is lost, even mid-reconcile.
    pub async fn run(
        mut self,
        hub: Arc<Hub>,
        mut leader: watch::Receiver<bool>,
        stop: CancellationToken,
    ) {
        let mut changes = hub.applied();
        // A kind appearing (GatewayClass served) is news even with no objects.
        let mut kinds = hub.sources().subscribe();
        // A partial model would look like Gateways were deleted.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hub.wait_ready() => {}
        }
        loop {
            while !*leader.borrow_and_update() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    r = leader.changed() => if r.is_err() { return },
                }
            }
            // A new term: what a previous leader (or term) applied may
            // have changed since.
            self.forget();
            let mut resync = tokio::time::Instant::now() + self.cfg.resync;
            loop {
                let mut view = hub.model().cluster_view();
                view.gateway_class_served = hub
                    .sources()
                    .get("GatewayClass")
                    .is_some_and(|k| k.state == crate::config::sources::State::Listed);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = leader.changed() => {}
                    report = self.reconcile(&view) => {
                        for e in &report.errors {
                            warn!(error = %e, "cluster write");
                        }
                        if report.applied + report.deleted + report.statuses > 0 {
                            info!(applied = report.applied, deleted = report.deleted, statuses = report.statuses, "reconciled");
                        }
                    }
                }
                if !*leader.borrow() {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = leader.changed() => {}
                    r = changes.changed() => if r.is_err() { return },
                    r = kinds.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(resync) => {
                        self.forget();
                        resync = tokio::time::Instant::now() + self.cfg.resync;
                    }
                }
                if !*leader.borrow() {
                    break;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.cfg.min_interval) => {}
                }
            }
        }
    }
}

/// What a Gateway's status should say.
struct GatewayStatus {
    /// Why its objects could not be written.
    problem: Option<String>,
    /// (type, value) per address.
    addresses: Vec<(String, String)>,
    /// How it is reached, once it has an address.
    reached: Option<String>,
    /// Ingress only: each listener's status, and the listeners not served.
    listeners: Option<(Vec<Value>, Option<String>)>,
}

/// The Service's ports, one per distinct listener port. Listener names may
/// be longer than a Service port name (a DNS label of at most 15
/// characters), so those get `port-<n>`. A waypoint's also has its status
/// port; an ingress's LoadBalancer only the listeners'.
fn service_ports(g: &Gateway, role: Role) -> Value {
    let mut seen = BTreeSet::new();
    let mut ports = Vec::new();
    let listeners = g.spec.listeners.iter().map(|l| (l.name.as_str(), l.port));
    let status = (role == Role::Waypoint).then_some(("status-port", 15021));
    for (name, port) in listeners.chain(status) {
        if !seen.insert(port) {
            continue;
        }
        let valid = !name.is_empty()
            && name.len() <= 15
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !name.starts_with('-')
            && !name.ends_with('-');
        let name = if valid {
            name.to_string()
        } else {
            format!("port-{port}")
        };
        let mut p = json!({"name": name, "port": port, "protocol": "TCP"});
        if role == Role::Ingress {
            p["targetPort"] = json!(port);
        }
        ports.push(p);
    }
    json!(ports)
}
