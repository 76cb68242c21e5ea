//! Signing certificates: the one place that decides what a mesh root, a mesh
//! intermediate and a workload leaf look like. The CA in istiod-lite signs
//! through this; tests use it to mint peers with chosen defects.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use mesh_core::identity::Identity;
use mesh_core::tls::{TlsError, WorkloadCertificate};

/// Why signing failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("no system randomness available")]
    Random,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A CA certificate and its key.
pub struct Issuer {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: SystemTime,
    inner: rcgen::Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn serial() -> Result<SerialNumber, IssueError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IssueError::Random)?;
    bytes[0] &= 0x7f; // keep it positive
    Ok(SerialNumber::from_slice(&bytes))
}

fn ca_params(
    trust_domain: &str,
    common_name: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, IssueError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

impl Issuer {
    /// A new self-signed ECDSA P-256 root.
    pub fn new_root(
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        // Back-date an hour so peers with slightly slow clocks accept it.
        let not_before = now - Duration::from_secs(3600);
        let not_after = now + validity;
        let params = ca_params(trust_domain, "Mesh Root CA", not_before, not_after)?;
        let cert = params.self_signed(&key)?;
        Ok(Issuer {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            inner: rcgen::Issuer::new(params, key),
        })
    }

    /// An intermediate CA signed by `self` (an enterprise PKI plugging a
    /// mesh intermediate in, or a test of that).
    pub fn new_intermediate(
        &self,
        trust_domain: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let not_before = now - Duration::from_secs(3600);
        let not_after = (now + validity).min(self.not_after);
        let params = ca_params(trust_domain, "Mesh Intermediate CA", not_before, not_after)?;
        let cert = params.signed_by(&key, &self.inner)?;
        Ok(Issuer {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            not_after,
            inner: rcgen::Issuer::new(params, key),
        })
    }

    /// Loads a CA certificate and its PKCS#8 key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let key = KeyPair::from_pem(key_pem)?;
        let cert_der = mesh_core::tls::parse_pem_certs(cert_pem, "CA certificate")?
            .into_iter()
            .next()
            .ok_or(TlsError::NoCertificate("CA certificate"))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| TlsError::X509(e.to_string()))?;
        if x509.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(
                TlsError::Key("the CA key does not match the CA certificate".into()).into(),
            );
        }
        if !x509.is_ca() {
            return Err(
                TlsError::X509("the CA certificate is not a CA (basicConstraints)".into()).into(),
            );
        }
        let ts = x509.validity().not_after.timestamp();
        let not_after = SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64);
        let inner = rcgen::Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(Issuer {
            cert_pem: cert_pem.to_string(),
            cert_der,
            not_after,
            inner,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The signing key, PKCS#8 PEM: only for persisting it to the CA's own
    /// 0600 file.
    pub fn key_pem(&self) -> String {
        self.inner.key().serialize_pem()
    }

    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    /// Signs a workload leaf for `public_key` carrying exactly `identity` as
    /// its URI SAN. `not_after` is cut to the issuer's own expiry.
    pub fn sign_workload(
        &self,
        public_key: &impl PublicKeyData,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<rcgen::Certificate, IssueError> {
        let mut params = CertificateParams::default();
        // Empty subject: the identity lives in the (then critical) SAN.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        // EC keys sign; key encipherment belongs to RSA key transport.
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.min(self.not_after).into();
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        Ok(params.signed_by(public_key, &self.inner)?)
    }

    /// A TLS server certificate (DNS and IP SANs, serverAuth) and its PKCS#8
    /// PEM key, for the controller's own gRPC endpoints.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<(String, String), IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names.first().map(String::as_str).unwrap_or("mesh"),
        );
        params.distinguished_name = dn;
        params.subject_alt_names = dns_names
            .iter()
            .map(|d| Ok(SanType::DnsName(d.clone().try_into()?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, rcgen::Error>>()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = not_before.into();
        params.not_after = not_after.min(self.not_after).into();
        params.serial_number = Some(serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.inner)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Generates a key and a leaf for `identity`: a complete workload
    /// certificate whose chain is `intermediates` and whose roots are `roots`.
    pub fn issue_workload(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
        intermediates: &[CertificateDer<'static>],
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<WorkloadCertificate, IssueError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let leaf = self.sign_workload(&key, identity, not_before, not_after)?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(intermediates.iter().cloned());
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(WorkloadCertificate::new(key, chain, roots)?)
    }
}
