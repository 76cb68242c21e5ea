//! The lab's container runtime: a container is a process in its pod's
//! netns, in a mount namespace of its own (the one `ip netns exec` makes,
//! whose mounts never reach the machine's) where its image's programs are
//! bind-mounted on `/usr/local/bin` and each of its volumes on its
//! `mountPath` (recursively, as the kubelet mounts a `hostPath`: the pods'
//! netns under `/var/run/netns` are mounts of their own). So every program
//! runs with the paths the manifests give it. What it does not isolate: the file system beyond those mounts, users
//! (everything runs as root), capabilities and resources.
//!
//! A bind mount needs its mount point to exist on the machine: the runtime
//! creates missing ones as empty directories, records them in the lab's
//! state, and `lab down` removes them again when still empty.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::error::{KubeletError, Result};

/// A directory of the lab's, bind-mounted at `target` in the container.
#[derive(Debug, Clone)]
pub struct Mount {
    pub source: PathBuf,
    pub target: String,
}

/// What one container process is started with.
pub struct Launch<'a> {
    pub netns: &'a str,
    pub mounts: &'a [Mount],
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub log: &'a Path,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shell prologue that mounts a container's volumes, then becomes its
/// program (`exec "$@"`).
pub fn script(mounts: &[Mount]) -> String {
    let mut s = String::from("set -e\n");
    for m in mounts {
        s.push_str(&format!(
            "mount --rbind {} {}\n",
            quote(&m.source.display().to_string()),
            quote(&m.target)
        ));
    }
    s.push_str("exec \"$@\"\n");
    s
}

/// Starts a container's process. Its environment is exactly `env` (nothing
/// of the lab's own, such as an admin KUBECONFIG, leaks in).
pub fn spawn(l: &Launch) -> Result<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(l.log)
        .map_err(|e| KubeletError::io(format!("opening {}", l.log.display()), e))?;
    let err = log
        .try_clone()
        .map_err(|e| KubeletError::io("a log handle", e))?;
    Command::new("ip")
        .args([
            "netns",
            "exec",
            l.netns,
            "sh",
            "-c",
            &script(l.mounts),
            "sh",
        ])
        .args(l.argv)
        .env_clear()
        .envs(l.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| KubeletError::io(format!("starting {:?}", l.argv), e))
}

/// Makes `target` (and missing parents) as empty directories; each one
/// made is added to `created`.
pub fn ensure_mountpoint(target: &str, created: &mut Vec<String>) -> Result<()> {
    let mut missing = Vec::new();
    let mut p = Path::new(target);
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    for d in missing.iter().rev() {
        std::fs::create_dir(d)
            .map_err(|e| KubeletError::io(format!("creating mount point {}", d.display()), e))?;
        created.push(d.display().to_string());
    }
    Ok(())
}

/// Removes mount points the runtime made, deepest first, when empty.
pub fn remove_mountpoints(created: &[String]) {
    for d in created.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prologue_mounts_then_execs() {
        let s = script(&[Mount {
            source: PathBuf::from("/lab/it's"),
            target: "/etc/ztunnel".into(),
        }]);
        assert_eq!(
            s,
            "set -e\nmount --rbind '/lab/it'\\''s' '/etc/ztunnel'\nexec \"$@\"\n"
        );
    }
}
