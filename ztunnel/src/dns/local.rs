//! The names the mesh answers itself, from the proxy state: a Service's
//! VIPs (`<svc>.<ns>.svc.<domain>`), a headless Service's ready endpoints,
//! and the per-pod names under a headless Service
//! (`<pod>.<svc>.<ns>.svc.<domain>`, the names a StatefulSet's pods get).

use std::net::IpAddr;

use crate::state::Snapshot;

/// What the mesh knows about one name.
#[derive(Debug, PartialEq, Eq)]
pub enum Local {
    /// The name is the mesh's: these addresses (possibly none of the asked
    /// family, which is an empty NOERROR answer).
    Addresses(Vec<IpAddr>),
    /// Under `svc.<domain>` but no Service or per-pod record (a search-path
    /// expansion such as `example.com.shop.svc.cluster.local`, which has no
    /// headless Service `com` in `shop` above it): NXDOMAIN without asking
    /// upstream.
    NoSuchName,
    /// Not the mesh's name: ask upstream.
    Unknown,
}

/// Looks `name` (lower case, without the trailing dot) up in the state.
pub fn lookup(snapshot: &Snapshot, domain: &str, name: &str) -> Local {
    let suffix = format!(".svc.{domain}");
    let Some(head) = name.strip_suffix(&suffix) else {
        return Local::Unknown;
    };
    let labels: Vec<&str> = head.split('.').collect();
    if labels.iter().any(|l| l.is_empty()) {
        return Local::NoSuchName;
    }
    match labels.as_slice() {
        [svc, ns] => service(snapshot, domain, svc, ns),
        [pod, svc, ns] => pod_of_headless(snapshot, domain, pod, svc, ns),
        // SRV names (`_port._proto.svc.ns`) are not A/AAAA queries and are
        // forwarded before they get here.
        _ => Local::NoSuchName,
    }
}

fn key(domain: &str, svc: &str, ns: &str) -> String {
    format!("{ns}/{svc}.{ns}.svc.{domain}")
}

fn service(snapshot: &Snapshot, domain: &str, svc: &str, ns: &str) -> Local {
    let key = key(domain, svc, ns);
    let Some(entry) = snapshot.service(&key) else {
        return Local::Unknown;
    };
    if !entry.service.vips.is_empty() {
        return Local::Addresses(entry.service.vips.iter().map(|(_, ip)| *ip).collect());
    }
    // Headless: every ready endpoint's address, as the cluster DNS answers.
    let mut ips: Vec<IpAddr> = snapshot
        .endpoints(&key)
        .filter(|w| w.healthy)
        .flat_map(|w| w.addresses.iter().copied())
        .collect();
    ips.sort();
    ips.dedup();
    Local::Addresses(ips)
}

fn pod_of_headless(snapshot: &Snapshot, domain: &str, pod: &str, svc: &str, ns: &str) -> Local {
    let key = key(domain, svc, ns);
    // Only headless Services publish per-pod names; any other three-label
    // name is a search-path expansion (`example.com` + `<ns>.svc...`).
    let Some(entry) = snapshot.service(&key) else {
        return Local::NoSuchName;
    };
    if !entry.service.vips.is_empty() {
        return Local::NoSuchName;
    }
    // A StatefulSet pod's hostname is its name; another pod that set
    // `hostname`/`subdomain` itself is left to the cluster DNS.
    match snapshot
        .endpoints(&key)
        .find(|w| w.healthy && w.name.eq_ignore_ascii_case(pod))
    {
        Some(w) => Local::Addresses(w.addresses.clone()),
        None => Local::Unknown,
    }
}
