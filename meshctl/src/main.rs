//! The meshctl binary.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use meshctl::cluster::{self, KubeFlags};
use meshctl::config_view::{self, Filters};
use meshctl::output::{Format, Table, print, value_string};
use meshctl::source::{Endpoint, Mesh, SourceError};
use meshctl::{check, manage, top, version, why};

/// The default lab directory (`lab up`'s default).
const DEFAULT_LAB: &str = "/tmp/mesh-lab";

#[derive(Parser)]
#[command(
    version,
    about = "See and steer the mesh: what the tunnels think is going on",
    after_help = "Exit codes: 0 done; 1 `check` found a problem; 2 the mesh could not be read or the command line is wrong."
)]
struct Args {
    /// The kubeconfig to use (default: KUBECONFIG, else ~/.kube/config).
    /// Kubernetes is the source whenever a kubeconfig is found and no
    /// other source is named.
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The namespace to act on or to show (default: all namespaces for
    /// listings; the context's namespace, else `default`, for changes).
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// Where the mesh is installed (ztunnel and istiod-lite pods).
    #[arg(
        short = 'i',
        long,
        global = true,
        visible_alias = "kube-namespace",
        env = "MESHCTL_ISTIO_NAMESPACE",
        default_value = "istio-system"
    )]
    istio_namespace: String,
    /// Use the Kubernetes cluster of the kubeconfig even when a lab is up.
    #[arg(long, global = true)]
    kube: bool,
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
    /// The default when there is no kubeconfig and /tmp/mesh-lab holds a lab.
    #[arg(long, global = true, env = "MESHCTL_LAB")]
    lab: Option<PathBuf>,
    /// A saved /config_dump to read instead of a live ztunnel.
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    /// Output: short (a table, the default), wide (every column), json or
    /// yaml (the objects behind the rows).
    #[arg(short = 'o', long, global = true, value_enum, default_value = "short")]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum What {
    #[value(alias = "workload")]
    Workloads,
    #[value(alias = "service", alias = "svc")]
    Services,
    #[value(alias = "policy")]
    Policies,
    #[value(alias = "certificate", alias = "certs", alias = "secret")]
    Certificates,
    #[value(alias = "connection")]
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
        /// workload(s), service(s), policy/policies, certificate(s),
        /// connection(s) or all.
        what: What,
        /// Only the ztunnel on this node.
        #[arg(long)]
        node: Option<String>,
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
    /// Enrolls a namespace in the mesh (istio.io/dataplane-mode=ambient);
    /// NAMESPACE or -n.
    Enroll {
        #[arg(value_name = "NAMESPACE")]
        target: Option<String>,
    },
    /// Releases a namespace from the mesh; NAMESPACE or -n.
    Unenroll {
        #[arg(value_name = "NAMESPACE")]
        target: Option<String>,
    },
    /// The versions of meshctl, the control plane and every proxy; warns
    /// when they differ.
    Version,
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
    List,
    /// Removes a waypoint.
    Delete {
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
}

fn kube_flags(a: &Args) -> KubeFlags {
    KubeFlags {
        kubeconfig: a.kubeconfig.clone(),
        context: a.context.clone(),
    }
}

/// The namespace a change goes to: -n, else the context's, else `default`.
fn target_namespace(a: &Args, positional: Option<&String>) -> String {
    positional
        .or(a.namespace.as_ref())
        .cloned()
        .or_else(|| cluster::context_namespace(&kube_flags(a)))
        .unwrap_or_else(|| "default".into())
}

