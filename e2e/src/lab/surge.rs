//! A ztunnel roll on one node, as the DaemonSet's surge makes it: a second
//! ztunnel starts beside the first, takes every pod from the node agent and
//! binds their listeners beside the first one's; once it is ready the first
//! gets SIGTERM ([`Lab::stop`]) and drains.
//!
//! The lab's ztunnels run in their node's netns, where a DaemonSet pod would
//! have a netns of its own: the second one's admin, metrics and readiness
//! ports are moved up by [`SURGE_PORT_OFFSET`] so the two do not collide.

use std::net::SocketAddr;
use std::time::Duration;

use crate::mesh::binary;
use mesh_core::netns::Netns;

use super::{Error, Lab};

/// Added to the surge ztunnel's admin (15000), metrics (15020) and
/// readiness (15021) ports.
pub const SURGE_PORT_OFFSET: u16 = 100;

impl Lab {
    /// Starts a second ztunnel on `node` (process `<node>-ztunnel-surge`,
    /// its config that of `<node>-ztunnel` with the ports moved) and
    /// returns its readiness address.
    pub fn surge_ztunnel(&mut self, node: &str) -> Result<SocketAddr, Error> {
        let n = self
            .state
            .nodes
            .iter()
            .find(|n| n.name == node)
            .cloned()
            .ok_or_else(|| format!("no node {node}"))?;
        let cfg = std::fs::read_to_string(self.dir.join(format!("{node}-ztunnel.yaml")))?;
        let mut moved = cfg;
        for port in [15000u16, 15020, 15021] {
            let to = port + SURGE_PORT_OFFSET;
            moved = moved.replace(&format!(":{port}\""), &format!(":{to}\""));
        }
        let path = self.dir.join(format!("{node}-ztunnel-surge.yaml"));
        std::fs::write(&path, moved)?;
        let cmd = vec![
            binary("ztunnel").display().to_string(),
            "--config".into(),
            path.display().to_string(),
        ];
        self.start_named(
            &format!("{node}-ztunnel-surge"),
            &n.netns,
            &[("RUST_LOG", "info")],
            cmd,
        )?;
        Ok(SocketAddr::new(n.ip.parse()?, 15021 + SURGE_PORT_OFFSET))
    }

    /// Whether the ztunnel of `node` whose readiness endpoint is `addr`
    /// answers 200 (asked from inside the node's netns).
    pub async fn ztunnel_ready(&self, node: &str, addr: SocketAddr) -> bool {
        let Some(n) = self.state.nodes.iter().find(|n| n.name == node) else {
            return false;
        };
        let Ok(netns) = Netns::open(&format!("/var/run/netns/{}", n.netns)) else {
            return false;
        };
        let Ok(Ok(sock)) = netns.run(tokio::net::TcpSocket::new_v4) else {
            return false;
        };
        let get = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = sock.connect(addr).await?;
            s.write_all(b"GET /healthz/ready HTTP/1.0\r\nHost: x\r\n\r\n")
                .await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(2), get).await,
            Ok(Ok(b)) if b.starts_with(b"HTTP/1.0 200") || b.starts_with(b"HTTP/1.1 200")
        )
    }
}
