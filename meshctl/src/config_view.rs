//! `meshctl ztunnel-config`: the tunnel's view of workloads, services,
//! policies, certificates and live connections, from `/config_dump`s.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::Value;

use crate::output::Table;
use crate::source::Dump;

/// The filters operators ask for.
#[derive(Debug, Default, Clone)]
pub struct Filters {
    pub namespace: Option<String>,
    pub address: Option<IpAddr>,
    pub direction: Option<String>,
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// Names for addresses (workload and service IPs), to print a waypoint as
/// `shop/waypoint` rather than an IP.
fn address_names(d: &Value) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for w in arr(&d["workloads"]) {
        for a in arr(&w["addresses"]) {
            names.insert(s(a), format!("{}/{}", s(&w["namespace"]), s(&w["name"])));
        }
    }
    for svc in arr(&d["services"]) {
        for v in arr(&svc["vips"]) {
            // (network, ip) pairs.
            if let Some(ip) = v.get(1) {
                names.insert(
                    s(ip),
                    format!("{}/{}", s(&svc["namespace"]), s(&svc["name"])),
                );
            }
        }
    }
    names
}

fn waypoint(w: &Value, names: &BTreeMap<String, String>) -> String {
    let Some(dst) = w.get("destination") else {
        return "-".into();
    };
    if let Some(a) = dst.get("Address") {
        let ip = s(&a["ip"]);
        return names.get(&ip).cloned().unwrap_or(ip);
    }
    if let Some(h) = dst.get("Hostname") {
        return format!("{}/{}", s(&h["namespace"]), s(&h["hostname"]));
    }
    "-".into()
}

fn protocol(v: &Value) -> String {
    match v.as_str() {
        Some("Hbone") => "HBONE".into(),
        Some("None") => "TCP".into(),
        _ => s(v),
    }
}

pub fn workloads(d: &Dump, f: &Filters) -> Table {
    let names = address_names(&d.value);
    let mut t = Table::new(
        "workloads",
        &[
            "NAMESPACE",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL",
        ],
    )
    .with_wide(&["IDENTITY", "HEALTHY", "CANONICAL NAME", "REVISION"]);
    for w in arr(&d.value["workloads"]) {
        let addrs: Vec<String> = arr(&w["addresses"]).iter().map(s).collect();
        if f.namespace
            .as_deref()
            .is_some_and(|n| n != s(&w["namespace"]))
        {
            continue;
        }
        if f.address.is_some_and(|a| !addrs.contains(&a.to_string())) {
            continue;
        }
        t.push_item(
            vec![
                s(&w["namespace"]),
                s(&w["name"]),
                if addrs.is_empty() {
                    "-".into()
                } else {
                    addrs.join(",")
                },
                s(&w["node"]),
                waypoint(&w["waypoint"], &names),
                protocol(&w["protocol"]),
                s(&w["identity"]),
                s(&w["healthy"]),
                s(&w["canonical_name"]),
                s(&w["canonical_revision"]),
            ],
            w.clone(),
        );
    }
    t
}

pub fn services(d: &Dump, f: &Filters) -> Table {
    let names = address_names(&d.value);
    let mut t = Table::new(
        "services",
        &["NAMESPACE", "NAME", "VIPS", "WAYPOINT", "ENDPOINTS"],
    )
    .with_wide(&["HOSTNAME"]);
    for svc in arr(&d.value["services"]) {
        let key = format!("{}/{}", s(&svc["namespace"]), s(&svc["hostname"]));
        let vips: Vec<String> = arr(&svc["vips"])
            .iter()
            .filter_map(|v| v.get(1).map(s))
            .collect();
        if f.namespace
            .as_deref()
            .is_some_and(|n| n != s(&svc["namespace"]))
        {
            continue;
        }
        if f.address.is_some_and(|a| !vips.contains(&a.to_string())) {
            continue;
        }
        let backing: Vec<&Value> = arr(&d.value["workloads"])
            .iter()
            .filter(|w| w["services"].get(&key).is_some())
            .collect();
        let ready = backing.iter().filter(|w| w["healthy"] == true).count();
        let ports: Vec<String> = arr(&svc["ports"])
            .iter()
            .map(|p| s(&p["service_port"]))
            .collect();
        t.push_item(
            vec![
                s(&svc["namespace"]),
                s(&svc["name"]),
                format!(
                    "{}{}",
                    vips.join(","),
                    if ports.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", ports.join(","))
                    }
                ),
                waypoint(&svc["waypoint"], &names),
                format!("{ready}/{}", backing.len()),
                s(&svc["hostname"]),
            ],
            svc.clone(),
        );
    }
    t
}

