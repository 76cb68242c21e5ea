//! The redirect rules inside a captured pod's netns (nftables):
//!
//! - inbound TCP from the kubelet's probe source ([`PROBE_SOURCE`], or
//!   [`PROBE_SOURCE_V6`] over IPv6: what the node SNATs its own
//!   connections to captured pods to: see
//!   the node side in `host.rs`) goes to the app untouched, so probes see the app
//!   itself and no mesh policy applies to them;
//! - inbound TCP to 15008 goes straight to the ztunnel's HBONE listener;
//! - other inbound TCP (from outside the pod) goes to 15006 (plaintext),
//!   unless the pod bypasses inbound capture
//!   (`ambient.istio.io/bypass-inbound-capture`);
//! - outbound TCP goes to 15001, DNS (53) to 15053;
//! - the app's replies to the ztunnel's connections from a client's
//!   address are routed back to the ztunnel within the pod
//!   ([`crate::orig_src`]), and, in every table, never leave through
//!   anything but loopback (the guard: a missing route stalls them);
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
pub const PROBE_SOURCE: std::net::Ipv4Addr = mesh_core::config::PROBE_SOURCE_V4;

/// The same for the node's IPv6 connections (Istio's IPv6 probe source: a
/// ULA no cluster assigns).
pub const PROBE_SOURCE_V6: std::net::Ipv6Addr = mesh_core::config::PROBE_SOURCE_V6;

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

/// The pod's table; with the original-source chains when `orig_src`.
pub fn ruleset(c: Capture, orig_src: bool) -> String {
    let dns = c.dns;
    let dns_rules = if dns {
        format!(
            "    udp dport 53 redirect to :{DNS_PORT}\n    tcp dport 53 {OPENING} redirect to :{DNS_PORT}\n"
        )
    } else {
        String::new()
    };
    let (inbound, from_link_local) = if c.bypass_inbound {
        (String::new(), String::new())
    } else {
        (
            format!("    {OPENING} redirect to :{INBOUND_PLAINTEXT_PORT}\n"),
            format!(
                "    ip6 saddr fe80::/10 {OPENING} drop
    ip saddr 169.254.0.0/16 ip saddr != {PROBE_SOURCE} {OPENING} drop
"
            ),
        )
    };
    // No ztunnel listener is bound at a link-local address (HBONE is not
    // redirected, and a prerouting REDIRECT lands on one when the pod has
    // no other address of that family): an opening to one is dropped,
    // never left to whatever a process of the pod binds there.
    let input = format!(
        "  chain input {{
    type filter hook input priority filter; policy accept;
    iifname \"lo\" accept
    ip6 daddr fe80::/10 {OPENING} drop
    ip daddr 169.254.0.0/16 {OPENING} drop
{from_link_local}  }}
"
    );
    let orig_src = if orig_src {
        crate::orig_src::chains()
    } else {
        String::new()
    };
    let guard = crate::orig_src::guard();
    format!(
        "table inet {TABLE} {{
{orig_src}{guard}  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"lo\" accept
    ip saddr {PROBE_SOURCE} accept
    ip6 saddr {PROBE_SOURCE_V6} accept
    tcp dport {HBONE_PORT} accept
{inbound}  }}
  chain output {{
    type nat hook output priority -100; policy accept;
    meta mark {MARK} accept
{dns_rules}    oifname \"lo\" accept
    {OPENING} redirect to :{OUTBOUND_PORT}
  }}
{input}}}
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
    run_in(netns, "nft", &["-f", "-"], script).map(drop)
}

/// Runs `nft -f -` with `script` inside `netns`; what it printed.
pub(crate) fn nft_output(netns: &Netns, script: &str) -> Result<String, RulesError> {
    run_in(netns, "nft", &["-f", "-"], script)
}

