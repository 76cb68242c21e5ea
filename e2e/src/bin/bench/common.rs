//! Helpers every scenario uses: statistics and table cells, and what the
//! lab's scenarios read from processes and pods.

use e2e::lab::Lab;
use e2e::mesh::binary;
use serde_json::{Value, json};

use crate::Error;

pub(crate) fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Where the load generator is pinned: the last CPU, when there are two
/// or more.
pub(crate) fn load_cpu() -> Option<usize> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    (n > 1).then(|| n - 1)
}

/// `labapp get` from inside a pod: the status line and the body.
pub(crate) fn get(lab: &Lab, from: &str, url: &str) -> Result<String, Error> {
    let labapp = binary("labapp").display().to_string();
    let out = lab.exec(from, &["timeout", "20", &labapp, "get", url])?;
    if !out.status.success() {
        return Err(format!("get {url} in {from}: {}", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// A GET to Envoy's admin inside its pod, with curl: `labapp get` sends
/// the absolute form (`GET http://host/path`), which proxies take and
/// Envoy's admin does not.
pub(crate) fn envoy_admin(lab: &Lab, pod: &str, path: &str) -> Result<String, Error> {
    let url = format!("http://127.0.0.1:15000{path}");
    let out = lab.exec(pod, &["curl", "-sf", "--max-time", "10", &url])?;
    if !out.status.success() {
        return Err(format!("curl {url} in {pod}: {}", out.status).into());
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// utime + stime of a process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> u64 {
    e2e::procfs::pid_stat(pid).map_or(0, |f| e2e::procfs::cpu_ticks(&f))
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf(3) reads a constant of the system; no memory is
    // passed.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A `/proc/PID/status` figure in MiB (VmRSS, VmHWM).
pub(crate) fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

pub(crate) fn alive(pid: u32) -> bool {
    e2e::procfs::pid_stat(pid).is_some_and(|f| f.first().map(String::as_str) != Some("Z"))
}

pub(crate) fn cell(s: (f64, f64, f64), decimals: usize) -> String {
    format!("{:.d$} ({:.d$}–{:.d$})", s.0, s.1, s.2, d = decimals)
}

pub(crate) fn stat_json(s: (f64, f64, f64)) -> Value {
    json!({"median": s.0, "min": s.1, "max": s.2})
}
