//! The folder source: a directory of Kubernetes YAML (multi-document files
//! allowed), re-read when a file changes. A file that does not parse, or an
//! object that does not, is reported by name and skipped; the last good
//! version of that object stays in force, unless it only widens access (a
//! ReferenceGrant): that one is dropped, so what cannot be read permits
//! nothing; and such an object defined in two files, or with a copy that
//! cannot be read, is used from neither. Object names must be Kubernetes
//! names ([`super::names`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::objects::{Change, Kind, Object, ObjectError, ObjectKey};

/// One reported problem with the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigIssue {
    pub file: String,
    /// "Kind/namespace/name" when the problem is in one object.
    pub object: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.object {
            Some(o) => write!(f, "{}: {}: {}", self.file, o, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}

#[derive(Clone)]
struct Entry {
    /// None for a pod once the model has been given it: pods are most of a
    /// large config, and the model keeps only what it reads of them. Should
    /// it be needed again (another file's copy went away), the file is read
    /// again ([`FolderSource::object_of`]).
    object: Option<Object>,
    /// Hash of the document as read, to tell a changed object from an
    /// unchanged one without keeping the document twice.
    hash: u64,
}

fn doc_hash(v: &serde_json::Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.to_string().hash(&mut h);
    h.finish()
}

#[derive(Default)]
struct FileState {
    mtime: Option<SystemTime>,
    /// The last good version of every object the file defines.
    objects: BTreeMap<ObjectKey, Entry>,
    /// Objects that only widen access (grants) of which this file holds a
    /// copy that cannot be read (or two copies): no copy of those is used,
    /// in any file.
    unreadable: BTreeSet<ObjectKey>,
    issues: Vec<ConfigIssue>,
}

impl FileState {
    /// The objects kept when the file cannot be read again: the last good
    /// version of each, except those that only widen access (a grant the
    /// user is changing is not left in force; fail closed).
    fn last_good(&self) -> BTreeMap<ObjectKey, Entry> {
        self.objects
            .iter()
            .filter(|(k, _)| !k.kind.widens_access())
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// The objects that only widen access this file held, now unreadable.
    fn widening_keys(&self) -> BTreeSet<ObjectKey> {
        self.objects
            .keys()
            .chain(&self.unreadable)
            .filter(|k| k.kind.widens_access())
            .cloned()
            .collect()
    }
}

pub struct FolderSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    /// What the model currently has, by key: the document hash.
    current: HashMap<ObjectKey, u64>,
    duplicates: Vec<ConfigIssue>,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        // The entry's type comes with the listing: no stat per file (a
        // poll lists every file). A symlink is followed, as before.
        let dir = match e.file_type() {
            Ok(t) if t.is_symlink() => p.is_dir(),
            Ok(t) => t.is_dir(),
            Err(_) => p.is_dir(),
        };
        if dir {
            yaml_files(&p, out);
        } else if matches!(p.extension().and_then(|x| x.to_str()), Some("yaml" | "yml")) {
            out.push(p);
        }
    }
}

/// Kind/namespace/name as written in a raw document, for reporting an
/// object that failed to parse.
/// The names of a document, checked as the API server would
/// ([`super::names`]); a document without them is left to the parser.
fn check_names(v: &serde_json::Value) -> Result<(), super::names::NameError> {
    let (Some(kind), Some(name)) = (
        v.get("kind").and_then(|k| k.as_str()),
        v.pointer("/metadata/name").and_then(|n| n.as_str()),
    ) else {
        return Ok(());
    };
    let ns = v.pointer("/metadata/namespace").and_then(|n| n.as_str());
    super::names::check(kind, name, ns)
}

