//! The forwarder's cache: upstream answers kept for their TTL (at most
//! `MAX_TTL`), weighed by their size so the whole cache stays within
//! `BUDGET` bytes whatever the pods ask, and nothing over `MAX_ENTRY` kept.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;
use moka::Expiry;
use moka::sync::Cache;

/// The whole cache, in bytes of answers.
const BUDGET: u64 = 16 << 20;
/// An answer larger than this (in memory) is answered but not kept.
const MAX_ENTRY: usize = 64 << 10;
/// No answer is kept longer, whatever its TTL says.
const MAX_TTL: Duration = Duration::from_secs(300);

/// (lower-case name, type).
pub type Key = (String, RecordType);

/// One upstream answer as the pod gets it.
#[derive(Debug)]
pub struct Answer {
    pub code: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    /// What it holds in memory, estimated as four times its wire size.
    pub size: usize,
    /// How long it may be kept.
    pub ttl: Duration,
    pub stored: Instant,
}

impl Answer {
    pub fn new(code: ResponseCode, answers: Vec<Record>, authorities: Vec<Record>) -> Answer {
        let size = 4 * answers
            .iter()
            .chain(&authorities)
            .map(|r| r.to_bytes().map(|b| b.len()).unwrap_or(512))
            .sum::<usize>();
        // A positive answer lives as long as its shortest record; a negative
        // one as the SOA's minimum (RFC 2308), else not at all.
        let ttl = if answers.is_empty() {
            authorities
                .iter()
                .find_map(|r| match &r.data {
                    hickory_proto::rr::RData::SOA(soa) => Some(soa.minimum.min(r.ttl)),
                    _ => None,
                })
                .unwrap_or(0)
        } else {
            answers.iter().map(|r| r.ttl).min().unwrap_or(0)
        };
        Answer {
            code,
            answers,
            authorities,
            size,
            ttl: Duration::from_secs(u64::from(ttl)).min(MAX_TTL),
            stored: Instant::now(),
        }
    }

    /// The records with their TTLs counted down to what is left.
    pub fn aged(&self) -> (Vec<Record>, Vec<Record>) {
        let left = self.ttl.saturating_sub(self.stored.elapsed()).as_secs() as u32;
        let age = |rs: &[Record]| {
            rs.iter()
                .cloned()
                .map(|mut r| {
                    r.ttl = r.ttl.min(left);
                    r
                })
                .collect()
        };
        (age(&self.answers), age(&self.authorities))
    }
}

struct ByTtl;

impl Expiry<Key, Arc<Answer>> for ByTtl {
    fn expire_after_create(&self, _: &Key, v: &Arc<Answer>, _: Instant) -> Option<Duration> {
        Some(v.ttl)
    }
}

pub struct AnswerCache(Cache<Key, Arc<Answer>>);

impl Default for AnswerCache {
    fn default() -> Self {
        AnswerCache(
            Cache::builder()
                .max_capacity(BUDGET)
                .weigher(|_, v: &Arc<Answer>| u32::try_from(v.size).unwrap_or(u32::MAX))
                .expire_after(ByTtl)
                .build(),
        )
    }
}

impl AnswerCache {
    pub fn get(&self, key: &Key) -> Option<Arc<Answer>> {
        self.0.get(key)
    }

    /// Keeps `answer` unless it may not be kept (no TTL) or is too large.
    pub fn put(&self, key: Key, answer: Arc<Answer>) {
        if answer.ttl.is_zero() || answer.size > MAX_ENTRY {
            return;
        }
        self.0.insert(key, answer);
    }

    /// The bytes held now (after pending evictions ran).
    pub fn weight(&self) -> u64 {
        self.0.run_pending_tasks();
        self.0.weighted_size()
    }
}
