//! The certificate manager: one certificate per identity the node needs.
//!
//! Each identity gets a small task that fetches its certificate, sleeps until
//! half-life, and renews. Callers that need a certificate wait on that task's
//! result (so concurrent callers share one CA request). A failed renewal keeps
//! the old certificate in service while it is still valid and retries with
//! jittered exponential backoff.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::ca::{CaClient, CaError};
use crate::clock::Clock;
use crate::identity::Identity;
use crate::tls::{TrustRoots, WorkloadCertificate};

/// Retry pacing after a failed fetch.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(150),
        }
    }
}

impl Backoff {
    /// Delay before retry number `failures` (1-based): exponential, capped,
    /// with "equal jitter" (between half and all of the step).
    pub fn delay(&self, failures: u32) -> Duration {
        let step = self
            .initial
            .saturating_mul(
                1u32.checked_shl(failures.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Why a caller did not get a certificate.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CertError {
    #[error("no certificate for {identity}: {source}")]
    Unavailable {
        identity: Identity,
        #[source]
        source: CaError,
    },
    #[error("certificate for {0} has expired and could not be renewed")]
    Expired(Identity),
    #[error("identity {0} is no longer managed")]
    Forgotten(Identity),
}

/// What the admin view reports per identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CertState {
    /// First fetch still in flight.
    Initializing,
    /// A valid certificate is in hand (renewal may be failing; see last_error).
    Available,
    /// No valid certificate.
    Unavailable,
}

#[derive(Debug, Clone, Serialize)]
pub struct CertificateStatus {
    pub identity: Identity,
    pub state: CertState,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub next_attempt: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RootStatus {
    pub subject: String,
    pub serial: String,
    pub not_before: String,
    pub not_after: String,
}

#[derive(Default)]
struct Slot {
    cert: Option<Arc<WorkloadCertificate>>,
    last_error: Option<CaError>,
    next_attempt: Option<SystemTime>,
    attempted: bool,
}

struct Entry {
    slot: watch::Sender<Slot>,
    task: tokio::task::AbortHandle,
}

struct Inner {
    ca: Arc<dyn CaClient>,
    clock: Arc<dyn Clock>,
    roots: TrustRoots,
    backoff: Backoff,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self.entries.get_mut().unwrap_or_else(|p| p.into_inner());
        for e in entries.values() {
            e.task.abort();
        }
    }
}

/// Cheap to clone; all clones share the same certificates.
#[derive(Clone)]
pub struct CertificateManager {
    inner: Arc<Inner>,
}

impl CertificateManager {
    pub fn new(
        ca: Arc<dyn CaClient>,
        clock: Arc<dyn Clock>,
        roots: TrustRoots,
        backoff: Backoff,
    ) -> Self {
        CertificateManager {
            inner: Arc::new(Inner {
                ca,
                clock,
                roots,
                backoff,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The mesh roots, kept current from every CA answer.
    pub fn roots(&self) -> &TrustRoots {
        &self.inner.roots
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.inner.clock
    }

    /// A valid certificate for `identity`, fetching it on first need. Waits
    /// for the first fetch; fails at once if the last attempt failed and no
    /// valid certificate is in hand.
    pub async fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, CertError> {
        let mut rx = self.ensure(identity);
        loop {
            {
                let slot = rx.borrow_and_update();
                let now = self.inner.clock.now();
                if let Some(cert) = &slot.cert
                    && cert.is_valid_at(now)
                {
                    return Ok(cert.clone());
                }
                if slot.attempted {
                    return Err(match (&slot.last_error, &slot.cert) {
                        (Some(e), _) => CertError::Unavailable {
                            identity: identity.clone(),
                            source: e.clone(),
                        },
                        (None, _) => CertError::Expired(identity.clone()),
                    });
                }
            }
            if rx.changed().await.is_err() {
                return Err(CertError::Forgotten(identity.clone()));
            }
        }
    }

    /// Starts fetching `identity` in the background if it is not yet managed.
    pub fn prefetch(&self, identity: &Identity) {
        self.ensure(identity);
    }

    /// Stops managing `identity` and drops its certificate.
    pub fn forget(&self, identity: &Identity) {
        if let Some(e) = self.lock().remove(identity) {
            e.task.abort();
            info!(%identity, "certificate dropped: identity no longer needed");
        }
    }

    /// Keeps only the identities for which `keep` is true.
    pub fn retain(&self, keep: impl Fn(&Identity) -> bool) {
        let gone: Vec<Identity> = self.lock().keys().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            self.forget(&id);
        }
    }

    /// Every managed identity has a valid certificate.
    pub fn all_available(&self) -> bool {
        self.status()
            .iter()
            .all(|s| s.state == CertState::Available)
    }

    /// The admin view, sorted by identity.
    pub fn status(&self) -> Vec<CertificateStatus> {
        let now = self.inner.clock.now();
        let mut out: Vec<_> = self
            .lock()
            .iter()
            .map(|(id, e)| {
                let slot = e.slot.borrow();
                let valid = slot.cert.as_ref().is_some_and(|c| c.is_valid_at(now));
                let state = if valid {
                    CertState::Available
                } else if slot.attempted {
                    CertState::Unavailable
                } else {
                    CertState::Initializing
                };
                CertificateStatus {
                    identity: id.clone(),
                    state,
                    serial: slot.cert.as_ref().map(|c| c.serial().to_string()),
                    not_before: slot.cert.as_ref().map(|c| rfc3339(c.not_before())),
                    not_after: slot.cert.as_ref().map(|c| rfc3339(c.not_after())),
                    next_attempt: slot.next_attempt.map(rfc3339),
                    last_error: slot.last_error.as_ref().map(ToString::to_string),
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// The trusted roots, for the admin view.
    /// The trusted roots, with times in RFC 3339 like the leaves'.
    pub fn root_status(&self) -> Vec<RootStatus> {
        self.inner
            .roots
            .current()
            .certs()
            .iter()
            .filter_map(|der| {
                let (_, x) = x509_parser::parse_x509_certificate(der).ok()?;
                Some(RootStatus {
                    subject: x.subject().to_string(),
                    serial: x.raw_serial_as_string(),
                    not_before: asn1_rfc3339(x.validity().not_before),
                    not_after: asn1_rfc3339(x.validity().not_after),
                })
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.inner.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ensure(&self, identity: &Identity) -> watch::Receiver<Slot> {
        let mut entries = self.lock();
        if let Some(e) = entries.get(identity) {
            return e.slot.subscribe();
        }
        let (tx, rx) = watch::channel(Slot::default());
        let worker = Worker {
            identity: identity.clone(),
            ca: self.inner.ca.clone(),
            clock: self.inner.clock.clone(),
            roots: self.inner.roots.clone(),
            backoff: self.inner.backoff,
            slot: tx.clone(),
        };
        let task = tokio::spawn(worker.run()).abort_handle();
        entries.insert(identity.clone(), Entry { slot: tx, task });
        rx
    }
}

struct Worker {
    identity: Identity,
    ca: Arc<dyn CaClient>,
    clock: Arc<dyn Clock>,
    roots: TrustRoots,
    backoff: Backoff,
    slot: watch::Sender<Slot>,
}

impl Worker {
    async fn run(self) {
        let id = &self.identity;
        let mut failures = 0u32;
        loop {
            let result = self.ca.fetch_certificate(id).await;
            let now = self.clock.now();
            let wake = match result {
                Ok(cert) => {
                    failures = 0;
                    if let Err(e) = self.roots.set(cert.roots().to_vec()) {
                        warn!(identity = %id, error = %e, "CA published unusable roots; keeping the old ones");
                    }
                    let refresh = cert.refresh_at();
                    info!(identity = %id, serial = cert.serial(), not_after = %rfc3339(cert.not_after()), "certificate issued");
                    self.slot.send_modify(|s| {
                        s.cert = Some(Arc::new(cert));
                        s.last_error = None;
                        s.next_attempt = Some(refresh);
                        s.attempted = true;
                    });
                    refresh
                }
                Err(error) => {
                    failures += 1;
                    let retry = now + self.backoff.delay(failures);
                    let kept = self
                        .slot
                        .borrow()
                        .cert
                        .as_ref()
                        .is_some_and(|c| c.is_valid_at(now));
                    warn!(identity = %id, %error, failures, keeping_valid_cert = kept, retry_at = %rfc3339(retry), "certificate fetch failed");
                    self.slot.send_modify(|s| {
                        s.last_error = Some(error);
                        s.next_attempt = Some(retry);
                        s.attempted = true;
                    });
                    retry
                }
            };
            self.clock.sleep_until(wake).await;
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

fn asn1_rfc3339(t: x509_parser::time::ASN1Time) -> String {
    t.to_datetime()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_jittered_and_caps() {
        let b = Backoff::default();
        for n in 1..40 {
            let d = b.delay(n);
            assert!(d <= b.max, "attempt {n}: {d:?}");
        }
        let first = b.delay(1);
        assert!(first >= Duration::from_millis(250) && first <= Duration::from_millis(500));
        let late = b.delay(30);
        assert!(late >= Duration::from_secs(75), "{late:?}");
    }
}
