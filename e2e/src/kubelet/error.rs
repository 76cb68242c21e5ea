//! What can go wrong while the lab plays the kubelet, with its context.

/// A kubelet failure: which step, and why.
#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    /// A call to the API server failed.
    #[error("{what}: {source}")]
    Api {
        what: String,
        #[source]
        source: Box<kube::Error>,
    },
    /// A file or process on this machine.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The lab's network (a netns, a veth, nftables).
    #[error("{what}: {why}")]
    Lab { what: String, why: String },
    /// A pod the lab cannot run as written (an image it has no program
    /// for, a volume kind it does not know).
    #[error("pod {pod}: {why}")]
    Pod { pod: String, why: String },
    /// The kubeconfig or control plane the lab was given.
    #[error("{0}")]
    Setup(String),
}

impl KubeletError {
    pub fn api(what: impl Into<String>, source: kube::Error) -> Self {
        KubeletError::Api {
            what: what.into(),
            source: Box::new(source),
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        KubeletError::Io {
            what: what.into(),
            source,
        }
    }

    pub fn lab(what: impl Into<String>, why: impl std::fmt::Display) -> Self {
        KubeletError::Lab {
            what: what.into(),
            why: why.to_string(),
        }
    }

    pub fn pod(pod: impl Into<String>, why: impl Into<String>) -> Self {
        KubeletError::Pod {
            pod: pod.into(),
            why: why.into(),
        }
    }

    /// Not found (404): an object gone between a list and a write.
    pub fn is_not_found(&self) -> bool {
        match self {
            KubeletError::Api { source, .. } => {
                matches!(&**source, kube::Error::Api(s) if s.code == 404)
            }
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, KubeletError>;