/// Objects that only widen access and are defined in more than one file,
/// or in a file that holds a copy that cannot be read: with the files that
/// define them.
fn refused_widening(files: &BTreeMap<PathBuf, FileState>) -> BTreeMap<ObjectKey, Vec<String>> {
    let mut copies: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    for (path, f) in files {
        let keys = f.objects.keys().filter(|k| k.kind.widens_access());
        for k in keys.chain(&f.unreadable) {
            let paths = copies.entry(k.clone()).or_default();
            let p = path.display().to_string();
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    copies
        .into_iter()
        .filter(|(k, paths)| paths.len() > 1 || files.values().any(|f| f.unreadable.contains(k)))
        .collect()
}

fn raw_label(v: &serde_json::Value) -> Option<String> {
    let kind = v.get("kind")?.as_str()?;
    let name = v.pointer("/metadata/name")?.as_str()?;
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(|x| x.as_str())
        .unwrap_or("");
    Some(if ns.is_empty() {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{ns}/{name}")
    })
}

impl FolderSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FolderSource {
            dir: dir.into(),
            files: BTreeMap::new(),
            current: HashMap::new(),
            duplicates: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every problem currently reported, by file.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        self.files
            .values()
            .flat_map(|f| f.issues.iter().cloned())
            .chain(self.duplicates.iter().cloned())
            .collect()
    }

    fn load_file(path: &Path, prev: &FileState) -> FileState {
        let file = path.display().to_string();
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let mut state = FileState {
            mtime,
            ..FileState::default()
        };
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                state.objects = prev.last_good();
                state.unreadable = prev.widening_keys();
                state.issues.push(ConfigIssue {
                    file,
                    object: None,
                    reason: format!("cannot read: {e}"),
                });
                return state;
            }
        };
        // Parse every document first: a syntax error anywhere keeps the
        // file's previous objects, since documents after it cannot be trusted.
        let mut docs = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            match serde_json::Value::deserialize(doc) {
                Ok(serde_json::Value::Null) => {}
                Ok(v) => docs.push(v),
                Err(e) => {
                    state.objects = prev.last_good();
                    // Grants copied here are unreadable copies: those
                    // of the last good read, and those of the documents
                    // before the error (a first read has no last good).
                    state.unreadable = prev.widening_keys();
                    state.unreadable.extend(
                        docs.iter()
                            .filter_map(|v| ObjectKey::of_raw(v, "default"))
                            .filter(|k| k.kind.widens_access()),
                    );
                    state.issues.push(ConfigIssue {
                        file,
                        object: None,
                        reason: format!("YAML syntax: {e}"),
                    });
                    return state;
                }
            }
        }
        for v in docs {
            let label = raw_label(&v);
            let raw_key = ObjectKey::of_raw(&v, "default");
            if let Err(reason) = check_names(&v) {
                state.issues.push(ConfigIssue {
                    file: file.clone(),
                    object: label,
                    reason: reason.to_string(),
                });
                continue;
            }
            let mut raw = v.clone();
            match Object::parse(v) {
                Ok(Some(mut obj)) => {
                    obj.default_namespace("default");
                    let key = obj.key();
                    if let Some(m) = raw.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                        m.entry("namespace")
                            .or_insert_with(|| key.namespace.clone().into());
                    }
                    if state.objects.contains_key(&key) {
                        if key.kind.widens_access() {
                            state.unreadable.insert(key.clone());
                        }
                        state.issues.push(ConfigIssue {
                            file: file.clone(),
                            object: Some(key.to_string()),
                            reason: "duplicate object in this file; the first is used".into(),
                        });
                        continue;
                    }
                    let hash = doc_hash(&raw);
                    state.objects.insert(
                        key,
                        Entry {
                            object: Some(obj),
                            hash,
                        },
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    // Keep the last good version of this object, if any,
                    // unless it only widens access (fail closed).
                    if let Some(k) = raw_key {
                        if k.kind.widens_access() {
                            state.unreadable.insert(k);
                        } else if let Some(old) = prev.objects.get(&k) {
                            state.objects.insert(k, old.clone());
                        }
                    }
                    let (object, reason) = match &e {
                        ObjectError::UnknownField { field, .. } => {
                            (label, format!("unknown field {field:?}"))
                        }
                        ObjectError::Invalid { reason, .. } => (label, reason.clone()),
                        other => (label, other.to_string()),
                    };
                    state.issues.push(ConfigIssue {
                        file: file.clone(),
                        object,
                        reason,
                    });
                }
            }
        }
        state
    }

    /// Re-reads changed, new and removed files and returns the resulting
    /// changes for the model.
    pub fn scan(&mut self) -> Vec<Change> {
        let mut paths = Vec::new();
        yaml_files(&self.dir, &mut paths);
        paths.sort();
        let mut dirty = false;
        // `paths` is sorted: a lookup each, not a scan each (10 000 files
        // would make this 10^8 path comparisons per poll).
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| paths.binary_search(p).is_err())
            .cloned()
            .collect();
        for p in gone {
            self.files.remove(&p);
            dirty = true;
        }
        for p in &paths {
            let mtime = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let prev = self.files.get(p);
            if prev.is_some_and(|f| f.mtime == mtime && mtime.is_some()) {
                continue;
            }
            let empty = FileState::default();
            let next = Self::load_file(p, prev.unwrap_or(&empty));
            for i in &next.issues {
                tracing::warn!("config: {i}");
            }
            self.files.insert(p.clone(), next);
            dirty = true;
        }
        if !dirty {
            return Vec::new();
        }
        // Merge files in path order; the first definition of a key wins,
        // except for objects that only widen access: none is used of those
        // defined twice, or with a copy that cannot be read.
        let mut merged: BTreeMap<ObjectKey, (&Path, &Entry)> = BTreeMap::new();
        self.duplicates.clear();
        let refused = refused_widening(&self.files);
        for (k, paths) in &refused {
            self.duplicates.push(ConfigIssue {
                file: paths.join(", "),
                object: Some(k.to_string()),
                reason: "defined more than once, or a copy cannot be read; every copy is dropped (it would widen access)".into(),
            });
        }
        for (path, f) in &self.files {
            for (k, e) in &f.objects {
                if refused.contains_key(k) {
                    continue;
                }
                if let Some((first, _)) = merged.get(k) {
                    self.duplicates.push(ConfigIssue {
                        file: path.display().to_string(),
                        object: Some(k.to_string()),
                        reason: format!(
                            "duplicate of the object in {}; that one is used",
                            first.display()
                        ),
                    });
                    continue;
                }
                merged.insert(k.clone(), (path.as_path(), e));
            }
        }
        let mut changes = Vec::new();
        let removed: Vec<ObjectKey> = self
            .current
            .keys()
            .filter(|k| !merged.contains_key(*k))
            .cloned()
            .collect();
        for k in removed {
            self.current.remove(&k);
            changes.push(Change::Delete(k));
        }
        let upserts: Vec<(PathBuf, ObjectKey, u64)> = merged
            .into_iter()
            .filter(|(k, (_, e))| self.current.get(k) != Some(&e.hash))
            .map(|(k, (p, e))| (p.to_path_buf(), k, e.hash))
            .collect();
        for (path, k, hash) in upserts {
            match self.object_of(&path, &k) {
                Some(o) => {
                    self.current.insert(k, hash);
                    changes.push(Change::Upsert(o));
                }
                // Gone from its file since it was read (the next scan reads
                // the file again): a pod no longer known is removed.
                None => {
                    if self.current.remove(&k).is_some() {
                        changes.push(Change::Delete(k));
                    }
                }
            }
        }
        // The model has every pod it needs: drop the folder's copies.
        for f in self.files.values_mut() {
            for (k, e) in f.objects.iter_mut() {
                if k.kind == Kind::Pod {
                    e.object = None;
                }
            }
        }
        changes
    }

    /// Object `k` as file `path` defines it: the copy kept, else (a pod's,
    /// dropped) read from the file again.
    fn object_of(&mut self, path: &Path, k: &ObjectKey) -> Option<Object> {
        let f = self.files.get_mut(path)?;
        let e = f.objects.get_mut(k)?;
        // A pod's copy goes to the model (it is dropped here anyway).
        let kept = if k.kind == Kind::Pod {
            e.object.take()
        } else {
            e.object.clone()
        };
        if kept.is_some() {
            return kept;
        }
        let mut fresh = Self::load_file(path, &FileState::default());
        let o = fresh.objects.remove(k)?.object;
        tracing::debug!(file = %path.display(), object = %k, "read again for an object dropped after use");
        o
    }
}
