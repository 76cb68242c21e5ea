//! Where the node agent learns pods' and namespaces' labels: the API server
//! (a watch of the pods on its node, `spec.nodeName=<node>`, and of every
//! namespace), or, in the lab, a directory of the same objects as YAML (the
//! lab's stand-in for the API server, which istiod-lite reads too). Both
//! give one [`View`], which [`crate::agent::reconcile`] acts on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use tokio::sync::Notify;

use crate::enroll::PodView;

/// The pods on this node and every namespace's labels, as last seen.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub pods: Vec<PodView>,
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("API server credentials: {0}")]
    Credentials(String),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Where the view comes from.
pub enum Source {
    /// The API server, through reflectors the watch keeps current.
    Kube {
        node: String,
        pods: Store<Pod>,
        namespaces: Store<Namespace>,
        /// Whether a watch failed and nothing has come from it since: its
        /// store is then what it was (an outage, a backoff), however old.
        behind: [Arc<AtomicBool>; 2],
    },
    /// A directory of Pod and Namespace objects (the lab), re-read on
    /// every look.
    Dir { node: String, dir: PathBuf },
}

impl Source {
    pub fn node(&self) -> &str {
        match self {
            Source::Kube { node, .. } | Source::Dir { node, .. } => node,
        }
    }

    /// The source `w` names, started; None for no watch.
    pub async fn start(
        w: &crate::agent::Watch,
        changed: Arc<Notify>,
    ) -> Result<Option<Source>, WatchError> {
        use crate::agent::Watch;
        Ok(match w {
            Watch::None => None,
            Watch::Kube { node } => Some(Source::kube(node.clone(), changed).await?),
            Watch::Dir { node, dir } => Some(Source::Dir {
                node: node.clone(),
                dir: dir.clone(),
            }),
        })
    }

    /// Starts watching the API server; `changed` is notified on every event.
    pub async fn kube(node: String, changed: Arc<Notify>) -> Result<Source, WatchError> {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| WatchError::Credentials(e.to_string()))?;
        let (pods, pw) = reflector::store::<Pod>();
        let (namespaces, nw) = reflector::store::<Namespace>();
        let on_node = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let behind = [
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        ];
        tokio::spawn(crate::agent::follow::follow(
            "pods",
            kube::Api::<Pod>::all(client.clone()),
            on_node,
            pw,
            behind[0].clone(),
            changed.clone(),
        ));
        tokio::spawn(crate::agent::follow::follow(
            "namespaces",
            kube::Api::<Namespace>::all(client),
            Default::default(),
            nw,
            behind[1].clone(),
            changed,
        ));
        Ok(Source::Kube {
            node,
            pods,
            namespaces,
            behind,
        })
    }

    /// Whether what the source shows may be stale: a watch failed and
    /// nothing has come from it since. A folder never is.
    pub fn behind(&self) -> bool {
        match self {
            Source::Kube { behind, .. } => behind.iter().any(|b| b.load(Ordering::Acquire)),
            Source::Dir { .. } => false,
        }
    }

    /// What is known now; None until the watch has listed everything once
    /// (acting on half a list could release pods whose namespace is not in
    /// yet).
    pub async fn view(&self) -> Result<Option<View>, WatchError> {
        match self {
            Source::Kube {
                node,
                pods,
                namespaces,
                ..
            } => {
                let ready = matches!(pods.wait_until_ready().now_or_never(), Some(Ok(())))
                    && matches!(namespaces.wait_until_ready().now_or_never(), Some(Ok(())));
                if !ready {
                    return Ok(None);
                }
                let mut v = View::default();
                for ns in namespaces.state() {
                    if let Some(name) = &ns.metadata.name {
                        v.namespaces
                            .insert(name.clone(), ns.metadata.labels.clone().unwrap_or_default());
                    }
                }
                v.pods = pods
                    .state()
                    .iter()
                    .filter_map(|p| PodView::from_pod(p))
                    .filter(|p| &p.node == node)
                    .collect();
                Ok(Some(v))
            }
            Source::Dir { node, dir } => {
                let (node, dir) = (node.clone(), dir.clone());
                tokio::task::spawn_blocking(move || read_dir(&node, &dir).map(Some))
                    .await
                    .unwrap_or_else(|e| {
                        Err(WatchError::Read {
                            path: "objects directory".into(),
                            source: std::io::Error::other(e),
                        })
                    })
            }
        }
    }
}

use futures::FutureExt;

/// Reads the Pod and Namespace objects in `dir` (one or more YAML
/// documents per file; other kinds and unreadable documents are skipped).
fn read_dir(node: &str, dir: &std::path::Path) -> Result<View, WatchError> {
    use serde::Deserialize;
    let err = |p: &std::path::Path, source| WatchError::Read {
        path: p.display().to_string(),
        source,
    };
    let mut v = View::default();
    for e in std::fs::read_dir(dir).map_err(|e| err(dir, e))?.flatten() {
        let path = e.path();
        if !matches!(
            path.extension().and_then(|x| x.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        // Written by rename: a file that vanished in between is skipped.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if !text.contains("Pod") && !text.contains("Namespace") {
            continue;
        }
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let Ok(value) = serde_json::Value::deserialize(doc) else {
                continue;
            };
            match value["kind"].as_str() {
                Some("Pod") => {
                    if let Some(p) = serde_json::from_value::<Pod>(value)
                        .ok()
                        .as_ref()
                        .and_then(PodView::from_pod)
                        .filter(|p| p.node == node)
                    {
                        v.pods.push(p);
                    }
                }
                Some("Namespace") => {
                    if let Ok(ns) = serde_json::from_value::<Namespace>(value)
                        && let Some(name) = ns.metadata.name
                    {
                        v.namespaces
                            .insert(name, ns.metadata.labels.unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_gives_this_nodes_pods_and_every_namespace() {
        let d = tempfile::tempdir().unwrap();
        let pod = |name: &str, node: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, uid: u-{name}}}\nspec: {{nodeName: {node}, containers: []}}\nstatus: {{phase: Running, podIP: 10.1.1.5}}\n"
            )
        };
        std::fs::write(d.path().join("pod-a.yaml"), pod("a", "node-1")).unwrap();
        std::fs::write(d.path().join("pod-b.yaml"), pod("b", "node-2")).unwrap();
        std::fs::write(
            d.path().join("namespace-shop.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("policy.yaml"),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\n",
        )
        .unwrap();
        let v = read_dir("node-1", d.path()).unwrap();
        assert_eq!(v.pods.len(), 1);
        assert_eq!(v.pods[0].uid, "u-a");
        assert_eq!(v.namespaces["shop"]["istio.io/dataplane-mode"], "ambient");
    }
}
