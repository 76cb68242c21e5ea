//! The redirect rules inside a captured pod's netns (nftables):
//!
//! - inbound TCP to 15008 goes straight to the ztunnel's HBONE listener;
//! - other inbound TCP (from outside the pod) goes to 15006 (plaintext);
//! - outbound TCP goes to 15001, DNS (53) to 15053;
//! - the ztunnel's own sockets carry mark 1337 and are left alone, as is
//!   other traffic within the pod (loopback); DNS is redirected before that
//!   exemption, so a loopback nameserver (127.0.0.53) is captured too.
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

pub fn ruleset(dns: bool) -> String {
    let dns_rules = if dns {
        format!(
            "    udp dport 53 redirect to :{DNS_PORT}\n    tcp dport 53 redirect to :{DNS_PORT}\n"
        )
    } else {
        String::new()
    };
    format!(
        "table inet {TABLE} {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" accept
    tcp dport {HBONE_PORT} accept
    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} accept
{dns_rules}    oifname \"lo\" accept
    meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
}}
"
    )
}

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("running nft: {0} (is the nftables package installed?)")]
    Spawn(std::io::Error),
    #[error("nft failed: {0}")]
    Nft(String),
}

/// Runs `nft -f -` with `script` inside `netns`.
fn nft(netns: &Netns, script: &str) -> Result<(), RulesError> {
    let fd = netns.fd().as_raw_fd();
    let mut cmd = Command::new("nft");
    cmd.args(["-f", "-"])
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
    let mut child = cmd.spawn().map_err(RulesError::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(RulesError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(RulesError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RulesError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Installs (or replaces) the redirect rules in a pod's netns.
pub fn install(netns: &Netns, dns: bool) -> Result<(), RulesError> {
    // Declaring then deleting makes the delete succeed whether or not the
    // table exists; the new table follows in the same transaction.
    let script = format!(
        "table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        ruleset(dns)
    );
    nft(netns, &script)
}

/// Removes the rules: the pod leaves the mesh.
pub fn remove(netns: &Netns) -> Result<(), RulesError> {
    nft(
        netns,
        &format!("table inet {TABLE}\ndelete table inet {TABLE}\n"),
    )
}
