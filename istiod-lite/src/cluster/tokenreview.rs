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
//! asks for certificates in bursts, and one review per burst is enough
//! (callers presenting a token whose review is in flight wait for its
//! answer: [`super::flight`]). A good review is never remembered past the
//! token's own expiry (its `exp`), and not at all for a token that names
//! none. Anyone may present a token, so what a stranger can make the
//! controller do is bounded: a token not shaped as a JWT is refused
//! without a review; at most [`REVIEWS_AT_ONCE`] reviews run at once (the
//! rest wait their turn a second, then are told UNAVAILABLE); one address
//! may have at most [`REVIEWS_PER_PEER`] reviews it sent waiting or in
//! flight (past it, UNAVAILABLE at once; callers waiting on another's
//! review of the same token are not counted); and refusals are remembered
//! apart from acceptances, in a cache of their own that drops its oldest
//! when full: bogus tokens never push the ztunnels' good reviews out.
//!
//! [`RESERVED_FOR_KNOWN`] of the slots are kept for tokens whose payload
//! (read unverified, only to choose the slots) names, by namespace, name
//! and uid, a pod the model knows that runs as the ztunnel's service
//! account or is a Gateway's pod ([`crate::access::may_admit`]), sent from
//! one of that pod's addresses in the model (a hostNetwork pod's are its
//! node's): the callers that must not be kept out. The payload is
//! unverified, so a pod that knows such a pod's uid can forge tokens
//! naming it (each a new digest, never cached); from another address they
//! take no reserved slot. At most one review per claimed uid holds a
//! reserved turn, and it is never waited for: another token naming the
//! uid meanwhile takes an unreserved slot like any token, so no claimant
//! queues ahead of the pod's own. Peers behind a NodePort or load
//! balancer that rewrites source addresses (SNAT) share one address, and
//! so its bound, and take no reserved slot.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use kube::{Api, Client};
use mesh_core::identity::Identity;
use tonic::metadata::MetadataMap;
use tracing::debug;

use super::flight::Flights;
use crate::ca::auth::{AuthError, Authenticator, Caller, bearer};
use crate::xds::Hub;

pub const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const CACHE_FOR: Duration = Duration::from_secs(60);
/// A refused token is remembered briefly, so a client retrying a bad token
/// does not cost a TokenReview per call.
const REFUSAL_CACHE_FOR: Duration = Duration::from_secs(5);
/// Acceptances remembered at most: when full, the one used least recently
/// goes.
const CACHE_MAX: usize = 10_000;
/// Acceptances remembered per pod at most (its projected token is rotated;
/// more are a pod minting tokens to crowd others out): its oldest goes.
const PER_POD: usize = 4;
/// Refusals remembered at most; the oldest goes first.
const REFUSALS_MAX: usize = 10_000;
/// TokenReviews in flight at once, at most.
pub const REVIEWS_AT_ONCE: usize = 16;
/// Of them, kept for tokens whose unverified claims name a node agent's
/// pod or a Gateway's pod the model knows, sent from that pod's address,
/// at most one per claimed pod:
/// other tokens never hold these.
pub const RESERVED_FOR_KNOWN: usize = 6;
/// Reviews one peer address may have sent and waiting or in flight at once
/// (not counting its callers waiting on a review of the same token).
pub const REVIEWS_PER_PEER: usize = 4;
/// How long a caller waits for a review slot before it is told to retry.
const SLOT_WAIT: Duration = Duration::from_secs(1);
/// The longest token reviewed (a projected token is about 1 KiB).
const MAX_TOKEN: usize = 16 * 1024;

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
    accepted: Mutex<Acceptances>,
    refused: Mutex<Refusals>,
    /// Review slots any token may take.
    in_flight: tokio::sync::Semaphore,
    /// Review slots only a token naming a known pod may take.
    reserved: tokio::sync::Semaphore,
    /// Reviews waiting or in flight per peer address.
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    /// Reviews in flight by token digest: one per token.
    flights: Flights<[u8; 32], Result<Caller, AuthError>>,
    /// Pod uids whose one review on a reserved turn is waiting or in
    /// flight.
    per_uid: Mutex<HashSet<String>>,
}

