//! The node agent: serves ZDS to the node's ztunnel and captures pods.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use mesh_cni::agent::{self, AgentConfig, PodSpec, Request, Watch};
use mesh_cni::find::Finder;
use mesh_cni::uninstalling::Check;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Node agent: hands captured pods to the ztunnel (ZDS) and installs their redirect rules"
)]
struct Args {
    /// The agent's control socket.
    #[arg(
        long,
        env = "ZTUNNEL_CNI_CONTROL",
        default_value = "/var/run/ztunnel/cni-control.sock"
    )]
    control_socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the agent.
    Serve {
        /// In a directory of its own (the ztunnels mount it read only), apart
        /// from the control socket and the state file.
        #[arg(long, default_value = "/var/run/ztunnel/zds/ztunnel.sock")]
        zds_socket: PathBuf,
        #[arg(long, default_value = "/var/run/ztunnel/cni-pods.json")]
        state_file: PathBuf,
        /// Redirect pods' DNS to the ztunnel (15053).
        #[arg(long)]
        dns: bool,
        /// This node's name: with it the agent watches enrollment (pods of
        /// this node, namespaces) and captures or releases running pods.
        #[arg(long, env = "NODE_NAME")]
        node: Option<String>,
        /// Watch a directory of Pod and Namespace YAML instead of the API
        /// server (the lab).
        #[arg(long, requires = "node")]
        objects_dir: Option<PathBuf>,
        /// The node's netns, where the kubelet's probes are SNATed to
        /// 169.254.7.127 (`/proc/self/ns/net` when the agent runs in it).
        /// Unset: no probe SNAT.
        #[arg(long)]
        host_netns: Option<String>,
        /// The node's /proc, scanned for running pods' netns.
        #[arg(long, default_value = "/proc")]
        proc_dir: PathBuf,
        /// Where the runtime pins pods' netns.
        #[arg(long, default_value = "/var/run/netns")]
        netns_dir: PathBuf,
        /// The DaemonSet running this agent: when it is gone or being
        /// deleted at a stop (an uninstall, not a roll), the node's probe
        /// tables are removed. Unset: a stop always keeps them.
        #[arg(long)]
        daemonset: Option<String>,
        /// The DaemonSet's namespace.
        #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
        daemonset_namespace: String,
    },
    /// Capture a pod (what the CNI plugin calls on ADD).
    Add {
        #[arg(long)]
        uid: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        namespace: String,
        #[arg(long, default_value = "default")]
        service_account: String,
        /// Path of the pod's network namespace.
        #[arg(long)]
        netns: String,
    },
    /// Release a pod as the CNI DEL does: all its rules go, and for 90 s
    /// the watch does not capture it again (an `add` can).
    Del {
        #[arg(long)]
        uid: String,
    },
    /// List captured pods.
    List,
    /// Reconcile enrollment now; prints the captured pods.
    Sync,
}

#[tokio::main]
async fn main() {
    mesh_core::init_logging();
    mesh_core::tls::install_default_provider();
    let a = Args::parse();
    let req = match a.cmd {
        Cmd::Serve {
            zds_socket,
            state_file,
            dns,
            node,
            objects_dir,
            host_netns,
            proc_dir,
            netns_dir,
            daemonset,
            daemonset_namespace,
        } => {
            // The lab's objects stand in for the API server here too.
            let uninstall = match (daemonset, &objects_dir) {
                (None, _) => Check::None,
                (Some(daemonset), Some(dir)) => Check::Dir {
                    dir: dir.clone(),
                    namespace: daemonset_namespace,
                    daemonset,
                },
                (Some(daemonset), None) => Check::Kube {
                    namespace: daemonset_namespace,
                    daemonset,
                },
            };
            let watch = match (node, objects_dir) {
                (Some(node), Some(dir)) => Watch::Dir { node, dir },
                (Some(node), None) => Watch::Kube { node },
                (None, _) => Watch::None,
            };
            let cfg = AgentConfig {
                zds_socket,
                control_socket: a.control_socket,
                state_file,
                dns,
                host_netns,
                finder: Finder {
                    proc_dir,
                    pinned_dir: netns_dir,
                },
                watch,
                uninstall,
            };
            let stop = CancellationToken::new();
            let s = stop.clone();
            tokio::spawn(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(_) => return,
                    };
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
                s.cancel();
            });
            if let Err(e) = agent::run(cfg, stop).await {
                tracing::error!("{e}");
                std::process::exit(1);
            }
            return;
        }
        Cmd::Add {
            uid,
            name,
            namespace,
            service_account,
            netns,
        } => Request::Add(PodSpec {
            uid,
            name,
            namespace,
            service_account,
            netns,
            ips: Vec::new(),
            bypass_inbound: false,
        }),
        Cmd::Del { uid } => Request::Del { uid },
        Cmd::List => Request::List,
        Cmd::Sync => Request::Sync,
    };
    match agent::call(&a.control_socket, &req).await {
        Ok(v) => println!("{v}"),
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(1);
        }
    }
}
