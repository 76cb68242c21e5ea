//! What a failed roll leaves to read: the lab's logs (the node agents',
//! both ztunnels' of node-1) copied to a directory of their own, and the
//! client pod's addresses, sockets and rules, since the lab's directory
//! goes with the test.

use std::path::PathBuf;
use std::process::Command;

use e2e::lab::Lab;

/// Copies `lab`'s logs and a look into the pods (or nodes) `keys` to a new directory
/// under the system's temporary one; returns where (or why not).
pub fn save(lab: &Lab, keys: &[&str]) -> Result<PathBuf, String> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    let out = std::env::temp_dir().join(format!("roll-fail-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let logs = lab.dir.join("logs");
    for entry in std::fs::read_dir(&logs).map_err(|e| format!("{}: {e}", logs.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let _ = std::fs::copy(entry.path(), out.join(entry.file_name()));
    }
    for key in keys {
        let netns = match lab.pod(key) {
            Some(pod) => pod.netns.clone(),
            None => match lab.state.nodes.iter().find(|n| n.name == *key) {
                Some(n) => n.netns.clone(),
                None => continue,
            },
        };
        let mut text = String::new();
        for cmd in [
            &["ip", "-6", "addr"][..],
            &["ip", "-6", "route"],
            &["ip", "-6", "neigh"],
            &["ip", "neigh"],
            &["ip", "link"],
            &["bridge", "fdb", "show", "br", "cbr0"],
            &["ss", "-tanpe"],
            &["nft", "list", "ruleset"],
            &["sysctl", "net.ipv4.tcp_migrate_req"],
        ] {
            let run = Command::new("ip")
                .args(["netns", "exec", &netns])
                .args(cmd)
                .output();
            text.push_str(&format!("$ {}\n", cmd.join(" ")));
            match run {
                Ok(o) => {
                    text.push_str(&String::from_utf8_lossy(&o.stdout));
                    text.push_str(&String::from_utf8_lossy(&o.stderr));
                }
                Err(e) => text.push_str(&format!("{e}\n")),
            }
        }
        let name = format!("state-{}.txt", key.replace('/', "-"));
        std::fs::write(out.join(name), text).map_err(|e| e.to_string())?;
    }
    Ok(out)
}