/// Runs `program args` inside `netns` with `script` on its stdin; its
/// output.
fn run_in(netns: &Netns, program: &str, args: &[&str], script: &str) -> Result<String, RulesError> {
    let fd = netns.fd().as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
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
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(RulesError::Failed(
            program.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Whether a captured pod got the original-source part of its rules.
#[derive(Debug)]
pub enum OrigSrc {
    On,
    /// Captured without it (its app sees the pod's own address as the
    /// client's): why.
    Off(RulesError),
}

/// Installs (or replaces) the redirect rules in a pod's netns. When the
/// original-source part cannot go in, the capture goes in without it.
pub fn install(netns: &Netns, c: Capture, v6: bool) -> Result<OrigSrc, RulesError> {
    install_in(&InPod(netns), c, v6)
}

/// Removes the rules: the pod is deleted.
pub fn remove(netns: &Netns) -> Result<(), RulesError> {
    remove_in(&InPod(netns))
}

/// Releases a pod that leaves the mesh: its capture and reply routing go,
/// the guard stays ([`guard_only`]).
pub fn release(netns: &Netns) -> Result<(), RulesError> {
    release_in(&InPod(netns))
}

/// Runs the pod's `nft` and `ip`.
trait PodRun: crate::orig_src::RunIp<Error = RulesError> {
    fn nft(&self, script: &str) -> Result<(), RulesError>;
}

/// Runs them inside a pod's netns.
struct InPod<'a>(&'a Netns);

impl crate::orig_src::RunIp for InPod<'_> {
    type Error = RulesError;
    fn run_ip(&self, args: &[&str], batch: &str) -> Result<(), RulesError> {
        run_in(self.0, "ip", args, batch).map(drop)
    }
    fn ip_output(&self, args: &[&str]) -> Result<String, RulesError> {
        run_in(self.0, "ip", args, "")
    }
}

impl PodRun for InPod<'_> {
    fn nft(&self, script: &str) -> Result<(), RulesError> {
        nft(self.0, script)
    }
}

/// The transaction that replaces the pod's table.
fn replace(c: Capture, orig_src: bool) -> String {
    replace_with(&ruleset(c, orig_src))
}

/// The transaction that replaces the pod's table with `table`.
fn replace_with(table: &str) -> String {
    // Declaring then deleting makes the delete succeed whether or not the
    // table exists; the new table follows in the same transaction.
    format!("table inet {TABLE}\ndelete table inet {TABLE}\n{table}")
}

/// The table of a released pod: the guard alone. It matches only the
/// ztunnel's transparent dials and their replies, so it changes nothing
/// for a pod out of the mesh; it keeps the replies of such a connection
/// still open (the ztunnel may not have closed it yet) off eth0. It goes
/// with the pod (its DEL) or is replaced when the pod is captured again.
pub fn guard_only() -> String {
    format!("table inet {TABLE} {{\n{}}}\n", crate::orig_src::guard())
}

/// A released pod's table when its rule could not be removed: the
/// marking chains the rule needs and the guard, no capture.
fn chains_and_guard() -> String {
    let (chains, guard) = (crate::orig_src::chains(), crate::orig_src::guard());
    format!("table inet {TABLE} {{\n{chains}{guard}}}\n")
}

/// The whole: the table with its chains, then the reply routing. Either
/// failing, the capture alone, with no reply routing left (which is how
/// the ztunnel tells that the pod's app must be dialed from the pod's own
/// address); only the capture itself failing is an error. `v6`: the pod
/// has an IPv6 address (its IPv6 routing is then required).
fn install_in<R: PodRun>(run: &R, c: Capture, v6: bool) -> Result<OrigSrc, RulesError> {
    // The chains first (the table is replaced in one transaction, so a
    // re-apply never drops them), the rule last: the rule, which the
    // ztunnel's route check sees, exists only while the chains do.
    let chains = run.nft(&replace(c, true));
    let chains_in = chains.is_ok();
    let whole = chains.and_then(|()| crate::orig_src::install(run, v6));
    let Err(why) = whole else {
        return Ok(OrigSrc::On);
    };
    // The rule goes first, then the table without the chains (its guard
    // stays, for the connections they already marked). A rule that cannot
    // go keeps the chains it needs: never a rule without them.
    if let Err(e) = crate::orig_src::remove(run) {
        let both = RulesError::Failed(
            "original source".into(),
            format!("{why}; and removing its rule failed: {e}"),
        );
        return if chains_in {
            Ok(OrigSrc::Off(both))
        } else {
            Err(both)
        };
    }
    run.nft(&replace(c, false))?;
    Ok(OrigSrc::Off(why))
}

