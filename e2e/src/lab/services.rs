//! Services: kube-proxy's VIP rules (nftables in every node) and the
//! ingress listener ports published on the machine's loopback.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::mesh::binary;

use super::objects::listener_ports;
use super::{Error, GATEWAY_NAME_LABEL, LOOPBACK_PORTS, Lab, PodState};

pub(crate) fn nft_in(netns: &str, script: &str) -> Result<(), Error> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

/// One VIP port's DNAT over its endpoints, in turn; `family` is "ip" or
/// "ip6".
fn dnat_rule(
    family: &str,
    vip: &str,
    port: u16,
    target: u16,
    eps: impl Iterator<Item = String>,
) -> String {
    let map: Vec<String> = eps
        .enumerate()
        .map(|(i, ip)| format!("{i} : {ip} . {target}"))
        .collect();
    if map.is_empty() {
        return String::new();
    }
    format!(
        "    {family} daddr {vip} tcp dport {port} dnat {family} to numgen inc mod {} map {{ {} }}\n",
        map.len(),
        map.join(", ")
    )
}

impl Lab {
    pub(super) fn kube_proxy(&self) -> Result<(), Error> {
        let mut rules = String::new();
        for s in self.state.services.values() {
            let eps: Vec<&PodState> = self
                .state
                .pods
                .values()
                .filter(|p| {
                    p.namespace == s.namespace
                        && !s.selector.is_empty()
                        && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
                })
                .collect();
            if eps.is_empty() || s.vip == super::objects::HEADLESS {
                continue;
            }
            for (port, target) in &s.ports {
                rules.push_str(&dnat_rule(
                    "ip",
                    &s.vip,
                    *port,
                    *target,
                    eps.iter().map(|p| p.ip.clone()),
                ));
                if let Some(vip6) = super::ipv6_twin(&s.vip) {
                    let ips = eps.iter().filter_map(|p| super::ipv6_twin(&p.ip));
                    rules.push_str(&dnat_rule("ip6", &vip6, *port, *target, ips));
                }
            }
        }
        let script = format!(
            "table inet lab-kube-proxy\ndelete table inet lab-kube-proxy\ntable inet lab-kube-proxy {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n{rules}  }}\n}}\n"
        );
        for n in &self.state.nodes {
            nft_in(&n.netns, &script)?;
        }
        Ok(())
    }

    /// Publishes an ingress Gateway's listener ports on the machine's
    /// loopback (the lab's load balancer): one forwarder process per port,
    /// spreading connections over the Gateway's pods.
    pub(super) fn publish(&mut self, gateway: &Value) -> Result<(), Error> {
        let ns = gateway["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default");
        let name = gateway["metadata"]["name"].as_str().unwrap_or_default();
        let pins: BTreeMap<u16, u16> = gateway["metadata"]["annotations"][LOOPBACK_PORTS]
            .as_str()
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                Some((k.trim().parse().ok()?, v.trim().parse().ok()?))
            })
            .collect();
        let pods: Vec<PodState> = self
            .state
            .pods
            .values()
            .filter(|p| {
                p.namespace == ns
                    && p.labels.get(GATEWAY_NAME_LABEL).map(String::as_str) == Some(name)
            })
            .cloned()
            .collect();
        let Some(first) = pods.first() else {
            return Ok(());
        };
        // Any node reaches every pod; the forwarder connects from the first
        // pod's node.
        let node_ns = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == first.node)
            .map(|n| n.netns.clone())
            .ok_or_else(|| format!("node {} of {ns}/{name} is gone", first.node))?;
        for port in listener_ports(gateway) {
            let key = format!("{ns}/{name}:{port}");
            if self.state.published.contains_key(&key) {
                continue;
            }
            let listen = format!("127.0.0.1:{}", pins.get(&port).copied().unwrap_or(0));
            let port_file = self.dir.join(format!("published-{ns}-{name}-{port}"));
            let _ = std::fs::remove_file(&port_file);
            let mut cmd = vec![
                binary("lab").display().to_string(),
                "forward".into(),
                "--listen".into(),
                listen,
                "--netns".into(),
                format!("/var/run/netns/{node_ns}"),
                "--port-file".into(),
                port_file.display().to_string(),
            ];
            for p in &pods {
                cmd.push("--to".into());
                cmd.push(format!("{}:{port}", p.ip));
            }
            self.spawn(&format!("forward-{ns}-{name}-{port}.log"), &cmd)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let addr = loop {
                if let Ok(a) = std::fs::read_to_string(&port_file)
                    && !a.trim().is_empty()
                {
                    break a.trim().to_string();
                }
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "publishing {key}: the forwarder did not start (see its log)"
                    )
                    .into());
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            self.state.published.insert(key, addr);
            self.save()?;
        }
        Ok(())
    }

    /// The loopback address an ingress listener port is published on.
    pub fn published(&self, namespace: &str, gateway: &str, port: u16) -> Option<String> {
        self.state
            .published
            .get(&format!("{namespace}/{gateway}:{port}"))
            .cloned()
    }
}
