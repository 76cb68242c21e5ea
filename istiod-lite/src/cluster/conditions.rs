//! Status conditions as the writer sets them: one condition, whether the
//! current ones already say what we want (other controllers' types left
//! alone), transition times kept across unchanged statuses, and a Gateway
//! listener's entry of `status.listeners`.

use serde_json::{Value, json};

use super::now_rfc3339;
use crate::model::ingress::ListenerStatus;

/// The listeners that are not served, by name, if any.
pub(crate) fn not_valid(listeners: &[ListenerStatus]) -> Option<String> {
    let bad: Vec<&str> = listeners
        .iter()
        .filter(|l| {
            l.conditions
                .iter()
                .any(|c| c.type_ == "Programmed" && !c.status)
        })
        .map(|l| l.name.as_str())
        .collect();
    (!bad.is_empty()).then(|| bad.join(", "))
}

/// One entry of `status.listeners`, without transition times.
pub(crate) fn listener_status(l: &ListenerStatus, generation: Option<i64>) -> Value {
    let kinds: Vec<Value> = l
        .kinds
        .names()
        .into_iter()
        .map(|k| json!({"group": "gateway.networking.k8s.io", "kind": k}))
        .collect();
    let conditions: Vec<Value> = l
        .conditions
        .iter()
        .map(|c| {
            condition(
                c.type_,
                if c.status { "True" } else { "False" },
                c.reason,
                &c.message,
                generation,
            )
        })
        .collect();
    json!({
        "name": l.name,
        "supportedKinds": kinds,
        "attachedRoutes": l.attached_routes,
        "conditions": conditions,
    })
}

/// Whether the listeners' status already says what we want (ours are all
/// the listeners there are: the Gateway has one controller).
pub(crate) fn same_listeners(current: &[Value], want: &[Value]) -> bool {
    current.len() == want.len()
        && want.iter().all(|w| {
            current.iter().any(|c| {
                c["name"] == w["name"]
                    && c["attachedRoutes"] == w["attachedRoutes"]
                    && c["supportedKinds"] == w["supportedKinds"]
                    && c["conditions"].as_array().is_some_and(|cc| {
                        let wc = w["conditions"].as_array().cloned().unwrap_or_default();
                        cc.len() == wc.len() && same_conditions(cc, &wc)
                    })
            })
        })
}

pub(crate) fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Value {
    let mut c = json!({"type": type_, "status": status, "reason": reason, "message": message});
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

pub(crate) fn same_conditions(current: &[Value], want: &[Value]) -> bool {
    let strip = |c: &Value| {
        let mut c = c.clone();
        if let Some(o) = c.as_object_mut() {
            o.remove("lastTransitionTime");
        }
        c
    };
    // Only the condition types we set: another controller's are its own.
    want.iter().all(|w| current.iter().any(|c| strip(c) == *w))
}

/// Sets lastTransitionTime: kept from the current condition of the same
/// type when its status did not change, now otherwise.
pub(crate) fn with_times(current: &[Value], want: Vec<Value>) -> Vec<Value> {
    let now = now_rfc3339();
    want.into_iter()
        .map(|mut w| {
            let kept = current
                .iter()
                .find(|c| c["type"] == w["type"] && c["status"] == w["status"])
                .and_then(|c| c["lastTransitionTime"].as_str().map(str::to_string));
            w["lastTransitionTime"] = json!(kept.unwrap_or_else(|| now.clone()));
            w
        })
        .collect()
}
