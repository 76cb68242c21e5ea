//! Who may open which proxy's xDS stream, and who may hold an ingress
//! Gateway's private keys.
//!
//! A node token (a ztunnel's: `Caller::only` unset) may ask for any
//! identity on its node, but it never holds a Gateway's keys: an ingress
//! gateway's stream (`ingress~<ns>~<pod>`) needs the gateway pod's own
//! credential, a token bound to that very pod whose service account is the
//! pod's. A workload token opens only its own pod's stream, and only
//! when that pod is a pod of a Gateway of the kind the stream names (a
//! waypoint's for `waypoint~`, an ingress gateway's for `ingress~`; a pod
//! the controller made for that Gateway, see [`Model::waypoint_of_proxy`]):
//! any pod can hold a token of our audience. An open stream is checked
//! again whenever Gateways or their pods change, and ended when it no
//! longer passes.

use mesh_core::identity::Identity;

use crate::ca::auth::Caller;
use crate::model::{INGRESS_PROXY_PREFIX, Model, ProxyError, WAYPOINT_PROXY_PREFIX};

/// Why a caller may not open a stream, or hold a Gateway's keys: told to
/// the caller (a `PermissionDenied` status) and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    #[error(
        "a node token may not subscribe as the ingress gateway pod {0:?}: \
         its keys go only to the pod's own service-account token"
    )]
    NodeTokenAsIngress(String),
    #[error(
        "a workload token may subscribe only as its own waypoint pod or ingress pod ({own}), not as {proxy_id:?}"
    )]
    NotOwnPod { own: String, proxy_id: String },
    #[error("a workload token may open {proxy_id:?} only as a Gateway's pod: {why}")]
    NotGatewayPod { proxy_id: String, why: ProxyError },
    #[error("a workload token may open an xDS stream only as a Gateway's pod: {0}")]
    NotAGatewayPod(String),
    #[error("a node token never holds an ingress gateway's keys")]
    NodeTokenKeys,
    #[error("proxy id {0:?} is not {INGRESS_PROXY_PREFIX}~<namespace>~<pod>")]
    BadProxyId(String),
    #[error("the caller's token is not bound to pod {0}/{1}")]
    NotBoundToPod(String, String),
    #[error("no pod {0}/{1}")]
    NoPod(String, String),
    #[error("the caller is {identity}, not pod {pod}'s service account {account:?}")]
    NotPodAccount {
        identity: Identity,
        pod: String,
        account: String,
    },
}

/// Whether `caller` may be admitted at all, from its token alone (before
/// any request names a proxy): a node token may; a workload token only
/// when its pod is, in the model, a pod of a waypoint or ingress Gateway
/// on the caller's node ([`may_open`]'s check, for either kind).
pub fn may_admit(caller: &Caller, model: &Model) -> Result<(), AccessError> {
    if caller.only.is_none() {
        return Ok(());
    }
    let Some((ns, pod)) = &caller.pod else {
        return Err(AccessError::NotAGatewayPod(
            "the token is bound to no pod".to_string(),
        ));
    };
    let waypoint = format!("{WAYPOINT_PROXY_PREFIX}~{ns}~{pod}");
    let ingress = format!("{INGRESS_PROXY_PREFIX}~{ns}~{pod}");
    match model.waypoint_of_proxy(&caller.node, &waypoint) {
        Ok(_) => Ok(()),
        Err(w) => match model.ingress_of_proxy(&caller.node, &ingress) {
            Ok(_) => Ok(()),
            Err(i) => Err(AccessError::NotAGatewayPod(format!(
                "pod {ns}/{pod}: as a waypoint: {w}; as an ingress gateway: {i}"
            ))),
        },
    }
}

/// Whether `caller` may open a stream as `proxy_id`; Err says why not.
pub fn may_open(caller: &Caller, model: &Model, proxy_id: &str) -> Result<(), AccessError> {
    let ingress = proxy_id
        .split_once('~')
        .is_some_and(|(p, _)| p == INGRESS_PROXY_PREFIX);
    if caller.only.is_none() {
        if ingress {
            return Err(AccessError::NodeTokenAsIngress(proxy_id.to_string()));
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
        // Its own pod, and that pod is a Gateway's of the kind named.
        let served = if ingress {
            model.ingress_of_proxy(&caller.node, proxy_id)
        } else {
            model.waypoint_of_proxy(&caller.node, proxy_id)
        };
        return served
            .map(|_| ())
            .map_err(|why| AccessError::NotGatewayPod {
                proxy_id: proxy_id.to_string(),
                why,
            });
    }
    Err(AccessError::NotOwnPod {
        own: if own.is_empty() {
            "no pod".to_string()
        } else {
            own.join(" or ")
        },
        proxy_id: proxy_id.to_string(),
    })
}

/// Whether `caller` is the ingress gateway pod `proxy_id` names, as itself:
/// a token bound to that pod, of the pod's own service account.
pub fn own_ingress_pod(caller: &Caller, model: &Model, proxy_id: &str) -> Result<(), AccessError> {
    let Some(identity) = &caller.only else {
        return Err(AccessError::NodeTokenKeys);
    };
    let (ns, pod) = proxy_id
        .strip_prefix(INGRESS_PROXY_PREFIX)
        .and_then(|r| r.strip_prefix('~'))
        .and_then(|r| r.split_once('~'))
        .ok_or_else(|| AccessError::BadProxyId(proxy_id.to_string()))?;
    if caller.pod.as_ref().map(|(n, p)| (n.as_str(), p.as_str())) != Some((ns, pod)) {
        return Err(AccessError::NotBoundToPod(ns.to_string(), pod.to_string()));
    }
    let sa = model
        .pod_service_account(ns, pod)
        .ok_or_else(|| AccessError::NoPod(ns.to_string(), pod.to_string()))?;
    if identity.namespace() != ns || identity.service_account() != sa {
        return Err(AccessError::NotPodAccount {
            identity: identity.clone(),
            pod: format!("{ns}/{pod}"),
            account: sa.to_string(),
        });
    }
    Ok(())
}
