//! Writing into the host's CNI directories: every file is replaced
//! atomically, because the container runtime may read the conf dir and exec
//! the plugin at any moment and must never see half a file.

use std::fs::{File, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::ByteString;
use serde_json::json;

use super::InstallError;

/// The kubeconfig's file name in the CNI conf dir. It has no `.conf`
/// suffix, so runtimes never mistake it for a network config.
pub const KUBECONFIG_NAME: &str = "mesh-cni-kubeconfig";

/// An `io::Error` mapper that says what we were doing to which file.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> InstallError {
    let path = path.to_path_buf();
    move |source| InstallError::Io {
        action,
        path,
        source,
    }
}

/// Replaces `path` with what `fill` writes: a temp file in the same
/// directory (rename is atomic only within one filesystem), its mode set
/// before the content lands, synced, then renamed over the target.
fn replace_atomically(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), InstallError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // The prefix and lack of suffix keep runtimes from loading it as config.
    let mut tmp = tempfile::Builder::new()
        .prefix(".mesh-cni-")
        .tempfile_in(dir)
        .map_err(io_err("creating a temporary file in", dir))?;
    let tmp_path = tmp.path().to_path_buf();
    tmp.as_file()
        .set_permissions(Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", &tmp_path))?;
    fill(tmp.as_file_mut()).map_err(io_err("writing", &tmp_path))?;
    tmp.as_file()
        .sync_all()
        .map_err(io_err("syncing", &tmp_path))?;
    tmp.persist(path)
        .map_err(|e| io_err("renaming a temporary file to", path)(e.error))?;
    Ok(())
}

/// Atomically replaces `path` with `bytes`.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    replace_atomically(path, mode, |f| f.write_all(bytes))
}

/// Atomically copies the plugin binary to `dst`, executable by all.
pub fn install_binary(src: &Path, dst: &Path) -> Result<(), InstallError> {
    let mut from = File::open(src).map_err(io_err("opening the plugin binary", src))?;
    replace_atomically(dst, 0o755, |to| io::copy(&mut from, to).map(drop))
}

/// The permission bits of an existing file, so a rewrite keeps them.
pub fn mode_of(path: &Path) -> Result<u32, InstallError> {
    let meta = std::fs::metadata(path).map_err(io_err("reading the mode of", path))?;
    Ok(meta.permissions().mode() & 0o7777)
}

/// Removes a file we installed; one already gone is fine.
pub fn remove_if_present(path: &Path) -> Result<bool, InstallError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// The API server's URL from the in-cluster service variables; an IPv6
/// address needs brackets to be a URL host.
pub fn server_url(host: &str, port: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    }
}

/// A kubeconfig for the plugin, acting as our service account. It is JSON,
/// which is YAML too: serde_json quotes the token safely whatever it holds.
pub fn render_kubeconfig(server: &str, ca: &[u8], token: &str) -> Result<String, InstallError> {
    let doc = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": server,
            "certificate-authority-data": ByteString(ca.to_vec()),
        }}],
        "users": [{"name": "mesh-cni", "user": {"token": token}}],
        "contexts": [{"name": "mesh-cni", "context": {"cluster": "local", "user": "mesh-cni"}}],
        "current-context": "mesh-cni",
    });
    let mut text = serde_json::to_string_pretty(&doc).map_err(|source| InstallError::Encode {
        path: PathBuf::from(KUBECONFIG_NAME),
        source,
    })?;
    text.push('\n');
    Ok(text)
}

/// Writes the kubeconfig when the file differs from what it should say:
/// first run, a rotated projected token or CA, or someone removed it.
/// Returns whether it wrote.
pub fn ensure_kubeconfig(server: &str, sa_dir: &Path, path: &Path) -> Result<bool, InstallError> {
    let ca_path = sa_dir.join("ca.crt");
    let token_path = sa_dir.join("token");
    let ca = std::fs::read(&ca_path).map_err(io_err("reading the cluster CA", &ca_path))?;
    let token = std::fs::read_to_string(&token_path)
        .map_err(io_err("reading the service account token", &token_path))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(InstallError::EmptyToken { path: token_path });
    }
    let want = render_kubeconfig(server, &ca, token)?;
    // A missing or unreadable file just means we write it.
    if std::fs::read_to_string(path).is_ok_and(|have| have == want) {
        return Ok(false);
    }
    write_atomically(path, want.as_bytes(), 0o600)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_hosts_are_bracketed() {
        assert_eq!(server_url("10.96.0.1", "443"), "https://10.96.0.1:443");
        assert_eq!(server_url("fd00::1", "443"), "https://[fd00::1]:443");
        assert_eq!(server_url("[fd00::1]", "443"), "https://[fd00::1]:443");
    }

    #[test]
    fn binary_is_copied_executable_and_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-bin");
        std::fs::write(&src, b"\x7fELF new").unwrap();
        let dst = dir.path().join("mesh-cni");
        std::fs::write(&dst, b"old").unwrap();
        install_binary(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"\x7fELF new");
        assert_eq!(mode_of(&dst).unwrap(), 0o755);
        // No temporary files are left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        let missing = install_binary(&dir.path().join("nope"), &dst).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
    }
}
