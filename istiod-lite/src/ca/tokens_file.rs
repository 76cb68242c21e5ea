//! Folder mode's token file (`--node-tokens`), re-read whenever it changes:
//! pods come and go while the controller runs (the lab adds an ingress
//! gateway pod's own token when it starts the pod), and removing an entry
//! revokes that token from the next call on. A file that no longer loads
//! refuses every caller until it is fixed: no stale token stays good.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tonic::metadata::MetadataMap;
use tracing::{error, info};

use super::auth::{
    AuthConfigError, AuthError, Authenticator, BootstrapTokens, Caller, PodDirectory,
};

/// What identifies one version of the file: inode, size and mtime.
type Stamp = (u64, u64, i64, i64);
/// The tokens as last read (or why they did not load), and from which
/// version of the file.
type Loaded = (Option<Stamp>, Result<Arc<BootstrapTokens>, AuthError>);

pub struct TokensFile {
    path: PathBuf,
    pods: Arc<dyn PodDirectory>,
    current: Mutex<Loaded>,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let m = std::fs::metadata(path)?;
    Ok((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

impl TokensFile {
    /// Loads the file now: one that does not load stops the start.
    pub fn load(path: &Path, pods: Arc<dyn PodDirectory>) -> Result<Self, AuthConfigError> {
        let at = stamp(path).ok();
        let tokens = BootstrapTokens::load(path)?.with_pods(pods.clone());
        Ok(TokensFile {
            path: path.to_path_buf(),
            pods,
            current: Mutex::new((at, Ok(Arc::new(tokens)))),
        })
    }

    /// The tokens as the file is now.
    fn tokens(&self) -> Result<Arc<BootstrapTokens>, AuthError> {
        let now = stamp(&self.path).map_err(|e| e.to_string());
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let now = match now {
            Ok(s) => s,
            Err(e) => {
                if cur.1.is_ok() {
                    error!(path = %self.path.display(), error = %e, "token file unreadable; refusing every caller");
                }
                let why = AuthError::TokenFile(format!("is unreadable: {e}"));
                *cur = (None, Err(why.clone()));
                return Err(why);
            }
        };
        if cur.0 != Some(now) {
            let loaded = BootstrapTokens::load(&self.path)
                .map(|t| Arc::new(t.with_pods(self.pods.clone())))
                .map_err(|e| AuthError::TokenFile(format!("does not load: {e}")));
            match &loaded {
                Ok(t) => {
                    info!(path = %self.path.display(), entries = t.len(), "token file re-read")
                }
                Err(e) => {
                    error!(path = %self.path.display(), error = %e, "refusing every caller until the token file loads")
                }
            }
            *cur = (Some(now), loaded);
        }
        cur.1.clone()
    }
}

impl Authenticator for TokensFile {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(std::future::ready(
            self.tokens().and_then(|t| t.check(metadata)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::auth::PodError;
    use mesh_core::identity::Identity;

    struct OnePod;
    impl PodDirectory for OnePod {
        fn pod_identity(&self, ns: &str, name: &str) -> Result<(String, Identity), PodError> {
            match (ns, name) {
                ("edge", "gw-1") => Ok((
                    "node-a".into(),
                    Identity::new("cluster.local", "edge", "public").map_err(|reason| {
                        PodError::BadAccount {
                            namespace: ns.into(),
                            pod: name.into(),
                            account: "public".into(),
                            reason: Box::new(reason),
                        }
                    })?,
                )),
                _ => Err(PodError::NotRunning(ns.into(), name.into())),
            }
        }
    }

    fn md(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    /// Rewrites the file as the lab does (a new file renamed into place).
    fn write(path: &Path, text: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn pod_tokens_are_the_pods_and_the_file_is_reread_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.yaml");
        write(&path, "node-a: node-a-token-0123456789\n");
        let f = TokensFile::load(&path, Arc::new(OnePod)).unwrap();
        let node = f
            .authenticate(&md("node-a-token-0123456789"))
            .await
            .unwrap();
        assert_eq!(node, Caller::node("node-a"));
        let err = f
            .authenticate(&md("gw-1-token-0123456789"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown"), "{err}");

        // The gateway pod's own token, added while running.
        write(
            &path,
            "node-a: node-a-token-0123456789\nedge/gw-1: gw-1-token-0123456789\nedge/gone: gone-token-0123456789\n",
        );
        let pod = f.authenticate(&md("gw-1-token-0123456789")).await.unwrap();
        assert_eq!(pod.node, "node-a");
        assert_eq!(pod.pod, Some(("edge".into(), "gw-1".into())));
        assert_eq!(
            pod.only.unwrap().to_string(),
            "spiffe://cluster.local/ns/edge/sa/public"
        );
        // A token of a pod the model does not know proves nothing.
        let err = f
            .authenticate(&md("gone-token-0123456789"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("no running pod edge/gone"), "{err}");

        // Removed: revoked. A file that does not load refuses everyone.
        write(&path, "node-a: node-a-token-0123456789\n");
        assert!(f.authenticate(&md("gw-1-token-0123456789")).await.is_err());
        write(&path, "node-a: [not, a, token]\n");
        let err = f
            .authenticate(&md("node-a-token-0123456789"))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not load"), "{err}");
        write(&path, "node-a: node-a-token-0123456789\n");
        assert!(f.authenticate(&md("node-a-token-0123456789")).await.is_ok());
    }

    #[test]
    fn a_holder_is_a_node_or_a_namespace_and_pod() {
        for bad in ["a/b/c", "/pod", "ns/", ""] {
            let err = BootstrapTokens::new([(bad.to_string(), "x".repeat(16))])
                .unwrap_err()
                .to_string();
            assert!(err.contains("neither"), "{bad}: {err}");
        }
    }
}
