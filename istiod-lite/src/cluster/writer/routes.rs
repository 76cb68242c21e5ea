//! HTTPRoute and GRPCRoute status: our entries of `status.parents` (one
//! per parentRef of ours, `controllerName` ours), written only when they
//! differ from what the watch shows. Other controllers' entries are kept
//! as they are; ours for parents no longer ours (or no longer referenced)
//! are removed.

use gateway_api::apis::experimental::grpcroutes::GrpcRoute;
use gateway_api::apis::experimental::httproutes::HttpRoute;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::super::FIELD_MANAGER;
use super::super::conditions::{condition, same_conditions, with_times};
use super::classes::CONTROLLER_NAME;
use super::{Report, WriteError, Writer};
use crate::model::route_status::{RouteKind, RouteView};

/// A parentRef with the API's defaults filled in (group, kind), so a
/// status entry read back compares equal to the spec's ref.
fn normalized(p: &Value) -> Value {
    let mut p = p.clone();
    if p.get("group").is_none() {
        p["group"] = json!("gateway.networking.k8s.io");
    }
    if p.get("kind").is_none() {
        p["kind"] = json!("Gateway");
    }
    p
}

fn ours(entry: &Value) -> bool {
    entry["controllerName"] == CONTROLLER_NAME
}

/// Our entries as they should be, without transition times.
fn wanted(v: &RouteView) -> Vec<Value> {
    v.parents
        .iter()
        .map(|(p, conds)| {
            let conditions: Vec<Value> = conds
                .iter()
                .map(|c| {
                    condition(
                        c.type_,
                        if c.status { "True" } else { "False" },
                        c.reason,
                        &c.message,
                        v.generation,
                    )
                })
                .collect();
            json!({"parentRef": p, "controllerName": CONTROLLER_NAME, "conditions": conditions})
        })
        .collect()
}

/// Whether the current entries of ours already say what we want.
pub(super) fn unchanged(current: &[Value], want: &[Value]) -> bool {
    let held: Vec<&Value> = current.iter().filter(|e| ours(e)).collect();
    held.len() == want.len()
        && want.iter().all(|w| {
            held.iter().any(|c| {
                normalized(&c["parentRef"]) == normalized(&w["parentRef"])
                    && c["conditions"].as_array().is_some_and(|cc| {
                        let wc = w["conditions"].as_array().cloned().unwrap_or_default();
                        cc.len() == wc.len() && same_conditions(cc, &wc)
                    })
            })
        })
}

/// The whole `status.parents` to write: other controllers' entries as
/// they are, then ours, each condition's transition time kept when its
/// status did not change.
pub(super) fn merged(current: &[Value], want: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = current.iter().filter(|e| !ours(e)).cloned().collect();
    for mut w in want {
        let held = current
            .iter()
            .filter(|e| ours(e))
            .find(|e| normalized(&e["parentRef"]) == normalized(&w["parentRef"]))
            .and_then(|e| e["conditions"].as_array().cloned())
            .unwrap_or_default();
        let conds = w["conditions"].as_array().cloned().unwrap_or_default();
        w["conditions"] = json!(with_times(&held, conds));
        out.push(w);
    }
    out
}

impl Writer {
    /// Writes the status of every route whose entries of ours changed.
    pub(super) async fn route_statuses(&mut self, routes: &[RouteView], report: &mut Report) {
        for v in routes {
            if let Err(e) = self.route_status(v, report).await {
                report.errors.push(e.to_string());
            }
        }
    }

    async fn route_status(&mut self, v: &RouteView, report: &mut Report) -> Result<(), WriteError> {
        let want = wanted(v);
        if unchanged(&v.current, &want) {
            return Ok(());
        }
        let parents = merged(&v.current, want);
        let mut patch = json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": v.kind.as_str(),
            "metadata": {"name": v.name, "namespace": v.namespace},
            "status": {"parents": parents},
        });
        // `status.parents` is replaced whole: write only over the version
        // the entries of others were read from (a conflict is retried on
        // the next reconcile, from the watch's newer copy).
        if let Some(rv) = &v.resource_version {
            patch["metadata"]["resourceVersion"] = json!(rv);
        }
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let written = match v.kind {
            RouteKind::Grpc => {
                let api: Api<GrpcRoute> = Api::namespaced(self.client.clone(), &v.namespace);
                api.patch_status(&v.name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            }
            RouteKind::Http => {
                let api: Api<HttpRoute> = Api::namespaced(self.client.clone(), &v.namespace);
                api.patch_status(&v.name, &params, &Patch::Apply(&patch))
                    .await
                    .map(|_| ())
            }
        };
        written.map_err(WriteError::status(format!(
            "{} {}/{}",
            v.kind.as_str(),
            v.namespace,
            v.name
        )))?;
        report.statuses += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(controller: &str, parent: Value, reason: &str, time: &str) -> Value {
        json!({
            "parentRef": parent,
            "controllerName": controller,
            "conditions": [{
                "type": "Accepted", "status": if reason == "Accepted" { "True" } else { "False" },
                "reason": reason, "message": "m", "observedGeneration": 2,
                "lastTransitionTime": time,
            }],
        })
    }

    fn strip_times(mut v: Value) -> Value {
        for c in v["conditions"].as_array_mut().into_iter().flatten() {
            if let Some(o) = c.as_object_mut() {
                o.remove("lastTransitionTime");
            }
        }
        v
    }

    #[test]
    fn only_our_entries_are_compared_and_replaced() {
        let spec_ref = json!({"name": "edge", "sectionName": "web"});
        // As the API server shows it: the group and kind defaulted.
        let read_back = json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge", "sectionName": "web"});
        let theirs = entry("example.com/other", json!({"name": "lb"}), "Accepted", "t0");
        let held = entry(CONTROLLER_NAME, read_back, "Accepted", "t1");
        let want = vec![strip_times(entry(
            CONTROLLER_NAME,
            spec_ref.clone(),
            "Accepted",
            "",
        ))];
        let current = vec![theirs.clone(), held];
        assert!(unchanged(&current, &want));
        // Another controller's entry alone does not count as ours.
        assert!(!unchanged(std::slice::from_ref(&theirs), &want));
        // A changed reason is a change; the merged list keeps the other
        // controller's entry and a new transition time for ours.
        let want = vec![strip_times(entry(
            CONTROLLER_NAME,
            spec_ref.clone(),
            "NotAllowedByListeners",
            "",
        ))];
        assert!(!unchanged(&current, &want));
        let out = merged(&current, want.clone());
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], theirs);
        assert_eq!(out[1]["conditions"][0]["reason"], "NotAllowedByListeners");
        assert_ne!(out[1]["conditions"][0]["lastTransitionTime"], "t1");
        // The same status keeps its transition time.
        let same = vec![strip_times(entry(
            CONTROLLER_NAME,
            spec_ref,
            "Accepted",
            "",
        ))];
        let out = merged(&current, same);
        assert_eq!(out[1]["conditions"][0]["lastTransitionTime"], "t1");
        // Ours for a parent no longer ours is dropped.
        assert!(!unchanged(&current, &[]));
        assert_eq!(merged(&current, Vec::new()), vec![theirs]);
    }
}
