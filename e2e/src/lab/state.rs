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

    pub fn save(&self) -> Result<(), Error> {
        std::fs::write(
            Self::state_file(&self.dir),
            serde_json::to_vec_pretty(&self.state)?,
        )?;
        Ok(())
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
