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
}

fn main() {
    // Before the runtime's threads exist (see tune_heap).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    ztunnel::app::tune_heap();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    runtime.block_on(run());
}

async fn run() {
    ztunnel::init_logging();
    let args = Args::parse();
    let cfg = match ztunnel::config::Config::load_for_node(&args.config, args.node.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(2);
        }
    };

    if let Err(e) = ztunnel::app::run(cfg).await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
