//! Why a write did not happen.

/// Why a write did not happen: kept in the [`super::Report`], and for a
/// Gateway in its status too.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("applying {key}: {source}")]
    Apply { key: String, source: kube::Error },
    #[error("reading {key}: {source}")]
    Read { key: String, source: kube::Error },
    #[error("Gateway {0} has no uid yet")]
    NoUid(String),
    #[error(
        "{kind} {object} already exists and was not created by istiod-lite; rename the Gateway or delete the {kind}"
    )]
    NotOurs { kind: String, object: String },
    /// `what`: "Gateway ns/name", "GatewayClass name", ...
    #[error("writing the status of {what}: {source}")]
    Status { what: String, source: kube::Error },
}

impl WriteError {
    pub(super) fn apply(key: &str) -> impl FnOnce(kube::Error) -> WriteError + '_ {
        move |source| WriteError::Apply {
            key: key.to_string(),
            source,
        }
    }

    pub(super) fn read(key: &str) -> impl FnOnce(kube::Error) -> WriteError + '_ {
        move |source| WriteError::Read {
            key: key.to_string(),
            source,
        }
    }

    pub(super) fn status(what: String) -> impl FnOnce(kube::Error) -> WriteError {
        move |source| WriteError::Status { what, source }
    }
}
