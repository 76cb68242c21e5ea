//! Which Kubernetes cluster meshctl talks to: the current kubeconfig (as
//! kubectl and istioctl read it: `--kubeconfig`, else `KUBECONFIG`, else
//! `~/.kube/config`), its current context or `--context`, and that
//! context's namespace as the default for namespaced commands.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::source::SourceError;

/// The flags that pick a cluster.
#[derive(Debug, Clone, Default)]
pub struct KubeFlags {
    pub kubeconfig: Option<PathBuf>,
    pub context: Option<String>,
}

impl KubeFlags {
    /// Whether a flag names a cluster (so Kubernetes is the source even
    /// when another would be the default).
    pub fn given(&self) -> bool {
        self.kubeconfig.is_some() || self.context.is_some()
    }
}

/// Whether there is a kubeconfig to read: `--kubeconfig`, `KUBECONFIG`
/// (`env`), or `~/.kube/config` under `home`.
pub fn kubeconfig_present(flags: &KubeFlags, env: Option<&str>, home: Option<&Path>) -> bool {
    if flags.kubeconfig.is_some() {
        return true;
    }
    if let Some(list) = env.filter(|e| !e.is_empty()) {
        return std::env::split_paths(list).any(|p| p.exists());
    }
    home.is_some_and(|h| h.join(".kube/config").exists())
}

/// `kubeconfig_present` for this process.
pub fn kubeconfig_here(flags: &KubeFlags) -> bool {
    let env = std::env::var("KUBECONFIG").ok();
    let home = std::env::var_os("HOME").map(PathBuf::from);
    kubeconfig_present(flags, env.as_deref(), home.as_deref())
}

fn load(flags: &KubeFlags) -> Result<Kubeconfig, SourceError> {
    let read = match &flags.kubeconfig {
        Some(p) => Kubeconfig::read_from(p),
        None => Kubeconfig::read(),
    };
    read.map_err(|e| {
        SourceError::Other(format!(
            "no kubeconfig: {e}\n  check: --kubeconfig FILE, KUBECONFIG or ~/.kube/config, as kubectl uses (or pick another source: --lab DIR, --addr IP:PORT, --file DUMP)"
        ))
    })
}

/// A client for the chosen cluster, and the namespace its context names.
pub async fn client(flags: &KubeFlags) -> Result<(kube::Client, String), SourceError> {
    let kc = load(flags)?;
    let opts = KubeConfigOptions {
        context: flags.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kc, &opts)
        .await
        .map_err(|e| {
            SourceError::Other(format!(
                "kubeconfig: {e}{}",
                flags
                    .context
                    .as_ref()
                    .map(|c| format!("\n  check: `kubectl config get-contexts` lists {c:?}"))
                    .unwrap_or_default()
            ))
        })?;
    let ns = config.default_namespace.clone();
    let client = kube::Client::try_from(config)
        .map_err(|e| SourceError::Other(format!("no Kubernetes client: {e}")))?;
    Ok((client, ns))
}

/// The namespace the chosen context names, when there is a kubeconfig to
/// read and it names one.
pub fn context_namespace(flags: &KubeFlags) -> Option<String> {
    if !kubeconfig_here(flags) {
        return None;
    }
    let kc = load(flags).ok()?;
    let name = flags.context.clone().or(kc.current_context.clone())?;
    kc.contexts
        .iter()
        .find(|c| c.name == name)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| c.namespace.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kubeconfig_is_found_where_kubectl_looks() {
        let dir = tempfile::tempdir().unwrap();
        let none = KubeFlags::default();
        assert!(!kubeconfig_present(&none, None, Some(dir.path())));
        assert!(!kubeconfig_present(&none, Some(""), None));
        std::fs::create_dir(dir.path().join(".kube")).unwrap();
        std::fs::write(dir.path().join(".kube/config"), "").unwrap();
        assert!(kubeconfig_present(&none, None, Some(dir.path())));
        // KUBECONFIG wins over the home file, and must exist.
        let missing = dir.path().join("nope");
        assert!(!kubeconfig_present(
            &none,
            Some(missing.to_str().unwrap()),
            Some(dir.path())
        ));
        let flag = KubeFlags {
            kubeconfig: Some(missing),
            context: None,
        };
        assert!(kubeconfig_present(&flag, None, None));
        assert!(flag.given());
    }

    #[test]
    fn the_context_names_the_default_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kc");
        std::fs::write(
            &p,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"http://127.0.0.1:1\"}}]\nusers: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u, namespace: shop}}, {name: y, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
        )
        .unwrap();
        let mut f = KubeFlags {
            kubeconfig: Some(p),
            context: None,
        };
        assert_eq!(context_namespace(&f).as_deref(), Some("shop"));
        f.context = Some("y".into());
        assert_eq!(context_namespace(&f), None);
    }
}
