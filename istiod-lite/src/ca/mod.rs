//! The mesh CA: a root (made on first start, or plugged in by the operator),
//! the signing flow for workload CSRs, and the gRPC service in front of it.

pub mod auth;
pub mod csr;
pub mod issue;
mod server;
mod store;
pub mod tokens_file;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::ca::issue::Issuer;
use mesh_core::clock::Clock;
use mesh_core::identity::Identity;
use mesh_core::tls::TrustRoots;

pub use server::{CaService, MAX_STREAMS_PER_CONNECTION, ServingCert, serve, with_limits};
pub use store::{CaLoadError, CaSource};

/// Default leaf lifetime.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Shortest leaf issued; shorter requests are raised to this.
pub const MIN_VALIDITY: Duration = Duration::from_secs(3600);
/// Longest leaf issued; longer requests are refused.
pub const MAX_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Leaves are back-dated a little so a peer whose clock lags still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

/// Every reason the CA says no. Each names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("caller not authenticated: {0}")]
    Unauthenticated(auth::AuthError),
    #[error("malformed PEM CSR: {0}")]
    MalformedPem(String),
    #[error("CSR does not parse: {0}")]
    BadCsr(String),
    #[error("CSR signature does not verify: {0}")]
    BadSignature(String),
    #[error("CSR has no URI SAN; exactly one SPIFFE identity is required")]
    NoSan,
    #[error("CSR has {n} URI SANs ({0:?}); exactly one is required", n = .0.len())]
    ManySans(Vec<String>),
    #[error("CSR SAN is not a workload identity: {0}")]
    NotSpiffe(String),
    #[error("identity {identity} is outside this mesh's trust domain {trust_domain:?}")]
    ForeignTrustDomain {
        identity: Identity,
        trust_domain: String,
    },
    #[error("ImpersonatedIdentity {requested:?} is not a workload identity: {reason}")]
    BadImpersonation { requested: String, reason: String },
    #[error("ImpersonatedIdentity {requested} does not match the CSR's SAN {csr}")]
    ImpersonationMismatch { requested: Identity, csr: Identity },
    #[error("a workload token for {own} cannot ask for identity {identity}")]
    NotOwnIdentity { identity: Identity, own: Identity },
    #[error("no workload with identity {identity} runs on node {node:?}")]
    NotOnNode { identity: Identity, node: String },
    #[error("weak key: {0}")]
    WeakKey(String),
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("validity_duration {0}s is out of range (0 for the default, at most {max}s)", max = MAX_VALIDITY.as_secs())]
    DurationOutOfRange(i64),
    #[error("signing failed: {0}")]
    Internal(String),
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        use tonic::Code;
        let code = match &r {
            Refusal::Unauthenticated(e) => e.status("").code(),
            Refusal::NotOnNode { .. } | Refusal::NotOwnIdentity { .. } => Code::PermissionDenied,
            Refusal::Internal(_) => Code::Internal,
            _ => Code::InvalidArgument,
        };
        tonic::Status::new(code, r.to_string())
    }
}

/// The signing half of the CA: who signs, what chain goes back.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer,
    /// PEM of the certificates between the issuer and the root, issuer first
    /// (empty when the issuer is the root).
    chain_pem: Vec<String>,
    /// Every root currently published, as one PEM bundle.
    root_bundle_pem: String,
    roots: TrustRoots,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The PEM bundle of every trusted root: what proxies and clients trust.
    pub fn root_bundle_pem(&self) -> &str {
        &self.root_bundle_pem
    }

    pub fn roots(&self) -> &TrustRoots {
        &self.roots
    }

    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// Intermediates between the issuer and the root, issuer first.
    pub fn chain_pem(&self) -> &[String] {
        &self.chain_pem
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Clamps a requested lifetime: 0 means the default, below the minimum is
    /// raised, negative or above the maximum is refused.
    pub fn validity_for(requested_secs: i64) -> Result<Duration, Refusal> {
        match requested_secs {
            0 => Ok(DEFAULT_VALIDITY),
            s if s < 0 || s as u64 > MAX_VALIDITY.as_secs() => Err(Refusal::DurationOutOfRange(s)),
            s => Ok(Duration::from_secs(s as u64).max(MIN_VALIDITY)),
        }
    }

    /// Signs a leaf for an already checked CSR; answers the chain leaf first,
    /// root bundle last.
    pub fn sign(
        &self,
        csr: &csr::CheckedCsr,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Vec<String>, Refusal> {
        let now = self.clock.now();
        let not_before: SystemTime = now - BACKDATE;
        let leaf = self
            .issuer
            .sign_workload(&csr.public_key, identity, not_before, now + validity)
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let mut chain = Vec::with_capacity(self.chain_pem.len() + 2);
        chain.push(leaf.pem());
        chain.extend(self.chain_pem.iter().cloned());
        chain.push(self.root_bundle_pem.clone());
        Ok(chain)
    }
}
