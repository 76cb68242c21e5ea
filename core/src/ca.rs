//! The client side of the mesh CA: make a key and a CSR for an identity, ask
//! `istio.v1.auth.IstioCertificateService/CreateCertificate`, and check that
//! what comes back is a certificate for that identity.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use mesh_proto::IMPERSONATED_IDENTITY;
use mesh_proto::istio::ca::IstioCertificateRequest;
use mesh_proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use prost_types::{Struct, Value, value::Kind};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::identity::Identity;
use crate::tls::{TlsError, WorkloadCertificate};

/// Why a certificate could not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CaError {
    #[error("CA address {address:?}: {reason}")]
    Config { address: String, reason: String },
    #[error("building the CSR: {0}")]
    Csr(String),
    #[error("CA unreachable: {0}")]
    Unreachable(String),
    #[error("CA refused ({code:?}): {message}")]
    Refused { code: tonic::Code, message: String },
    #[error("CA answer unusable: {0}")]
    BadAnswer(String),
    #[error("bearer token: {0}")]
    Token(#[from] TokenError),
    #[error("CA answered a certificate for {got}, not the requested {want}")]
    WrongIdentity {
        got: Box<Identity>,
        want: Box<Identity>,
    },
}

impl From<tonic::Status> for CaError {
    fn from(s: tonic::Status) -> Self {
        match s.code() {
            // Transport failures (connect, TLS, timeouts) arrive as these.
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                CaError::Unreachable(s.message().to_string())
            }
            code => CaError::Refused {
                code,
                message: s.message().to_string(),
            },
        }
    }
}

impl From<TlsError> for CaError {
    fn from(e: TlsError) -> Self {
        CaError::BadAnswer(e.to_string())
    }
}

pub type CaFuture<'a> =
    Pin<Box<dyn Future<Output = Result<WorkloadCertificate, CaError>> + Send + 'a>>;

/// Something that turns an identity into a signed certificate.
pub trait CaClient: Send + Sync + 'static {
    fn fetch_certificate<'a>(&'a self, identity: &'a Identity) -> CaFuture<'a>;
}

/// A bearer token for the controller: fixed, or read from a file at each
/// use, because the kubelet rotates projected service-account tokens in
/// place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    Fixed(String),
    File(std::path::PathBuf),
}

impl From<String> for Token {
    fn from(s: String) -> Self {
        Token::Fixed(s)
    }
}

/// Why a bearer token cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("token is not a valid header value")]
    NotAHeader,
}

impl Token {
    /// The `authorization` header value, or why there is none.
    pub fn header(&self) -> Result<MetadataValue<tonic::metadata::Ascii>, TokenError> {
        let text = match self {
            Token::Fixed(t) => t.clone(),
            Token::File(p) => std::fs::read_to_string(p).map_err(|e| TokenError::Read {
                path: p.display().to_string(),
                reason: e.to_string(),
            })?,
        };
        format!("Bearer {}", text.trim())
            .parse()
            .map_err(|_| TokenError::NotAHeader)
    }
}

/// Settings for [`IstioCaClient`].
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// e.g. `https://127.0.0.1:15012`.
    pub address: String,
    /// PEM of the root(s) that sign the CA's serving certificate.
    pub ca_root_pem: String,
    /// The name the CA's serving certificate carries.
    pub server_name: String,
    /// Sent as `authorization: Bearer <token>`; proves which node we are.
    pub token: Option<Token>,
    /// Requested leaf lifetime.
    pub validity: Duration,
    pub request_timeout: Duration,
}

/// The gRPC client of Istio's certificate service.
#[derive(Clone)]
pub struct IstioCaClient {
    client: IstioCertificateServiceClient<Channel>,
    token: Option<Token>,
    validity: Duration,
}

impl IstioCaClient {
    pub fn new(cfg: CaClientConfig) -> Result<Self, CaError> {
        let bad = |reason: String| CaError::Config {
            address: cfg.address.clone(),
            reason,
        };
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&cfg.ca_root_pem))
            .domain_name(cfg.server_name.clone());
        let channel = Endpoint::from_shared(cfg.address.clone())
            .map_err(|e| bad(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| bad(e.to_string()))?
            .timeout(cfg.request_timeout)
            .connect_timeout(cfg.request_timeout)
            .connect_lazy();
        if let Some(t) = &cfg.token {
            // Fail at start-up on a token that cannot be sent at all.
            t.header().map_err(|e| bad(e.to_string()))?;
        }
        Ok(IstioCaClient {
            client: IstioCertificateServiceClient::new(channel),
            token: cfg.token.clone(),
            validity: cfg.validity,
        })
    }

    async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| CaError::Csr(e.to_string()))?;
        let csr = csr_pem(&key, identity)?;
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: self.validity.as_secs() as i64,
            metadata: Some(impersonate(identity)),
        });
        if let Some(t) = &self.token {
            req.metadata_mut()
                .insert("authorization", t.header().map_err(CaError::Token)?);
        }
        let resp = self
            .client
            .clone()
            .create_certificate(req)
            .await?
            .into_inner();
        let cert = WorkloadCertificate::from_pem(&key.serialize_pem(), &resp.cert_chain)?;
        if cert.identity() != identity {
            return Err(CaError::WrongIdentity {
                got: Box::new(cert.identity().clone()),
                want: Box::new(identity.clone()),
            });
        }
        Ok(cert)
    }
}

impl CaClient for IstioCaClient {
    fn fetch_certificate<'a>(&'a self, identity: &'a Identity) -> CaFuture<'a> {
        Box::pin(self.fetch(identity))
    }
}

/// A PEM CSR with an empty subject and `identity` as its only URI SAN.
pub fn csr_pem(key: &KeyPair, identity: &Identity) -> Result<String, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(
        identity
            .to_string()
            .try_into()
            .map_err(|e: rcgen::Error| CaError::Csr(e.to_string()))?,
    )];
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|e| CaError::Csr(e.to_string()))
}

/// The request metadata naming the identity asked for on a workload's behalf.
pub fn impersonate(identity: &Identity) -> Struct {
    let mut s = Struct::default();
    s.fields.insert(
        IMPERSONATED_IDENTITY.to_string(),
        Value {
            kind: Some(Kind::StringValue(identity.to_string())),
        },
    );
    s
}

#[cfg(test)]
mod tests {
    use super::Token;

    #[test]
    fn a_token_file_is_read_at_each_use() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("istio-token");
        std::fs::write(&path, "first\n").expect("write");
        let t = Token::File(path.clone());
        assert_eq!(t.header().expect("header"), "Bearer first");
        // The kubelet rotates the projected token in place.
        std::fs::write(&path, "second").expect("write");
        assert_eq!(t.header().expect("header"), "Bearer second");
        std::fs::remove_file(&path).expect("remove");
        let err = t.header().expect_err("gone").to_string();
        assert!(err.contains("istio-token"), "{err}");
        assert!(Token::Fixed("bad\nvalue".into()).header().is_err());
    }
}
