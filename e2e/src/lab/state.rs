//! What the lab records in `<dir>/lab.json` (its nodes, pods, services,
//! namespaces, processes and netns: the schema is `mesh_core::lab_file`,
//! which `meshctl --lab` reads too), and the [`Lab`] handle over them.

use std::path::{Path, PathBuf};

pub use mesh_core::lab_file::{KubeState, LabState, NodeState, PodState, ProcState, ServiceState};

use super::{CONTROL_IP_HOST, Error};

pub struct Lab {
    pub dir: PathBuf,
    pub state: LabState,
}

impl Lab {
    pub fn state_file(dir: &Path) -> PathBuf {
        LabState::path(dir)
    }

    pub fn load(dir: &Path) -> Result<Lab, Error> {
        let text = std::fs::read_to_string(Self::state_file(dir))
            .map_err(|e| format!("no lab at {}: {e}", dir.display()))?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            state: serde_json::from_str(&text)?,
        })
    }

    /// Writes the state file whole: a new file (made as a plain write
    /// would, under the umask) renamed over the old, so a reader (a test,
    /// meshctl, the other lab process) never sees half.
    pub fn save(&self) -> Result<(), Error> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".lab.json.{}.{n}", std::process::id()));
        let written = serde_json::to_vec_pretty(&self.state)
            .map_err(Error::from)
            .and_then(|text| {
                use std::io::Write;
                // A new file, never one planted at the name beforehand.
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&tmp)?;
                Ok(f.write_all(&text)?)
            })
            .and_then(|()| Ok(std::fs::rename(&tmp, Self::state_file(&self.dir))?));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written
    }

    pub fn net(&self) -> String {
        format!("10.{}", 100 + self.state.id as u32)
    }

    /// The IPv6 twin of [`Lab::net`]'s `/16`: `fd00:10:L::/48`.
    pub fn net6(&self) -> String {
        format!("fd00:10:{}", 100 + self.state.id as u32)
    }

    pub fn control_ip(&self) -> String {
        format!("{}.0.{CONTROL_IP_HOST}", self.net())
    }

    pub(crate) fn ns_name(&self, tag: &str) -> String {
        format!("{}{tag}", self.state.prefix)
    }

    pub fn pod(&self, key: &str) -> Option<&PodState> {
        self.state.pods.get(key)
    }

    /// A pod's IPv6 address (the twin of its IPv4 one).
    pub fn pod_ip6(&self, key: &str) -> Option<String> {
        ipv6_twin(&self.pod(key)?.ip)
    }

    /// A Service's IPv6 VIP (none for a headless Service).
    pub fn service_vip6(&self, key: &str) -> Option<String> {
        ipv6_twin(&self.state.services.get(key)?.vip)
    }
}

/// The lab is dual-stack: every address it gives (nodes, the control
/// plane, pods, Service VIPs) has an IPv6 twin in the ULA range, made by
/// writing the IPv4 address's four decimal numbers as the groups of
/// `fd00:a:b:c::d`: 10.L.i.k is fd00:10:L:i::k, and each `/24` becomes the
/// `/64` of the same three numbers. None for what is not an IPv4 address
/// (a headless Service's "None").
pub fn ipv6_twin(v4: &str) -> Option<String> {
    let ip: std::net::Ipv4Addr = v4.parse().ok()?;
    let [a, b, c, d] = ip.octets();
    Some(format!("fd00:{a}:{b}:{c}::{d}"))
}

/// The `/64` twin of the `/24` holding `v4`.
pub fn ipv6_twin_net(v4: &str) -> Option<String> {
    let ip: std::net::Ipv4Addr = v4.parse().ok()?;
    let [a, b, c, _] = ip.octets();
    Some(format!("fd00:{a}:{b}:{c}::/64"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader never sees a half-written state file: the kubelet saves it
    /// while tests read it, and a read between the truncate and the write
    /// found it empty ("EOF while parsing a value").
    #[test]
    fn a_load_beside_a_save_sees_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut lab = Lab {
            dir: dir.path().to_path_buf(),
            state: LabState::default(),
        };
        lab.state.netns = (0..2000).map(|i| format!("lab120-netns-{i}")).collect();
        lab.save().unwrap();
        let writer = std::thread::spawn(move || {
            for _ in 0..300 {
                lab.save().unwrap();
            }
        });
        let mut bad = 0;
        while !writer.is_finished() {
            if Lab::load(dir.path()).is_err() {
                bad += 1;
            }
        }
        writer.join().unwrap();
        assert_eq!(bad, 0, "loads of a half-written file");
    }

    #[test]
    fn twins_keep_the_numbers_and_refuse_what_is_not_ipv4() {
        assert_eq!(
            ipv6_twin("10.101.2.11").as_deref(),
            Some("fd00:10:101:2::11")
        );
        assert_eq!(
            ipv6_twin_net("10.101.2.11").as_deref(),
            Some("fd00:10:101:2::/64")
        );
        assert_eq!(ipv6_twin("None"), None);
        assert_eq!(ipv6_twin("fd00::1"), None);
        let v6: std::net::Ipv6Addr = ipv6_twin("10.250.250.255").unwrap().parse().unwrap();
        assert_eq!(v6.segments()[0], 0xfd00);
    }
}
