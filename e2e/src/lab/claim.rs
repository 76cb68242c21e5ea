//! Lab ids and who holds them.
//!
//! A lab's network namespaces are named by its id (`lab<id>-sw`, ...) in the
//! machine's /run/netns, which everyone on the machine shares. So a lab
//! records who made it, in /run/mesh-lab/lab<id>.json, before it makes a
//! namespace, and a new lab takes an id only when nothing holds it, or when
//! what holds it is the debris of a program that is gone (a test or a demo
//! that crashed). A lab made with `lab up` outlives its command: nothing but
//! `lab down` ends it. Namespaces of an id that nobody recorded are left
//! alone too: they may be anybody's.
//!
//! Ids: `lab up` defaults to [`DEFAULT_ID`], and people choose theirs from
//! [`PEOPLE_IDS`]; the project's own programs take theirs from ranges no
//! person's lab is expected in: the demo from [`DEMO_IDS`], the benchmark
//! from [`BENCH_IDS`], the tests from [`TEST_IDS`].

use std::fmt;
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// `lab up`'s id (addresses 10.101.0.0/16).
pub const DEFAULT_ID: u8 = 1;
/// Every id (addresses 10.(100+id).0.0/16).
pub const ALL_IDS: RangeInclusive<u8> = 1..=150;
/// Ids for the labs people start with `lab up --id`.
pub const PEOPLE_IDS: RangeInclusive<u8> = 1..=99;
/// The demo takes the first free one of these.
pub const DEMO_IDS: RangeInclusive<u8> = 100..=109;
/// The benchmark takes the first free one of these.
pub const BENCH_IDS: RangeInclusive<u8> = 110..=119;
/// The tests take the first free one of these.
pub const TEST_IDS: RangeInclusive<u8> = 120..=149;
/// The test of sweeping a crashed run's lab takes this one alone: its
/// crashed record is debris any lab taking a free id would sweep and take.
pub const SWEEP_TEST_ID: u8 = 150;

/// Where the records live (per machine, or per rootless lab: its holder has
/// a /run of its own).
pub const RECORDS: &str = "/run/mesh-lab";

/// What ends a lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keeper {
    /// The process that made it takes it down when it ends (a test, the
    /// demo, the benchmark). Once that process is gone, what is left is
    /// debris, and the next lab of the id sweeps it.
    Process,
    /// `lab up`: the lab outlives the command that made it; only `lab down`
    /// ends it.
    Command,
}

/// The record of who made a lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    pub id: u8,
    pub keeper: Keeper,
    /// The program that made it (its executable's name), its pid and its
    /// start time (clock ticks after boot: a reused pid is not it).
    pub program: String,
    pub pid: u32,
    pub start: u64,
    /// The lab's directory (absolute).
    pub dir: PathBuf,
    /// Ties the record to the lab's state (`LabState::claim`).
    pub token: String,
}

impl Owner {
    /// Whether the lab it records is still someone's: a process-kept lab
    /// while its process runs, a `lab up` lab while its namespaces and its
    /// state file (what `lab down` goes by) exist.
    fn holds(&self, has_namespaces: bool) -> bool {
        match self.keeper {
            Keeper::Process => crate::procfs::pid_stat(self.pid)
                .and_then(|f| f.get(19)?.parse::<u64>().ok())
                .is_some_and(|start| start == self.start),
            Keeper::Command => has_namespaces && self.dir.join("lab.json").exists(),
        }
    }
}

/// Why an id cannot be taken.
#[derive(Debug)]
pub enum ClaimError {
    /// Not a lab id.
    OutOfRange { id: u8 },
    /// A live lab holds it.
    Held { owner: Owner },
    /// Namespaces of the id exist and no lab recorded making them.
    Unrecorded { id: u8, namespaces: Vec<String> },
    /// The record exists but cannot be read.
    Unreadable { path: PathBuf, why: String },
    /// Every id of a range is taken.
    NoneFree {
        ids: RangeInclusive<u8>,
        taken: Vec<ClaimError>,
    },
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for ClaimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimError::OutOfRange { id } => write!(
                f,
                "lab id {id} is out of range ({}..={}: addresses are 10.(100+id).0.0/16)",
                ALL_IDS.start(),
                ALL_IDS.end()
            ),
            ClaimError::Held { owner: o } => match o.keeper {
                Keeper::Command => write!(
                    f,
                    "lab id {} is taken by the lab at {} (made with `lab up`); it is left alone: \
                     take it down with `lab --dir {} down`, or choose another id",
                    o.id,
                    o.dir.display(),
                    o.dir.display()
                ),
                Keeper::Process => write!(
                    f,
                    "lab id {} is taken by {} (pid {}, lab at {}), which is still running; \
                     it is left alone: wait for it, or choose another id",
                    o.id,
                    o.program,
                    o.pid,
                    o.dir.display()
                ),
            },
            ClaimError::Unrecorded { id, namespaces } => write!(
                f,
                "lab id {id}: network namespaces {} exist and no lab recorded making them \
                 (a lab of an older version, or not a lab); they are left alone: if they are \
                 what a crashed lab left, remove them with `lab down --id {id}`",
                namespaces.join(", ")
            ),
            ClaimError::Unreadable { path, why } => write!(
                f,
                "{} cannot be read ({why}); if no lab of its id runs, remove it",
                path.display()
            ),
            ClaimError::NoneFree { ids, taken } => {
                write!(f, "no free lab id in {}..={}:", ids.start(), ids.end())?;
                for t in taken {
                    write!(f, "\n  {t}")?;
                }
                Ok(())
            }
            ClaimError::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for ClaimError {}

fn record_path(id: u8) -> PathBuf {
    Path::new(RECORDS).join(format!("lab{id}.json"))
}

/// The record of an id, if there is one.
pub fn owner_of(id: u8) -> Result<Option<Owner>, ClaimError> {
    let path = record_path(id);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ClaimError::Unreadable {
                path,
                why: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ClaimError::Io {
            what: "reading",
            path,
            source,
        }),
    }
}

