//! Running the workspace's programs as another user (the rootless lab's test
//! runs the lab as nobody).
//!
//! That user reaches nothing of the checkout: it may live in a private
//! directory (a root user's home is mode 0700, and so is any `mktemp -d`).
//! So the programs it runs are copied into a directory made for it, under a
//! temporary directory every user can search, and it gets a home of its
//! own, a standard PATH and a plain locale instead of the caller's
//! environment.

use std::fmt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The PATH the other user gets (the caller's may name directories only it
/// can reach, such as root's ~/.cargo/bin).
pub const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the programs cannot be given to the user.
#[derive(Debug)]
pub enum AsUserError {
    /// No temporary directory the user can search.
    NoReachableTemp { uid: u32, tried: Vec<String> },
    /// A program is not built.
    NotBuilt { path: PathBuf },
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl fmt::Display for AsUserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AsUserError::NoReachableTemp { uid, tried } => {
                write!(
                    f,
                    "no temporary directory that uid {uid} can search, to copy the programs it \
                     runs into (set TMPDIR to one every user can search, such as /tmp):"
                )?;
                for t in tried {
                    write!(f, "\n  {t}")?;
                }
                Ok(())
            }
            AsUserError::NotBuilt { path } => write!(
                f,
                "{} is not built; run `cargo build --workspace --bins` (just test does)",
                path.display()
            ),
            AsUserError::Io { what, path, source } => {
                write!(f, "{what} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for AsUserError {}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> AsUserError {
    let path = path.to_path_buf();
    move |source| AsUserError::Io { what, path, source }
}

/// The first of `path` and its ancestors that `uid` (group `gid`, no other
/// groups) cannot search, as "DIR (mode 0700, owner 0:0)"; None when it can
/// reach `path`. Judged by the mode bits, as the kernel does without ACLs.
pub fn blocked(path: &Path, uid: u32, gid: u32) -> Option<String> {
    if uid == 0 {
        return None;
    }
    let path = match std::fs::canonicalize(path) {
        Ok(p) => p,
        Err(e) => return Some(format!("{} ({e})", path.display())),
    };
    for dir in path.ancestors().collect::<Vec<_>>().into_iter().rev() {
        let m = match std::fs::metadata(dir) {
            Ok(m) => m,
            Err(e) => return Some(format!("{} ({e})", dir.display())),
        };
        let bits = if m.uid() == uid {
            m.mode() >> 6
        } else if m.gid() == gid {
            m.mode() >> 3
        } else {
            m.mode()
        };
        if bits & 0o1 == 0 {
            return Some(format!(
                "{} (mode {:04o}, owner {}:{})",
                dir.display(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            ));
        }
    }
    None
}

/// Programs of this workspace given to another user, and a home for it.
pub struct AsUser {
    uid: u32,
    gid: u32,
    /// Removed (with everything the user made in it) when dropped.
    root: tempfile::TempDir,
}

impl AsUser {
    /// Copies `programs` (built binaries of the workspace, as
    /// [`crate::mesh::binary`] finds them) where `uid` can run them.
    pub fn new(uid: u32, gid: u32, programs: &[&str]) -> Result<AsUser, AsUserError> {
        let mut bases = vec![std::env::temp_dir()];
        for b in ["/tmp", "/var/tmp", "/dev/shm"] {
            if !bases.iter().any(|x| x == Path::new(b)) {
                bases.push(b.into());
            }
        }
        Self::new_in(&bases, uid, gid, programs)
    }

    /// [`AsUser::new`] under the first of `bases` that `uid` can search.
    pub fn new_in(
        bases: &[PathBuf],
        uid: u32,
        gid: u32,
        programs: &[&str],
    ) -> Result<AsUser, AsUserError> {
        let mut tried = Vec::new();
        let root = bases.iter().find_map(|b| match blocked(b, uid, gid) {
            Some(why) => {
                tried.push(format!("{}: blocked at {why}", b.display()));
                None
            }
            None => match tempfile::Builder::new().prefix("as-user-").tempdir_in(b) {
                Ok(d) => Some(d),
                Err(e) => {
                    tried.push(format!("{}: {e}", b.display()));
                    None
                }
            },
        });
        let root = root.ok_or(AsUserError::NoReachableTemp { uid, tried })?;
        let u = AsUser { uid, gid, root };
        let open = std::fs::Permissions::from_mode(0o755);
        std::fs::set_permissions(u.root.path(), open.clone())
            .map_err(io("setting the mode of", u.root.path()))?;
        let bin = u.root.path().join("bin");
        std::fs::create_dir(&bin).map_err(io("creating", &bin))?;
        std::fs::set_permissions(&bin, open.clone()).map_err(io("setting the mode of", &bin))?;
        for p in programs {
            let from = crate::mesh::locate(p);
            if !from.exists() {
                return Err(AsUserError::NotBuilt { path: from });
            }
            let to = bin.join(p);
            std::fs::copy(&from, &to).map_err(io("copying", &from))?;
            std::fs::set_permissions(&to, open.clone()).map_err(io("setting the mode of", &to))?;
        }
        let home = u.home();
        std::fs::create_dir(&home).map_err(io("creating", &home))?;
        std::os::unix::fs::chown(&home, Some(uid), Some(gid)).map_err(io("chown", &home))?;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700))
            .map_err(io("setting the mode of", &home))?;
        Ok(u)
    }

    /// The user's home: its own, mode 0700.
    pub fn home(&self) -> PathBuf {
        self.root.path().join("home")
    }

    /// Where a given program is.
    pub fn program(&self, name: &str) -> PathBuf {
        self.root.path().join("bin").join(name)
    }

    /// Copies a file into the user's home, as the user's.
    pub fn give(&self, from: &Path, name: &str) -> Result<PathBuf, AsUserError> {
        let to = self.home().join(name);
        std::fs::copy(from, &to).map_err(io("copying", from))?;
        std::os::unix::fs::chown(&to, Some(self.uid), Some(self.gid)).map_err(io("chown", &to))?;
        Ok(to)
    }

    /// A given program, to run as the user: its uid and gid and no other
    /// groups, in its home, with HOME, a standard PATH and the C locale and
    /// nothing else of the caller's environment.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(self.program(program));
        // Without explicit groups, the standard library drops root's
        // supplementary groups before it changes the uid.
        c.uid(self.uid)
            .gid(self.gid)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", self.home())
            .env("LC_ALL", "C")
            .current_dir(self.home());
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOBODY: u32 = 65534;

    #[test]
    fn a_private_directory_on_the_way_is_named() {
        // Under a directory nobody reaches (whatever TMPDIR is).
        let base = AsUser::new(NOBODY, NOBODY, &[]).expect("a reachable temp");
        let private = base.root.path().join("private");
        let inner = private.join("inner");
        std::fs::create_dir_all(&inner).expect("mkdir");
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        assert_eq!(blocked(base.root.path(), NOBODY, NOBODY), None);
        let why = blocked(&inner, NOBODY, NOBODY).expect("blocked");
        assert!(
            why.starts_with(&format!("{} (mode 0700", private.display())),
            "{why}"
        );
        // Its owner, and root, get through.
        std::os::unix::fs::chown(&private, Some(NOBODY), None).expect("chown");
        assert_eq!(blocked(&inner, NOBODY, NOBODY), None);
        assert_eq!(blocked(&inner, 0, 0), None);

        // With nowhere it can reach, giving it programs fails, saying where.
        std::os::unix::fs::chown(&private, Some(0), None).expect("chown");
        let err = AsUser::new_in(std::slice::from_ref(&inner), NOBODY, NOBODY, &[])
            .err()
            .expect("no reachable temp")
            .to_string();
        assert!(
            err.contains("no temporary directory that uid 65534 can search")
                && err.contains(&format!("blocked at {}", private.display())),
            "{err}"
        );
    }
}
