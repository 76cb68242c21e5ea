//! Who may open which proxy's xDS stream, and who may hold an ingress
//! Gateway's private keys.
//!
//! A node token (a ztunnel's: `Caller::only` unset) may ask for any
//! identity on its node, but it never holds a Gateway's keys: an ingress
//! gateway's stream (`ingress~<ns>~<pod>`) needs the gateway pod's own
//! credential, a token bound to that very pod whose service account is the
//! pod's. A workload token opens only its own pod's stream.

use crate::ca::auth::Caller;
use crate::model::{INGRESS_PROXY_PREFIX, Model, WAYPOINT_PROXY_PREFIX};

/// Whether `caller` may open a stream as `proxy_id`; Err says why not.
pub fn may_open(caller: &Caller, proxy_id: &str) -> Result<(), String> {
    let ingress = proxy_id
        .split_once('~')
        .is_some_and(|(p, _)| p == INGRESS_PROXY_PREFIX);
    if caller.only.is_none() {
        if ingress {
            return Err(format!(
                "a node token may not subscribe as the ingress gateway pod {proxy_id:?}: \
                 its keys go only to the pod's own service-account token"
            ));
        }
        return Ok(());
    }
    // Any pod can hold a token of our audience, and the mesh's state is not
    // for every pod to read.
    let own: Vec<String> = caller
        .pod
        .iter()
        .flat_map(|(ns, pod)| {
            [WAYPOINT_PROXY_PREFIX, INGRESS_PROXY_PREFIX].map(|p| format!("{p}~{ns}~{pod}"))
        })
        .collect();
    if own.iter().any(|o| o == proxy_id) {
        return Ok(());
    }
    Err(format!(
        "a workload token may subscribe only as its own waypoint pod or ingress pod ({}), not as {proxy_id:?}",
        if own.is_empty() {
            "no pod".to_string()
        } else {
            own.join(" or ")
        }
    ))
}

/// Whether `caller` is the ingress gateway pod `proxy_id` names, as itself:
/// a token bound to that pod, of the pod's own service account.
pub fn own_ingress_pod(caller: &Caller, model: &Model, proxy_id: &str) -> Result<(), String> {
    let Some(identity) = &caller.only else {
        return Err("a node token never holds an ingress gateway's keys".into());
    };
    let (ns, pod) = proxy_id
        .strip_prefix(INGRESS_PROXY_PREFIX)
        .and_then(|r| r.strip_prefix('~'))
        .and_then(|r| r.split_once('~'))
        .ok_or_else(|| {
            format!("proxy id {proxy_id:?} is not {INGRESS_PROXY_PREFIX}~<namespace>~<pod>")
        })?;
    if caller.pod.as_ref().map(|(n, p)| (n.as_str(), p.as_str())) != Some((ns, pod)) {
        return Err(format!("the caller's token is not bound to pod {ns}/{pod}"));
    }
    let sa = model
        .pod_service_account(ns, pod)
        .ok_or_else(|| format!("no pod {ns}/{pod}"))?;
    if identity.namespace() != ns || identity.service_account() != sa {
        return Err(format!(
            "the caller is {identity}, not pod {ns}/{pod}'s service account {sa:?}"
        ));
    }
    Ok(())
}
