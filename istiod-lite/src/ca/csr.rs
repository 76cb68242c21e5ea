//! Checking a CSR before anything is signed for it.

use mesh_core::identity::Identity;
use rustls_pki_types::CertificateSigningRequestDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::Refusal;

/// Largest CSR we read; real ones are under 2 KiB.
pub const MAX_CSR_BYTES: usize = 16 * 1024;
const MIN_RSA_BITS: usize = 2048;

/// A CSR whose signature, key and single SPIFFE SAN have been checked.
pub struct CheckedCsr {
    pub public_key: rcgen::SubjectPublicKeyInfo,
    pub identity: Identity,
}

pub fn check(pem: &str) -> Result<CheckedCsr, Refusal> {
    if pem.len() > MAX_CSR_BYTES {
        return Err(Refusal::MalformedPem(format!(
            "CSR is {} bytes, more than {MAX_CSR_BYTES}",
            pem.len()
        )));
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| Refusal::MalformedPem(e.to_string()))?;
    let (rest, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| Refusal::BadCsr(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(Refusal::BadCsr("trailing bytes after the request".into()));
    }
    // Key first: a weak key is the clearer reason, and ring will not even
    // verify signatures made with one.
    let spki = &csr.certification_request_info.subject_pki;
    check_key(spki)?;
    csr.verify_signature()
        .map_err(|e| Refusal::BadSignature(format!("{e:?}")))?;

    let mut uris = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                if let GeneralName::URI(u) = name {
                    uris.push(u.to_string());
                }
            }
        }
    }
    let uri = match uris.as_slice() {
        [] => return Err(Refusal::NoSan),
        [one] => one,
        many => return Err(Refusal::ManySans(many.to_vec())),
    };
    let identity = uri
        .parse::<Identity>()
        .map_err(|e| Refusal::NotSpiffe(e.to_string()))?;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki.raw)
        .map_err(|e| Refusal::UnsupportedKey(e.to_string()))?;
    Ok(CheckedCsr {
        public_key,
        identity,
    })
}

// ECDSA P-256/P-384 and RSA of at least 2048 bits: what Istio's proxies use.
fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), Refusal> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
            Some(c) => Err(Refusal::UnsupportedKey(format!(
                "EC curve {c} (only P-256 and P-384 are accepted)"
            ))),
            None => Err(Refusal::UnsupportedKey(
                "EC key without a named curve".into(),
            )),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= MIN_RSA_BITS => Ok(()),
            Ok(PublicKey::RSA(rsa)) => Err(Refusal::WeakKey(format!(
                "RSA key of {} bits (at least {MIN_RSA_BITS} required)",
                rsa.key_size()
            ))),
            _ => Err(Refusal::UnsupportedKey("RSA key does not parse".into())),
        };
    }
    Err(Refusal::UnsupportedKey(format!(
        "key algorithm {alg} (only ECDSA P-256/P-384 and RSA >= {MIN_RSA_BITS} are accepted)"
    )))
}
