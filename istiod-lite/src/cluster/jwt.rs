//! The expiry a JWT names (`exp`), read without checking its signature: it
//! only ever shortens how long a review the API server made is remembered,
//! never decides whether a token is good.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// base64url without padding (RFC 7515), as JWT segments are written.
fn base64url(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim_end_matches('=').bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// When the token expires, if it is a JWT that says.
pub fn expiry(token: &str) -> Option<SystemTime> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let claims: serde_json::Value = serde_json::from_slice(&base64url(payload)?).ok()?;
    let exp = claims.get("exp")?.as_u64()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(exp))
}

/// The pod a projected service-account token's payload names (its
/// `kubernetes.io` claim: namespace, pod name and uid), read without
/// checking anything: it only chooses which review slots the token may
/// wait for, never whether it is good.
pub fn pod_claim(token: &str) -> Option<(String, String, String)> {
    let mut parts = token.split('.');
    let (_, payload, _, None) = (parts.next()?, parts.next()?, parts.next()?, parts.next()) else {
        return None;
    };
    let claims: serde_json::Value = serde_json::from_slice(&base64url(payload)?).ok()?;
    let k8s = claims.get("kubernetes.io")?;
    let pod = k8s.get("pod")?;
    let text = |v: &serde_json::Value, k: &str| v.get(k)?.as_str().map(str::to_string);
    Some((
        text(k8s, "namespace")?,
        text(pod, "name")?,
        text(pod, "uid")?,
    ))
}

/// Whether a base64url segment decodes to a JSON object (a JWT's header).
pub fn json_object(segment: &str) -> bool {
    base64url(segment)
        .and_then(|b| serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&b).ok())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expiry_is_read_from_the_payload_and_nothing_else_passes() {
        // {"exp":1700000000,"sub":"a"} in base64url.
        let payload = "eyJleHAiOjE3MDAwMDAwMDAsInN1YiI6ImEifQ";
        let t = format!("aGVhZA.{payload}.c2ln");
        assert_eq!(
            expiry(&t),
            Some(UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        for bad in [
            "opaque-token".to_string(),
            format!("aGVhZA.{payload}"),
            format!("aGVhZA.{payload}.c2ln.extra"),
            "aGVhZA.e30.c2ln".to_string(), // {}: no exp
            "aGVhZA.!!!.c2ln".to_string(),
        ] {
            assert_eq!(expiry(&bad), None, "{bad}");
        }
        assert_eq!(base64url("aGVsbG8").as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn a_pod_claim_is_read_from_the_payload_and_nothing_else_passes() {
        // {"kubernetes.io":{"namespace":"ns","pod":{"name":"p","uid":"u"}}}
        let payload = "eyJrdWJlcm5ldGVzLmlvIjp7Im5hbWVzcGFjZSI6Im5zIiwicG9kIjp7Im5hbWUiOiJwIiwidWlkIjoidSJ9fX0";
        let t = format!("aGVhZA.{payload}.c2ln");
        let want = ("ns".to_string(), "p".to_string(), "u".to_string());
        assert_eq!(pod_claim(&t), Some(want));
        for bad in [
            format!("aGVhZA.{payload}"),
            "aGVhZA.e30.c2ln".to_string(),
            "aGVhZA.!!!.c2ln".to_string(),
        ] {
            assert_eq!(pod_claim(&bad), None, "{bad}");
        }
    }
}