/// The one review on a reserved turn for a claimed pod uid; the turn is
/// given back when dropped.
struct UidTurn<'a> {
    per_uid: &'a Mutex<HashSet<String>>,
    uid: String,
}

impl<'a> UidTurn<'a> {
    /// The turn for `uid`, if no other review holds it: never waited for,
    /// so no claimant queues ahead of another.
    fn take(per_uid: &'a Mutex<HashSet<String>>, uid: String) -> Option<UidTurn<'a>> {
        let mut set = per_uid.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(uid.clone()) {
            debug!("a review for the pod a token names holds its reserved turn");
            return None;
        }
        Some(UidTurn { per_uid, uid })
    }
}

impl Drop for UidTurn<'_> {
    fn drop(&mut self) {
        let mut set = self.per_uid.lock().unwrap_or_else(|p| p.into_inner());
        set.remove(&self.uid);
    }
}

/// One review counted against its peer's address; uncounted when dropped.
struct PeerTurn<'a> {
    per_peer: &'a Mutex<HashMap<IpAddr, usize>>,
    peer: Option<IpAddr>,
}

impl<'a> PeerTurn<'a> {
    /// Counts a review for `peer`, or refuses (Busy) one past its bound.
    /// A caller whose address is unknown (in-process) is not counted.
    fn take(
        per_peer: &'a Mutex<HashMap<IpAddr, usize>>,
        peer: Option<IpAddr>,
    ) -> Result<PeerTurn<'a>, AuthError> {
        if let Some(ip) = peer {
            let mut map = per_peer.lock().unwrap_or_else(|p| p.into_inner());
            let n = map.entry(ip).or_insert(0);
            if *n >= REVIEWS_PER_PEER {
                debug!(%ip, "token review refused: this address has too many in flight");
                return Err(AuthError::Busy);
            }
            *n += 1;
        }
        Ok(PeerTurn { per_peer, peer })
    }
}

impl Drop for PeerTurn<'_> {
    fn drop(&mut self) {
        let Some(ip) = self.peer else {
            return;
        };
        let mut map = self.per_peer.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }
}

/// Good reviews by the token's SHA-256, until when each holds: the least
/// recently used goes first when full, and a pod keeps at most
/// [`PER_POD`]. Each step is O(log n).
#[derive(Default)]
struct Acceptances {
    by_key: HashMap<[u8; 32], Accepted>,
    /// Last use -> key, least recent first.
    recency: BTreeMap<u64, [u8; 32]>,
    /// Per pod (namespace, name), its keys, oldest first.
    by_pod: HashMap<(String, String), VecDeque<[u8; 32]>>,
    tick: u64,
}

struct Accepted {
    until: Instant,
    caller: Caller,
    used: u64,
    pod: (String, String),
}

impl Acceptances {
    fn get(&mut self, key: &[u8; 32]) -> Option<Caller> {
        let e = self.by_key.get_mut(key)?;
        if Instant::now() >= e.until {
            self.remove(key);
            return None;
        }
        self.tick += 1;
        self.recency.remove(&e.used);
        e.used = self.tick;
        self.recency.insert(self.tick, *key);
        Some(e.caller.clone())
    }

