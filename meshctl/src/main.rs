//! The meshctl binary.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use meshctl::config_view::{self, Filters};
use meshctl::output::{Format, Table, print, value_string};
use meshctl::source::{Mesh, SourceError};
use meshctl::{check, manage, top, why};

/// The default lab directory (`lab up`'s default).
const DEFAULT_LAB: &str = "/tmp/mesh-lab";

#[derive(Parser)]
#[command(
    version,
    about = "See and steer the mesh: what the tunnels think is going on"
)]
struct Args {
    /// A ztunnel's admin address (its /config_dump), e.g. 10.0.0.5:15000.
    #[arg(long, global = true, env = "MESHCTL_ADDR")]
    addr: Option<SocketAddr>,
    /// That ztunnel's metrics address (for `top` and `check`), e.g. 10.0.0.5:15020.
    #[arg(long, global = true)]
    metrics_addr: Option<SocketAddr>,
    /// The controller's debug address (istiod-lite --debug-addr).
    #[arg(long, global = true, env = "MESHCTL_CONTROLLER")]
    controller: Option<SocketAddr>,
    /// A lab's directory: every proxy of the lab, reached in its namespaces.
    /// The default when no other source is given and /tmp/mesh-lab holds a lab.
    #[arg(long, global = true, env = "MESHCTL_LAB")]
    lab: Option<PathBuf>,
    /// A saved /config_dump to read instead of a live ztunnel.
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    /// A Kubernetes cluster (the current kubeconfig): proxies are reached
    /// through the API server's pod port-forward.
    #[arg(long, global = true)]
    kube: bool,
    /// Where the mesh is installed on Kubernetes.
    #[arg(long, global = true, default_value = "istio-system")]
    kube_namespace: String,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
    All,
}

#[derive(Clone, Copy, ValueEnum)]
enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, ValueEnum)]
enum Serves {
    Service,
    Workload,
    All,
}

