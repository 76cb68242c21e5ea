use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{TlsError, TrustRoots, identities_in, provider};
use crate::identity::Identity;

/// Client side: the server must chain to the mesh roots and present one of
/// the identities expected for the destination. There is no SNI in HBONE, so
/// the server name rustls passes in is ignored.
#[derive(Debug)]
pub struct ServerIdentityVerifier {
    roots: TrustRoots,
    expected: Vec<Identity>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    pub fn new(roots: TrustRoots, expected: Vec<Identity>) -> Self {
        ServerIdentityVerifier {
            roots,
            expected,
            algs: provider().signature_verification_algorithms,
        }
    }
}

/// Server side: the client must present a certificate that chains to the
/// mesh roots and names an identity in one of our trust domains.
#[derive(Debug)]
pub struct ClientIdentityVerifier {
    roots: TrustRoots,
    trust_domains: Vec<String>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientIdentityVerifier {
    pub fn new(roots: TrustRoots, trust_domains: Vec<String>) -> Self {
        ClientIdentityVerifier {
            roots,
            trust_domains,
            algs: provider().signature_verification_algorithms,
        }
    }
}

impl std::fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustRoots({} roots)", self.current().certs().len())
    }
}

/// Checks that `chain` (leaf first) verifies to `roots` for mutual-TLS use
/// and returns the leaf's identities.
pub fn verify_workload_chain(
    roots: &TrustRoots,
    chain: &[CertificateDer<'_>],
    now: std::time::SystemTime,
) -> Result<Vec<Identity>, rustls::Error> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or(rustls::Error::NoCertificatesPresented)?;
    let now = UnixTime::since_unix_epoch(
        now.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default(),
    );
    let algs = provider().signature_verification_algorithms;
    verify_chain(
        roots,
        &algs,
        leaf,
        intermediates,
        now,
        webpki::KeyUsage::client_auth(),
    )?;
    verify_chain(
        roots,
        &algs,
        leaf,
        intermediates,
        now,
        webpki::KeyUsage::server_auth(),
    )
}

/// Verifies the chain for the given usage and returns the leaf's identities.
fn verify_chain(
    roots: &TrustRoots,
    algs: &WebPkiSupportedAlgorithms,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<Vec<Identity>, rustls::Error> {
    let set = roots.current();
    if set.anchors().is_empty() {
        return Err(other(TlsError::NoRoots));
    }
    let cert = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| other(TlsError::X509(e.to_string())))?;
    cert.verify_for_usage(
        algs.all,
        set.anchors(),
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(chain_error)?;
    identities_in(end_entity).map_err(other)
}

// Keep rustls' standard certificate errors where one fits, so the alert sent
// to the peer is the standard one (expired, unknown CA); the rest carry our
// typed error.
fn chain_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    match e {
        W::CertExpired { time, not_after } => {
            CertificateError::ExpiredContext { time, not_after }.into()
        }
        W::CertNotValidYet { time, not_before } => {
            CertificateError::NotValidYetContext { time, not_before }.into()
        }
        W::UnknownIssuer => CertificateError::UnknownIssuer.into(),
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature.into(),
        other_err => other(TlsError::Chain(format!("{other_err:?}"))),
    }
}

fn other(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The handshake-signature half of a verifier is the provider's, the same
/// for both sides; only the certificate checks differ.
macro_rules! handshake_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.algs)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = verify_chain(
            &self.roots,
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if got.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(other(TlsError::UnexpectedIdentity {
                got: got.iter().map(ToString::to_string).collect(),
                expected: self.expected.iter().map(ToString::to_string).collect(),
            }))
        }
    }

    handshake_signatures!();
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let got = verify_chain(
            &self.roots,
            &self.algs,
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        match got
            .iter()
            .find(|id| !self.trust_domains.iter().any(|td| td == id.trust_domain()))
        {
            Some(outside) => Err(other(TlsError::TrustDomain {
                got: outside.clone(),
                want: self.trust_domains.join(","),
            })),
            None => Ok(ClientCertVerified::assertion()),
        }
    }

    handshake_signatures!();
}
