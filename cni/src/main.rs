//! `mesh-cni`: the CNI plugin binary the kubelet runs (see the library), and,
//! as `mesh-cni install`, the DaemonSet container that installs it.

use std::io::Read;
use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut args = std::env::args_os();
    // The runtime runs the plugin with no arguments; only we pass one.
    if args.nth(1).is_some_and(|a| a == "install") {
        // `install` stands in for the program name, as clap expects.
        let args = mesh_cni::install::Args::parse_from(std::env::args_os().skip(1));
        return install(args).await;
    }
    plugin().await
}

/// One CNI command, driven by `CNI_COMMAND` and stdin.
async fn plugin() -> ExitCode {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let env = mesh_cni::Env {
        command: var("CNI_COMMAND"),
        netns: var("CNI_NETNS"),
        args: var("CNI_ARGS"),
    };
    let mut stdin = String::new();
    if env.command != "VERSION" && std::io::stdin().read_to_string(&mut stdin).is_err() {
        stdin.clear();
    }
    match mesh_cni::run(&env, &stdin).await {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err((e, version)) => {
            // The kubelet shows `msg` in the pod's events.
            print!("{}", e.to_json(&version));
            // Logs go to stderr (stdout is the runtime's), plain or JSON.
            mesh_core::init_logging();
            tracing::error!(command = %env.command, "mesh-cni: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The install-cni container: runs until SIGTERM or SIGINT, then exits 0
/// whether it uninstalled or (a restart or upgrade) left the plugin in place.
async fn install(args: mesh_cni::install::Args) -> ExitCode {
    mesh_core::init_logging();
    mesh_core::tls::install_default_provider();
    let cfg = match args.into_config() {
        Ok(cfg) => cfg,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    if let Err(e) = watch_signals(stop.clone()) {
        tracing::error!("cannot listen for SIGTERM: {e}");
        return ExitCode::FAILURE;
    }
    // Without a client, shutdown keeps the plugin: the safe side.
    let api = match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!("no API client ({e}); a shutdown will leave mesh-cni installed");
            None
        }
    };
    match mesh_cni::install::run(&cfg, api, stop).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

/// Cancels `stop` on the first SIGTERM (the kubelet stopping the pod) or
/// SIGINT (a terminal).
fn watch_signals(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        stop.cancel();
    });
    Ok(())
}
