//! Finding a running pod's netns from the node, as Istio's node agent does:
//! every netns on the node (those of its processes, `/proc/<pid>/ns/net`,
//! and those the runtime pinned, `/var/run/netns/*`, which a pod whose
//! containers have not started yet only has) is entered in turn and its
//! interface addresses read; the pod's is the one holding the pod's IP.
//!
//! The node's own netns is never a candidate (host-network pods are never
//! captured), and an IP held by more than one netns is refused: capturing
//! the wrong one would redirect someone else's traffic.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use mesh_core::netns::Netns;

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("no netns on the node holds {0:?}")]
    NotFound(Vec<IpAddr>),
    #[error("{ips:?} is held by more than one netns ({paths:?}); refusing to guess")]
    Ambiguous {
        ips: Vec<IpAddr>,
        paths: Vec<String>,
    },
    #[error("netns {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("netns {0} changed while it was being opened (its process ended)")]
    Changed(String),
}

/// Where the node's netns are found.
#[derive(Debug, Clone)]
pub struct Finder {
    /// The node's /proc (`/host/proc` in a container that mounts it).
    pub proc_dir: PathBuf,
    /// Where the runtime pins pods' netns (`/var/run/netns`).
    pub pinned_dir: PathBuf,
}

/// One netns seen in a scan.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    id: (u64, u64),
    addrs: Vec<IpAddr>,
}

/// Every netns on the node but the node's own, with its addresses.
#[derive(Debug, Default)]
pub struct Scan {
    seen: Vec<Seen>,
}

impl Finder {
    /// The candidate paths: pinned files first (their paths stay valid for
    /// the pod's life), then each process's.
    fn paths(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(dir) = std::fs::read_dir(&self.pinned_dir) {
            let mut pinned: Vec<PathBuf> = dir.flatten().map(|e| e.path()).collect();
            pinned.sort();
            out.extend(pinned);
        }
        if let Ok(dir) = std::fs::read_dir(&self.proc_dir) {
            for e in dir.flatten() {
                let name = e.file_name();
                if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                    out.push(e.path().join("ns/net"));
                }
            }
        }
        out
    }

    /// Reads every netns on the node but `host` (the node's own).
    pub fn scan(&self, host: (u64, u64)) -> Scan {
        let mut ids = std::collections::BTreeSet::from([host]);
        let mut seen = Vec::new();
        for path in self.paths() {
            // stat(2) on the link gives the namespace's identity without
            // opening it: each netns is entered once.
            let Ok(m) = std::fs::metadata(&path) else {
                continue;
            };
            if !ids.insert((m.dev(), m.ino())) {
                continue;
            }
            let p = path.display().to_string();
            let Ok(ns) = Netns::open(&p) else { continue };
            match addresses(&ns) {
                Ok(addrs) => seen.push(Seen {
                    path: p,
                    id: ns.id(),
                    addrs,
                }),
                Err(e) => {
                    tracing::debug!(netns = %p, error = %e, "cannot read the netns's addresses")
                }
            }
        }
        Scan { seen }
    }
}

impl Scan {
    /// The netns holding any of `ips`, opened, with the path it was found by.
    pub fn find(&self, ips: &[IpAddr]) -> Result<(String, Netns), FindError> {
        let hits: BTreeMap<(u64, u64), &Seen> = self
            .seen
            .iter()
            .filter(|s| s.addrs.iter().any(|a| ips.contains(a)))
            .map(|s| (s.id, s))
            .collect();
        let mut hits = hits.into_values();
        let (Some(hit), None) = (hits.next(), hits.next()) else {
            let paths: Vec<String> = self
                .seen
                .iter()
                .filter(|s| s.addrs.iter().any(|a| ips.contains(a)))
                .map(|s| s.path.clone())
                .collect();
            return Err(if paths.is_empty() {
                FindError::NotFound(ips.to_vec())
            } else {
                FindError::Ambiguous {
                    ips: ips.to_vec(),
                    paths,
                }
            });
        };
        let ns = Netns::open(&hit.path).map_err(|source| FindError::Open {
            path: hit.path.clone(),
            source,
        })?;
        // A process's path may now name another netns (the pid was reused).
        if ns.id() != hit.id {
            return Err(FindError::Changed(hit.path.clone()));
        }
        Ok((hit.path.clone(), ns))
    }
}

/// The addresses on a netns's interfaces (loopback and link-local left out:
/// they are no pod's).
pub fn addresses(netns: &Netns) -> std::io::Result<Vec<IpAddr>> {
    netns.addresses()
}

/// The defaults on a node: its /proc and the runtime's pinned netns.
impl Default for Finder {
    fn default() -> Self {
        Finder {
            proc_dir: Path::new("/proc").to_path_buf(),
            pinned_dir: Path::new("/var/run/netns").to_path_buf(),
        }
    }
}
