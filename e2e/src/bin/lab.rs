//! `lab`: a multi-node mesh on this machine, from ordinary Kubernetes YAML.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use e2e::lab::{Lab, read_docs};

#[derive(Debug, Parser)]
#[command(about = "A mesh lab of network-namespace nodes and pods")]
struct Args {
    /// Where the lab keeps its state, config and logs.
    #[arg(long, global = true, default_value = "/tmp/mesh-lab")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build the network, start the mesh, apply the manifests.
    Up {
        /// A YAML file or a folder of them.
        manifests: PathBuf,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Lab number (its addresses are 10.(100+id).0.0/16).
        #[arg(long, default_value_t = 1)]
        id: u8,
    },
    /// Remove everything the lab made (by its state file; without one, by
    /// the lab number: what a crashed lab left).
    Down {
        #[arg(long, default_value_t = 1)]
        id: u8,
    },
    /// Run a command inside a pod (namespace/name).
    Exec {
        pod: String,
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// Apply more YAML: label changes and policies take effect live.
    Apply { file: PathBuf },
    /// Show nodes, pods and services.
    Status,
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("lab: {e}");
    std::process::exit(1)
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        fail(
            "the lab creates network namespaces and needs root (run it with sudo, or as root in a VM or container)",
        );
    }
    match a.cmd {
        Cmd::Up {
            manifests,
            nodes,
            id,
        } => {
            if Lab::state_file(&a.dir).exists() {
                fail(format!(
                    "a lab already exists at {}; run `lab down` first",
                    a.dir.display()
                ));
            }
            let docs = read_docs(&manifests).unwrap_or_else(|e| fail(e));
            let mut lab = Lab::create(&a.dir, id, nodes).unwrap_or_else(|e| fail(e));
            let r = async {
                lab.start_mesh().await?;
                lab.apply(docs).await
            }
            .await;
            if let Err(e) = r {
                lab.down();
                fail(e);
            }
            println!(
                "lab up at {} ({} nodes, {} pods)",
                a.dir.display(),
                nodes,
                lab.state.pods.len()
            );
        }
        Cmd::Down { id } => {
            match Lab::load(&a.dir) {
                Ok(mut lab) => lab.down(),
                Err(_) => e2e::lab::sweep(id),
            }
            println!("lab down");
        }
        Cmd::Exec { pod, cmd } => {
            let lab = Lab::load(&a.dir).unwrap_or_else(|e| fail(e));
            let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
            let out = lab.exec(&pod, &args).unwrap_or_else(|e| fail(e));
            print!("{}", String::from_utf8_lossy(&out.stdout));
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(out.status.code().unwrap_or(1));
        }
        Cmd::Apply { file } => {
            let mut lab = Lab::load(&a.dir).unwrap_or_else(|e| fail(e));
            let docs = read_docs(&file).unwrap_or_else(|e| fail(e));
            lab.apply(docs).await.unwrap_or_else(|e| fail(e));
            println!("applied {}", file.display());
        }
        Cmd::Status => {
            let lab = Lab::load(&a.dir).unwrap_or_else(|e| fail(e));
            for n in &lab.state.nodes {
                println!("node {} {} (netns {})", n.name, n.ip, n.netns);
            }
            for (k, p) in &lab.state.pods {
                println!(
                    "pod {k:<28} {:<15} {} {}",
                    p.ip,
                    p.node,
                    if p.captured { "HBONE" } else { "TCP" }
                );
            }
            for (k, s) in &lab.state.services {
                println!("service {k:<24} {} ports {:?}", s.vip, s.ports);
            }
        }
    }
}
