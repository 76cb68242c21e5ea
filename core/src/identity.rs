//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! This is the bottom of the crate: it knows nothing of TLS or the network.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

const SCHEME: &str = "spiffe://";

/// A workload identity as Istio defines it.
///
/// Stored as its URI in one shared allocation plus offsets: cloning is a
/// reference-count bump, since identities travel with every connection.
#[derive(Clone)]
pub struct Identity {
    uri: Arc<str>,
    /// Byte ranges of the namespace and service account inside `uri`.
    ns: (u16, u16),
    sa: u16,
}

/// Why a string is not a workload identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("identity {0:?} does not start with spiffe://")]
    Scheme(String),
    #[error(
        "identity {0:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
    )]
    Shape(String),
    #[error("identity {input:?} has an invalid {part}: {reason}")]
    Part {
        input: String,
        part: &'static str,
        reason: &'static str,
    },
}

impl Identity {
    /// Builds an identity, checking each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        let err = |part, reason| IdentityError::Part {
            input: format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"),
            part,
            reason,
        };
        check_trust_domain(trust_domain).map_err(|r| err("trust domain", r))?;
        check_segment(namespace).map_err(|r| err("namespace", r))?;
        check_segment(service_account).map_err(|r| err("service account", r))?;
        let uri = format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}");
        // Segments are bounded (255 + 253 + 253), so offsets fit in u16.
        let ns_start = (SCHEME.len() + trust_domain.len() + "/ns/".len()) as u16;
        let ns_end = ns_start + namespace.len() as u16;
        let sa = ns_end + "/sa/".len() as u16;
        Ok(Identity {
            uri: uri.into(),
            ns: (ns_start, ns_end),
            sa,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.uri[SCHEME.len()..self.ns.0 as usize - "/ns/".len()]
    }

    pub fn namespace(&self) -> &str {
        &self.uri[self.ns.0 as usize..self.ns.1 as usize]
    }

    pub fn service_account(&self) -> &str {
        &self.uri[self.sa as usize..]
    }

    /// The principal as authorization policies name it: the URI without `spiffe://`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The full `spiffe://` URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl PartialEq for Identity {
    fn eq(&self, other: &Self) -> bool {
        self.uri == other.uri
    }
}

impl Eq for Identity {}

impl std::hash::Hash for Identity {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.uri.hash(state)
    }
}

impl PartialOrd for Identity {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Identity {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.uri.cmp(&other.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.uri)
    }
}

// SPIFFE trust domains: lowercase letters, digits, '.', '-', '_'.
fn check_trust_domain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > 255 {
        return Err("longer than 255 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only lowercase letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

// Path segments: SPIFFE allows letters, digits, '.', '-', '_'; Kubernetes names fit in that.
fn check_segment(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s == "." || s == ".." {
        return Err("'.' and '..' are not allowed");
    }
    if s.len() > 253 {
        return Err("longer than 253 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("only letters, digits, '.', '-' and '_' are allowed");
    }
    Ok(())
}

impl FromStr for Identity {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdentityError::Scheme(s.to_string()))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Identity::new(td, ns, sa),
            _ => Err(IdentityError::Shape(s.to_string())),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl Serialize for Identity {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_cheap_to_clone() {
        assert!(std::mem::size_of::<Identity>() <= 24);
    }

    #[test]
    fn parses_and_prints() {
        let id: Identity = "spiffe://cluster.local/ns/default/sa/bookinfo"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo"
        );
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/bookinfo");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a/sa",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/namespace/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local/ns/../sa/b",
            "spiffe://cluster.local/ns/a b/sa/b",
            "spiffe://cluster.local/ns//sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn error_names_the_problem() {
        let e = "spiffe://cluster.local/ns/a b/sa/x"
            .parse::<Identity>()
            .unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
    }
}
