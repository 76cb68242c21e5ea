//! `/proc/<pid>/stat` and `/proc/<pid>/task/<tid>/stat`, read past the
//! command name, which may hold spaces and parentheses.

use std::path::Path;

/// The fields after the command name: `[0]` is the state (`R`, `S`, `Z`,
/// ...), `[11]` utime, `[12]` stime (clock ticks), `[19]` the start time.
/// None when the file cannot be read (the process is gone).
pub fn stat_fields(path: impl AsRef<Path>) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(path).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime from [`stat_fields`], in clock ticks.
pub fn cpu_ticks(fields: &[String]) -> u64 {
    fields
        .iter()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// A process's fields (see [`stat_fields`]).
pub fn pid_stat(pid: u32) -> Option<Vec<String>> {
    stat_fields(format!("/proc/{pid}/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_start_after_a_command_name_with_spaces_and_parentheses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("stat");
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime prio nice threads
        // itrealvalue starttime
        std::fs::write(
            &path,
            "42 (tokio (rt) worker) R 1 42 42 0 -1 4194560 10 0 0 0 7 5 0 0 20 0 3 0 987654 0\n",
        )
        .expect("write");
        let f = stat_fields(&path).expect("fields");
        assert_eq!(f[0], "R");
        assert_eq!(cpu_ticks(&f), 12);
        assert_eq!(f[19], "987654");
        assert!(stat_fields(dir.path().join("gone")).is_none());
        let me = pid_stat(std::process::id()).expect("own stat");
        assert!(["R", "S"].contains(&me[0].as_str()), "{me:?}");
    }
}
