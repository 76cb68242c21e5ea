//! Callers authenticated by projected service-account tokens (audience
//! `istio-ca`), checked with the TokenReview API. A token is bound to the
//! pod it was issued to; the pod's node (from the model, cross-checked with
//! the node the API server names when it does) is the caller's node. The
//! ztunnel's service account may ask for any identity on its node, but
//! never for an ingress gateway's keys; any other caller (a waypoint, an
//! ingress gateway) only for its own identity, and on xDS only as its own
//! pod (`waypoint~<ns>~<pod>` or `ingress~<ns>~<pod>`, checked in
//! [`crate::access`]).
//!
//! Reviews are cached for a short while by a hash of the token: a ztunnel
//! asks for certificates in bursts, and one review per burst is enough. A
//! good review is never remembered past the token's own expiry (its `exp`),
//! and not at all for a token that names none.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use mesh_core::identity::Identity;
use tonic::metadata::MetadataMap;
use tracing::debug;

use crate::ca::auth::{AuthError, Authenticator, Caller, bearer};
use crate::xds::Hub;

pub const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const CACHE_FOR: Duration = Duration::from_secs(60);
/// A refused token is remembered briefly, so a client retrying a bad token
/// does not cost a TokenReview per call.
const REFUSAL_CACHE_FOR: Duration = Duration::from_secs(5);
const CACHE_MAX: usize = 10_000;

#[derive(Debug, Clone)]
pub struct ReviewConfig {
    pub audience: String,
    /// namespace/name of the service account node proxies run as.
    pub ztunnel_account: (String, String),
    pub trust_domain: String,
}

pub struct TokenReviewer {
    api: Api<TokenReview>,
    cfg: ReviewConfig,
    hub: Arc<Hub>,
    cache: Mutex<HashMap<[u8; 32], Reviewed>>,
}

/// A review's answer and until when it holds, by the token's SHA-256.
type Reviewed = (Instant, Result<Caller, AuthError>);

/// How long a review's answer may be remembered: a refusal briefly; a good
/// answer for [`CACHE_FOR`], but never past the token's expiry, and not at
/// all when the token names none.
fn remember_for(token: &str, answer: &Result<Caller, AuthError>) -> Duration {
    if answer.is_err() {
        return REFUSAL_CACHE_FOR;
    }
    match super::jwt::expiry(token) {
        Some(exp) => exp
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(CACHE_FOR),
        None => Duration::ZERO,
    }
}

impl TokenReviewer {
    pub fn new(client: Client, cfg: ReviewConfig, hub: Arc<Hub>) -> Self {
        TokenReviewer {
            api: Api::all(client),
            cfg,
            hub,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn review(&self, token: &str) -> Result<Caller, AuthError> {
        // A SHA-256 digest is always 32 bytes.
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((until, answer)) = cache.get(&key)
                && Instant::now() < *until
            {
                return answer.clone();
            }
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: Some(vec![self.cfg.audience.clone()]),
            },
            ..TokenReview::default()
        };
        // An API server that cannot answer says nothing about the token:
        // not remembered.
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::ReviewFailed(e.to_string()))?;
        let answer = answer
            .status
            .ok_or(AuthError::NoReviewStatus)
            .and_then(|status| self.caller(&status));
        let ttl = remember_for(token, &answer);
        if ttl.is_zero() {
            return answer;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            let now = Instant::now();
            cache.retain(|_, (until, _)| now < *until);
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(key, (Instant::now() + ttl, answer.clone()));
        answer
    }

    /// Who a reviewed token belongs to, or why it is not good enough.
    fn caller(&self, status: &TokenReviewStatus) -> Result<Caller, AuthError> {
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(
                status.error.clone().filter(|e| !e.is_empty()),
            ));
        }
        // An empty list means "the API server's own audience", not ours: a
        // pod's ordinary API token must not pass.
        let audiences = status.audiences.as_deref().unwrap_or_default();
        if !audiences.contains(&self.cfg.audience) {
            return Err(AuthError::WrongAudience {
                want: self.cfg.audience.clone(),
                got: audiences.to_vec(),
            });
        }
        let user = status.user.as_ref().ok_or(AuthError::NoUser)?;
        let username = user.username.as_deref().unwrap_or_default();
        let (ns, sa) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|r| r.split_once(':'))
            .ok_or_else(|| AuthError::NotServiceAccount(username.to_string()))?;
        let extra = user.extra.as_ref();
        let one = |k: &str| {
            extra
                .and_then(|e| e.get(k))
                .and_then(|v| v.first())
                .cloned()
        };
        let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
            return Err(AuthError::NotPodBound(username.to_string()));
        };
        let known = self.hub.model().pod_node(ns, &pod, &uid);
        let node = match (known, one(NODE_NAME)) {
            (Some(m), Some(n)) if m != n => {
                return Err(AuthError::NodeMismatch {
                    namespace: ns.to_string(),
                    pod,
                    model: m,
                    token: n,
                });
            }
            (Some(m), _) => m,
            (None, Some(n)) => n,
            (None, None) => {
                return Err(AuthError::UnknownPod {
                    namespace: ns.to_string(),
                    pod,
                    uid,
                });
            }
        };
        let only = if (ns, sa)
            == (
                self.cfg.ztunnel_account.0.as_str(),
                self.cfg.ztunnel_account.1.as_str(),
            ) {
            None
        } else {
            Some(
                Identity::new(&self.cfg.trust_domain, ns, sa).map_err(|reason| {
                    AuthError::BadAccount {
                        namespace: ns.to_string(),
                        account: sa.to_string(),
                        reason: Box::new(reason),
                    }
                })?,
            )
        };
        debug!(%username, pod = %pod, %node, "token reviewed");
        Ok(Caller {
            node,
            only,
            pod: Some((ns.to_string(), pod)),
        })
    }
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(
        &'a self,
        metadata: &'a MetadataMap,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let token = bearer(metadata)?;
            self.review(token).await
        })
    }
}