fn scope(p: &Value) -> String {
    match p["scope"].as_str() {
        Some("Global") => "mesh".into(),
        Some("Namespace") => format!("namespace {}", s(&p["namespace"])),
        Some("WorkloadSelector") => "workload selector".into(),
        _ => s(&p["scope"]),
    }
}

pub fn policies(d: &Dump, f: &Filters) -> Table {
    let mut t = Table::new(
        "policies",
        &["NAMESPACE", "NAME", "ACTION", "SCOPE", "RULES"],
    );
    for p in arr(&d.value["policies"]) {
        if f.namespace
            .as_deref()
            .is_some_and(|n| n != s(&p["namespace"]))
        {
            continue;
        }
        t.push_item(
            vec![
                s(&p["namespace"]),
                s(&p["name"]),
                s(&p["action"]).to_ascii_uppercase(),
                scope(p),
                arr(&p["rules"]).len().to_string(),
            ],
            p.clone(),
        );
    }
    t
}

pub fn certificates(dumps: &[Dump]) -> Table {
    let mut t = Table::new(
        "certificates",
        &["NODE", "IDENTITY", "KIND", "STATE", "NOT AFTER"],
    )
    .with_wide(&["SERIAL", "NOT BEFORE"]);
    for d in dumps {
        for c in arr(&d.value["certificates"]) {
            let state = match (&c["state"], &c["last_error"]) {
                (Value::String(st), Value::String(e)) => format!("{st} (last error: {e})"),
                (st, _) => s(st),
            };
            let mut item = c.clone();
            item["node"] = d.node.clone().into();
            item["kind"] = "leaf".into();
            t.push_item(
                vec![
                    d.node.clone(),
                    s(&c["identity"]),
                    "leaf".into(),
                    state,
                    s(&c["not_after"]),
                    s(&c["serial"]),
                    s(&c["not_before"]),
                ],
                item,
            );
        }
        for r in arr(&d.value["roots"]) {
            let mut item = r.clone();
            item["node"] = d.node.clone().into();
            item["kind"] = "root".into();
            t.push_item(
                vec![
                    d.node.clone(),
                    s(&r["subject"]),
                    "root".into(),
                    "trusted".into(),
                    s(&r["not_after"]),
                    s(&r["serial"]),
                    s(&r["not_before"]),
                ],
                item,
            );
        }
    }
    t
}

pub fn connections(dumps: &[Dump], f: &Filters) -> Table {
    let mut t = Table::new(
        "connections",
        &[
            "NODE",
            "WORKLOAD",
            "DIRECTION",
            "LOCAL",
            "REMOTE",
            "TARGET",
            "PROTOCOL",
            "PEER IDENTITY",
        ],
    );
    for d in dumps {
        for c in arr(&d.value["connections"]) {
            let direction = s(&c["direction"]);
            if f.direction
                .as_deref()
                .is_some_and(|want| !direction.eq_ignore_ascii_case(want))
            {
                continue;
            }
            // Inbound over HBONE, or plaintext into the mesh (15006).
            let inbound = direction.to_ascii_lowercase().starts_with("inbound");
            let (workload, local, remote, peer) = if inbound {
                (&c["dst_workload"], &c["dst"], &c["src"], &c["src_identity"])
            } else {
                let remote = if c["hbone_peer"].is_null() {
                    &c["dst"]
                } else {
                    &c["hbone_peer"]
                };
                (&c["src_workload"], &c["src"], remote, &c["dst_identity"])
            };
            if let Some(a) = f.address {
                let a = a.to_string();
                let hit = [&c["src"], &c["dst"]]
                    .iter()
                    .any(|v| s(v).rsplit_once(':').is_some_and(|(ip, _)| ip == a));
                if !hit {
                    continue;
                }
            }
            let mut item = c.clone();
            item["node"] = d.node.clone().into();
            t.push_item(
                vec![
                    d.node.clone(),
                    s(workload),
                    direction.to_ascii_uppercase(),
                    s(local),
                    s(remote),
                    s(&c["dst"]),
                    s(&c["protocol"]).to_ascii_uppercase(),
                    s(peer),
                ],
                item,
            );
        }
    }
    t
}
