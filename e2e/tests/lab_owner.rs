//! Labs someone else started are left alone: a lab made with `lab up`
//! under the CLI's default id keeps running beside a test's lab, and a test
//! that asks for its id is refused with who holds it, instead of sweeping it.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::lab::{DEFAULT_ID, Down, Lab, TEST_IDS};
use e2e::mesh::binary;

/// The network namespaces of lab `id`, each with the processes in it.
fn snapshot(id: u8) -> Vec<(String, Vec<String>)> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let prefix = format!("lab{id}-");
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let out = Command::new("ip")
                .args(["netns", "pids", &n])
                .output()
                .unwrap();
            let mut pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .map(str::to_string)
                .collect();
            pids.sort();
            (n, pids)
        })
        .collect()
}

fn lab(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary("lab"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

/// A lab this test made with `lab up`, taken down with `lab down`.
struct Up(PathBuf);

impl Drop for Up {
    fn drop(&mut self) {
        let _ = lab(&self.0, &["down"]);
    }
}

#[test]
fn a_lab_someone_started_under_the_default_id_is_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    // Someone's lab under the default id: the one running, else one made
    // here as they would make it.
    let _made = if snapshot(DEFAULT_ID).is_empty() {
        let manifest = tmp.path().join("shop.yaml");
        std::fs::write(
            &manifest,
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        )
        .unwrap();
        let dir = tmp.path().join("theirs");
        let up = lab(&dir, &["up", manifest.to_str().unwrap(), "--nodes", "1"]);
        let made = Up(dir);
        assert!(
            up.status.success(),
            "lab up: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        Some(made)
    } else {
        None
    };
    let before = snapshot(DEFAULT_ID);
    assert!(
        before.iter().any(|(_, pids)| !pids.is_empty()),
        "{before:?}"
    );

    // A test's lab comes and goes beside it.
    drop(Down(
        Lab::create_in(&tmp.path().join("test"), TEST_IDS, 1).unwrap(),
    ));
    assert_eq!(snapshot(DEFAULT_ID), before);

    // A test asking for its id is refused, told who holds it (or, for a lab
    // of an older version, that no lab recorded making its namespaces).
    let refused = Lab::create(&tmp.path().join("asks"), DEFAULT_ID, 1);
    let taken = snapshot(DEFAULT_ID);
    let why = match refused {
        Ok(l) => {
            drop(Down(l));
            "it was taken over".to_string()
        }
        Err(e) => e.to_string(),
    };
    assert!(
        why.starts_with("lab id 1 is taken by") || why.starts_with("lab id 1: network namespaces"),
        "{why}"
    );
    assert_eq!(taken, before);
}
