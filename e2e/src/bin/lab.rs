//! `lab`: a multi-node mesh on this machine, from ordinary Kubernetes YAML.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use e2e::lab::{Keeper, Lab, read_docs};

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
    /// Build the network, start the mesh, apply the manifests. With
    /// `--kube`: build the network, start a real Kubernetes control plane
    /// and be the kubelet of its nodes; then drive it with kubectl.
    Up {
        /// A YAML file or a folder of them (not with --kube: there, apply
        /// them with kubectl).
        #[arg(required_unless_present = "kube", conflicts_with = "kube")]
        manifests: Option<PathBuf>,
        /// Be the kubelet of a real API server (docs/install.md, "The lab
        /// as a cluster").
        #[arg(long)]
        kube: bool,
        /// With --kube: the API server's port on 127.0.0.1 (etcd takes
        /// this plus 10000 and 10001).
        #[arg(long, default_value_t = 16443)]
        kube_port: u16,
        /// With --kube: use this running API server instead of starting one.
        #[arg(long, requires = "kube")]
        kubeconfig: Option<PathBuf>,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Lab number (its addresses are 10.(100+id).0.0/16): 1 to 99 are
        /// people's; 100 and up the demo's, the benchmark's and the tests'.
        /// An id another lab holds is refused, never taken over.
        #[arg(long, default_value_t = e2e::lab::DEFAULT_ID)]
        id: u8,
    },
    /// Remove everything the lab made (by its state file; without one, by
    /// the lab number: what a crashed lab left, unless a live lab holds it).
    Down {
        #[arg(long, default_value_t = e2e::lab::DEFAULT_ID)]
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
    /// (internal) A published port's forwarder (the lab's load balancer).
    #[command(hide = true)]
    Forward {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        netns: PathBuf,
        #[arg(long, required = true)]
        to: Vec<std::net::SocketAddr>,
        #[arg(long)]
        port_file: PathBuf,
    },
    /// (internal) The kubelet and controllers of a `--kube` lab.
    #[command(hide = true)]
    Kubelet {
        #[arg(long)]
        kubeconfig: PathBuf,
    },
    /// (internal) Hold the rootless lab's user and mount namespaces.
    #[command(hide = true)]
    Hold,
}

