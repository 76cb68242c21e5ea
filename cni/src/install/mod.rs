//! `mesh-cni install`: the node agent DaemonSet's `install-cni` container.
//!
//! It puts the plugin on the node and keeps it there: the binary in the
//! host's CNI bin dir, a kubeconfig for it (rewritten as the projected
//! service account token rotates), and our entry chained into the primary
//! CNI config, re-checked every few seconds because the network plugin's
//! own daemon may rewrite that file and drop us. On SIGTERM it takes the
//! plugin out only when the DaemonSet itself is going away (see
//! [`uninstall`]).
//!
//! The host paths are mounted into the container (`/host/...`); the entry's
//! own paths are the host's, since the runtime runs the plugin on the host.

pub mod chain;
pub mod files;
pub mod json;
pub mod uninstall;

use std::path::PathBuf;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

pub use chain::{Chain, Entry};
pub use uninstall::Decision;

use json::Json;

/// What can go wrong while installing; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid JSON, so it is left untouched: {source}", path.display())]
    BadJson {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot chain mesh-cni into {}, so it is left untouched: {reason}", path.display())]
    Unchainable {
        path: PathBuf,
        reason: chain::Unchainable,
    },
    #[error("encoding {}: {source}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("the service account token {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error("invalid --{flag}: {reason}")]
    Flag { flag: &'static str, reason: String },
}

/// The installer's flags. Host directories are as mounted in the container.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    bin_name = "mesh-cni install",
    about = "Installs the mesh-cni plugin on this node and keeps it chained"
)]
pub struct Args {
    /// The host's CNI bin dir, as mounted here.
    #[arg(long, default_value = "/host/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted here.
    #[arg(long, default_value = "/host/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The same conf dir as the host sees it (for paths inside the entry).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub host_cni_conf_dir: PathBuf,
    /// The plugin to install [default: this executable].
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// Where the service account's token and CA are mounted.
    #[arg(long, default_value = "/var/run/secrets/kubernetes.io/serviceaccount")]
    pub sa_dir: PathBuf,
    /// The DaemonSet whose deletion means uninstall.
    #[arg(long, default_value = "node-agent")]
    pub daemonset: String,
    /// The DaemonSet's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub namespace: String,
    /// How often to re-check the entry and the token (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub check_interval: Duration,
    /// The API server address the plugin's kubeconfig points at.
    #[arg(long, env = "KUBERNETES_SERVICE_HOST")]
    pub kube_host: String,
    /// The API server port the plugin's kubeconfig points at.
    #[arg(long, env = "KUBERNETES_SERVICE_PORT", default_value = "443")]
    pub kube_port: u16,
    /// The node agent's control socket, for the entry [default: NetConf's].
    #[arg(long)]
    pub agent_socket: Option<PathBuf>,
    /// Namespaces the plugin never captures, comma-separated [default: NetConf's].
    #[arg(long, value_delimiter = ',')]
    pub exclude_namespaces: Option<Vec<String>>,
    /// Seconds the plugin waits for the node agent per pod [default: NetConf's].
    #[arg(long)]
    pub timeout_secs: Option<u64>,
}

/// A duration flag that does not read as one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration like 5s or 500ms")]
    Syntax(String),
    #[error("must be more than zero")]
    Zero,
}

/// Parses "5s", "500ms", "2m" or plain seconds.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    let (digits, unit): (&str, fn(u64) -> Duration) = if let Some(n) = text.strip_suffix("ms") {
        (n, Duration::from_millis)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, Duration::from_secs)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, |m| Duration::from_secs(m.saturating_mul(60)))
    } else {
        (text, Duration::from_secs)
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| DurationError::Syntax(text.to_string()))?;
    if n == 0 {
        return Err(DurationError::Zero);
    }
    Ok(unit(n))
}

/// Everything the installer needs, resolved from [`Args`].
#[derive(Debug, Clone)]
pub struct InstallConfig {
    pub cni_bin_dir: PathBuf,
    pub cni_conf_dir: PathBuf,
    pub host_cni_conf_dir: PathBuf,
    pub plugin_binary: PathBuf,
    pub sa_dir: PathBuf,
    /// The API server URL written into the plugin's kubeconfig.
    pub server: String,
    pub namespace: String,
    pub daemonset: String,
    /// Between checks once everything is in place.
    pub check_interval: Duration,
    /// Between attempts while something is missing (no primary config yet).
    pub retry_interval: Duration,
    /// How long shutdown waits for the API server's answer.
    pub api_timeout: Duration,
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub timeout_secs: u64,
}

