//! Setting the L4 scenario's lab up: the tools it needs, the servers in
//! the server pods, the Envoy sidecars, and every path answering.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::ca::TRUST_DOMAIN;
use e2e::envoy::{
    envoy_binary, sidecar_capture_rules, sidecar_inbound_config, sidecar_outbound_config,
    write_cert,
};
use e2e::lab::Lab;
use e2e::mesh::binary;
use mesh_core::identity::Identity;

use super::{
    ECHO_PORT, HTTP_PORT, IPERF_PORT, MESHES, Mesh, Placement, SERVER_PORTS, SOCKPERF_PORT, Test,
};
use crate::Error;
use crate::common::{alive, envoy_admin, get, load_cpu};

/// The tools every run needs, and the Debian package of each: `taskset`
/// pins the load, `nft` installs the sidecar's capture, `curl` reads
/// Envoy's admin.
const TOOLS: [(&str, &str); 3] = [
    ("taskset", "util-linux"),
    ("nft", "nftables"),
    ("curl", "curl"),
];

/// `name` is an executable on PATH.
fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            std::fs::metadata(d.join(name)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// The tools the chosen tests need are installed.
pub(super) fn check_tools(tests: &[Test]) -> Result<(), Error> {
    let mut need: Vec<(&str, &str)> = TOOLS.to_vec();
    for t in tests.iter().map(|t| t.tool()).filter(|t| *t != "labapp") {
        if !need.iter().any(|(n, _)| *n == t) {
            need.push((t, t));
        }
    }
    let missing: Vec<&str> = need
        .iter()
        .filter(|(t, _)| !on_path(t))
        .map(|(_, p)| *p)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing tools; install them with: apt-get install {} (`just bench` does)",
            missing.join(" ")
        )
        .into())
    }
}

