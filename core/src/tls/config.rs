use std::sync::Arc;

use rustls::version::TLS13;
use rustls::{ClientConfig, CommonState, ServerConfig};

use super::{
    ALPN_H2, ClientIdentityVerifier, ServerIdentityVerifier, TlsError, TrustRoots,
    WorkloadCertificate, identities_in, provider,
};
use crate::identity::Identity;

/// The HBONE server config for one workload: TLS 1.3 only, ALPN h2, presents
/// `cert`, requires a client certificate from the same trust domain.
pub fn server_config(
    cert: &WorkloadCertificate,
    roots: TrustRoots,
) -> Result<ServerConfig, TlsError> {
    let verifier =
        ClientIdentityVerifier::new(roots, vec![cert.identity().trust_domain().to_string()]);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(cert.chain().to_vec(), cert.key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: every connection's client chain is checked against the
    // roots as they are now (they rotate).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// The HBONE client config: presents `cert` and accepts only a server that
/// proves one of `expected`.
pub fn client_config(
    cert: &WorkloadCertificate,
    roots: TrustRoots,
    expected: Vec<Identity>,
) -> Result<ClientConfig, TlsError> {
    let verifier = ServerIdentityVerifier::new(roots, expected);
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(cert.chain().to_vec(), cert.key())?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The verified identity of the peer of a finished handshake.
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    let leaf = conn.peer_certificates()?.first()?;
    identities_in(leaf).ok()?.into_iter().next()
}