impl Args {
    pub fn into_config(self) -> Result<InstallConfig, InstallError> {
        let plugin_binary = match self.plugin_binary {
            Some(path) => path,
            None => std::env::current_exe().map_err(|e| InstallError::Flag {
                flag: "plugin-binary",
                reason: format!("no default, the running executable is unknown: {e}"),
            })?,
        };
        if self.kube_host.is_empty() {
            return Err(InstallError::Flag {
                flag: "kube-host",
                reason: "empty (is KUBERNETES_SERVICE_HOST set?)".into(),
            });
        }
        // By default kube-system and the mesh's own namespace (this
        // DaemonSet's, wherever it was installed).
        let exclude_namespaces = self
            .exclude_namespaces
            .unwrap_or_else(|| vec!["kube-system".into(), self.namespace.clone()]);
        Ok(InstallConfig {
            cni_bin_dir: self.cni_bin_dir,
            cni_conf_dir: self.cni_conf_dir,
            host_cni_conf_dir: self.host_cni_conf_dir,
            plugin_binary,
            sa_dir: self.sa_dir,
            server: files::server_url(&self.kube_host, &self.kube_port.to_string()),
            namespace: self.namespace,
            daemonset: self.daemonset,
            check_interval: self.check_interval,
            retry_interval: Duration::from_secs(1),
            // Well inside the pod's 35s termination grace period.
            api_timeout: Duration::from_secs(10),
            agent_socket: self.agent_socket.unwrap_or_else(crate::default_agent),
            exclude_namespaces,
            timeout_secs: self.timeout_secs.unwrap_or_else(crate::default_timeout),
        })
    }
}

impl InstallConfig {
    /// The kubeconfig as this container writes it.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.cni_conf_dir.join(files::KUBECONFIG_NAME)
    }

    /// The installed plugin as this container writes it.
    pub fn binary_path(&self) -> PathBuf {
        self.cni_bin_dir.join(chain::PLUGIN_TYPE)
    }

    /// Our conflist entry, with the host's view of the kubeconfig path.
    pub fn entry(&self) -> Entry {
        Entry {
            kubeconfig: self.host_cni_conf_dir.join(files::KUBECONFIG_NAME),
            agent_socket: self.agent_socket.clone(),
            exclude_namespaces: self.exclude_namespaces.clone(),
            timeout_secs: self.timeout_secs,
        }
    }
}

