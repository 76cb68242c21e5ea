//! Who is asking, and may they have that identity?
//!
//! Authentication proves which node the caller runs on. Authorization asks
//! the node check whether a workload with the requested identity runs there.
//! Both are traits: the bootstrap-token authenticator and a static node map
//! serve the single-machine case; the config model and the Kubernetes
//! TokenReview plug in behind the same seams.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_core::identity::{Identity, IdentityError};
use serde::Deserialize;
use tonic::metadata::MetadataMap;

/// A caller whose node has been proven.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub node: String,
    /// When set, the caller is a workload that may ask only for its own
    /// identity (a waypoint with its own token); when unset, a node proxy
    /// that may ask for any identity running on its node.
    pub only: Option<Identity>,
    /// The pod (namespace, name) the caller's token is bound to, when known.
    pub pod: Option<(String, String)>,
}

impl Caller {
    /// A node proxy on `node`.
    pub fn node(node: impl Into<String>) -> Self {
        Caller {
            node: node.into(),
            only: None,
            pod: None,
        }
    }
}

/// Why a caller is not authenticated: told to the caller (an
/// `Unauthenticated` status) and logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no authorization header (expected \"Bearer <token>\")")]
    NoHeader,
    #[error("authorization header is not ASCII")]
    NotAscii,
    #[error("authorization header is not a Bearer token")]
    NotBearer,
    #[error("unknown bootstrap token")]
    UnknownToken,
    #[error("pod tokens are not accepted here (no config model)")]
    PodTokensOff,
    #[error("the token of pod {namespace}/{pod}: {reason}")]
    PodToken {
        namespace: String,
        pod: String,
        reason: Box<PodError>,
    },
    /// Folder mode's token file cannot be read or does not load: every
    /// caller is refused until it does.
    #[error("the token file {0}")]
    TokenFile(String),
    /// Not shaped as a service-account token (a JWT: three base64url
    /// segments, the first a JSON header): refused without asking the API.
    #[error("the bearer token is not a JWT")]
    NotJwt,
    /// The API server could not answer (says nothing about the token).
    #[error("TokenReview failed: {0}")]
    ReviewFailed(String),
    /// Every review slot stayed taken while the caller waited: nothing is
    /// known of its token; it may retry (UNAVAILABLE).
    #[error("too many token reviews in flight; retry later")]
    Busy,
    #[error("the TokenReview came back without a status")]
    NoReviewStatus,
    #[error("token rejected by the API server{}", .0.as_ref().map(|e| format!(": {e}")).unwrap_or_default())]
    Rejected(Option<String>),
    #[error("token is not for audience {want:?} (it is for {got:?})")]
    WrongAudience { want: String, got: Vec<String> },
    #[error("the TokenReview names no user")]
    NoUser,
    #[error("{0:?} is not a service account")]
    NotServiceAccount(String),
    #[error("the token of {0} is not bound to a pod; use a projected service-account token")]
    NotPodBound(String),
    #[error("pod {namespace}/{pod} runs on {model:?} but its token names node {token:?}")]
    NodeMismatch {
        namespace: String,
        pod: String,
        model: String,
        token: String,
    },
    #[error("pod {namespace}/{pod} (uid {uid}) is not known (yet); its node cannot be proven")]
    UnknownPod {
        namespace: String,
        pod: String,
        uid: String,
    },
    #[error("service account {namespace}/{account}: {reason}")]
    BadAccount {
        namespace: String,
        account: String,
        reason: Box<IdentityError>,
    },
}

/// Why a pod's own token does not tie it to a node and identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("no running pod {0}/{1} is known (yet)")]
    NotRunning(String, String),
    #[error("pod {0}/{1} is not scheduled on a node")]
    NotScheduled(String, String),
    #[error("pod {namespace}/{pod}'s service account {account:?}: {reason}")]
    BadAccount {
        namespace: String,
        pod: String,
        account: String,
        reason: Box<IdentityError>,
    },
}

impl AuthError {
    /// The gRPC status refusing a caller for this reason, its message
    /// starting with `what`: UNAVAILABLE when nothing is known of the
    /// token yet (the API server could not answer, or every review slot
    /// was taken), else UNAUTHENTICATED.
    pub fn status(&self, what: &str) -> tonic::Status {
        let msg = format!("{what}: {self}");
        match self {
            AuthError::Busy | AuthError::ReviewFailed(_) => tonic::Status::unavailable(msg),
            _ => tonic::Status::unauthenticated(msg),
        }
    }
}

pub trait Authenticator: Send + Sync + 'static {
    /// Why authentication failed is returned for the caller to read.
    /// Asynchronous: the Kubernetes authenticator asks the API server.
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>>;

    /// As [`Authenticator::authenticate`], for a request from `peer` (its
    /// address, when known): an authenticator that spends on each caller
    /// (a TokenReview) bounds what one address may have in flight.
    fn authenticate_from<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        peer: Option<std::net::IpAddr>,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        let _ = peer;
        self.authenticate(metadata)
    }
}