/// Rootless: without root, the lab lives in a user namespace of its own (as
/// rootless container tools do). A holder process keeps that namespace (and
/// a private mount namespace with its own /run/netns) alive; every lab
/// command re-enters it with nsenter, where it is root over its own
/// namespaces and nothing else.
mod rootless {
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    fn holder_pid(dir: &Path) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(dir.join("holder.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    const NO_USERNS: &str = "this kernel does not let unprivileged users create user namespaces \
        (check sysctl user.max_user_namespaces and kernel.unprivileged_userns_clone, or an AppArmor/SELinux \
        restriction); run the lab as root, or enable unprivileged user namespaces";

    /// Why the holder could not be started.
    #[derive(Debug, thiserror::Error)]
    pub enum HolderError {
        #[error("{what}: {source}")]
        Io {
            what: &'static str,
            source: std::io::Error,
        },
        /// It exited before it was ready: most likely no user namespaces
        /// for unprivileged users (its log follows).
        #[error("{NO_USERNS}\n{0}")]
        NoUserns(String),
    }

    fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> HolderError {
        move |source| HolderError::Io { what, source }
    }

    /// Starts the holder for a new lab.
    pub fn start_holder(dir: &Path) -> Result<u32, HolderError> {
        if let Some(pid) = holder_pid(dir) {
            return Ok(pid);
        }
        std::fs::create_dir_all(dir).map_err(io("creating the lab directory"))?;
        let _ = std::fs::remove_file(dir.join("holder.ready"));
        let log =
            std::fs::File::create(dir.join("holder.log")).map_err(io("creating holder.log"))?;
        let exe = std::env::current_exe().map_err(io("finding this executable"))?;
        let child = Command::new("unshare")
            .args([
                "--user",
                "--map-root-user",
                "--net",
                "--mount",
                "--propagation",
                "private",
                "--",
            ])
            .arg(exe)
            .arg("--dir")
            .arg(dir)
            .arg("hold")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("holder.log"))?)
            .stderr(log)
            .spawn()
            .map_err(io("unshare"))?;
        let pid = child.id();
        std::mem::forget(child);
        std::fs::write(dir.join("holder.pid"), pid.to_string())
            .map_err(io("writing holder.pid"))?;
        for _ in 0..100 {
            if dir.join("holder.ready").exists() {
                return Ok(pid);
            }
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let why = std::fs::read_to_string(dir.join("holder.log")).unwrap_or_default();
        Err(HolderError::NoUserns(why.trim().to_string()))
    }

    /// Runs this same command inside the holder's namespaces; returns its exit code.
    pub fn reenter(dir: &Path, pid: Option<u32>) -> i32 {
        let Some(pid) = pid.or_else(|| holder_pid(dir)) else {
            eprintln!("lab: no rootless lab at {} (lab up first)", dir.display());
            return 1;
        };
        let exe = std::env::current_exe().expect("current exe");
        let args: Vec<String> = std::env::args().skip(1).collect();
        let status = Command::new("nsenter")
            // The holder maps our uid to root inside and denies setgroups, so
            // keep our credentials: inside they already are root.
            // Entering a mount namespace resets the working directory;
            // relative paths in the command must still mean what they meant.
            .arg(format!(
                "--wd={}",
                std::env::current_dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|_| "/".into())
            ))
            .args([
                "-t",
                &pid.to_string(),
                "-U",
                "-m",
                "-n",
                "--preserve-credentials",
                "--",
            ])
            .arg(exe)
            .args(args)
            .env("LAB_ROOTLESS_INSIDE", "1")
            .status();
        match status {
            Ok(s) => s.code().unwrap_or(1),
            Err(e) => {
                eprintln!("lab: nsenter: {e}");
                1
            }
        }
    }

