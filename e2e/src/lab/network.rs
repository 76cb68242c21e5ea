//! The lab's network: the switch, control and node netns, their bridges
//! and routes, made under a claimed id; and taking it all down again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[cfg(doc)]
use super::TEST_IDS;
use super::process::{sh, start_time, zombie};
use super::{Error, Keeper, Lab, LabState, NodeState, Owner, claim, ipv6_twin, ipv6_twin_net};

/// Gives `dev` in `ns` the IPv6 twin of `v4` (prefix `/64`), usable at once:
/// no duplicate address detection, which would leave it tentative (and
/// unbindable) for a second or two.
pub(crate) fn add_v6(ns: &str, dev: &str, v4: &str) -> Result<(), Error> {
    let ip = ipv6_twin(v4).ok_or_else(|| format!("{v4} is not an IPv4 address"))?;
    sh(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{ip}/64"),
        "dev",
        dev,
        "nodad",
    ])
}

/// In `ns`, routes the IPv6 twin of the `/24` holding `v4_net` via the twin
/// of `v4_via`.
fn route_v6(ns: &str, v4_net: &str, v4_via: &str) -> Result<(), Error> {
    let net = ipv6_twin_net(v4_net).ok_or_else(|| format!("{v4_net} is not IPv4"))?;
    let via = ipv6_twin(v4_via).ok_or_else(|| format!("{v4_via} is not IPv4"))?;
    sh(&["ip", "-n", ns, "-6", "route", "add", &net, "via", &via])
}

fn check_nodes(nodes: usize) -> Result<(), Error> {
    if (1..=20).contains(&nodes) {
        Ok(())
    } else {
        Err(format!("{nodes} nodes: between 1 and 20").into())
    }
}

/// The MAC address of node `i`'s bridge `cbr0` (locally administered,
/// one per node; each bridge is a link of its own).
///
/// A bridge whose address is not set takes the lowest of its ports'
/// addresses, so plugging in a pod could change the pods' gateway MAC under
/// them (the bridge's address changes to the new port's when it is lower).
/// IPv4 recovers at once (the node's ARP requests carry its gateway
/// address), IPv6 does not: the node re-resolves its pods from its
/// link-local address, so a pod's entry for the gateway's global address
/// keeps the old MAC, which is now only a port's. The bridge passes the
/// pods' frames to it up as addressed to another host (but for the pod on
/// that port), which IPv6 drops, until the entry goes stale (15-45 s).
pub(crate) fn node_bridge_mac(i: u8) -> String {
    format!("02:00:00:00:{i:02x}:01")
}

