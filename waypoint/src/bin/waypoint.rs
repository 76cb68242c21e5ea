//! The waypoint binary: `waypoint --config waypoint.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(version, about = "The mesh's per-namespace L7 proxy")]
struct Args {
    /// YAML config (see docs/waypoint.md).
    #[arg(long, env = "WAYPOINT_CONFIG")]
    config: PathBuf,
    /// This replica's pod name; overrides the config's `pod_name` (a
    /// Deployment sets POD_NAME from metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    mesh_core::init_logging();
    let args = Args::parse();
    let cfg = match waypoint::config::Config::load_for_pod(&args.config, args.pod_name.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad config");
            return ExitCode::from(2);
        }
    };

    match waypoint::app::run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "waypoint failed");
            ExitCode::FAILURE
        }
    }
}
