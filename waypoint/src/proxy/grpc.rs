//! gRPC on the request path: which requests are gRPC, the answers a
//! route's retry policy retries (a trailers-only answer whose
//! `grpc-status` is one of its gRPC codes), and the client's deadline
//! (`grpc-timeout`).

use std::time::{Duration, Instant};

use http::{HeaderMap, Response};

/// A gRPC request (any `application/grpc` content type, `+proto` and
/// the others included).
pub(super) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/grpc"))
}

/// Whether an answer's head carries a `grpc-status` in `codes`.
pub(super) fn retriable<B>(resp: &Response<B>, codes: &[u32]) -> bool {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u32>().ok())
        .is_some_and(|c| codes.contains(&c))
}

/// The client's deadline from `grpc-timeout` (`<digits><unit>`, at most 8
/// digits; units H, M, S, m, u, n); None when absent or malformed.
pub(super) fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-message` as text: percent-decoded (the gRPC spec encodes it),
/// bytes that are not UTF-8 replaced.
pub(super) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-message` as the gRPC spec sends it: bytes outside printable
/// ASCII, and `%`, percent-encoded.
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The deadline a gRPC request's `grpc-timeout` sets, from `started`.
pub(super) fn deadline(headers: &HeaderMap, started: Instant) -> Option<Instant> {
    if !is_grpc(headers) {
        return None;
    }
    started.checked_add(timeout(headers)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses_every_unit_and_refuses_the_rest() {
        let t = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().expect("value"));
            timeout(&h)
        };
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("9n"), Some(Duration::from_nanos(9)));
        for bad in ["", "S", "123456789S", "5s", "-1S", "1.5S"] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(percent_decode("failing%20as%20asked"), "failing as asked");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_encode("50% é"), "50%25 %C3%A9");
        assert_eq!(percent_decode(&percent_encode("50% é")), "50% é");
    }

    #[test]
    fn only_the_listed_statuses_are_retried() {
        let mut r = Response::new(());
        r.headers_mut()
            .insert("grpc-status", "14".parse().expect("v"));
        assert!(retriable(&r, &[1, 4, 8, 14]));
        assert!(!retriable(&r, &[1]));
        r.headers_mut()
            .insert("grpc-status", "0".parse().expect("v"));
        assert!(!retriable(&r, &[1, 4, 8, 14]));
    }
}
