//! The L4 scenario's report: the figures per path, the proxies' memory and
//! CPU, and the goals for the ztunnel path, as tables and JSON.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Ctx, MESHES, Mesh, Placement, Rss, Sample, Samples, figures};
use crate::Args;
use crate::common::{cell, load_cpu, stat_json, stats};

/// One proxy's figures the goals are judged on (medians, MiB and CPU s).
#[derive(Debug, Clone, Copy)]
pub(super) struct ProxyMedians {
    idle: f64,
    held: Option<f64>,
    cpu_per_gb: Option<f64>,
}

/// Per path, per proxy, its medians: for the goals.
pub(super) type Medians = BTreeMap<(Placement, Mesh), Vec<ProxyMedians>>;

/// Median (min, max) of a list, or None when it is empty.
fn stats_of(v: Vec<f64>) -> Option<(f64, f64, f64)> {
    (!v.is_empty()).then(|| stats(v))
}

/// 8 MB and 20 MB (the goals are in MB) in MiB.
const MB: f64 = 1e6 / (1024.0 * 1024.0);

/// Prints the figures of every path, each mesh also as a ratio to plain;
/// returns them as JSON.
pub(super) fn figures_table(
    a: &Args,
    machine: &str,
    c: &Ctx<'_>,
    placements: &[Placement],
    samples: &Samples,
) -> Vec<Value> {
    let pin = load_cpu()
        .map(|c| format!("load generator pinned to CPU {c}"))
        .unwrap_or_else(|| "load generator not pinned".into());
    println!(
        "\nL4: client pod (node-1) -> server pod (node-2 cross-node, node-1 same-node); {} runs of {} s per figure; {pin} ({machine})",
        a.runs, c.secs
    );
    println!(
        "{} runtime threads per ztunnel ({}), --concurrency {} per Envoy. Each cell: median (min–max); x plain: the mesh's figure over plain's in the same run.",
        c.workers, c.runtime, c.workers
    );
    let mut paths_json = Vec::new();
    for &p in placements {
        println!("\n{}:\n", p.name());
        if p == Placement::Same && c.fast_path {
            println!(
                "(ztunnel: one ztunnel serves both pods and hands each connection from its outbound side to its inbound side in memory: no tunnel, no TLS; `same_node_fast_path`)\n"
            );
        }
        println!(
            "| scenario | figure | plain | ztunnel | envoy | ztunnel x plain | envoy x plain |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- |");
        for f in figures() {
            let per = |m: Mesh| -> Vec<f64> {
                samples
                    .get(&(p, m))
                    .map(|v| {
                        v.iter()
                            .filter_map(|s| s.figures.get(f.key).copied())
                            .collect()
                    })
                    .unwrap_or_default()
            };
            let plain = per(Mesh::Plain);
            if plain.is_empty() {
                continue;
            }
            let ratio = |m: Mesh| {
                stats_of(
                    per(m)
                        .iter()
                        .zip(&plain)
                        .filter(|(_, b)| **b > 0.0)
                        .map(|(a, b)| a / b)
                        .collect(),
                )
            };
            let show = |s: Option<(f64, f64, f64)>, d: usize| {
                s.map(|s| cell(s, d)).unwrap_or_else(|| "-".into())
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.scenario,
                f.unit,
                show(stats_of(plain.clone()), f.decimals),
                show(stats_of(per(Mesh::Ztunnel)), f.decimals),
                show(stats_of(per(Mesh::Envoy)), f.decimals),
                show(ratio(Mesh::Ztunnel), 2),
                show(ratio(Mesh::Envoy), 2),
            );
            for m in MESHES {
                paths_json.push(json!({
                    "placement": p.name(),
                    "path": m.name(),
                    "figure": f.key,
                    "scenario": f.scenario,
                    "unit": f.unit,
                    "higher_is_better": f.higher_is_better,
                    "runs": per(m),
                    "value": stats_of(per(m)).map(stat_json),
                    "ratio_to_plain": if m == Mesh::Plain { Value::Null } else { ratio(m).map(stat_json).into() },
                }));
            }
        }
    }
    paths_json
}

