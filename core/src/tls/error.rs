use crate::identity::{Identity, IdentityError};

/// Everything that can be wrong with a certificate, key or peer.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: not valid PEM: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("{0}: no certificate found")]
    NoCertificate(&'static str),
    #[error("private key: {0}")]
    Key(String),
    #[error("certificate does not parse as X.509: {0}")]
    X509(String),
    #[error("certificate carries no SPIFFE URI SAN")]
    NoSpiffeIdentity,
    #[error("certificate URI SAN is not a workload identity: {0}")]
    BadIdentity(#[from] IdentityError),
    #[error("certificate chain does not verify to the mesh roots: {0}")]
    Chain(String),
    #[error("peer identity {got:?} is not one of the expected {expected:?}")]
    UnexpectedIdentity {
        got: Vec<String>,
        expected: Vec<String>,
    },
    #[error("peer identity {got} is outside trust domain {want:?}")]
    TrustDomain { got: Identity, want: String },
    #[error("no trust roots")]
    NoRoots,
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A readable reason for a failed handshake: our own verifier errors by their
/// message rather than rustls' debug form of them.
pub fn handshake_failure(e: &std::io::Error) -> String {
    let Some(inner) = e.get_ref() else {
        return e.to_string();
    };
    match inner.downcast_ref::<rustls::Error>() {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {}", other.0)
        }
        Some(r) => r.to_string(),
        None => e.to_string(),
    }
}
