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
    let mut cfg = match ztunnel::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            std::process::exit(2);
        }
    };
    if let Some(node) = args.node.filter(|n| !n.is_empty()) {
        cfg.node = node;
    }
    if cfg.node.is_empty() {
        tracing::error!(
            "{}: no node name: set `node` in the config, or pass --node / NODE_NAME",
            args.config.display()
        );
        std::process::exit(2);
    }
    if let Err(e) = ztunnel::app::run(cfg).await {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}
