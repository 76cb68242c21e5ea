//! The names the mesh answers itself, from the proxy state: a Service's
//! VIPs (`<svc>.<ns>.svc.<domain>`), a headless Service's ready endpoints,
//! and the per-pod names under a headless Service
//! (`<pod>.<svc>.<ns>.svc.<domain>`, the names a StatefulSet's pods get).

use std::net::IpAddr;

use mesh_core::state::Snapshot;

/// What the mesh knows about one name.
#[derive(Debug, PartialEq, Eq)]
pub enum Local {
    /// The name is the mesh's: these addresses (possibly none of the asked
    /// family, which is an empty NOERROR answer). `endpoints`: pod
    /// addresses (a headless Service or a per-pod name), which move more
    /// often than a VIP.
    Addresses { ips: Vec<IpAddr>, endpoints: bool },
    /// Under `svc.<domain>` with three labels or more before it but no
    /// Service above it (a search-path expansion such as
    /// `example.com.shop.svc.cluster.local`: there is no Service `com` in
    /// `shop`): NXDOMAIN without asking upstream.
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
        return Local::Addresses {
            ips: entry.service.vips.iter().map(|(_, ip)| *ip).collect(),
            endpoints: false,
        };
    }
    // Headless: every ready endpoint's address, as the cluster DNS answers.
    let mut ips: Vec<IpAddr> = snapshot
        .endpoints(&key)
        .filter(|w| w.healthy)
        .flat_map(|w| w.addresses.iter().copied())
        .collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() {
        // No VIP and no ready endpoint the mesh knows: an ExternalName
        // Service, one without a selector, or one that publishes unready
        // addresses. The cluster DNS knows what to answer.
        return Local::Unknown;
    }
    Local::Addresses {
        ips,
        endpoints: true,
    }
}

fn pod_of_headless(snapshot: &Snapshot, domain: &str, pod: &str, svc: &str, ns: &str) -> Local {
    let key = key(domain, svc, ns);
    // A three-label name under no Service is a search-path expansion
    // (`example.com` + `<ns>.svc...`).
    let Some(entry) = snapshot.service(&key) else {
        return Local::NoSuchName;
    };
    if !entry.service.vips.is_empty() {
        // The cluster DNS has endpoint names under these too
        // (`10-1-1-20.web.shop...`): its to answer.
        return Local::Unknown;
    }
    // A StatefulSet pod's hostname is its name; another pod that set
    // `hostname`/`subdomain` itself is left to the cluster DNS.
    match snapshot
        .endpoints(&key)
        .find(|w| w.healthy && w.name.eq_ignore_ascii_case(pod))
    {
        Some(w) => Local::Addresses {
            ips: w.addresses.clone(),
            endpoints: true,
        },
        None => Local::Unknown,
    }
}
