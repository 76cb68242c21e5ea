//! Chaining our plugin into the node's primary CNI config: the file the
//! runtime loads (the lexicographically first config in the conf dir), with
//! our entry last in its plugin list so we run after the network plugin
//! has given the pod its address.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::InstallError;
use super::files::{KUBECONFIG_NAME, io_err, mode_of, write_atomically};
use super::json::Json;

/// The `type` of our entry: how we find it again.
pub const PLUGIN_TYPE: &str = "mesh-cni";

/// What our conflist entry says; the field names are [`crate::NetConf`]'s.
/// Paths are as the host sees them: the runtime runs the plugin there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kubeconfig: PathBuf,
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
    pub timeout_secs: u64,
}

#[derive(Serialize)]
struct Wire<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    name: &'a str,
    kubeconfig: &'a Path,
    agent_socket: &'a Path,
    exclude_namespaces: &'a [String],
    timeout_secs: u64,
}

impl Entry {
    /// The entry as it goes into the plugin list, `type` and `name` first.
    pub fn to_json(&self) -> Result<Json, InstallError> {
        let wire = Wire {
            kind: PLUGIN_TYPE,
            name: PLUGIN_TYPE,
            kubeconfig: &self.kubeconfig,
            agent_socket: &self.agent_socket,
            exclude_namespaces: &self.exclude_namespaces,
            timeout_secs: self.timeout_secs,
        };
        Json::from_serialize(&wire).map_err(|source| InstallError::Encode {
            path: PathBuf::from("the mesh-cni conflist entry"),
            source,
        })
    }
}

/// What [`ensure`] found or did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chain {
    /// No network config yet: the node's network plugin is not installed.
    NoPrimary,
    /// The primary already carries our entry as it should.
    InPlace(PathBuf),
    /// Our entry was added to (or updated in) the primary conflist.
    Written(PathBuf),
    /// The primary was a single-plugin config; it is now this conflist.
    Converted { from: PathBuf, to: PathBuf },
}

/// The network configs in `dir`, in the order runtimes (libcni) sort them.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        // The dir appears when the network plugin is installed; wait for it.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err("listing", dir))?.path();
        let ext = path.extension().and_then(OsStr::to_str);
        let is_config = matches!(ext, Some("conf" | "conflist" | "json"));
        if is_config && path.file_name() != Some(OsStr::new(KUBECONFIG_NAME)) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Puts our entry into the primary config, unless it is there already.
/// A file that does not parse is never rewritten.
pub fn ensure(dir: &Path, entry: &Json) -> Result<Chain, InstallError> {
    let Some(path) = config_files(dir)?.into_iter().next() else {
        return Ok(Chain::NoPrimary);
    };
    let doc = read_config(&path)?;
    let unchainable = |reason: Unchainable| InstallError::Unchainable {
        path: path.clone(),
        reason,
    };
    if is_list(&path, &doc) {
        let Some(doc) = with_entry(doc, entry).map_err(unchainable)? else {
            return Ok(Chain::InPlace(path));
        };
        write_config(&path, &doc, mode_of(&path)?)?;
        return Ok(Chain::Written(path));
    }
    // As Istio's install-cni does: a chain needs a list, so the single
    // plugin becomes the first of one, in <stem>.conflist (which sorts
    // right after the .conf, so the order of files barely changes).
    let list = to_list(doc, entry).map_err(unchainable)?;
    let to = path.with_extension("conflist");
    write_config(&to, &list, mode_of(&path)?)?;
    // Until the .conf is gone it still sorts first and stays in force.
    std::fs::remove_file(&path).map_err(io_err("removing the converted", &path))?;
    Ok(Chain::Converted { from: path, to })
}

/// Takes our entry out of every conflist in `dir` (the primary may have
/// changed since we chained). Returns the files changed and, separately,
/// the failures: one bad file must not stop the others being cleaned.
pub fn remove_everywhere(dir: &Path) -> (Vec<PathBuf>, Vec<InstallError>) {
    let files = match config_files(dir) {
        Ok(files) => files,
        Err(e) => return (Vec::new(), vec![e]),
    };
    let (mut changed, mut failed) = (Vec::new(), Vec::new());
    for path in files {
        match remove_from(&path) {
            Ok(true) => changed.push(path),
            Ok(false) => {}
            Err(e) => failed.push(e),
        }
    }
    (changed, failed)
}

fn remove_from(path: &Path) -> Result<bool, InstallError> {
    let mut doc = read_config(path)?;
    let Some(Json::Array(plugins)) = doc.get_mut("plugins") else {
        return Ok(false);
    };
    let before = plugins.len();
    plugins.retain(|p| !is_ours(p));
    if plugins.len() == before {
        return Ok(false);
    }
    write_config(path, &doc, mode_of(path)?)?;
    Ok(true)
}

fn read_config(path: &Path) -> Result<Json, InstallError> {
    let text = std::fs::read_to_string(path).map_err(io_err("reading", path))?;
    Json::parse(&text).map_err(|source| InstallError::BadJson {
        path: path.to_path_buf(),
        source,
    })
}

fn write_config(path: &Path, doc: &Json, mode: u32) -> Result<(), InstallError> {
    let text = doc.to_pretty().map_err(|source| InstallError::Encode {
        path: path.to_path_buf(),
        source,
    })?;
    write_atomically(path, text.as_bytes(), mode)
}

/// A `.conflist` is a list; a `.json` may be either, and says by content.
fn is_list(path: &Path, doc: &Json) -> bool {
    match path.extension().and_then(OsStr::to_str) {
        Some("conflist") => true,
        Some("json") => doc.get("plugins").is_some(),
        _ => false,
    }
}

fn is_ours(plugin: &Json) -> bool {
    plugin.get("type").and_then(Json::as_str) == Some(PLUGIN_TYPE)
}

/// Why a primary config cannot take our entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unchainable {
    #[error("it has no \"plugins\" list")]
    NoPlugins,
    #[error("it is not a JSON object")]
    NotAnObject,
    #[error("it has no {0:?}")]
    Missing(&'static str),
}

/// The conflist with our entry in it, or `None` if it already is as it
/// should be. An entry of ours that differs (an upgrade changed a flag) is
/// replaced where it stands.
fn with_entry(mut doc: Json, entry: &Json) -> Result<Option<Json>, Unchainable> {
    let Some(Json::Array(plugins)) = doc.get_mut("plugins") else {
        return Err(Unchainable::NoPlugins);
    };
    match plugins.iter().position(is_ours) {
        Some(i) if plugins[i] == *entry => return Ok(None),
        Some(i) => plugins[i] = entry.clone(),
        None => plugins.push(entry.clone()),
    }
    Ok(Some(doc))
}

/// A single-plugin config as a conflist: its name and version on the list,
/// the original plugin untouched as the first link, ours after it.
fn to_list(conf: Json, entry: &Json) -> Result<Json, Unchainable> {
    if !matches!(conf, Json::Object(_)) {
        return Err(Unchainable::NotAnObject);
    }
    let field = |key: &'static str| conf.get(key).cloned().ok_or(Unchainable::Missing(key));
    let (name, version) = (field("name")?, field("cniVersion")?);
    Ok(Json::Object(vec![
        ("name".into(), name),
        ("cniVersion".into(), version),
        ("plugins".into(), Json::Array(vec![conf, entry.clone()])),
    ]))
}
