//! The lab: a multi-node mesh on one machine, out of network namespaces.
//!
//! The lab plays kubelet, CNI and kube-proxy, nothing more: every mesh
//! program in it is the production binary with production config.
//!
//! ```text
//!  switch netns: bridge br0 ── ctl netns (10.L.0.100: istiod-lite)
//!                         ├── node-i netns (10.L.0.i: ztunnel + ztunnel-cni)
//!                         │      bridge cbr0 10.L.i.1/24 ── pod netns 10.L.i.k
//! ```
//!
//! Dual-stack: each of those addresses has an IPv6 twin, fd00:10:L:i::k
//! ([`ipv6_twin`]), routed the same way.
//!
//! Everything it creates is listed in `<dir>/lab.json`, so `lab down` (or a
//! test's drop) removes it all, also after a crash.

mod claim;
mod control;
mod forward;
mod network;
mod objects;
mod pods;
mod process;
mod services;
mod state;
mod surge;

pub use claim::{
    ALL_IDS, BENCH_IDS, ClaimError, DEFAULT_ID, DEMO_IDS, Keeper, Owner, PEOPLE_IDS, RECORDS,
    SWEEP_TEST_ID, TEST_IDS, claim, claim_free, namespaces_of, owner_of, record, release, sweep,
    sweep_unheld,
};
pub use control::{
    LAB_DAEMONSET, LAB_DAEMONSET_NAMESPACE, LAB_ZTUNNEL_EXTRA, MESH_CONFIG, ztunnel_extra_from_env,
};
pub use forward::forward;
pub use objects::{
    GATEWAY_NAME_LABEL, INGRESS_CLASS, LOOPBACK_PORTS, WAYPOINT_CLASS, WAYPOINT_REPLICAS,
    parse_docs, read_docs,
};
pub(crate) use process::{sh, start_time};
pub(crate) use services::nft_in;
pub use state::{
    KubeState, Lab, LabState, NodeState, PodState, ProcState, ServiceState, ipv6_twin,
    ipv6_twin_net,
};
pub use surge::SURGE_PORT_OFFSET;

#[cfg(doc)]
use crate::mesh::binary;

pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The workspace's programs the lab runs (found with [`binary`]).
pub const PROGRAMS: &[&str] = &[
    "lab",
    "labapp",
    "istiod-lite",
    "ztunnel",
    "ztunnel-cni",
    "waypoint",
];

pub const CONTROL_IP_HOST: u8 = 100;

/// A lab taken down when dropped (also when a test fails).
pub struct Down(pub Lab);

impl Drop for Down {
    fn drop(&mut self) {
        // Another process (`lab apply`, meshctl) may have added pods since:
        // take them down too.
        if let Ok(l) = Lab::load(&self.0.dir) {
            self.0 = l;
        }
        self.0.down();
    }
}