/// Prints each proxy's memory (`idle` before any load, `peak` after all)
/// and CPU; returns them as JSON, and their medians for the goals.
pub(super) fn proxies_table(
    a: &Args,
    c: &Ctx<'_>,
    placements: &[Placement],
    samples: &Samples,
    idle: &Rss,
    peak: &Rss,
) -> (Vec<Value>, Medians) {
    println!(
        "\nPer proxy: RSS before any load, largest RSS while {} connections were open (scenario 6), peak RSS (VmHWM) after everything, each with its anonymous part (RssAnon: without the binary's mapped pages) in brackets; CPU seconds per GB in scenario 1 up, per 1 000 requests in scenario 4 at 32 connections (7).\n",
        a.l4_connections
    );
    println!(
        "| path | proxy | side | RSS idle MiB | RSS {} conns MiB | RSS peak MiB | CPU s / GB (1, up) | CPU s / 1000 req (4, 32 conns) |",
        a.l4_connections
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut proxies_json = Vec::new();
    // Per path, per proxy, its medians: for the goals.
    let mut medians: Medians = BTreeMap::new();
    for &p in placements {
        for m in [Mesh::Ztunnel, Mesh::Envoy] {
            let Some(v) = samples.get(&(p, m)) else {
                continue;
            };
            for (i, x) in c.proxies(m, p).iter().enumerate() {
                let of = |f: fn(&Sample) -> &BTreeMap<usize, f64>| {
                    stats_of(v.iter().filter_map(|s| f(s).get(&i).copied()).collect())
                };
                let gb = of(|s| &s.cpu_per_gb);
                let k = of(|s| &s.cpu_per_1000);
                let held = of(|s| &s.rss_held);
                let held_anon = of(|s| &s.anon_held);
                let show = |s: Option<(f64, f64, f64)>, d| {
                    s.map(|s| cell(s, d)).unwrap_or_else(|| "-".into())
                };
                let (idle, idle_anon) = idle.get(&x.name).copied().unwrap_or_default();
                let (top, top_anon) = peak.get(&x.name).copied().unwrap_or_default();
                let held_cell = match (held, held_anon) {
                    (Some(h), Some(a)) => format!("{} [{:.1}]", cell(h, 1), a.0),
                    _ => "-".into(),
                };
                println!(
                    "| {} {} | {} | {} | {idle:.1} [{idle_anon:.1}] | {held_cell} | {top:.1} [{top_anon:.1}] | {} | {} |",
                    p.name(),
                    m.name(),
                    x.name,
                    x.side,
                    show(gb, 3),
                    show(k, 3),
                );
                medians.entry((p, m)).or_default().push(ProxyMedians {
                    idle,
                    held: held.map(|s| s.0),
                    cpu_per_gb: gb.map(|s| s.0),
                });
                proxies_json.push(json!({
                    "placement": p.name(),
                    "path": m.name(),
                    "proxy": x.name,
                    "side": x.side,
                    "rss_idle_mib": idle,
                    "rss_anon_idle_mib": idle_anon,
                    "rss_held_mib": held.map(stat_json),
                    "rss_anon_held_mib": held_anon.map(stat_json),
                    "rss_peak_mib": top,
                    "rss_anon_peak_mib": top_anon,
                    "cpu_s_per_gb_up": gb.map(stat_json),
                    "cpu_s_per_1000_requests": k.map(stat_json),
                }));
            }
        }
    }
    (proxies_json, medians)
}

/// The goals for the ztunnel path, against the medians (not
/// asserted).
pub(super) fn goals(
    a: &Args,
    c: &Ctx<'_>,
    placements: &[Placement],
    samples: &Samples,
    medians: &Medians,
) -> Vec<Value> {
    // Issue 27's goals for the ztunnel path, against the medians.
    let mut goals = Vec::new();
    let ratio_median = |p: Placement, key: &str| -> Option<f64> {
        let z = samples.get(&(p, Mesh::Ztunnel))?;
        let plain = samples.get(&(p, Mesh::Plain))?;
        stats_of(
            z.iter()
                .zip(plain)
                .filter_map(|(a, b)| Some(a.figures.get(key)? / b.figures.get(key)?))
                .collect(),
        )
        .map(|s| s.0)
    };
    for &p in placements {
        let mut goal = |name: String, value: Option<f64>, target: String, met: Option<bool>| {
            if let Some(v) = value {
                goals.push(json!({"placement": p.name(), "goal": name, "measured": v, "target": target, "met": met}));
            }
        };
        for (key, what, min) in [
            ("s1_up_gbps", "one stream (up) / plain", 0.5),
            ("s1_down_gbps", "one stream (down) / plain", 0.5),
            ("s4_c1_rps", "1-connection HTTP req/s / plain", 0.70),
            ("s4_c32_rps", "32-connection HTTP req/s / plain", 0.45),
            ("s5_cps", "new connections/s / plain", 0.30),
        ] {
            let r = ratio_median(p, key);
            goal(what.into(), r, format!(">= {min}"), r.map(|r| r >= min));
        }
        let added: Option<f64> = stats_of(
            samples
                .get(&(p, Mesh::Ztunnel))
                .zip(samples.get(&(p, Mesh::Plain)))
                .map(|(z, pl)| {
                    z.iter()
                        .zip(pl)
                        .filter_map(|(a, b)| {
                            Some(a.figures.get("s3_p50_us")? - b.figures.get("s3_p50_us")?)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
        .map(|s| s.0);
        goal(
            "ping-pong p50 added over plain (µs)".into(),
            added,
            "< 40".into(),
            added.map(|a| a < 40.0),
        );
        let p99 = ratio_median(p, "s3_p99_us");
        goal(
            "ping-pong p99 / plain".into(),
            p99,
            "<= 1.6".into(),
            p99.map(|r| r <= 1.6),
        );
        let z = medians
            .get(&(p, Mesh::Ztunnel))
            .cloned()
            .unwrap_or_default();
        let e = medians.get(&(p, Mesh::Envoy)).cloned().unwrap_or_default();
        let max_of = |v: &[ProxyMedians], f: fn(&ProxyMedians) -> Option<f64>| {
            v.iter().filter_map(f).reduce(f64::max)
        };
        let idle_max = max_of(&z, |x| Some(x.idle));
        goal(
            "idle RSS per ztunnel (MiB)".into(),
            idle_max,
            format!("< 10 MB ({:.2} MiB)", 10.0 * MB),
            idle_max.map(|v| v < 10.0 * MB),
        );
        let held_max = max_of(&z, |x| x.held);
        goal(
            format!(
                "RSS per ztunnel with {} connections (MiB)",
                a.l4_connections
            ),
            held_max,
            format!("< 16 MB ({:.2} MiB)", 16.0 * MB),
            held_max.map(|v| v < 16.0 * MB),
        );
        // The encrypting side of scenario 1 up is the client side's proxy;
        // a same-node hand-over encrypts nothing.
        let enc = z.first().and_then(|x| x.cpu_per_gb);
        goal(
            if p == Placement::Same && c.fast_path {
                "CPU s / GB, ztunnel (scenario 1 up; same-node hand-over, no encryption)".into()
            } else {
                "CPU s / GB, encrypting ztunnel (scenario 1 up)".into()
            },
            enc,
            // 30% below the 1.34 of the full run of 2026-12-07.
            "< 0.94".into(),
            enc.map(|v| v < 0.94),
        );
        goals.extend(versus_envoy(p, samples, &z, &e));
    }
    goals
}

/// ztunnel against Envoy on one placement: every figure, and memory per
/// path (`z`, `e`: the paths' proxies' medians); None when Envoy was not
/// measured.
fn versus_envoy(
    p: Placement,
    samples: &Samples,
    z: &[ProxyMedians],
    e: &[ProxyMedians],
) -> Option<Value> {
    let median_of = |p: Placement, m: Mesh, key: &str| -> Option<f64> {
        stats_of(
            samples
                .get(&(p, m))?
                .iter()
                .filter_map(|s| s.figures.get(key).copied())
                .collect(),
        )
        .map(|s| s.0)
    };
    // ztunnel against Envoy: every figure, and memory per path.
    let mut worse = Vec::new();
    for f in figures() {
        if let (Some(zv), Some(ev)) = (
            median_of(p, Mesh::Ztunnel, f.key),
            median_of(p, Mesh::Envoy, f.key),
        ) && (if f.higher_is_better { zv < ev } else { zv > ev })
        {
            worse.push(format!("{} {}", f.scenario, f.unit));
        }
    }
    let sum = |v: &[ProxyMedians], f: fn(&ProxyMedians) -> Option<f64>| {
        v.iter().filter_map(f).sum::<f64>()
    };
    for (what, zv, ev) in [
        ("idle", sum(z, |x| Some(x.idle)), sum(e, |x| Some(x.idle))),
        ("held", sum(z, |x| x.held), sum(e, |x| x.held)),
    ] {
        if zv > 0.0 && ev > 0.0 && zv >= ev {
            worse.push(format!(
                "RSS {what}: ztunnels {zv:.1} MiB, Envoys {ev:.1} MiB"
            ));
        }
    }
    let compared = figures().any(|f| median_of(p, Mesh::Envoy, f.key).is_some());
    compared.then(|| {
        json!({
            "placement": p.name(),
            "goal": "ztunnel at least as good as Envoy in every figure, less memory",
            "measured": if worse.is_empty() { "yes".to_string() } else { format!("not in: {}", worse.join("; ")) },
            "target": "every figure",
            "met": worse.is_empty(),
        })
    })
}

/// Prints the goals' table.
pub(super) fn print_goals(goals: &[Value]) {
    println!("\nGoals for the ztunnel path (medians; not asserted):\n");
    println!("| placement | goal | measured | target | met |");
    println!("| --- | --- | --- | --- | --- |");
    for g in goals {
        let measured = match &g["measured"] {
            Value::Number(n) => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
            v => v.as_str().unwrap_or_default().to_string(),
        };
        println!(
            "| {} | {} | {measured} | {} | {} |",
            g["placement"].as_str().unwrap_or_default(),
            g["goal"].as_str().unwrap_or_default(),
            g["target"].as_str().unwrap_or_default(),
            match g["met"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            }
        );
    }
}
