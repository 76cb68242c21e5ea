//! `istio.v1.auth.IstioCertificateService` over gRPC with TLS.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::identity::Identity;
use mesh_proto::IMPERSONATED_IDENTITY;
use mesh_proto::istio::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use mesh_proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use prost_types::value::Kind;
use tonic::transport::{Identity as TonicIdentity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::auth::{Authenticator, NodeAuthorizer};
use super::{CertificateAuthority, Refusal, csr};

const SERVING_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The CA as a gRPC service.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    authn: Arc<dyn Authenticator>,
    authz: Arc<dyn NodeAuthorizer>,
}

impl CaService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        authn: Arc<dyn Authenticator>,
        authz: Arc<dyn NodeAuthorizer>,
    ) -> Self {
        CaService { ca, authn, authz }
    }

    /// The tonic service, with message sizes bounded for CSRs.
    pub fn into_server(self) -> IstioCertificateServiceServer<Self> {
        IstioCertificateServiceServer::new(self)
            .max_decoding_message_size(csr::MAX_CSR_BYTES + 4096)
    }

    async fn handle(
        &self,
        req: &Request<IstioCertificateRequest>,
    ) -> Result<(String, Identity, Vec<String>), Refusal> {
        let caller = self
            .authn
            .authenticate_from(req.metadata(), req.remote_addr().map(|a| a.ip()))
            .await
            .map_err(Refusal::Unauthenticated)?;
        let body = req.get_ref();
        let validity = CertificateAuthority::validity_for(body.validity_duration)?;
        let csr = csr::check(&body.csr)?;
        let identity = match impersonated(body)? {
            Some(requested) if requested != csr.identity => {
                return Err(Refusal::ImpersonationMismatch {
                    requested,
                    csr: csr.identity,
                });
            }
            _ => csr.identity.clone(),
        };
        if identity.trust_domain() != self.ca.trust_domain() {
            return Err(Refusal::ForeignTrustDomain {
                identity,
                trust_domain: self.ca.trust_domain().to_string(),
            });
        }
        if let Some(own) = &caller.only
            && *own != identity
        {
            return Err(Refusal::NotOwnIdentity {
                identity,
                own: own.clone(),
            });
        }
        if !self.authz.workload_on_node(&caller.node, &identity) {
            return Err(Refusal::NotOnNode {
                identity,
                node: caller.node,
            });
        }
        let chain = self.ca.sign(&csr, &identity, validity)?;
        Ok((caller.node, identity, chain))
    }
}

fn impersonated(body: &IstioCertificateRequest) -> Result<Option<Identity>, Refusal> {
    let Some(value) = body
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => {
            s.parse()
                .map(Some)
                .map_err(
                    |e: mesh_core::identity::IdentityError| Refusal::BadImpersonation {
                        requested: s.clone(),
                        reason: e.to_string(),
                    },
                )
        }
        other => Err(Refusal::BadImpersonation {
            requested: format!("{other:?}"),
            reason: "not a string".into(),
        }),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        crate::metrics::metrics().csr();
        match self.handle(&request).await {
            Ok((node, identity, cert_chain)) => {
                crate::metrics::metrics().issued();
                info!(%identity, node, ?peer, "certificate issued");
                Ok(Response::new(IstioCertificateResponse { cert_chain }))
            }
            Err(refusal) => {
                let now = std::time::Instant::now();
                if let Some(left_out) =
                    crate::metrics::log_limit().admit("certificate refused", now)
                {
                    warn!(?peer, reason = %refusal, left_out, "certificate refused");
                }
                Err(refusal.into())
            }
        }
    }
}

/// The controller's own TLS serving certificate, signed by the mesh CA.
#[derive(Clone)]
pub struct ServingCert {
    pub chain_pem: String,
    pub key_pem: String,
}

impl ServingCert {
    pub fn issue(
        ca: &CertificateAuthority,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<Self, Refusal> {
        // Real time, not the CA's clock: rustls checks serving certificates
        // against the wall clock.
        let now = std::time::SystemTime::now();
        let (leaf, key_pem) = ca
            .issuer()
            .issue_server(
                dns_names,
                ips,
                now - Duration::from_secs(60),
                now + SERVING_VALIDITY,
            )
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        let mut chain_pem = leaf;
        for pem in ca.chain_pem() {
            chain_pem.push_str(pem);
        }
        Ok(ServingCert { chain_pem, key_pem })
    }
}

/// Streams one connection may have open at once: a proxy needs one ADS
/// stream, and its certificate requests queue behind the rest.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// The per-connection limits every gRPC server of ours applies.
pub fn with_limits(server: Server) -> Server {
    server.max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
}

/// A tonic server builder that serves TLS with `cert`.
pub fn serve(cert: &ServingCert) -> Result<Server, tonic::transport::Error> {
    with_limits(Server::builder())
        .tls_config(
            ServerTlsConfig::new()
                .identity(TonicIdentity::from_pem(&cert.chain_pem, &cert.key_pem)),
        )
        .map(|s| {
            s.http2_keepalive_interval(Some(Duration::from_secs(30)))
                .timeout(Duration::from_secs(30))
        })
}