/// The pod is deleted: the rule first, so the ztunnel's route check never
/// sees it without the chains; the table goes even if that fails (the
/// netns goes with the pod).
fn remove_in<R: PodRun>(run: &R) -> Result<(), RulesError> {
    let routes = crate::orig_src::remove(run);
    let rules = run.nft(&format!("table inet {TABLE}\ndelete table inet {TABLE}\n"));
    rules.and(routes)
}

/// The pod leaves the mesh but lives on: the rule first, then, in one
/// transaction, the table becomes the guard alone ([`guard_only`]). A rule
/// that cannot go keeps the marking chains (never a rule without them):
/// the capture goes all the same, and the failure is returned.
fn release_in<R: PodRun>(run: &R) -> Result<(), RulesError> {
    if let Err(e) = crate::orig_src::remove(run) {
        run.nft(&replace_with(&chains_and_guard()))?;
        return Err(e);
    }
    run.nft(&replace_with(&guard_only()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_pass_before_any_redirect_and_bypass_drops_only_inbound() {
        let r = ruleset(
            Capture {
                dns: true,
                bypass_inbound: false,
            },
            true,
        );
        let probe = r.find("ip saddr 169.254.7.127 accept").expect("probe rule");
        let redirect = r.find(":15006").expect("inbound redirect");
        assert!(probe < redirect, "{r}");
        let probe6 = r
            .find("ip6 saddr fd16:9254:7127:1337:ffff:ffff:ffff:ffff accept")
            .expect("IPv6 probe rule");
        assert!(probe6 < redirect, "{r}");
        let b = ruleset(
            Capture {
                dns: true,
                bypass_inbound: true,
            },
            true,
        );
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

    /// A connection redirected to one of the pod's link-local addresses
    /// (the prerouting REDIRECT's target when the pod has no other IPv6
    /// address) would find no ztunnel listener there, only whatever a
    /// process of the pod bound: the pod drops its SYN. Failed first: no
    /// such rule.
    #[test]
    fn openings_to_a_link_local_address_are_dropped_in_the_pod() {
        // HBONE is not redirected: an opening to a link-local address's
        // 15008 would stay there, with inbound capture bypassed too.
        for bypass_inbound in [false, true] {
            let r = ruleset(
                Capture {
                    dns: false,
                    bypass_inbound,
                },
                true,
            );
            let input = r.find("hook input").expect("an input chain");
            let chain = &r[input..];
            let lo = chain.find("iifname \"lo\" accept").expect("loopback kept");
            for rule in [
                "ip6 daddr fe80::/10 tcp flags & (syn | ack) == syn drop",
                "ip daddr 169.254.0.0/16 tcp flags & (syn | ack) == syn drop",
            ] {
                let drop = chain.find(rule).expect(rule);
                assert!(lo < drop, "{r}");
            }
        }
    }

    /// A connection opened from a link-local source (IPv6 fe80::/10, IPv4
    /// 169.254/16 but the probe source) names no workload: the pod drops
    /// its SYN, a layer below the ztunnel's own refusal. Failed first: no
    /// such rule.
    #[test]
    fn link_local_openings_are_dropped_in_the_pod() {
        let r = ruleset(
            Capture {
                dns: true,
                bypass_inbound: false,
            },
            true,
        );
        let input = r.find("hook input").expect("an input chain");
        let chain = &r[input..];
        let v6 = chain
            .find("ip6 saddr fe80::/10 tcp flags & (syn | ack) == syn drop")
            .expect("IPv6 link-local dropped");
        let v4 = chain
            .find("ip saddr 169.254.0.0/16 ip saddr != 169.254.7.127 tcp flags & (syn | ack) == syn drop")
            .expect("IPv4 link-local dropped, the probe source kept");
        let lo = chain.find("iifname \"lo\" accept").expect("loopback kept");
        assert!(lo < v6 && lo < v4, "{r}");
    }

    /// Records what would run in the pod: `ip <args>: <batch>`, `nft
    /// add` (a table, `+orig_src` with its chains) or `nft delete`; fails
    /// every `ip` when `no_ip`, and an `nft` script naming a conntrack zone
    /// when `no_zones` (a kernel without them).
    #[derive(Default)]
    struct Record {
        steps: std::cell::RefCell<Vec<String>>,
        no_ip: bool,
        no_zones: bool,
        /// Every `ip -6` fails (a pod without IPv6).
        no_v6: bool,
        /// Every `rule del` fails.
        stuck_rule: bool,
        /// How many policy rules the pod holds (IPv4, IPv6).
        rules: std::cell::RefCell<[usize; 2]>,
    }

    impl Record {
        fn take(&self) -> Vec<String> {
            self.steps.take()
        }
    }

    impl crate::orig_src::RunIp for Record {
        type Error = RulesError;
        fn run_ip(&self, args: &[&str], batch: &str) -> Result<(), RulesError> {
            self.fails(args)?;
            let v6 = usize::from(args.contains(&"-6"));
            let mut rules = self.rules.borrow_mut();
            for l in batch.lines() {
                if l.starts_with("rule add") {
                    rules[v6] += 1;
                } else if l.starts_with("rule del") {
                    if self.stuck_rule {
                        return Err(RulesError::Failed("ip".into(), "Permission denied".into()));
                    }
                    if rules[v6] == 0 {
                        return Err(RulesError::Failed("ip".into(), "No such file".into()));
                    }
                    rules[v6] -= 1;
                }
            }
            let line = format!("ip {}: {}", args.join(" "), batch.trim());
            self.steps.borrow_mut().push(line);
            Ok(())
        }

        fn ip_output(&self, args: &[&str]) -> Result<String, RulesError> {
            self.fails(args)?;
            let v6 = usize::from(args.contains(&"-6"));
            let n = self.rules.borrow()[v6];
            Ok("32764:\tfrom all fwmark 0x111 lookup 100\n".repeat(n))
        }
    }

    impl Record {
        fn fails(&self, args: &[&str]) -> Result<(), RulesError> {
            if self.no_ip || (self.no_v6 && args.contains(&"-6")) {
                let e = std::io::Error::from(std::io::ErrorKind::NotFound);
                return Err(RulesError::Spawn("ip".into(), e));
            }
            Ok(())
        }
    }

    impl PodRun for Record {
        fn nft(&self, script: &str) -> Result<(), RulesError> {
            if self.no_zones && script.contains(" zone ") {
                return Err(RulesError::Failed(
                    "nft".into(),
                    "Error: Could not process rule: Operation not supported".into(),
                ));
            }
            let what = match (
                script.contains("chain prerouting"),
                script.contains("orig_src_mark"),
                script.contains("orig_src_guard"),
            ) {
                (true, true, _) => "nft add+orig_src",
                (true, false, _) => "nft add",
                (false, true, true) => "nft chains+guard",
                (false, false, true) => "nft guard",
                _ => "nft delete",
            };
            self.steps.borrow_mut().push(what.to_string());
            Ok(())
        }
    }

    /// Whether, after `steps`, the reply routing's rule is in place (the
    /// last `rule` step added it).
    fn rule_left(steps: &[String]) -> bool {
        steps
            .iter()
            .rev()
            .find(|s| s.contains("rule "))
            .is_some_and(|s| s.contains("rule add"))
    }

    /// Without the original-source part (no `ip`, or a kernel without
    /// conntrack zones) the pod is still captured, whole: the capture
    /// table goes in, without the chains, and no reply routing is left
    /// behind (the ztunnel reads its absence as "dial from the pod's own
    /// address").
    #[test]
    fn without_original_source_the_pod_is_captured_all_the_same() {
        for (no_ip, no_zones) in [(true, false), (false, true)] {
            let r = Record {
                no_ip,
                no_zones,
                ..Default::default()
            };
            let installed = install_in(&r, Capture::default(), false);
            let steps = r.take();
            assert!(installed.is_ok(), "{installed:?} {steps:#?}");
            // Captured (where `ip` cannot even tell whether a rule is
            // there, the chains stay: see the next tests).
            let last = steps.last().map(String::as_str);
            assert!(last.is_some_and(|l| l.starts_with("nft add")), "{steps:#?}");
            assert!(!rule_left(&steps), "{steps:#?}");
        }
        // With both, both.
        let r = Record::default();
        install_in(&r, Capture::default(), false).unwrap();
        let steps = r.take();
        // (The rule last: see the next test.)
        assert_eq!(steps.first().map(String::as_str), Some("nft add+orig_src"));
        assert!(rule_left(&steps), "{steps:#?}");
    }

    /// The policy rule (which the ztunnel's route check sees) exists only
    /// while the chains that mark the ztunnel's dials do: the chains go in
    /// first and the rule last; on removal the rule goes first.
    #[test]
    fn the_rule_exists_only_while_the_chains_do() {
        let r = Record::default();
        install_in(&r, Capture::default(), false).unwrap();
        let steps = r.take();
        let nft = steps
            .iter()
            .position(|s| s.starts_with("nft add"))
            .expect("nft");
        let first_add = steps
            .iter()
            .position(|s| s.contains("rule add"))
            .expect("ip");
        assert!(nft < first_add, "{steps:#?}");
        remove_in(&r).unwrap();
        let steps = r.take();
        let nft = steps.iter().position(|s| s == "nft delete").expect("nft");
        let first_del = steps
            .iter()
            .position(|s| s.contains("rule del"))
            .expect("ip");
        assert!(first_del < nft, "{steps:#?}");
    }

    /// Re-applying a pod's rules (a bypass change, an agent restart) never
    /// removes the rule, not even for a moment: live transparent
    /// connections would send their replies out of eth0 in that gap.
    #[test]
    fn re_applying_never_removes_the_rule() {
        let r = Record::default();
        install_in(&r, Capture::default(), false).unwrap();
        r.take();
        install_in(&r, Capture::default(), false).unwrap();
        let steps = r.take();
        assert!(!steps.iter().any(|s| s.contains("rule del")), "{steps:#?}");
        assert_eq!(r.rules.borrow()[0], 1, "{steps:#?}");
    }

    /// Packets of the ztunnel's transparent dials (conntrack mark
    /// [`crate::orig_src::REPLY_MARK`]) leave through loopback or not at
    /// all, whatever the routing: in every table, with or without the
    /// original-source chains (a fallback keeps the guard for live
    /// connections).
    #[test]
    fn the_ztunnels_dials_never_leave_but_through_loopback() {
        for orig_src in [true, false] {
            let r = ruleset(Capture::default(), orig_src);
            assert!(r.contains("type filter hook postrouting"), "{r}");
            assert!(r.contains("ct mark 273 oifname != \"lo\" drop"), "{r}");
        }
    }

    /// A released pod (it leaves the mesh, it lives on) keeps the guard:
    /// the rule goes, then the table becomes the guard alone in one
    /// transaction (never deleted), so the replies of a transparent
    /// connection the ztunnel has not closed yet never leave in cleartext.
    /// Capturing it again replaces that table whole.
    #[test]
    fn a_released_pod_keeps_the_guard() {
        let r = Record::default();
        install_in(&r, Capture::default(), false).unwrap();
        r.take();
        release_in(&r).unwrap();
        let steps = r.take();
        assert!(!steps.iter().any(|s| s == "nft delete"), "{steps:#?}");
        assert_eq!(steps.last().map(String::as_str), Some("nft guard"));
        let del = steps.iter().position(|s| s.contains("rule del"));
        assert!(del.is_some_and(|d| d < steps.len() - 1), "{steps:#?}");
        assert!(!rule_left(&steps) && r.rules.borrow()[0] == 0);
        let g = replace_with(&guard_only());
        assert!(g.starts_with("table inet ztunnel-inpod\ndelete table inet ztunnel-inpod\n"));
        assert!(g.contains("ct mark 273 oifname != \"lo\" drop"), "{g}");
        assert!(
            !g.contains("redirect") && !g.contains("orig_src_mark"),
            "{g}"
        );
        // Enrolled again: the whole table replaces the guard's, the rule
        // follows.
        install_in(&r, Capture::default(), false).unwrap();
        let steps = r.take();
        assert_eq!(steps.first().map(String::as_str), Some("nft add+orig_src"));
        assert!(rule_left(&steps), "{steps:#?}");
        assert!(replace(Capture::default(), true).starts_with("table inet ztunnel-inpod\ndelete"));
    }

    /// A pod captured without original source has no rule: releasing or
    /// deleting it is no failure.
    #[test]
    fn a_pod_without_a_rule_is_released_without_failure() {
        let r = Record {
            no_zones: true,
            ..Default::default()
        };
        let got = install_in(&r, Capture::default(), false).unwrap();
        assert!(matches!(got, OrigSrc::Off(_)), "{got:?}");
        release_in(&r).unwrap();
        remove_in(&r).unwrap();
    }

    /// When the original-source part fails after its rule went in and the
    /// rule cannot be removed, the chains stay (never a rule without them)
    /// and the failure is reported; with no chains in, it is an error.
    #[test]
    fn a_rule_that_cannot_go_keeps_its_chains() {
        let r = Record {
            no_v6: true,
            stuck_rule: true,
            ..Default::default()
        };
        let got = install_in(&r, Capture::default(), true).unwrap();
        let OrigSrc::Off(why) = got else {
            panic!("{got:?}")
        };
        assert!(why.to_string().contains("removing its rule"), "{why}");
        let steps = r.take();
        assert!(!steps.iter().any(|s| s == "nft add"), "{steps:#?}");
        assert!(rule_left(&steps), "{steps:#?}");
        // Released: the rule cannot go, so neither do the chains; the
        // capture does.
        assert!(release_in(&r).is_err());
        let steps = r.take();
        assert_eq!(steps.last().map(String::as_str), Some("nft chains+guard"));
        let t = chains_and_guard();
        assert!(t.contains("orig_src_mark") && t.contains("orig_src_guard"));
        assert!(!t.contains("redirect"), "{t}");
    }

    /// A pod with an IPv6 address whose IPv6 reply routing cannot go in
    /// is not reported as having original source.
    #[test]
    fn a_pod_with_ipv6_without_ipv6_routing_is_reported() {
        let r = Record {
            no_v6: true,
            ..Default::default()
        };
        let got = install_in(&r, Capture::default(), true).unwrap();
        assert!(matches!(got, OrigSrc::Off(_)), "{got:?}");
        assert!(!rule_left(&r.take()));
        // Without an IPv6 address, IPv6 off is no loss.
        let r = Record {
            no_v6: true,
            ..Default::default()
        };
        let got = install_in(&r, Capture::default(), false).unwrap();
        assert!(matches!(got, OrigSrc::On), "{got:?}");
    }
}