/// The network namespaces named for lab `id` (an error when they cannot be
/// listed: an id is never taken blind).
pub fn namespaces_of(id: u8) -> Result<Vec<String>, ClaimError> {
    let failed = |source| ClaimError::Io {
        what: "running",
        path: "ip netns list".into(),
        source,
    };
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map_err(failed)?;
    if !out.status.success() {
        return Err(failed(std::io::Error::other(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )));
    }
    let prefix = format!("lab{id}-");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_string)
        .collect())
}

/// This process, as a record names it.
fn me(id: u8, dir: &Path, keeper: Keeper) -> Owner {
    let pid = std::process::id();
    let start = crate::procfs::pid_stat(pid)
        .and_then(|f| f.get(19)?.parse().ok())
        .unwrap_or(0);
    let program = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "?".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Owner {
        id,
        keeper,
        program,
        pid,
        start,
        dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()),
        token: format!("{pid}-{start}-{nanos}"),
    }
}

/// Writes the record only if none exists (the whole record appears at once:
/// written aside, then linked into place); false if one does.
pub fn record(owner: &Owner) -> Result<bool, ClaimError> {
    let path = record_path(owner.id);
    let io = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| ClaimError::Io { what, path, source }
    };
    std::fs::create_dir_all(RECORDS).map_err(io("creating", Path::new(RECORDS)))?;
    let aside = Path::new(RECORDS).join(format!(".lab{}.{}", owner.id, owner.token));
    let text = serde_json::to_vec_pretty(owner).unwrap_or_default();
    std::fs::File::create(&aside)
        .and_then(|mut f| f.write_all(&text))
        .map_err(io("writing", &aside))?;
    let linked = std::fs::hard_link(&aside, &path);
    let _ = std::fs::remove_file(&aside);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(ClaimError::Io {
            what: "recording",
            path,
            source,
        }),
    }
}

/// Takes lab id `id` for a lab at `dir`, or says who holds it. Debris (a
/// lab whose keeping process is gone, a record whose namespaces are gone)
/// is swept first; anything else is left alone.
pub fn claim(id: u8, dir: &Path, keeper: Keeper) -> Result<Owner, ClaimError> {
    if !ALL_IDS.contains(&id) {
        return Err(ClaimError::OutOfRange { id });
    }
    // Again after sweeping debris or losing a race to another lab.
    for _ in 0..3 {
        let namespaces = namespaces_of(id)?;
        match owner_of(id)? {
            Some(owner) if owner.holds(!namespaces.is_empty()) => {
                return Err(ClaimError::Held { owner });
            }
            // Debris: swept, then the id is looked at again.
            Some(_) => sweep(id),
            None if !namespaces.is_empty() => {
                return Err(ClaimError::Unrecorded { id, namespaces });
            }
            None => {
                let me = me(id, dir, keeper);
                if record(&me)? {
                    return Ok(me);
                }
            }
        }
    }
    match owner_of(id)? {
        Some(owner) => Err(ClaimError::Held { owner }),
        None => Err(ClaimError::Unreadable {
            path: record_path(id),
            why: "it keeps changing".into(),
        }),
    }
}

/// Takes the first id of `ids` that [`claim`] gives.
pub fn claim_free(
    ids: RangeInclusive<u8>,
    dir: &Path,
    keeper: Keeper,
) -> Result<Owner, ClaimError> {
    let mut taken = Vec::new();
    for id in ids.clone() {
        match claim(id, dir, keeper) {
            Ok(o) => return Ok(o),
            Err(
                e @ (ClaimError::Held { .. }
                | ClaimError::Unrecorded { .. }
                | ClaimError::Unreadable { .. }),
            ) => taken.push(e),
            Err(e) => return Err(e),
        }
    }
    Err(ClaimError::NoneFree { ids, taken })
}

/// Gives an id back: removes its record if it is the one `token` made.
pub fn release(id: u8, token: &str) {
    if let Ok(Some(o)) = owner_of(id)
        && o.token == token
    {
        let _ = std::fs::remove_file(record_path(id));
    }
}

/// [`sweep`], unless a live lab holds the id (`lab down --id` without a
/// state file: a lab that is someone's is taken down by its own directory).
pub fn sweep_unheld(id: u8) -> Result<(), ClaimError> {
    let namespaces = namespaces_of(id)?;
    if let Some(owner) = owner_of(id)?
        && owner.holds(!namespaces.is_empty())
    {
        return Err(ClaimError::Held { owner });
    }
    sweep(id);
    Ok(())
}

/// Removes what a crashed lab of this id left behind: its network
/// namespaces (processes in them die with their last reference, the
/// namespace's own sockets are gone), their /etc/netns entries and its
/// record. For `lab down --id` and for debris [`claim`] found.
pub fn sweep(id: u8) {
    for name in namespaces_of(id).unwrap_or_default() {
        // Processes still inside (from a crashed run) are ended first.
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", &name]).output() {
            for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) on a process left inside a lab
                    // namespace of this id, which only the lab creates.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(&name));
    }
    let _ = std::fs::remove_file(record_path(id));
}