/// Installs, keeps the plugin in place until `stop`, then decides (asking
/// the API server through `api`) whether to uninstall, and does so.
pub async fn run(
    cfg: &InstallConfig,
    api: Option<kube::Client>,
    stop: CancellationToken,
) -> Result<Decision, InstallError> {
    let mut keeper = Keeper::new(cfg)?;
    loop {
        let wait = if keeper.pass() {
            cfg.check_interval
        } else {
            cfg.retry_interval
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    let decision = uninstall::decide(
        api.as_ref(),
        &cfg.namespace,
        &cfg.daemonset,
        cfg.api_timeout,
    )
    .await;
    match &decision {
        Decision::Uninstall(why) => {
            info!("uninstalling mesh-cni: {why}");
            uninstall::uninstall(cfg);
        }
        Decision::Keep(why) => info!("leaving mesh-cni in place: {why}"),
    }
    Ok(decision)
}

/// Brings the node to the installed state, one pass at a time.
struct Keeper<'a> {
    cfg: &'a InstallConfig,
    entry: Json,
    binary_copied: bool,
    in_place: bool,
    /// The last problem logged: a retry every second must not flood the
    /// log with the same line, so each problem is logged when it starts.
    last_problem: Option<String>,
}

impl<'a> Keeper<'a> {
    fn new(cfg: &'a InstallConfig) -> Result<Self, InstallError> {
        Ok(Keeper {
            cfg,
            entry: cfg.entry().to_json()?,
            binary_copied: false,
            in_place: false,
            last_problem: None,
        })
    }

    /// One pass; whether everything is in place.
    fn pass(&mut self) -> bool {
        let result = self.step();
        self.in_place = match result {
            Ok(true) => {
                if !self.in_place {
                    info!(conf_dir = %self.cfg.cni_conf_dir.display(), "mesh-cni is in place");
                }
                self.last_problem = None;
                true
            }
            Ok(false) => {
                let dir = self.cfg.cni_conf_dir.display();
                let waiting = format!("waiting for the node's primary CNI config in {dir}");
                self.report(waiting, false);
                false
            }
            Err(e) => {
                self.report(e.to_string(), true);
                false
            }
        };
        self.in_place
    }

    /// Binary, then kubeconfig, then the entry: in that order, so the
    /// entry never sends the runtime to a plugin that cannot run.
    fn step(&mut self) -> Result<bool, InstallError> {
        self.ensure_binary()?;
        let kubeconfig = self.cfg.kubeconfig_path();
        if files::ensure_kubeconfig(&self.cfg.server, &self.cfg.sa_dir, &kubeconfig)? {
            info!(file = %kubeconfig.display(), "wrote the plugin's kubeconfig");
        }
        match chain::ensure(&self.cfg.cni_conf_dir, &self.entry)? {
            Chain::NoPrimary => return Ok(false),
            Chain::InPlace(_) => {}
            Chain::Written(path) => info!(file = %path.display(), "chained mesh-cni"),
            Chain::Converted { from, to } => info!(
                from = %from.display(),
                to = %to.display(),
                "converted the single-plugin config to a conflist and chained mesh-cni"
            ),
        }
        Ok(true)
    }

    /// Copies once per start (a new image brings a new binary), and again
    /// only if someone removed it; re-reading megabytes every pass would
    /// be waste.
    fn ensure_binary(&mut self) -> Result<(), InstallError> {
        let dst = self.cfg.binary_path();
        if self.binary_copied && dst.exists() {
            return Ok(());
        }
        files::install_binary(&self.cfg.plugin_binary, &dst)?;
        self.binary_copied = true;
        info!(file = %dst.display(), "installed the plugin binary");
        Ok(())
    }

    /// Logs a problem when it starts; waiting for the network plugin to
    /// be installed is normal on a new node, not an error.
    fn report(&mut self, problem: String, is_error: bool) {
        if self.last_problem.as_deref() == Some(problem.as_str()) {
            return;
        }
        if is_error {
            error!("{problem}; retrying");
        } else {
            info!("{problem}");
        }
        self.last_problem = Some(problem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn flags_default_to_the_daemonset_contract() {
        let args = Args::try_parse_from([
            "install",
            "--kube-host=fd00::1",
            "--kube-port=6443",
            "--plugin-binary=/usr/local/bin/mesh-cni",
        ])
        .unwrap();
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.cni_bin_dir, PathBuf::from("/host/opt/cni/bin"));
        assert_eq!(cfg.cni_conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(cfg.check_interval, Duration::from_secs(5));
        assert_eq!(cfg.server, "https://[fd00::1]:6443");
        assert_eq!(
            cfg.kubeconfig_path(),
            PathBuf::from("/host/etc/cni/net.d/mesh-cni-kubeconfig")
        );
        assert_eq!(
            cfg.binary_path(),
            PathBuf::from("/host/opt/cni/bin/mesh-cni")
        );
        // The entry points at the host's view of the conf dir.
        assert_eq!(
            cfg.entry().kubeconfig,
            PathBuf::from("/etc/cni/net.d/mesh-cni-kubeconfig")
        );
        assert_eq!(cfg.entry().exclude_namespaces, crate::default_excluded());
        assert_eq!(cfg.daemonset, "node-agent");
        let args = Args::try_parse_from([
            "install",
            "--kube-host=10.96.0.1",
            "--exclude-namespaces=a,b",
            "--check-interval=1s",
        ])
        .unwrap();
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.exclude_namespaces, ["a", "b"]);
        // Installed in another namespace, that one is never captured.
        let args =
            Args::try_parse_from(["install", "--kube-host=10.96.0.1", "--namespace=mesh"]).unwrap();
        let cfg = args.into_config().unwrap();
        assert_eq!(cfg.exclude_namespaces, ["kube-system", "mesh"]);
        // The default plugin binary is this (test) executable.
        assert!(cfg.plugin_binary.exists());
    }
}
