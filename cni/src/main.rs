//! `mesh-cni`: the CNI plugin binary the kubelet runs (see the library).

use std::io::Read;
use std::process::ExitCode;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
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
            eprintln!("mesh-cni: {e}");
            ExitCode::FAILURE
        }
    }
}