    pub fn stop_holder(dir: &Path) {
        if let Some(pid) = holder_pid(dir) {
            // SAFETY: kill(2) on the holder this lab started (its pid file).
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        for f in ["holder.pid", "holder.ready"] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }

    /// The holder itself: a private /run (for /run/netns), then wait.
    pub fn hold(dir: &Path) -> ! {
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs", "/run"])
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            eprintln!("cannot mount a private /run inside the user namespace");
            std::process::exit(1);
        }
        let _ = std::fs::create_dir_all("/run/netns");
        let _ = std::fs::write(dir.join("holder.ready"), "");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// `lab up --kube`: a control plane (unless given one), the network, the
/// kubelet. Whatever was started is stopped again when a step fails.
fn kube_up(dir: &std::path::Path, nodes: usize, id: u8, port: u16, given: Option<PathBuf>) {
    use e2e::kubelet;
    if Lab::state_file(dir).exists() {
        fail(format!(
            "a lab already exists at {}; run `lab down` first",
            dir.display()
        ));
    }
    let script = kubelet::plane_script();
    let plane_dir = dir.join("kube/plane");
    let (kubeconfig, plane) = match given {
        Some(k) => (k, None),
        None => {
            let _ = std::fs::create_dir_all(&plane_dir);
            // A fresh API server each time (the unpacked server binary is kept).
            let _ = std::fs::remove_dir_all(plane_dir.join("etcd-data"));
            match kubelet::plane_up(&script, &plane_dir, port) {
                Ok(k) => (
                    k,
                    Some((
                        script.display().to_string(),
                        plane_dir.display().to_string(),
                    )),
                ),
                Err(e) => {
                    kubelet::plane_down(&script, &plane_dir);
                    fail(e)
                }
            }
        }
    };
    let kubeconfig = std::fs::canonicalize(&kubeconfig).unwrap_or(kubeconfig);
    let mut lab = match Lab::create_kept(dir, id, nodes, Keeper::Command) {
        Ok(l) => l,
        Err(e) => {
            if plane.is_some() {
                kubelet::plane_down(&script, &plane_dir);
            }
            fail(e)
        }
    };
    lab.state.kube = Some(e2e::lab::KubeState {
        kubeconfig: kubeconfig.display().to_string(),
        plane,
        ..Default::default()
    });
    let started = lab
        .save()
        .map_err(|e| e.to_string())
        .and_then(|()| kubelet::start(&mut lab, &kubeconfig).map_err(|e| e.to_string()));
    if let Err(e) = started {
        lab.down();
        fail(e);
    }
    println!(
        "lab up at {} ({nodes} nodes), the kubelet of {}
export KUBECONFIG={}",
        dir.display(),
        kubeconfig.display(),
        kubeconfig.display()
    );
}

fn fail(e: impl std::fmt::Display) -> ! {
    eprintln!("lab: {e}");
    std::process::exit(1)
}

#[tokio::main]
async fn main() {
    let a = Args::parse();
    if let Cmd::Hold = a.cmd {
        rootless::hold(&a.dir);
    }
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && std::env::var_os("LAB_ROOTLESS_INSIDE").is_none() {
        if matches!(a.cmd, Cmd::Up { kube: true, .. } | Cmd::Kubelet { .. }) {
            fail(
                "lab up --kube needs root: its containers bind-mount their volumes, and it runs a control plane",
            );
        }
        let code = match &a.cmd {
            Cmd::Up { .. } => match rootless::start_holder(&a.dir) {
                Ok(pid) => {
                    let code = rootless::reenter(&a.dir, Some(pid));
                    if code != 0 {
                        rootless::stop_holder(&a.dir);
                    }
                    code
                }
                Err(e) => fail(e),
            },
            Cmd::Down { .. } => {
                let code = rootless::reenter(&a.dir, None);
                rootless::stop_holder(&a.dir);
                code
            }
            _ => rootless::reenter(&a.dir, None),
        };
        std::process::exit(code);
    }
    match a.cmd {
        Cmd::Up {
            kube: true,
            nodes,
            id,
            kube_port,
            kubeconfig,
            ..
        } => kube_up(&a.dir, nodes, id, kube_port, kubeconfig),
        Cmd::Kubelet { kubeconfig } => {
            mesh_core::init_logging();
            let run = async {
                let k = e2e::kubelet::Kubelet::new(&a.dir, &kubeconfig).await?;
                k.run().await
            };
            if let Err(e) = run.await {
                fail(e);
            }
        }
        Cmd::Up {
            manifests,
            nodes,
            id,
            ..
        } => {
            let Some(manifests) = manifests else {
                fail("no manifests given");
            };
            if Lab::state_file(&a.dir).exists() {
                fail(format!(
                    "a lab already exists at {}; run `lab down` first",
                    a.dir.display()
                ));
            }
            let docs = read_docs(&manifests).unwrap_or_else(|e| fail(e));
            // The lab outlives this command: only `lab down` ends it.
            let mut lab =
                Lab::create_kept(&a.dir, id, nodes, Keeper::Command).unwrap_or_else(|e| fail(e));
            lab.state.ztunnel_extra = e2e::lab::ztunnel_extra_from_env();
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
                // A crashed lab's leftovers, unless a live lab holds the id.
                Err(_) => e2e::lab::sweep_unheld(id).unwrap_or_else(|e| fail(e)),
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
        Cmd::Forward {
            listen,
            netns,
            to,
            port_file,
        } => {
            if let Err(e) = e2e::lab::forward(&listen, &netns, &to, &port_file).await {
                fail(e);
            }
        }
        Cmd::Hold => unreachable!("handled above"),
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
            for (k, a) in &lab.state.published {
                println!("published {k:<22} on {a}");
            }
        }
    }
}