    fn remove(&mut self, key: &[u8; 32]) {
        let Some(e) = self.by_key.remove(key) else {
            return;
        };
        self.recency.remove(&e.used);
        if let Some(keys) = self.by_pod.get_mut(&e.pod) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.by_pod.remove(&e.pod);
            }
        }
    }

    fn insert(&mut self, key: [u8; 32], until: Instant, caller: Caller) {
        self.remove(&key);
        let pod = caller
            .pod
            .clone()
            .unwrap_or_else(|| (String::new(), caller.node.clone()));
        while let Some(oldest) = self
            .by_pod
            .get(&pod)
            .filter(|k| k.len() >= PER_POD)
            .and_then(|k| k.front().copied())
        {
            self.remove(&oldest);
        }
        while self.by_key.len() >= CACHE_MAX {
            let Some((_, lru)) = self.recency.first_key_value() else {
                break;
            };
            let lru = *lru;
            self.remove(&lru);
        }
        self.tick += 1;
        self.recency.insert(self.tick, key);
        self.by_pod.entry(pod.clone()).or_default().push_back(key);
        self.by_key.insert(
            key,
            Accepted {
                until,
                caller,
                used: self.tick,
                pod,
            },
        );
    }
}

/// Refused tokens by SHA-256, until when each refusal holds, oldest first.
#[derive(Default)]
struct Refusals {
    by_key: HashMap<[u8; 32], (Instant, AuthError)>,
    order: VecDeque<[u8; 32]>,
}

impl Refusals {
    fn get(&self, key: &[u8; 32]) -> Option<AuthError> {
        self.by_key
            .get(key)
            .filter(|(until, _)| Instant::now() < *until)
            .map(|(_, e)| e.clone())
    }

    fn insert(&mut self, key: [u8; 32], until: Instant, why: AuthError) {
        if self.by_key.insert(key, (until, why)).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > REFUSALS_MAX {
            if let Some(old) = self.order.pop_front() {
                self.by_key.remove(&old);
            }
        }
    }
}

/// Shaped as a JWT (what a projected service-account token is): three
/// base64url segments, the first a JSON object. Says nothing of whether it
/// is good: only the API server does.
pub fn jwt_shaped(token: &str) -> bool {
    let b64 = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    };
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    token.len() <= MAX_TOKEN && b64(head) && b64(body) && b64(sig) && super::jwt::json_object(head)
}

