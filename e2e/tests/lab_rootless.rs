//! The lab without root: as an unprivileged user (nobody) the lab CLI runs
//! inside a user namespace of its own, held between commands, and leaves
//! nothing behind on `lab down`.
//!
//! Nobody reaches nothing of the checkout (it may live in a private
//! directory), so the test gives it copies of the programs and a home of
//! its own ([`e2e::as_user`]).

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use e2e::as_user::AsUser;

const NOBODY: u32 = 65534;

fn as_nobody(nobody: &AsUser, dir: &Path, args: &[&str]) -> Output {
    nobody
        .command("lab")
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} as nobody: {e}", nobody.program("lab").display()))
}

#[test]
fn an_unprivileged_user_runs_the_lab_in_its_own_user_namespace() {
    let nobody = AsUser::new(NOBODY, NOBODY, e2e::lab::PROGRAMS).unwrap_or_else(|e| panic!("{e}"));
    let manifest = nobody
        .give(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/demo/shop.yaml"),
            "shop.yaml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let dir = nobody.home().join("lab");
    // Its namespaces are private to it, so no other lab can collide; a test
    // id still, so that a leak would show as a test's.
    let id = e2e::lab::TEST_IDS.end().to_string();
    let up = as_nobody(
        &nobody,
        &dir,
        &["up", manifest.to_str().unwrap(), "--id", &id],
    );
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
            &nobody,
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

    let down = as_nobody(&nobody, &dir, &["down"]);
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
