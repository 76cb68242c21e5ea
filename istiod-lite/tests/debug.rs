//! The debug endpoint shows the whole mesh (every workload, policy and
//! proxy connection): it listens on loopback unless given a bearer token,
//! and then anyone but a loopback caller must present the token. Probes
//! reach `/ready` and `/healthz` on a separate health listener.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// This machine's address on its default route: a local address that is not
/// loopback (no packet is sent to find it).
fn non_loopback_ip() -> IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.connect("192.0.2.1:9")
        .or_else(|_| s.connect("10.255.255.1:9"))
        .expect("this test needs a non-loopback address (a default route)");
    let ip = s.local_addr().unwrap().ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "{ip}");
    ip
}

/// istiod-lite on an empty config folder with `args`.
fn spawn(dir: &Path, args: &[String]) -> Child {
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("tokens.yaml"), "node-a: node-a-token-0123456789\n").unwrap();
    Command::new(env!("CARGO_BIN_EXE_istiod-lite"))
        .arg("--config-dir")
        .arg(dir.join("config"))
        .arg("--data-dir")
        .arg(dir)
        .arg("--node-tokens")
        .arg(dir.join("tokens.yaml"))
        .arg(format!("--grpc-addr=127.0.0.1:{}", free_port()))
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).unwrap())
        .spawn()
        .unwrap()
}

/// GET `path` at `addr`, from `from` when given: (status, body).
async fn get(
    addr: SocketAddr,
    from: Option<IpAddr>,
    path: &str,
    token: Option<&str>,
) -> Option<(u16, String)> {
    let sock = tokio::net::TcpSocket::new_v4().ok()?;
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0)).ok()?;
    }
    let mut s = sock.connect(addr).await.ok()?;
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nhost: x\r\n{auth}\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text))
}

async fn wait_up(addr: SocketAddr, dir: &Path) {
    for _ in 0..200 {
        if get(addr, None, "/ready", None).await.map(|r| r.0) == Some(200) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "istiod-lite never became ready:\n{}",
        std::fs::read_to_string(dir.join("log")).unwrap_or_default()
    );
}

#[tokio::test]
async fn a_debug_port_off_loopback_needs_a_token_and_refuses_callers_without_it() {
    mesh_core::tls::install_default_provider();
    let ip = non_loopback_ip();

    // Off loopback without a token: the start is refused, and says why.
    let dir = tempfile::tempdir().unwrap();
    let mut c = spawn(
        dir.path(),
        &[format!("--debug-addr=0.0.0.0:{}", free_port())],
    );
    let mut status = None;
    for _ in 0..100 {
        status = c.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = c.kill();
    let _ = c.wait();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "istiod-lite served its debug port on 0.0.0.0 without a token:\n{log}"
    );
    assert!(log.contains("--debug-token-file"), "{log}");

    // With a token: a caller from off loopback without it is refused (and
    // logged), with it is served; loopback is served; health needs nothing.
    let dir = tempfile::tempdir().unwrap();
    let token = "debug-token-0123456789abcdef";
    std::fs::write(dir.path().join("debug.token"), format!("{token}\n")).unwrap();
    let (port, health) = (free_port(), free_port());
    let _c = Running(spawn(
        dir.path(),
        &[
            format!("--debug-addr=0.0.0.0:{port}"),
            format!(
                "--debug-token-file={}",
                dir.path().join("debug.token").display()
            ),
            format!("--health-addr=0.0.0.0:{health}"),
        ],
    ));
    let lo = SocketAddr::from(([127, 0, 0, 1], port));
    wait_up(lo, dir.path()).await;
    let far = SocketAddr::new(ip, port);
    for path in ["/debug/model", "/debug/connections", "/debug/config"] {
        let (code, body) = get(far, Some(ip), path, None).await.unwrap();
        assert_eq!(code, 401, "{path}: {body}");
        assert!(!body.contains("workloads"), "{body}");
        let (code, _) = get(far, Some(ip), path, Some("debug-token-0123456789abcdeX"))
            .await
            .unwrap();
        assert_eq!(code, 401, "{path} with a wrong token");
        let (code, body) = get(far, Some(ip), path, Some(token)).await.unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        let (code, _) = get(lo, None, path, None).await.unwrap();
        assert_eq!(code, 200, "{path} from loopback");
    }
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("debug request refused")),
        "{log}"
    );
    // The probes' listener: /ready and /healthz from anywhere, nothing else.
    let far_health = SocketAddr::new(ip, health);
    for (path, want) in [("/ready", 200), ("/healthz", 200), ("/debug/model", 404)] {
        let (code, _) = get(far_health, Some(ip), path, None).await.unwrap();
        assert_eq!(code, want, "{path} on the health port");
    }
}
