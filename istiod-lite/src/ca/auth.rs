//! Who is asking, and may they have that identity?
//!
//! Authentication proves which node the caller runs on. Authorization asks
//! the node check whether a workload with the requested identity runs there.
//! Both are traits: the bootstrap-token authenticator and a static node map
//! serve the single-machine case; the config model and the Kubernetes
//! TokenReview plug in behind the same seams.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use futures::future::BoxFuture;
use serde::Deserialize;
use tonic::metadata::MetadataMap;
use ztunnel::identity::Identity;

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

pub trait Authenticator: Send + Sync + 'static {
    /// Why authentication failed is returned as a message for the caller.
    /// Asynchronous: the Kubernetes authenticator asks the API server.
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, String>>;
}

/// The bearer token of a request, or why there is none.
pub fn bearer(metadata: &MetadataMap) -> Result<&str, String> {
    let header = metadata
        .get("authorization")
        .ok_or("no authorization header (expected \"Bearer <token>\")")?
        .to_str()
        .map_err(|_| "authorization header is not ASCII")?;
    Ok(header
        .strip_prefix("Bearer ")
        .ok_or("authorization header is not a Bearer token")?)
}

pub trait NodeAuthorizer: Send + Sync + 'static {
    /// True when a workload with `identity` runs on `node`.
    fn workload_on_node(&self, node: &str, identity: &Identity) -> bool;
}

/// Per-node bootstrap tokens, handed to each node's ztunnel out of band.
#[derive(Debug, Clone, Default)]
pub struct BootstrapTokens {
    by_token: HashMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
}

impl BootstrapTokens {
    /// `node -> token` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut by_token = HashMap::new();
        for (node, token) in pairs {
            if token.len() < 16 {
                return Err(format!(
                    "token for node {node:?} is shorter than 16 characters"
                ));
            }
            if let Some(other) = by_token.insert(token, node.clone()) {
                return Err(format!("nodes {other:?} and {node:?} share a token"));
            }
        }
        Ok(BootstrapTokens { by_token })
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
        Self::new(map).map_err(err)
    }
}

impl Authenticator for BootstrapTokens {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, String>> {
        Box::pin(std::future::ready(self.check(metadata)))
    }
}

impl BootstrapTokens {
    fn check(&self, metadata: &MetadataMap) -> Result<Caller, String> {
        let token = bearer(metadata)?;
        // Compare against every token so timing does not reveal a prefix.
        let mut found = None;
        for (known, node) in &self.by_token {
            if constant_time_eq(known.as_bytes(), token.as_bytes()) {
                found = Some(node);
            }
        }
        found
            .map(|node| Caller::node(node.clone()))
            .ok_or_else(|| "unknown bootstrap token".to_string())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
