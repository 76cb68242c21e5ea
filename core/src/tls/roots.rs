use std::sync::{Arc, RwLock};

use rustls_pki_types::{CertificateDer, TrustAnchor};

use super::TlsError;

/// The mesh roots a proxy trusts, shared by every config it builds and
/// replaceable at run time: during a root rotation the CA publishes old and
/// new roots together, and both are trusted until the old one is withdrawn.
#[derive(Clone)]
pub struct TrustRoots {
    current: Arc<RwLock<Arc<RootSet>>>,
}

/// One published set of roots.
pub struct RootSet {
    certs: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

impl RootSet {
    fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        let anchors = certs
            .iter()
            .map(|c| {
                webpki::anchor_from_trusted_cert(c)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::X509(format!("root is not a usable trust anchor: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RootSet { certs, anchors })
    }

    pub fn certs(&self) -> &[CertificateDer<'static>] {
        &self.certs
    }

    pub fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl TrustRoots {
    /// Starts with the given roots (which may be empty: nothing verifies until
    /// roots are set).
    pub fn new(certs: Vec<CertificateDer<'static>>) -> Result<Self, TlsError> {
        Ok(TrustRoots {
            current: Arc::new(RwLock::new(Arc::new(RootSet::new(certs)?))),
        })
    }

    pub fn empty() -> Self {
        TrustRoots {
            current: Arc::new(RwLock::new(Arc::new(RootSet {
                certs: Vec::new(),
                anchors: Vec::new(),
            }))),
        }
    }

    /// Replaces the trusted set. Returns whether it changed.
    pub fn set(&self, certs: Vec<CertificateDer<'static>>) -> Result<bool, TlsError> {
        if certs.is_empty() {
            return Err(TlsError::NoRoots);
        }
        if self.current().certs == certs {
            return Ok(false);
        }
        let set = Arc::new(RootSet::new(certs)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(true)
    }

    pub fn current(&self) -> Arc<RootSet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