#[derive(Subcommand)]
enum Cmd {
    /// What a ztunnel holds: workloads, services, policies, certificates,
    /// live connections.
    ZtunnelConfig {
        what: What,
        /// Only the ztunnel on this node.
        #[arg(long)]
        node: Option<String>,
        #[arg(long, short = 'n')]
        namespace: Option<String>,
        /// Only entries with this address.
        #[arg(long)]
        address: Option<IpAddr>,
        /// Connections in this direction only.
        #[arg(long, value_enum)]
        direction: Option<Direction>,
    },
    /// Explains one connection: capture, identity, routing, waypoint,
    /// policies at each hop, and the outcome.
    Why {
        /// The source pod: namespace/name, or its IP.
        src: String,
        /// The destination: a service (name, name.namespace, FQDN), a pod
        /// (namespace/name) or an IP; :PORT (default 80).
        dst: String,
        /// Where mesh-wide policies live.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Live connections, bytes and requests per workload edge.
    Top {
        /// Print one frame and exit (for scripts).
        #[arg(long)]
        once: bool,
        /// Seconds between refreshes (rates are over this interval).
        #[arg(long, default_value_t = 2.0)]
        interval: f64,
    },
    /// Enrolls a namespace in the mesh (istio.io/dataplane-mode=ambient).
    Enroll { namespace: String },
    /// Releases a namespace from the mesh.
    Unenroll { namespace: String },
    /// Declares, lists and deletes waypoints.
    Waypoint {
        #[command(subcommand)]
        cmd: WaypointCmd,
    },
    /// Every proxy ready, every certificate valid, every config acknowledged.
    Check {
        /// A certificate expiring sooner than this fails the check.
        #[arg(long, default_value_t = 3600)]
        expiry_warning_secs: u64,
    },
    /// Prints a shell completion script.
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum WaypointCmd {
    /// Declares a waypoint (a Gateway of class istio-waypoint).
    Apply {
        #[arg(long, short = 'n')]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
        /// Also send the namespace's traffic through it.
        #[arg(long)]
        enroll_namespace: bool,
        /// What it serves.
        #[arg(long = "for", value_enum, default_value = "service")]
        serves: Serves,
    },
    /// Waypoints, the services each serves, their routes and policies.
    List {
        #[arg(long, short = 'n')]
        namespace: Option<String>,
    },
    /// Removes a waypoint.
    Delete {
        #[arg(long, short = 'n')]
        namespace: String,
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
}

async fn mesh(a: &Args) -> Result<Mesh, SourceError> {
    if a.kube {
        let client = kube::Client::try_default().await.map_err(|e| {
            SourceError::Other(format!(
                "no Kubernetes client: {e}\n  check: KUBECONFIG or ~/.kube/config, as kubectl uses"
            ))
        })?;
        return Mesh::from_kube(client, &a.kube_namespace).await;
    }
    if let Some(f) = &a.file {
        return Mesh::from_file(f);
    }
    if let Some(addr) = a.addr {
        return Ok(Mesh::by_address(addr, a.metrics_addr, a.controller));
    }
    let lab = a.lab.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_LAB));
    if a.lab.is_some() || lab.join("lab.json").exists() {
        let mut m = Mesh::from_lab(&lab)?;
        if let Some(c) = a.controller {
            m.controller = Some(meshctl::source::Endpoint::new("istiod-lite debug", c, None));
        }
        return Ok(m);
    }
    // The controller alone (its connections, config problems and sources).
    if let Some(c) = a.controller {
        return Ok(Mesh {
            ztunnels: Vec::new(),
            waypoints: Vec::new(),
            controller: Some(meshctl::source::Endpoint::new("istiod-lite debug", c, None)),
            file: None,
            lab: None,
            kube: None,
        });
    }
    Err(SourceError::Other(format!(
        "no mesh to read: give --addr (a ztunnel's admin address), --controller ADDR, --lab DIR, or --file DUMP (no lab at {DEFAULT_LAB})"
    )))
}

async fn run(a: Args) -> Result<(String, bool), SourceError> {
    let out = a.output;
    let tables = |t: Vec<Table>| print(out, &t);
    match &a.cmd {
        Cmd::Completion { shell } => {
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "meshctl", &mut buf);
            Ok((String::from_utf8_lossy(&buf).into_owned(), true))
        }
        Cmd::ZtunnelConfig {
            what,
            node,
            namespace,
            address,
            direction,
        } => {
            let m = mesh(&a).await?;
            let dumps = m.dumps(node.as_deref()).await?;
            let f = Filters {
                namespace: namespace.clone(),
                address: *address,
                direction: direction.map(|d| match d {
                    Direction::Inbound => "inbound".into(),
                    Direction::Outbound => "outbound".into(),
                }),
            };
            // The mesh-wide tables are the same on every ztunnel: one is enough.
            let one = &dumps[..1];
            let mut ts = Vec::new();
            let all = matches!(what, What::All);
            if all || matches!(what, What::Workloads) {
                ts.extend(one.iter().map(|d| config_view::workloads(d, &f)));
            }
            if all || matches!(what, What::Services) {
                ts.extend(one.iter().map(|d| config_view::services(d, &f)));
            }
            if all || matches!(what, What::Policies) {
                ts.extend(one.iter().map(|d| config_view::policies(d, &f)));
            }
            if all || matches!(what, What::Certificates) {
                ts.push(config_view::certificates(&dumps));
            }
            if all || matches!(what, What::Connections) {
                ts.push(config_view::connections(&dumps, &f));
            }
            Ok((tables(ts), true))
        }
        Cmd::Why {
            src,
            dst,
            root_namespace,
        } => {
            let m = mesh(&a).await?;
            let (dumps, unreachable) = m.reachable_dumps().await?;
            for u in &unreachable {
                eprintln!("meshctl why: ztunnel on {u} did not answer; reasoning from the others");
            }
            // Which L7 policies each waypoint applies, when the controller
            // is reachable (it is optional for `why`).
            let l7 = match &m.controller {
                Some(c) => c.get_json("/debug/model").await.ok().map(|model| {
                    model["waypointRoutes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|r| {
                            (
                                r["service"].as_str().unwrap_or_default().to_string(),
                                r["policies"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|p| p.as_str().map(str::to_string))
                                    .collect(),
                            )
                        })
                        .collect()
                }),
                None => None,
            };
            let e = why::explain(&dumps, src, dst, root_namespace, "", l7.as_ref())?;
            let mut text = match out {
                Format::Table => e.table().render(),
                f => value_string(f, &e),
            };
            if out == Format::Table && !e.skipped.is_empty() {
                text.push_str(&format!(
                    "note: {} entries of the dump could not be read (a newer version?): {}\n",
                    e.skipped.len(),
                    e.skipped.join("; ")
                ));
            }
            Ok((text, true))
        }
        Cmd::Top { once, interval } => {
            let m = mesh(&a).await?;
            let interval = Duration::from_secs_f64(interval.max(0.2));
            let mut stdout = std::io::stdout();
            top::run(&m, interval, *once, |t, live| {
                let text = print(out, std::slice::from_ref(t));
                // Refresh in place: home, clear, frame.
                let _ = if live {
                    write!(stdout, "\x1b[H\x1b[2J{text}")
                } else {
                    write!(stdout, "{text}")
                };
                let _ = stdout.flush();
            })
            .await?;
            Ok((String::new(), true))
        }
        Cmd::Enroll { namespace } => Ok((
            manage::enroll(&mesh(&a).await?, namespace, true).await?,
            true,
        )),
        Cmd::Unenroll { namespace } => Ok((
            manage::enroll(&mesh(&a).await?, namespace, false).await?,
            true,
        )),
        Cmd::Waypoint { cmd } => {
            let m = mesh(&a).await?;
            match cmd {
                WaypointCmd::Apply {
                    namespace,
                    name,
                    enroll_namespace,
                    serves,
                } => {
                    let serves = match serves {
                        Serves::Service => "service",
                        Serves::Workload => "workload",
                        Serves::All => "all",
                    };
                    Ok((
                        manage::waypoint_apply(&m, namespace, name, serves, *enroll_namespace)
                            .await?,
                        true,
                    ))
                }
                WaypointCmd::List { namespace } => Ok((
                    tables(manage::waypoint_list(&m, namespace.as_deref()).await?),
                    true,
                )),
                WaypointCmd::Delete { namespace, name } => {
                    Ok((manage::waypoint_delete(&m, namespace, name).await?, true))
                }
            }
        }
        Cmd::Check {
            expiry_warning_secs,
        } => {
            let m = mesh(&a).await?;
            let findings = check::run(&m, Duration::from_secs(*expiry_warning_secs)).await;
            let ok = findings.iter().all(|f| f.ok);
            Ok((tables(vec![check::table(&findings)]), ok))
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok((text, ok)) => {
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("meshctl: {e}");
            ExitCode::from(2)
        }
    }
}