/// How long a review's answer may be remembered: a refusal briefly (not at
/// all when only the model does not know the token's pod yet); a good
/// answer for [`CACHE_FOR`], but never past the token's expiry, and not at
/// all when the token names none.
fn remember_for(token: &str, answer: &Result<Caller, AuthError>) -> Duration {
    match answer {
        // The API server vouched for the token, but the model has not yet
        // seen its pod (or sees it elsewhere): an informer lagging a new
        // pod must not keep it out for the refusal's while.
        Err(AuthError::UnknownPod { .. } | AuthError::NodeMismatch { .. }) => {
            return Duration::ZERO;
        }
        Err(_) => return REFUSAL_CACHE_FOR,
        Ok(_) => {}
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
            accepted: Mutex::new(Acceptances::default()),
            refused: Mutex::new(Refusals::default()),
            in_flight: tokio::sync::Semaphore::new(REVIEWS_AT_ONCE - RESERVED_FOR_KNOWN),
            reserved: tokio::sync::Semaphore::new(RESERVED_FOR_KNOWN),
            per_peer: Mutex::new(HashMap::new()),
            flights: Flights::default(),
            per_uid: Mutex::new(HashSet::new()),
        }
    }

    /// The pod uid the token's unverified claims name, when that pod is
    /// one the model knows (namespace, name and uid) that runs as the
    /// ztunnel's service account or is a Gateway's pod, and the token
    /// comes from one of that pod's addresses: such a token may take a
    /// reserved slot, one review per uid at a time.
    fn reserved_claim(&self, token: &str, peer: Option<IpAddr>) -> Option<String> {
        let (ns, pod, uid) = super::jwt::pod_claim(token)?;
        let model = self.hub.model();
        if !model.pod_has_ip(&ns, &pod, &uid, peer?) {
            return None;
        }
        let (node, account) = model.pod_node_account(&ns, &pod, &uid)?;
        let (zt_ns, zt_sa) = &self.cfg.ztunnel_account;
        if (ns.as_str(), account.as_str()) == (zt_ns.as_str(), zt_sa.as_str()) {
            return Some(uid);
        }
        let only = Identity::new(&self.cfg.trust_domain, &ns, &account).ok()?;
        let caller = Caller {
            node,
            only: Some(only),
            pod: Some((ns, pod)),
        };
        crate::access::may_admit(&caller, &model).ok()?;
        Some(uid)
    }

    /// A review slot, waited for until `until`: any free one for a token
    /// that may take a reserved one, else only the unreserved ones.
    async fn slot(
        &self,
        reserved: bool,
        until: Instant,
    ) -> Result<tokio::sync::SemaphorePermit<'_>, AuthError> {
        let wait = async {
            if reserved {
                tokio::select! {
                    p = self.reserved.acquire() => p,
                    p = self.in_flight.acquire() => p,
                }
            } else {
                self.in_flight.acquire().await
            }
        };
        match tokio::time::timeout_at(until.into(), wait).await {
            Ok(turn) => turn.map_err(|e| AuthError::ReviewFailed(e.to_string())),
            Err(_) => {
                debug!(
                    reserved,
                    "token review refused: every review slot it may take is taken"
                );
                Err(AuthError::Busy)
            }
        }
    }

    /// A remembered answer for the token with this digest, if one holds.
    fn remembered(&self, key: &[u8; 32]) -> Option<Result<Caller, AuthError>> {
        let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(caller) = accepted.get(key) {
            return Some(Ok(caller));
        }
        drop(accepted);
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.get(key).map(Err)
    }

    /// Remembers an answer for `ttl`.
    fn remember(&self, key: [u8; 32], ttl: Duration, answer: &Result<Caller, AuthError>) {
        let until = Instant::now() + ttl;
        match answer {
            Ok(caller) => {
                let mut accepted = self.accepted.lock().unwrap_or_else(|p| p.into_inner());
                accepted.insert(key, until, caller.clone());
            }
            Err(why) => {
                let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
                refused.insert(key, until, why.clone());
            }
        }
    }

    async fn review(&self, token: &str, peer: Option<IpAddr>) -> Result<Caller, AuthError> {
        if !jwt_shaped(token) {
            return Err(AuthError::NotJwt);
        }
        // A SHA-256 digest is always 32 bytes.
        let mut key = [0u8; 32];
        key.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
        if let Some(answer) = self.remembered(&key) {
            return answer;
        }
        // One review per token at a time: a burst of calls with one token
        // waits for one answer, and only its sender counts against its
        // address.
        self.flights
            .once(key, || self.send_review(token, key, peer))
            .await
    }

    /// Sends a review of the token with digest `key`, within the bounds.
    async fn send_review(
        &self,
        token: &str,
        key: [u8; 32],
        peer: Option<IpAddr>,
    ) -> Result<Caller, AuthError> {
        // At most so many reviews at once; the rest wait their turn a
        // little (and may find the answer remembered once it comes), then
        // are told to retry: a flood of strangers' tokens does not queue
        // good callers behind it for good.
        let _peer_turn = PeerTurn::take(&self.per_peer, peer)?;
        let until = Instant::now() + SLOT_WAIT;
        // A token that may take a reserved slot whose pod's turn is held
        // waits like any other, never behind the holder.
        let uid_turn = self
            .reserved_claim(token, peer)
            .and_then(|uid| UidTurn::take(&self.per_uid, uid));
        let _turn = self.slot(uid_turn.is_some(), until).await?;
        if let Some(answer) = self.remembered(&key) {
            return answer;
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
        if !ttl.is_zero() {
            self.remember(key, ttl, &answer);
        }
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
        self.authenticate_from(metadata, None)
    }

    fn authenticate_from<'a>(
        &'a self,
        metadata: &'a MetadataMap,
        peer: Option<IpAddr>,
    ) -> BoxFuture<'a, Result<Caller, AuthError>> {
        Box::pin(async move {
            let token = bearer(metadata)?;
            self.review(token, peer).await
        })
    }
}