/// Runs a command in a pod, bounded by `limit` seconds, and returns its
/// stdout; fails with its stderr when it fails.
pub(super) fn run_in(
    lab: &Lab,
    pod: &str,
    limit: u64,
    pinned: bool,
    cmd: &[&str],
) -> Result<String, Error> {
    let limit = limit.to_string();
    let cpu = load_cpu().map(|c| c.to_string());
    let mut full: Vec<&str> = vec!["timeout", &limit];
    if let (true, Some(cpu)) = (pinned, &cpu) {
        full.extend(["taskset", "-c", cpu]);
    }
    full.extend(cmd);
    let out = lab.exec(pod, &full)?;
    if !out.status.success() {
        return Err(format!(
            "{} in {pod}: {}: {}{}",
            cmd.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
                .join(" | ")
        )
        .into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// The servers a test talks to, beside each server pod's static HTTP
/// server (its app): the name, the port and the command.
fn server_for(t: Test, ip: &str) -> (&'static str, u16, Vec<String>) {
    let cmd = |c: &[&str]| c.iter().map(|s| s.to_string()).collect();
    match t.tool() {
        "iperf3" => (
            "iperf3",
            IPERF_PORT,
            cmd(&["iperf3", "-s", "-p", &IPERF_PORT.to_string()]),
        ),
        "sockperf" => (
            "sockperf",
            SOCKPERF_PORT,
            cmd(&[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                ip,
                "-p",
                &SOCKPERF_PORT.to_string(),
            ]),
        ),
        "labapp" => (
            "echo",
            ECHO_PORT,
            cmd(&[
                &binary("labapp").display().to_string(),
                "tcp-echo",
                "--port",
                &ECHO_PORT.to_string(),
            ]),
        ),
        _ => ("http", HTTP_PORT, vec![]),
    }
}

/// Starts the servers the tests need in every server pod (ended with the
/// lab), and waits until they and the pod's HTTP server listen.
pub(super) async fn start_servers(lab: &mut Lab, tests: &[Test]) -> Result<(), Error> {
    let mut ports = vec![HTTP_PORT];
    for m in MESHES {
        for p in [Placement::Cross, Placement::Same] {
            let key = p.server(m);
            let ip = lab.pod(&key).ok_or("no server pod")?.ip.clone();
            let tag = key.replace('/', "-");
            let mut started = Vec::new();
            for &t in tests {
                let (name, port, cmd) = server_for(t, &ip);
                if cmd.is_empty() || started.contains(&name) {
                    continue;
                }
                started.push(name);
                if !ports.contains(&port) {
                    ports.push(port);
                }
                lab.spawn_in_pod(&key, &format!("pod-{tag}-{name}.log"), &[], &cmd)?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for m in MESHES {
        for p in [Placement::Cross, Placement::Same] {
            let key = p.server(m);
            loop {
                let ss = run_in(lab, &key, 10, false, &["ss", "-Hltn"])?;
                let listening: Vec<u16> = ss
                    .lines()
                    .filter_map(|l| {
                        l.split_whitespace()
                            .nth(3)?
                            .rsplit(':')
                            .next()?
                            .parse()
                            .ok()
                    })
                    .collect();
                if ports.iter().all(|p| listening.contains(p)) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!("{key}: servers not listening on {ports:?}: {ss}").into());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    Ok(())
}

/// The Envoy sidecars: an outbound one in the envoy path's client pod (with
/// the capture rules) and an inbound one in each of its server pods, with
/// certificates from the lab's CA for the pods' identities. Returns their
/// pids by pod key.
pub(super) async fn start_envoys(
    lab: &mut Lab,
    workers: usize,
) -> Result<BTreeMap<String, u32>, Error> {
    let m = Mesh::Envoy;
    let id = |sa: &str| Identity::new(TRUST_DOMAIN, m.ns(), sa).map_err(|e| e.to_string());
    let (client_id, server_id) = (id("client")?, id("server")?);
    let mut certs = e2e::ca::from_lab_ca(&lab.dir, &[client_id.clone(), server_id.clone()])
        .await?
        .into_iter();
    let (Some(client_cert), Some(server_cert)) = (certs.next(), certs.next()) else {
        return Err("the lab's CA issued fewer certificates than asked".into());
    };
    let dir = lab.dir.join("envoy-l4");
    std::fs::create_dir_all(&dir)?;
    let (cc, ck, cr) = write_cert(&dir, "client", &client_cert);
    let (sc, sk, sr) = write_cert(&dir, "server", &server_cert);
    let admin = "127.0.0.1:15000".parse()?;
    let workers = workers.to_string();

    let mut configs = Vec::new();
    let ckey = m.client();
    let cip = lab.pod(&ckey).ok_or("no client pod")?.ip.parse()?;
    configs.push((
        ckey.clone(),
        sidecar_outbound_config(admin, cip, (&cc, &ck, &cr), server_id.as_str()),
    ));
    for p in [Placement::Cross, Placement::Same] {
        let key = p.server(m);
        let ip = lab.pod(&key).ok_or("no server pod")?.ip.parse()?;
        configs.push((
            key,
            sidecar_inbound_config(
                admin,
                ip,
                &SERVER_PORTS,
                (&sc, &sk, &sr),
                &format!("spiffe://{TRUST_DOMAIN}/"),
            ),
        ));
    }
    let mut pids = BTreeMap::new();
    for (key, config) in configs {
        let tag = key.replace('/', "-");
        let cfg = dir.join(format!("{tag}.yaml"));
        std::fs::write(&cfg, config)?;
        let log = format!("pod-{tag}-envoy.log");
        let cmd: Vec<String> = vec![
            envoy_binary().display().to_string(),
            "-c".into(),
            cfg.display().to_string(),
            "--disable-hot-restart".into(),
            "--concurrency".into(),
            workers.clone(),
            "-l".into(),
            "warning".into(),
        ];
        let pid = lab.spawn_in_pod(&key, &log, &[], &cmd)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if !alive(pid) {
                let text =
                    std::fs::read_to_string(lab.dir.join("logs").join(&log)).unwrap_or_default();
                return Err(format!("envoy in {key} exited:\n{text}").into());
            }
            let r = envoy_admin(lab, &key, "/ready");
            if r.as_ref().is_ok_and(|b| b.contains("LIVE")) {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("envoy in {key} did not become ready: {r:?}").into());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pids.insert(key, pid);
    }
    // Capture only once the outbound listener is up.
    let rules = dir.join("capture.nft");
    std::fs::write(&rules, sidecar_capture_rules())?;
    run_in(
        lab,
        &ckey,
        10,
        false,
        &["nft", "-f", &rules.display().to_string()],
    )?;
    Ok(pids)
}

/// Waits until the client reaches the server's HTTP port over each path.
pub(super) async fn paths_ready(lab: &Lab, placements: &[Placement]) -> Result<(), Error> {
    for &p in placements {
        for m in MESHES {
            let ip = lab.pod(&p.server(m)).ok_or("no server pod")?.ip.clone();
            let url = format!("http://{ip}:{HTTP_PORT}/");
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let r = get(lab, &m.client(), &url);
                if r.as_ref().is_ok_and(|b| b.starts_with("200")) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "{} {}: {url} not answering after 60 s: {r:?}",
                        p.name(),
                        m.name()
                    )
                    .into());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Ok(())
}