impl Lab {
    pub(crate) fn add_netns(&mut self, name: &str) -> Result<(), Error> {
        sh(&["ip", "netns", "add", name])?;
        self.state.netns.push(name.to_string());
        self.save()?;
        // Interfaces made here after skip duplicate address detection (their
        // link-local addresses too): the lab's IPv6 is usable at once.
        for key in ["all", "default"] {
            sh(&[
                "ip",
                "netns",
                "exec",
                name,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{key}.accept_dad=0"),
            ])?;
        }
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])
    }

    /// Creates the network: switch, control netns, nodes, as lab `id`, kept
    /// by this process (taken down by it; debris once it is gone). An id
    /// someone else holds is refused, never swept. On failure, whatever was
    /// made is removed again.
    pub fn create(dir: &Path, id: u8, nodes: usize) -> Result<Lab, Error> {
        Self::create_kept(dir, id, nodes, Keeper::Process)
    }

    /// [`Lab::create`], with what keeps the lab said.
    pub fn create_kept(dir: &Path, id: u8, nodes: usize, keeper: Keeper) -> Result<Lab, Error> {
        check_nodes(nodes)?;
        let owner = claim::claim(id, dir, keeper)?;
        Self::create_claimed(dir, owner, nodes)
    }

    /// [`Lab::create`] with the first free id of `ids` (the tests take
    /// theirs from [`TEST_IDS`]).
    pub fn create_in(
        dir: &Path,
        ids: std::ops::RangeInclusive<u8>,
        nodes: usize,
    ) -> Result<Lab, Error> {
        check_nodes(nodes)?;
        let owner = claim::claim_free(ids, dir, Keeper::Process)?;
        Self::create_claimed(dir, owner, nodes)
    }

    fn create_claimed(dir: &Path, owner: Owner, nodes: usize) -> Result<Lab, Error> {
        let mut lab = Lab {
            dir: dir.to_path_buf(),
            state: LabState {
                id: owner.id,
                claim: owner.token.clone(),
                ..Default::default()
            },
        };
        match Self::build(dir, &owner, nodes, &mut lab) {
            Ok(()) => Ok(lab),
            Err(e) => {
                lab.down();
                Err(e)
            }
        }
    }

    fn build(dir: &Path, owner: &Owner, nodes: usize, out: &mut Lab) -> Result<(), Error> {
        std::fs::create_dir_all(dir.join("logs"))?;
        std::fs::create_dir_all(dir.join("config"))?;
        std::fs::create_dir_all(dir.join("data"))?;
        let id = owner.id;
        let lab = Lab {
            dir: dir.to_path_buf(),
            state: LabState {
                id,
                claim: owner.token.clone(),
                prefix: format!("lab{id}-"),
                next_vip: 1,
                ..Default::default()
            },
        };
        lab.save()?;
        *out = Lab {
            dir: lab.dir.clone(),
            state: lab.state.clone(),
        };
        let lab = out;
        let net = lab.net();
        let sw = lab.ns_name("sw");
        lab.add_netns(&sw)?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let attach = |ns: &str, port: &str, ip: &str| -> Result<(), Error> {
            sh(&[
                "ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", port, "netns",
                &sw,
            ])?;
            sh(&["ip", "-n", &sw, "link", "set", port, "master", "br0", "up"])?;
            sh(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ])?;
            add_v6(ns, "eth0", ip)?;
            sh(&["ip", "-n", ns, "link", "set", "eth0", "up"])
        };
        let ctl = lab.ns_name("ctl");
        lab.add_netns(&ctl)?;
        attach(&ctl, "ctl", &lab.control_ip())?;
        for i in 1..=nodes as u8 {
            let ns = lab.ns_name(&format!("n{i}"));
            lab.add_netns(&ns)?;
            let ip = format!("{net}.0.{i}");
            attach(&ns, &format!("n{i}"), &ip)?;
            // The bridge's address is set, so plugging in a pod never
            // changes it ([`node_bridge_mac`]).
            let mac = node_bridge_mac(i);
            sh(&[
                "ip", "-n", &ns, "link", "add", "cbr0", "address", &mac, "type", "bridge",
            ])?;
            sh(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{net}.{i}.1/24"),
                "dev",
                "cbr0",
            ])?;
            add_v6(&ns, "cbr0", &format!("{net}.{i}.1"))?;
            sh(&["ip", "-n", &ns, "link", "set", "cbr0", "up"])?;
            for key in ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"] {
                sh(&["ip", "netns", "exec", &ns, "sysctl", "-qw", key])?;
            }
            lab.state.nodes.push(NodeState {
                name: format!("node-{i}"),
                netns: ns,
                ip,
                index: i,
            });
        }
        // Every node and the control netns reach every pod CIDR.
        let nodes_copy = lab.state.nodes.clone();
        for n in &nodes_copy {
            for m in &nodes_copy {
                if n.index != m.index {
                    sh(&[
                        "ip",
                        "-n",
                        &n.netns,
                        "route",
                        "add",
                        &format!("{net}.{}.0/24", m.index),
                        "via",
                        &m.ip,
                    ])?;
                    route_v6(&n.netns, &format!("{net}.{}.0", m.index), &m.ip)?;
                }
            }
            sh(&[
                "ip",
                "-n",
                &ctl,
                "route",
                "add",
                &format!("{net}.{}.0/24", n.index),
                "via",
                &n.ip,
            ])?;
            route_v6(&ctl, &format!("{net}.{}.0", n.index), &n.ip)?;
        }
        lab.save()
    }

    /// Tears everything down: processes, then namespaces.
    pub fn down(&mut self) {
        // A kube lab's kubelet first: it starts nothing more meanwhile.
        crate::kubelet::stop_kubelet(self);
        let kube = self.state.kube.clone();
        // Only processes that are still the ones the lab started.
        let ours: Vec<u32> = self
            .state
            .pids
            .iter()
            .filter(|(pid, t)| start_time(*pid) == Some(*t))
            .map(|(pid, _)| *pid)
            .collect();
        for pid in ours.iter().rev() {
            // SAFETY: kill(2) on processes this lab started (pid and start time match).
            unsafe {
                libc::kill(*pid as i32, libc::SIGTERM);
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && ours
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists() && !zombie(*p))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for pid in &ours {
            if !zombie(*pid) {
                // SAFETY: as above; the process did not stop on SIGTERM.
                unsafe {
                    libc::kill(*pid as i32, libc::SIGKILL);
                }
            }
        }
        for ns in self.state.netns.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
            let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
        }
        self.state.pids.clear();
        self.state.netns.clear();
        claim::release(self.state.id, &self.state.claim);
        // The run's config, CA data, agent state and sockets go too: a later
        // `lab up` in the same directory starts clean.
        for d in ["config", "data"] {
            let _ = std::fs::remove_dir_all(self.dir.join(d));
        }
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.ends_with(".sock")
                    || name.ends_with("-pods.json")
                    || name.ends_with(".token")
                    || name.ends_with("-ztunnel.yaml")
                    || name == "tokens.yaml"
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_file(Self::state_file(&self.dir));
        if let Some(k) = kube {
            crate::kubelet::after_down(&k, &self.dir);
        }
    }
}
