//! TLS for the mesh: workload certificates, the mesh trust roots (which may
//! rotate at run time), SPIFFE-aware certificate verifiers, and the rustls
//! configurations the data path uses.
//!
//! rustls checks chains but not URI SANs, so the verifiers here do the chain
//! check through webpki and then compare SPIFFE identities themselves.

mod cert;
mod config;
mod error;
mod roots;
mod verify;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use cert::{WorkloadCertificate, identities_in, parse_pem_certs};
pub use config::{client_config, peer_identity, server_config};
pub use error::{TlsError, handshake_failure};
pub use roots::TrustRoots;
pub use verify::{ClientIdentityVerifier, ServerIdentityVerifier, verify_workload_chain};

/// ALPN protocol every HBONE connection negotiates.
pub const ALPN_H2: &[u8] = b"h2";

/// The one crypto provider of every binary in the mesh (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for libraries (tonic, kube)
/// that build their own rustls configs. Call once at start-up; later calls
/// are harmless.
pub fn install_default_provider() {
    let _ = CryptoProvider::install_default((*provider()).clone());
}
