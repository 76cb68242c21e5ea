//! The ztunnel binary.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Per-node L4 mesh proxy: HBONE over mTLS, L4 policy, telemetry"
)]
struct Args {
    /// YAML configuration file.
    #[arg(long, short, env = "ZTUNNEL_CONFIG")]
    config: PathBuf,
    /// The node this ztunnel serves; overrides the config's `node` (a
    /// DaemonSet sets NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node: Option<String>,
    /// The controller's CA address; overrides the config's `ca.address`
    /// (the DaemonSet names istiod-lite in its own namespace).
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// The name the CA's certificate is checked against; overrides
    /// `ca.server_name`.
    #[arg(long, env = "CA_SERVER_NAME")]
    ca_server_name: Option<String>,
    /// The controller's xDS address; overrides `state.xds_address`.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: Option<String>,
    /// Where mesh-wide policies live; overrides `root_namespace`.
    #[arg(long, env = "ROOT_NAMESPACE")]
    root_namespace: Option<String>,
    /// Whether apps see their clients' addresses (true) or their own pod's
    /// (false); overrides `original_source`.
    #[arg(long, env = "ENABLE_ORIG_SRC")]
    original_source: Option<bool>,
}

fn main() {
    // Before the runtime's threads exist (see tune_heap).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    ztunnel::memory::tune_heap();
    mesh_core::init_logging();
    let args = Args::parse();
    // The config first: it says how many threads the runtime gets.
    let over = ztunnel::config::Overrides {
        ca_address: args.ca_address,
        ca_server_name: args.ca_server_name,
        xds_address: args.xds_address,
        root_namespace: args.root_namespace,
        original_source: args.original_source,
    };
    let cfg = match ztunnel::config::Config::load_with(&args.config, args.node.as_deref(), &over) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = match cfg.runtime {
        mesh_core::config::RuntimeKind::WorkStealing => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Some(n) = cfg.worker_threads {
                builder.worker_threads(n);
            }
            builder.enable_all().build()
        }
        mesh_core::config::RuntimeKind::Sharded => {
            let n = cfg
                .worker_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            mesh_core::shards::start(n, std::time::Duration::from_micros(cfg.busy_poll_us))
        }
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(ztunnel::app::run(cfg)) {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
