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

#[tokio::main]
async fn main() {
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
