//! What every binary's wiring shares: a start-up error that says what was
//! being set up, the certificate manager built from the CA settings, and
//! the wait for SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::ca::{CaClientConfig, IstioCaClient, Token};
use crate::certs::{Backoff, CertificateManager};
use crate::clock::SystemClock;
use crate::tls::TrustRoots;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{what}: {reason}")]
    Start { what: String, reason: String },
}

/// A start-up failure: what was being set up, and why it failed.
pub fn start_err(what: impl Into<String>, reason: impl ToString) -> AppError {
    AppError::Start {
        what: what.into(),
        reason: reason.to_string(),
    }
}

/// The certificate manager for a proxy's identities, from its CA settings:
/// the CA's root (also what the controller's TLS is checked against) is
/// read once; the token file at every request (it may be rotated). Returns
/// the manager, the root PEM and the token. Shared by the ztunnel and the
/// waypoint.
pub fn certificates(
    ca: &crate::config::CaConfig,
) -> Result<(CertificateManager, String, Option<Token>), AppError> {
    let root = std::fs::read_to_string(&ca.root_cert)
        .map_err(|e| start_err(format!("CA root {}", ca.root_cert.display()), e))?;
    let token = match &ca.token_file {
        Some(p) => {
            // Read once now so a missing file fails start-up, not later.
            std::fs::read_to_string(p)
                .map_err(|e| start_err(format!("token {}", p.display()), e))?;
            Some(Token::File(p.clone()))
        }
        None => None,
    };
    let client = IstioCaClient::new(CaClientConfig {
        address: ca.address.clone(),
        ca_root_pem: root.clone(),
        server_name: ca.server_name.clone(),
        token: token.clone(),
        validity: ca.validity,
        request_timeout: Duration::from_secs(10),
    })
    .map_err(|e| start_err("CA client", e))?;
    let certs = CertificateManager::new(
        Arc::new(client),
        Arc::new(SystemClock),
        TrustRoots::empty(),
        Backoff::default(),
    );
    Ok((certs, root, token))
}

/// Waits for SIGTERM (the kubelet's stop) or SIGINT.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        r = tokio::signal::ctrl_c() => {
            if let Err(e) = r { error!(error = %e, "signal handler failed"); }
            info!("SIGINT");
        }
    }
    Ok(())
}
