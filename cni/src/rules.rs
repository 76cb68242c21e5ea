//! The redirect rules inside a captured pod's netns (nftables):
//!
//! - inbound TCP from the kubelet's probe source ([`PROBE_SOURCE`], what
//!   the node SNATs its own connections to captured pods to: see
//!   the node side in `host.rs`) goes to the app untouched, so probes see the app
//!   itself and no mesh policy applies to them;
//! - inbound TCP to 15008 goes straight to the ztunnel's HBONE listener;
//! - other inbound TCP (from outside the pod) goes to 15006 (plaintext),
//!   unless the pod bypasses inbound capture
//!   (`ambient.istio.io/bypass-inbound-capture`);
//! - outbound TCP goes to 15001, DNS (53) to 15053;
//! - the app's replies to the ztunnel's connections from a client's
//!   address are routed back to the ztunnel within the pod
//!   ([`crate::orig_src`]);
//! - the ztunnel's own sockets carry mark 1337 and are left alone, as is
//!   other traffic within the pod (loopback); DNS is redirected before that
//!   exemption, so a loopback nameserver (127.0.0.53) is captured too.
//!
//! Only a connection's opening SYN is redirected (`SYN` without `ACK`): a
//! connection open before the pod was captured (which conntrack had not
//! tracked, as the netns had no NAT yet, and now picks up mid-stream) goes
//! on as it was instead of being sent to a listener that never saw it.
//!
//! Applying replaces the whole table, so it is idempotent.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use mesh_core::config::{DNS_PORT, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use mesh_core::netns::Netns;

pub const TABLE: &str = "ztunnel-inpod";
/// The ztunnel's own sockets carry this mark; the rules leave them alone.
pub const MARK: u32 = mesh_core::config::INPOD_MARK;

/// The link-local address the node SNATs its own connections to captured
/// pods to (kubelet probes), as Istio does.
pub const PROBE_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);

/// How a pod is captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capture {
    /// Redirect DNS to the ztunnel's 15053.
    pub dns: bool,
    /// Leave inbound traffic to the app uncaptured (outbound still is).
    pub bypass_inbound: bool,
}

/// Matches the first segment of a TCP connection only.
const OPENING: &str = "tcp flags & (syn | ack) == syn";

pub fn ruleset(c: Capture) -> String {
    let dns = c.dns;
    let dns_rules = if dns {
        format!(
            "    udp dport 53 redirect to :{DNS_PORT}\n    tcp dport 53 {OPENING} redirect to :{DNS_PORT}\n"
        )
    } else {
        String::new()
    };
    let inbound = if c.bypass_inbound {
        String::new()
    } else {
        format!("    {OPENING} redirect to :{INBOUND_PLAINTEXT_PORT}\n")
    };
    let orig_src = crate::orig_src::chains();
    format!(
        "table inet {TABLE} {{
{orig_src}  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" accept
    ip saddr {PROBE_SOURCE} accept
    tcp dport {HBONE_PORT} accept
{inbound}  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} accept
{dns_rules}    oifname \"lo\" accept
    {OPENING} redirect to :{OUTBOUND_PORT}
  }}
}}
"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("running {0}: {1} (are the nftables and iproute2 packages installed?)")]
    Spawn(String, std::io::Error),
    #[error("{0} failed: {1}")]
    Failed(String, String),
}

/// Runs `nft -f -` with `script` inside `netns`.
pub(crate) fn nft(netns: &Netns, script: &str) -> Result<(), RulesError> {
    run_in(netns, "nft", &["-f", "-"], script)
}

/// Runs `program args` inside `netns` with `script` on its stdin.
fn run_in(netns: &Netns, program: &str, args: &[&str], script: &str) -> Result<(), RulesError> {
    let fd = netns.fd().as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: between fork and exec only setns(2) runs, which is
    // async-signal-safe; it moves the child into the pod's netns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawn = |e| RulesError::Spawn(program.to_string(), e);
    let mut child = cmd.spawn().map_err(spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RulesError::Failed(
            program.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or replaces) the redirect rules in a pod's netns.
pub fn install(netns: &Netns, c: Capture) -> Result<(), RulesError> {
    // Declaring then deleting makes the delete succeed whether or not the
    // table exists; the new table follows in the same transaction.
    let script = format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        ruleset(c)
    );
    nft(netns, &script)?;
    crate::orig_src::install(&InPod(netns))
}

/// Runs `ip` inside a pod's netns (for [`crate::orig_src`]).
struct InPod<'a>(&'a Netns);

impl crate::orig_src::RunIp for InPod<'_> {
    type Error = RulesError;
    fn run_ip(&self, args: &[&str], batch: &str) -> Result<(), RulesError> {
        run_in(self.0, "ip", args, batch)
    }
}

/// Removes the rules: the pod leaves the mesh.
pub fn remove(netns: &Netns) -> Result<(), RulesError> {
    let routes = crate::orig_src::remove(&InPod(netns));
    nft(
        netns,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )?;
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_pass_before_any_redirect_and_bypass_drops_only_inbound() {
        let r = ruleset(Capture {
            dns: true,
            bypass_inbound: false,
        });
        let probe = r.find("ip saddr 169.254.7.127 accept").expect("probe rule");
        let redirect = r.find(":15006").expect("inbound redirect");
        assert!(probe < redirect, "{r}");
        let b = ruleset(Capture {
            dns: true,
            bypass_inbound: true,
        });
        assert!(!b.contains(":15006") && b.contains(":15001"), "{b}");
        // Only openings are redirected: a connection from before the
        // capture, picked up mid-stream, is left alone.
        for l in r
            .lines()
            .filter(|l| l.contains("tcp") && l.contains("redirect"))
        {
            assert!(l.contains("tcp flags & (syn | ack) == syn"), "{l}");
        }
    }
}
