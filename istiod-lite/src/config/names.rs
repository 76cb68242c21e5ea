//! Kubernetes object names, as the API server checks them: the folder
//! source reads names no API server would accept (a `grpc:` prefix, upper
//! case) otherwise, and the model's own names (a GRPCRoute is held under
//! `grpc:<name>`) could then be spelled by a user.

/// A name the API server would refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "metadata.name {name:?} is not a valid name (a DNS-1123 subdomain: at most 253 of a-z, 0-9, '-' and '.', each dot-separated part starting and ending with a letter or digit)"
    )]
    Name { name: String },
    #[error(
        "metadata.name {name:?} is not a valid name (a Namespace's is a DNS-1123 label: at most 63 of a-z, 0-9 and '-', starting and ending with a letter or digit)"
    )]
    NamespaceName { name: String },
    #[error(
        "metadata.namespace {namespace:?} is not a valid namespace (a DNS-1123 label: at most 63 of a-z, 0-9 and '-', starting and ending with a letter or digit)"
    )]
    Namespace { namespace: String },
}

/// `metadata.name`: a DNS-1123 subdomain (a Namespace's: a label).
/// `metadata.namespace`: a DNS-1123 label.
pub fn check(kind: &str, name: &str, namespace: Option<&str>) -> Result<(), NameError> {
    if kind == "Namespace" {
        if !is_label(name) {
            return Err(NameError::NamespaceName { name: name.into() });
        }
    } else if !is_subdomain(name) {
        return Err(NameError::Name { name: name.into() });
    }
    match namespace {
        Some(ns) if !is_label(ns) => Err(NameError::Namespace {
            namespace: ns.into(),
        }),
        _ => Ok(()),
    }
}

/// `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
pub fn is_label(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    !b.is_empty()
        && b.len() <= 63
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

/// Labels joined by '.', at most 253 characters.
pub fn is_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label_part)
}

/// A subdomain's part: a label's characters, with no length of its own.
fn is_label_part(s: &str) -> bool {
    let b = s.as_bytes();
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && b.iter().all(|c| alnum(c) || *c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_as_the_api_server_checks_them() {
        for ok in ["web", "a", "web-1", "0x", "a.b-c.d", "grpc-web"] {
            assert!(is_subdomain(ok), "{ok}");
        }
        for bad in ["", "grpc:web", "Web", "-a", "a-", "a..b", ".a", "a.", "a_b"] {
            assert!(!is_subdomain(bad), "{bad}");
        }
        assert!(is_subdomain(&"a".repeat(253)));
        assert!(!is_subdomain(&"a".repeat(254)));
        assert!(is_label(&"a".repeat(63)));
        assert!(!is_label(&"a".repeat(64)));
        assert!(!is_label("a.b"));
        assert!(check("HTTPRoute", "web", Some("shop")).is_ok());
        assert!(check("HTTPRoute", "web", Some("Shop.x")).is_err());
        assert!(check("Namespace", "a.b", None).is_err());
        assert!(check("GatewayClass", "istio-waypoint", None).is_ok());
    }
}
