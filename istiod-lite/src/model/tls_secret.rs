//! A Secret checked as a listener certificate, once, when it changes: the
//! PEM text a valid one serves, or why it cannot serve. Errors never quote
//! the key, and the material's Debug form hides it.

use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::kube::TLS_SECRET_TYPE;

/// What a valid TLS Secret holds, as PEM text, kept only to be served.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    pub(super) cert_chain: String,
    pub(super) private_key: String,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsMaterial { .. }")
    }
}

/// Why a Secret cannot serve as a listener certificate. The text follows
/// "Secret ns/name" in the Gateway's listener status.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("is of type {0:?}, not {TLS_SECRET_TYPE}")]
    Type(String),
    /// `key`: "tls.crt" or "tls.key".
    #[error("has no {key}")]
    Missing { key: &'static str },
    #[error("{key} is not PEM text")]
    NotText { key: &'static str },
    #[error("tls.crt is not valid PEM: {0}")]
    CertPem(rustls_pki_types::pem::Error),
    #[error("no certificate in tls.crt")]
    NoCertificate,
    #[error("no private key in tls.key (PKCS#8, PKCS#1 or SEC1 PEM)")]
    NoKey,
    /// The PEM error could quote a line of the key: it says only what is wrong.
    #[error("tls.key is not valid PEM")]
    KeyPem,
    #[error("tls.key is not a usable private key (RSA, ECDSA P-256/P-384 or Ed25519)")]
    UnusableKey,
    #[error("tls.key does not match the first certificate in tls.crt")]
    KeyMismatch,
    #[error("cannot check that tls.key matches tls.crt")]
    Unchecked,
    #[error("the first certificate in tls.crt does not parse: {0}")]
    CertParse(rustls::Error),
}

/// A Secret as the model keeps it: what it serves, or why it cannot serve.
pub type TlsSecret = Result<TlsMaterial, SecretError>;

fn data<'a>(s: &'a Secret, key: &'static str) -> Result<&'a [u8], SecretError> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .filter(|b| !b.is_empty())
        .ok_or(SecretError::Missing { key })
}

fn text<'a>(b: &'a [u8], key: &'static str) -> Result<&'a str, SecretError> {
    std::str::from_utf8(b).map_err(|_| SecretError::NotText { key })
}

/// Checks a Secret as a listener certificate: of type `kubernetes.io/tls`,
/// `tls.crt` PEM certificates (leaf first), `tls.key` a PEM private key
/// (PKCS#8, PKCS#1 or SEC1) matching the leaf.
pub fn tls_secret(s: &Secret) -> TlsSecret {
    let t = s.type_.as_deref().unwrap_or("Opaque");
    if t != TLS_SECRET_TYPE {
        return Err(SecretError::Type(t.to_string()));
    }
    let crt = data(s, "tls.crt")?;
    let key = data(s, "tls.key")?;
    let cert_chain = text(crt, "tls.crt")?;
    let private_key = text(key, "tls.key")?;
    let certs = CertificateDer::pem_slice_iter(crt)
        .collect::<Result<Vec<_>, _>>()
        .map_err(SecretError::CertPem)?;
    if certs.is_empty() {
        return Err(SecretError::NoCertificate);
    }
    let der = PrivateKeyDer::from_pem_slice(key).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => SecretError::NoKey,
        _ => SecretError::KeyPem,
    })?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|_| SecretError::UnusableKey)?;
    CertifiedKey::new(certs, signer)
        .keys_match()
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                SecretError::KeyMismatch
            }
            rustls::Error::InconsistentKeys(_) => SecretError::Unchecked,
            other => SecretError::CertParse(other),
        })?;
    Ok(TlsMaterial {
        cert_chain: cert_chain.to_string(),
        private_key: private_key.to_string(),
    })
}
