use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;
use crate::identity::Identity;

/// A workload's certificate, its chain to the mesh root, and its key.
#[derive(Debug)]
pub struct WorkloadCertificate {
    identity: Identity,
    /// Leaf first, then intermediates; roots are kept apart.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    not_before: SystemTime,
    not_after: SystemTime,
    serial: String,
}

impl WorkloadCertificate {
    /// Builds from a PEM key and a CA answer: `chain[0]` the leaf, then
    /// intermediates, the last entry the root bundle (one or more roots, since
    /// both old and new roots are published during a root rotation).
    pub fn from_pem(key_pem: &str, chain_pem: &[String]) -> Result<Self, TlsError> {
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        let (roots_pem, certs_pem) = match chain_pem {
            [] | [_] => return Err(TlsError::NoCertificate("certificate chain with a root")),
            [certs @ .., roots] => (roots, certs),
        };
        let mut chain = Vec::with_capacity(certs_pem.len());
        for pem in certs_pem {
            chain.extend(parse_pem_certs(pem, "certificate chain")?);
        }
        let roots = parse_pem_certs(roots_pem, "root bundle")?;
        Self::new(key, chain, roots)
    }

    /// Builds from DER parts. `chain[0]` is the leaf.
    pub fn new(
        key: PrivateKeyDer<'static>,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoCertificate("leaf"))?;
        let (_, x509) =
            X509Certificate::from_der(leaf).map_err(|e| TlsError::X509(e.to_string()))?;
        let identity = identities_of(&x509)?
            .into_iter()
            .next()
            .ok_or(TlsError::NoSpiffeIdentity)?;
        let validity = x509.validity();
        let not_before = asn1_to_system(validity.not_before.timestamp());
        let not_after = asn1_to_system(validity.not_after.timestamp());
        let serial = x509.raw_serial_as_string();
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        Ok(WorkloadCertificate {
            identity,
            chain,
            roots,
            key,
            not_before,
            not_after,
            serial,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }
    pub fn not_before(&self) -> SystemTime {
        self.not_before
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    /// Serial number, colon-separated hex.
    pub fn serial(&self) -> &str {
        &self.serial
    }
    /// Leaf first, then intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }

    /// When to renew: half-way through the validity.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

fn asn1_to_system(ts: i64) -> SystemTime {
    if ts >= 0 {
        UNIX_EPOCH + Duration::from_secs(ts as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(ts.unsigned_abs())
    }
}

/// Parses every certificate in a PEM string; at least one is required.
pub fn parse_pem_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(what));
    }
    Ok(certs)
}

/// The SPIFFE identities in a certificate's URI SANs (at least one).
pub fn identities_in(der: &CertificateDer<'_>) -> Result<Vec<Identity>, TlsError> {
    let (_, x509) = X509Certificate::from_der(der).map_err(|e| TlsError::X509(e.to_string()))?;
    identities_of(&x509)
}

fn identities_of(x509: &X509Certificate<'_>) -> Result<Vec<Identity>, TlsError> {
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::X509(e.to_string()))?
        .ok_or(TlsError::NoSpiffeIdentity)?;
    let mut out = Vec::new();
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            out.push(uri.parse::<Identity>()?);
        }
    }
    if out.is_empty() {
        return Err(TlsError::NoSpiffeIdentity);
    }
    Ok(out)
}