/// The bearer token of a request, or why there is none.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, AuthError> {
    let header = metadata
        .get("authorization")
        .ok_or(AuthError::NoHeader)?
        .to_str()
        .map_err(|_| AuthError::NotAscii)?;
    header.strip_prefix("Bearer ").ok_or(AuthError::NotBearer)
}

pub trait NodeAuthorizer: Send + Sync + 'static {
    /// True when a workload with `identity` runs on `node`.
    fn workload_on_node(&self, node: &str, identity: &Identity) -> bool;
}

/// Who a bootstrap token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// A node's proxies (its ztunnel; in the lab, its waypoints too).
    Node(String),
    /// One pod (namespace, name), as itself: a pod's own credential, as a
    /// pod-bound service-account token is in a cluster.
    Pod(String, String),
}

/// Where a pod runs and as whom, from the config model: how a pod's own
/// token is tied to its node and identity.
pub trait PodDirectory: Send + Sync + 'static {
    /// The node of a running pod and its service account's identity, or
    /// why it has none.
    fn pod_identity(&self, namespace: &str, name: &str) -> Result<(String, Identity), PodError>;
}

/// Bootstrap tokens, handed out of band: one per node (its ztunnel's), and
/// optionally one per pod that must prove it is itself (an ingress
/// gateway's: its keys go to no node proxy). A pod's token is tied to its
/// node and identity through the [`PodDirectory`]; without one, pod tokens
/// are refused.
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    by_token: HashMap<String, Holder>,
    pods: Option<Arc<dyn PodDirectory>>,
}

impl std::fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("tokens", &self.by_token.len())
            .field("pods", &self.pods.is_some())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    #[error("token for {0:?} is shorter than 16 characters")]
    ShortToken(String),
    #[error("{0:?} is neither a node name nor <namespace>/<pod>")]
    BadHolder(String),
    #[error("{0:?} shares its token with another entry")]
    SharedToken(String),
}

impl BootstrapTokens {
    /// `holder -> token` pairs: a node's name, or `<namespace>/<pod>` for a
    /// pod's own token (a node name never holds a `/`).
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, AuthConfigError> {
        let mut by_token = HashMap::new();
        for (holder, token) in pairs {
            if token.len() < 16 {
                return Err(AuthConfigError::ShortToken(holder));
            }
            let h = match holder.split_once('/') {
                None if !holder.is_empty() => Holder::Node(holder.clone()),
                Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                    Holder::Pod(ns.to_string(), pod.to_string())
                }
                _ => return Err(AuthConfigError::BadHolder(holder)),
            };
            if by_token.insert(token, h).is_some() {
                return Err(AuthConfigError::SharedToken(holder));
            }
        }
        Ok(BootstrapTokens {
            by_token,
            pods: None,
        })
    }

    /// Pod tokens are tied to their pods through `pods`.
    pub fn with_pods(mut self, pods: Arc<dyn PodDirectory>) -> Self {
        self.pods = Some(pods);
        self
    }

    /// A YAML map of node name to token.
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let err = |reason: String| AuthConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let map: HashMap<String, String> =
            serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
        Self::new(map).map_err(|e| err(e.to_string()))
    }

    /// How many entries there are (nodes and pods).
    pub fn len(&self) -> usize {
        self.by_token.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_token.is_empty()
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(std::future::ready(self.check(metadata)))
    }
}

impl BootstrapTokens {
    pub(crate) fn check(&self, metadata: &MetadataMap) -> Result<Caller, AuthError> {
        let token = bearer(metadata)?;
        // Compare against every token so timing does not reveal a prefix.
        let mut found = None;
        for (known, holder) in &self.by_token {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(holder);
            }
        }
        match found.ok_or(AuthError::UnknownToken)? {
            Holder::Node(node) => Ok(Caller::node(node.clone())),
            Holder::Pod(ns, pod) => {
                let pods = self.pods.as_ref().ok_or(AuthError::PodTokensOff)?;
                let (node, identity) =
                    pods.pod_identity(ns, pod)
                        .map_err(|reason| AuthError::PodToken {
                            namespace: ns.clone(),
                            pod: pod.clone(),
                            reason: Box::new(reason),
                        })?;
                Ok(Caller {
                    node,
                    only: Some(identity),
                    pod: Some((ns.clone(), pod.clone())),
                })
            }
        }
    }
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fixed node -> identities map: the seam's simplest implementation.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct StaticNodeIdentities {
    nodes: HashMap<String, BTreeSet<Identity>>,
}

impl StaticNodeIdentities {
    pub fn new(nodes: impl IntoIterator<Item = (String, Vec<Identity>)>) -> Self {
        StaticNodeIdentities {
            nodes: nodes
                .into_iter()
                .map(|(n, ids)| (n, ids.into_iter().collect()))
                .collect(),
        }
    }

    /// A YAML map of node name to a list of SPIFFE identities.
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let err = |reason: String| AuthConfigError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))
    }
}

impl NodeAuthorizer for StaticNodeIdentities {
    fn workload_on_node(&self, node: &str, identity: &Identity) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|ids| ids.contains(identity))
    }
}
