//! The processes the lab runs: started in a netns, logged, remembered by
//! pid and start time (so a reused pid is never signalled), stopped and
//! restarted by name.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Error, Lab, ProcState};

pub(crate) fn sh(args: &[&str]) -> Result<(), Error> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into())
    }
}

impl Lab {
    pub(super) fn spawn_in(
        &mut self,
        netns: &str,
        log: &str,
        env: &[(&str, &str)],
        cmd: &[String],
    ) -> Result<u32, Error> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", netns]).args(cmd);
        for (k, v) in env {
            c.env(k, v);
        }
        self.spawn_command(c, log)
    }

    /// Starts a process in the machine's own netns (a published port's
    /// forwarder), ended with the lab.
    pub(crate) fn spawn(&mut self, log: &str, cmd: &[String]) -> Result<u32, Error> {
        let mut c = Command::new(&cmd[0]);
        c.args(&cmd[1..]);
        self.spawn_command(c, log)
    }

    fn spawn_command(&mut self, mut c: Command, log: &str) -> Result<u32, Error> {
        let logf = std::fs::File::create(self.dir.join("logs").join(log))?;
        let child = c
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .stdin(Stdio::null())
            .spawn()?;
        let pid = child.id();
        // The lab outlives this handle: `lab down` ends the process by pid.
        std::mem::forget(child);
        self.state.pids.push((pid, start_time(pid).unwrap_or(0)));
        self.save()?;
        Ok(pid)
    }

    /// Starts a named process (and remembers how, for restarts).
    pub(super) fn start_named(
        &mut self,
        name: &str,
        netns: &str,
        env: &[(&str, &str)],
        cmd: Vec<String>,
    ) -> Result<(), Error> {
        let log = format!("{name}.log");
        let pid = self.spawn_in(netns, &log, env, &cmd)?;
        self.state.procs.insert(
            name.to_string(),
            ProcState {
                netns: netns.to_string(),
                cmd,
                log,
                env: env
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                pid: Some(pid),
            },
        );
        self.save()
    }

    /// Stops a named process (SIGKILL with `kill`, else SIGTERM) and waits.
    pub fn stop(&mut self, name: &str, kill: bool) -> Result<(), Error> {
        let p = self
            .state
            .procs
            .get_mut(name)
            .ok_or_else(|| format!("no process {name}"))?;
        if let Some(pid) = p.pid.take() {
            self.end_pid(pid, kill);
        }
        self.save()
    }

    /// Signals one process this lab started (SIGKILL with `kill`, else
    /// SIGTERM), forgets it, and waits (bounded) until it is gone.
    pub(crate) fn end_pid(&mut self, pid: u32, kill: bool) {
        let sig = if kill { libc::SIGKILL } else { libc::SIGTERM };
        let started = self
            .state
            .pids
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, t)| *t);
        if started.is_some_and(|t| start_time(pid) == Some(t)) {
            // SAFETY: kill(2) on a process this lab started (same pid and
            // start time, so not a reused pid).
            unsafe {
                libc::kill(pid as i32, sig);
            }
        }
        self.state.pids.retain(|(p, _)| *p != pid);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline
            && Path::new(&format!("/proc/{pid}")).exists()
            && !zombie(pid)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends one process [`Lab::spawn_in_pod`] started (SIGTERM, then waits,
    /// bounded), before the lab goes.
    pub fn end_process(&mut self, pid: u32) -> Result<(), Error> {
        self.end_pid(pid, false);
        self.save()
    }

    /// Starts a stopped named process again, as it was first started.
    pub fn restart(&mut self, name: &str) -> Result<(), Error> {
        let p = self
            .state
            .procs
            .get(name)
            .cloned()
            .ok_or_else(|| format!("no process {name}"))?;
        let env: Vec<(&str, &str)> = p
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let pid = self.spawn_in(&p.netns, &p.log, &env, &p.cmd)?;
        if let Some(p) = self.state.procs.get_mut(name) {
            p.pid = Some(pid);
        }
        self.save()
    }
}

/// A process's start time (field 22 of /proc/<pid>/stat).
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    crate::procfs::pid_stat(pid)?.get(19)?.parse().ok()
}

/// A zombie, or gone.
pub(super) fn zombie(pid: u32) -> bool {
    crate::procfs::pid_stat(pid).is_none_or(|f| f.first().map(String::as_str) == Some("Z"))
}