/// The mesh to read: a named source (--file, --addr, --lab, --kube or a
/// kubeconfig flag, --controller alone), else the current kubeconfig's
/// cluster, else the lab at /tmp/mesh-lab.
async fn mesh(a: &Args) -> Result<Mesh, SourceError> {
    let flags = kube_flags(a);
    let from_kube = || async {
        let (client, _) = cluster::client(&flags).await?;
        let mut m = Mesh::from_kube(client, &a.istio_namespace).await?;
        if let Some(c) = a.controller {
            m.controller = Some(Endpoint::new("istiod-lite debug", c, None));
        }
        Ok::<_, SourceError>(m)
    };
    if let Some(f) = &a.file {
        return Mesh::from_file(f);
    }
    if let Some(addr) = a.addr {
        return Ok(Mesh::by_address(addr, a.metrics_addr, a.controller));
    }
    let from_lab = |lab: &PathBuf| {
        let mut m = Mesh::from_lab(lab)?;
        if let Some(c) = a.controller {
            m.controller = Some(Endpoint::new("istiod-lite debug", c, None));
        }
        Ok::<_, SourceError>(m)
    };
    if let Some(lab) = &a.lab {
        return from_lab(lab);
    }
    if a.kube || flags.given() {
        return from_kube().await;
    }
    // The controller alone (its connections, config problems and sources).
    if let Some(c) = a.controller {
        return Ok(Mesh {
            controller: Some(Endpoint::new("istiod-lite debug", c, None)),
            ..Default::default()
        });
    }
    if cluster::kubeconfig_here(&flags) {
        return from_kube().await;
    }
    let lab = PathBuf::from(DEFAULT_LAB);
    if lab.join("lab.json").exists() {
        return from_lab(&lab);
    }
    Err(SourceError::Other(format!(
        "no mesh to read: no kubeconfig (KUBECONFIG, ~/.kube/config or --kubeconfig) and no lab at {DEFAULT_LAB}; give --addr (a ztunnel's admin address), --controller ADDR, --lab DIR or --file DUMP"
    )))
}

/// `ztunnel-config WHAT`: the tables of the ztunnels' dumps.
async fn ztunnel_config(
    a: &Args,
    what: What,
    node: Option<&str>,
    address: Option<IpAddr>,
    direction: Option<Direction>,
) -> Result<(String, bool), SourceError> {
    let m = mesh(a).await?;
    let dumps = m.dumps(node).await?;
    let f = Filters {
        namespace: a.namespace.clone(),
        address,
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
    Ok((print(a.output, &ts), true))
}

/// `why SRC DST`: one connection explained.
async fn why_cmd(
    a: &Args,
    src: &str,
    dst: &str,
    root_namespace: &str,
) -> Result<(String, bool), SourceError> {
    let out = a.output;
    let m = mesh(a).await?;
    let (dumps, unreachable) = m.reachable_dumps().await?;
    for u in &unreachable {
        eprintln!("meshctl why: ztunnel on {u} did not answer; reasoning from the others");
    }
    // Which L7 policies each waypoint applies, when the controller is
    // reachable (it is optional for `why`).
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
    let text = if out.is_table() {
        print(out, &[e.table()])
    } else {
        value_string(out, &e)
    };
    if out.is_table() && !e.skipped.is_empty() {
        eprintln!(
            "note: {} entries of the dump could not be read (a newer version?): {}",
            e.skipped.len(),
            e.skipped.join("; ")
        );
    }
    Ok((text, true))
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
            address,
            direction,
        } => ztunnel_config(&a, *what, node.as_deref(), *address, *direction).await,
        Cmd::Why {
            src,
            dst,
            root_namespace,
        } => why_cmd(&a, src, dst, root_namespace).await,
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
        Cmd::Enroll { target } => {
            let ns = target_namespace(&a, target.as_ref());
            Ok((manage::enroll(&mesh(&a).await?, &ns, true).await?, true))
        }
        Cmd::Unenroll { target } => {
            let ns = target_namespace(&a, target.as_ref());
            Ok((manage::enroll(&mesh(&a).await?, &ns, false).await?, true))
        }
        Cmd::Version => {
            // The client's version even when no mesh can be read.
            let m = match mesh(&a).await {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("meshctl version: no mesh to ask: {e}");
                    Mesh::default()
                }
            };
            let all = version::collect(&m).await;
            for w in version::skew(&all) {
                eprintln!("{w}");
            }
            Ok((tables(vec![version::table(&all)]), true))
        }
        Cmd::Waypoint { cmd } => {
            let m = mesh(&a).await?;
            match cmd {
                WaypointCmd::Apply {
                    name,
                    enroll_namespace,
                    serves,
                } => {
                    let serves = match serves {
                        Serves::Service => "service",
                        Serves::Workload => "workload",
                        Serves::All => "all",
                    };
                    let ns = target_namespace(&a, None);
                    Ok((
                        manage::waypoint_apply(&m, &ns, name, serves, *enroll_namespace).await?,
                        true,
                    ))
                }
                WaypointCmd::List => Ok((
                    tables(manage::waypoint_list(&m, a.namespace.as_deref()).await?),
                    true,
                )),
                WaypointCmd::Delete { name } => {
                    let ns = target_namespace(&a, None);
                    Ok((manage::waypoint_delete(&m, &ns, name).await?, true))
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
