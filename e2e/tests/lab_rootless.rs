//! The lab without root: as an unprivileged user (nobody) the lab CLI runs
//! inside a user namespace of its own, held between commands, and leaves
//! nothing behind on `lab down`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn as_nobody(dir: &Path, args: &[&str]) -> Output {
    Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "env",
            "HOME=/tmp",
        ])
        .arg(e2e::mesh::binary("lab"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("setpriv runs")
}

#[test]
fn an_unprivileged_user_runs_the_lab_in_its_own_user_namespace() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let dir = tmp.path().join("lab");
    // Its namespaces are private to it, so no other lab can collide.
    let id = "150".to_string();
    let up = as_nobody(&dir, &["up", "manifests/demo/shop.yaml", "--id", &id]);
    let stderr = String::from_utf8_lossy(&up.stderr).to_string();
    assert!(up.status.success(), "lab up as nobody failed: {stderr}");
    let holder: u32 = std::fs::read_to_string(dir.join("holder.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    // Its namespaces are not the host's: nothing appears in the host's /run/netns.
    let host = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&host.stdout).contains(&format!("lab{id}-")));

    // The mesh works inside (the ztunnel takes pods once it has config).
    let mut answer = String::new();
    for _ in 0..60 {
        let out = as_nobody(
            &dir,
            &[
                "exec",
                "shop/client-0",
                "--",
                "labapp",
                "get",
                "http://server.shop/",
            ],
        );
        answer = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && answer.starts_with("200 OK") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        answer.starts_with("200 OK") && answer.contains("pod=server-"),
        "{answer}"
    );

    let down = as_nobody(&dir, &["down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!dir.join("holder.pid").exists());
    // The holder (and with it the lab's namespaces) goes away.
    let gone = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(format!("/proc/{holder}/stat"))
            .map(|s| s.split_whitespace().nth(2) == Some("Z"))
            .unwrap_or(true)
    });
    assert!(gone, "the holder {holder} is still running");
}
