//! Cluster mode: what istiod-lite does against a Kubernetes API server
//! beyond watching it. Every replica serves xDS and the CA; the writes
//! (root ConfigMaps, waypoint Deployments, status) are the Lease holder's.
//!
//! - [`ca_secret`]: the root CA kept in a Secret, created once; replicas that
//!   race to create it agree on the one that won.
//! - [`lease`]: leader election through a `coordination.k8s.io` Lease.
//! - [`tokenreview`]: callers authenticated by projected service-account
//!   tokens, checked with the TokenReview API and bound to their pod's node.
//! - [`writer`]: the leader's reconcile loop.

pub mod ca_secret;
pub mod conditions;
pub mod flight;
pub mod jwt;
pub mod lease;
pub mod tokenreview;
pub mod writer;

/// The field manager of every write, so server-side apply can tell our
/// fields from an operator's.
pub const FIELD_MANAGER: &str = "istiod-lite";
/// Label on everything the controller creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "istiod-lite");

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("CA Secret {name}: {reason}")]
    CaSecret { name: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

impl ClusterError {
    pub fn api(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ClusterError {
        let what = what.into();
        move |source| ClusterError::Api {
            what,
            source: Box::new(source),
        }
    }
}

/// The HTTP status of an API error, if the API server answered one.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// RFC 3339 "now", as Kubernetes writes times.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
