//! What a request is normalized to before authorization, routing and
//! forwarding, as Istio documents it (its "Authorization Policy
//! Normalization" reference and the mesh config's `pathNormalization`).
//! The normalized request is both what policies and routes judge and what
//! the backend receives, so what was authorized is what is served.
//!
//! In Istio's order, as `how` asks:
//!
//! 1. `DECODE_AND_MERGE_SLASHES` only: `%2F` and `%5C` (any case) are
//!    decoded to `/` and `\`.
//! 2. `BASE` and stricter (Envoy's `normalize_path`, RFC 3986 6.2.2):
//!    percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!    decoded, the hex digits of every other escape are upper-cased
//!    (`%2f` is `%2F`), `\` becomes `/`, and dot segments are resolved
//!    (RFC 3986 5.2.4). Decoding happens once: `%2561` stays `%2561`.
//! 3. `MERGE_SLASHES` and `DECODE_AND_MERGE_SLASHES`: runs of `/` become one.
//!
//! Under every option, `NONE` included, `%00` and a `%` not followed by
//! two hex digits are refused (400), as is a method that is not upper
//! case. The query is never touched: policies and routes match the path
//! without it, and the backend gets it as sent.

use std::borrow::Cow;

use http::Uri;
use http::request::Parts;
use serde::Deserialize;

/// The mesh-wide `pathNormalization` option (Istio's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PathNormalization {
    /// The path is judged and forwarded as received.
    None,
    /// RFC 3986 normalization plus `\` to `/`; slashes are not merged.
    #[default]
    Base,
    /// `BASE`, then repeated slashes merged.
    MergeSlashes,
    /// `%2F` and `%5C` decoded first, then `MERGE_SLASHES`.
    DecodeAndMergeSlashes,
}

impl PathNormalization {
    pub fn as_str(self) -> &'static str {
        match self {
            PathNormalization::None => "NONE",
            PathNormalization::Base => "BASE",
            PathNormalization::MergeSlashes => "MERGE_SLASHES",
            PathNormalization::DecodeAndMergeSlashes => "DECODE_AND_MERGE_SLASHES",
        }
    }

    fn merges_slashes(self) -> bool {
        matches!(
            self,
            PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
        )
    }
}

/// Why a request is refused before anything judges it (answered with 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("path {path:?} has %00 at byte {at}")]
    Nul { path: String, at: usize },
    #[error("path {path:?} has a malformed percent-encoding at byte {at}")]
    BadEscape { path: String, at: usize },
    #[error("method {0:?} is not upper case")]
    MethodCase(String),
    #[error("path {path:?} normalizes to {normalized:?}, which is not a request target")]
    Unusable { path: String, normalized: String },
    #[error("host {0:?} is not a host[:port] (no userinfo, path, query or fragment)")]
    BadHost(String),
    #[error("more than one Host header")]
    HostRepeated,
    #[error("Host {header:?} is not the request's authority {authority:?}")]
    HostMismatch { header: String, authority: String },
    #[error("no host: the request names neither an authority nor a Host")]
    NoHost,
    #[error("request target {0:?} is not a path (origin or absolute form)")]
    NotAPath(String),
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 3986 2.3.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Every `%` must start `%HH`, and `%00` is never accepted.
fn check_escapes(path: &str) -> Result<(), RequestError> {
    let b = path.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            i += 1;
            continue;
        }
        match (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) {
            (Some(0), Some(0)) => {
                return Err(RequestError::Nul {
                    path: path.to_string(),
                    at: i,
                });
            }
            (Some(_), Some(_)) => i += 3,
            _ => {
                return Err(RequestError::BadEscape {
                    path: path.to_string(),
                    at: i,
                });
            }
        }
    }
    Ok(())
}

/// Steps 1 and the decoding part of 2, in one pass over escapes that are
/// known to be well formed (so nothing decoded can start a new escape).
fn decode(path: &str, slashes: bool) -> Vec<u8> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            let v = h * 16 + l;
            if unreserved(v) {
                out.push(v);
            } else if slashes && (v == b'/' || v == b'\\') {
                // `\` is then a slash too (step 2).
                out.push(b'/');
            } else {
                out.extend_from_slice(&[b'%', HEX_UPPER[h as usize], HEX_UPPER[l as usize]]);
            }
            i += 3;
            continue;
        }
        if c >= 0x80 {
            // A raw non-ASCII byte is spelled as its escape, so a policy on
            // the encoded form holds for the raw one (the backend decodes
            // both to the same path).
            out.extend_from_slice(&[
                b'%',
                HEX_UPPER[(c >> 4) as usize],
                HEX_UPPER[(c & 15) as usize],
            ]);
        } else {
            out.push(if c == b'\\' { b'/' } else { c });
        }
        i += 1;
    }
    out
}

/// RFC 3986 5.2.4, on a path whose only separator is `/`.
fn remove_dot_segments(input: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(input.len());
    let mut rest = input;
    let pop = |out: &mut Vec<u8>| {
        let cut = out.iter().rposition(|&c| c == b'/').unwrap_or(0);
        out.truncate(cut);
    };
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix(b"../") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix(b"./") {
            rest = r;
        } else if rest.starts_with(b"/./") {
            rest = &rest[2..];
        } else if rest == b"/." {
            rest = b"/";
        } else if rest.starts_with(b"/../") {
            rest = &rest[3..];
            pop(&mut out);
        } else if rest == b"/.." {
            rest = b"/";
            pop(&mut out);
        } else if rest == b"." || rest == b".." {
            rest = b"";
        } else {
            // The first segment, with its leading slash if it has one.
            let from = usize::from(rest[0] == b'/');
            let end = rest[from..]
                .iter()
                .position(|&c| c == b'/')
                .map_or(rest.len(), |p| p + from);
            out.extend_from_slice(&rest[..end]);
            rest = &rest[end..];
        }
    }
    out
}

fn merge_slashes(mut p: Vec<u8>) -> Vec<u8> {
    p.dedup_by(|a, b| *a == b'/' && *b == b'/');
    p
}

/// The host a request names (the URI's authority, else its one Host
/// header) is a plain `host[:port]`: a Host like `orders/admin#` would be
/// judged as host plus path here yet rebuilt upstream as another path, and
/// userinfo (`u@host`) hides the host from `hosts` matches.
fn check_host(parts: &Parts) -> Result<(), RequestError> {
    let mut headers = parts.headers.get_all(http::header::HOST).iter();
    let header = headers.next();
    if headers.next().is_some() {
        return Err(RequestError::HostRepeated);
    }
    let host = match (parts.uri.authority(), header) {
        (Some(a), Some(h)) => {
            // An absolute-form target's authority is the host, and the Host
            // header is ignored (RFC 9112 3.2.2); over HTTP/2 a Host naming
            // another host than :authority is malformed (RFC 9113 8.3.1).
            // Either way nothing after this reads a Host other than the
            // authority (`request` overwrites it).
            if parts.version == http::Version::HTTP_2
                && !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes())
            {
                return Err(RequestError::HostMismatch {
                    header: String::from_utf8_lossy(h.as_bytes()).into(),
                    authority: a.as_str().to_string(),
                });
            }
            a.as_str()
        }
        (Some(a), None) => a.as_str(),
        (None, Some(h)) => h
            .to_str()
            .map_err(|_| RequestError::BadHost(String::from_utf8_lossy(h.as_bytes()).into()))?,
        // Only HTTP/1.0 may name no host.
        (None, None) if parts.version <= http::Version::HTTP_10 => return Ok(()),
        (None, None) => return Err(RequestError::NoHost),
    };
    let bad = || RequestError::BadHost(host.to_string());
    let parsed: http::uri::Authority = host.parse().map_err(|_| bad())?;
    if host.contains('@') || parsed.as_str() != host || parsed.host().is_empty() {
        return Err(bad());
    }
    Ok(())
}

/// The path as `how` normalizes it, or why the request is refused.
pub fn normalize_path(path: &str, how: PathNormalization) -> Result<Cow<'_, str>, RequestError> {
    check_escapes(path)?;
    // `*` (OPTIONS) and the empty path of an authority-form target are not
    // paths to normalize.
    if how == PathNormalization::None || path.is_empty() || path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode(path, how == PathNormalization::DecodeAndMergeSlashes);
    let mut p = remove_dot_segments(&decoded);
    if how.merges_slashes() {
        p = merge_slashes(p);
    }
    if p.is_empty() {
        p.push(b'/');
    }
    if p == path.as_bytes() {
        return Ok(Cow::Borrowed(path));
    }
    // Only ASCII was replaced by ASCII, so this is still UTF-8.
    String::from_utf8(p)
        .map(Cow::Owned)
        .map_err(|e| RequestError::Unusable {
            path: path.to_string(),
            normalized: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
}

/// Refuses what Istio refuses and rewrites the request's path as `how`
/// says (the query as sent). Runs before authorization and routing.
pub fn request(parts: &mut Parts, how: PathNormalization) -> Result<(), RequestError> {
    let method = parts.method.as_str();
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err(RequestError::MethodCase(method.to_string()));
    }
    // An authority-form target (`GET orders:80`) has no path: judged as ""
    // yet sent as "/", so it is refused, as is CONNECT at L7.
    if !parts.uri.path().starts_with('/') || parts.method == http::Method::CONNECT {
        return Err(RequestError::NotAPath(parts.uri.to_string()));
    }
    check_host(parts)?;
    // One host for everything after this: the authority, when there is one.
    if let Some(a) = parts.uri.authority()
        && parts.headers.contains_key(http::header::HOST)
        && let Ok(v) = http::HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(http::header::HOST, v);
    }
    let path = parts.uri.path();
    let normalized = normalize_path(path, how)?;
    if normalized == path {
        return Ok(());
    }
    let unusable = || RequestError::Unusable {
        path: path.to_string(),
        normalized: normalized.to_string(),
    };
    let pq = match parts.uri.query() {
        Some(q) => format!("{normalized}?{q}"),
        None => normalized.to_string(),
    };
    let mut up = parts.uri.clone().into_parts();
    up.path_and_query = Some(pq.parse().map_err(|_| unusable())?);
    parts.uri = Uri::from_parts(up).map_err(|_| unusable())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::PathNormalization::*;
    use super::*;

    fn n(path: &str, how: PathNormalization) -> String {
        normalize_path(path, how)
            .unwrap_or_else(|e| panic!("{path}: {e}"))
            .into_owned()
    }

    fn all() -> [PathNormalization; 4] {
        [None, Base, MergeSlashes, DecodeAndMergeSlashes]
    }

    #[test]
    fn istio_percent_encoding_table() {
        // Istio's example: /some%2fdata/%61%62%63.
        assert_eq!(n("/some%2fdata/%61%62%63", None), "/some%2fdata/%61%62%63");
        assert_eq!(n("/some%2fdata/%61%62%63", Base), "/some%2Fdata/abc");
        assert_eq!(
            n("/some%2fdata/%61%62%63", MergeSlashes),
            "/some%2Fdata/abc"
        );
        assert_eq!(
            n("/some%2fdata/%61%62%63", DecodeAndMergeSlashes),
            "/some/data/abc"
        );
        // Every row of the table, either hex case.
        for how in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(n("/%2d%2D", how), "/--");
            assert_eq!(n("/a%2eb", how), "/a.b");
            assert_eq!(n("/%30%39", how), "/09");
            assert_eq!(n("/%41%5a%5A", how), "/AZZ");
            assert_eq!(n("/%5f%5F", how), "/__");
            assert_eq!(n("/%61%7a%7A", how), "/azz");
            assert_eq!(n("/%7e%7E", how), "/~~");
            // Not unreserved: kept encoded, hex upper-cased (RFC 3986 6.2.2.1).
            assert_eq!(n("/a%3fb%20c", how), "/a%3Fb%20c");
        }
        // %5C: kept under BASE and MERGE_SLASHES, a slash when decoded.
        assert_eq!(n("/a%5cb", Base), "/a%5Cb");
        assert_eq!(n("/a%5cb", MergeSlashes), "/a%5Cb");
        assert_eq!(n("/a%5cb", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(n("/a%5C%2F%2fb", DecodeAndMergeSlashes), "/a/b");
        // Once only: %25 is not unreserved, so %2561 stays.
        for how in all() {
            assert_eq!(n("/%2561dmin", how), "/%2561dmin");
        }
    }

    #[test]
    fn nul_and_broken_escapes_are_refused_under_every_option() {
        for how in all() {
            for bad in ["/%00", "/a%00b", "/%2e%00"] {
                assert!(
                    matches!(normalize_path(bad, how), Err(RequestError::Nul { .. })),
                    "{bad} {how:?}"
                );
            }
            for bad in ["/%", "/a%2", "/%zz", "/%%32%65", "/%g1"] {
                assert!(
                    matches!(
                        normalize_path(bad, how),
                        Err(RequestError::BadEscape { .. })
                    ),
                    "{bad} {how:?}"
                );
            }
        }
    }

    #[test]
    fn istio_backslash_dots_and_slashes() {
        // Backslash (BASE): /some\data, and the best-practices page's \da.
        assert_eq!(n("/some\\data", Base), "/some/data");
        assert_eq!(n("\\da", Base), "/da");
        assert_eq!(n("/some\\data", None), "/some\\data");
        // Multiple slashes: merged only when asked.
        assert_eq!(n("/some//data///abc", Base), "/some//data///abc");
        assert_eq!(n("/some//data///abc", MergeSlashes), "/some/data/abc");
        assert_eq!(n("/a//b", MergeSlashes), "/a/b");
        assert_eq!(n("/a//b", DecodeAndMergeSlashes), "/a/b");
        assert_eq!(n("/a%2fb", DecodeAndMergeSlashes), "/a/b");
        // Dot segments (RFC 3986).
        for how in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(n("/public/./data/abc/../xyz", how), "/public/data/xyz");
            assert_eq!(n("/a/../b", how), "/b");
            assert_eq!(n("/../..", how), "/");
            assert_eq!(n("/a/b/..", how), "/a/");
            assert_eq!(n("/a/.", how), "/a/");
            assert_eq!(n("/%2e%2E/admin", how), "/admin");
            assert_eq!(n("/x\\..\\admin", how), "/admin");
            assert_eq!(n("/a.b/..c/...", how), "/a.b/..c/...");
        }
        assert_eq!(
            n("/public/./data/abc/../xyz", None),
            "/public/./data/abc/../xyz"
        );
        // Istio's order: dots before slashes are merged.
        assert_eq!(n("/a//../b", MergeSlashes), "/a/b");
        // %2F is decoded before the dots are resolved.
        assert_eq!(n("/x%2F..%2Fadmin", DecodeAndMergeSlashes), "/admin");
        assert_eq!(n("/x%2F..%2Fadmin", MergeSlashes), "/x%2F..%2Fadmin");
        // NONE forwards anything else as received (Istio's example).
        assert_eq!(n("../%2Fa../b", None), "../%2Fa../b");
    }

    #[test]
    fn unchanged_paths_are_borrowed_and_targets_that_are_not_paths_kept() {
        for how in all() {
            assert!(matches!(
                normalize_path("/orders/7", how),
                Ok(Cow::Borrowed(_))
            ));
            assert_eq!(n("*", how), "*");
            assert_eq!(n("", how), "");
        }
    }

    /// A request as HTTP/1.0 (which may name no host), so each test adds
    /// only the host it is about.
    fn parts(method: &str, uri: &str) -> Parts {
        let (p, ()) = http::Request::builder()
            .method(method)
            .uri(uri)
            .version(http::Version::HTTP_10)
            .body(())
            .expect("request")
            .into_parts();
        p
    }

    #[test]
    fn the_request_keeps_its_query_and_refuses_lower_case_methods() {
        let mut p = parts("GET", "/a/./%62/../c?x=/../%61&y");
        request(&mut p, Base).expect("normalizes");
        assert_eq!(p.uri.path(), "/a/c");
        assert_eq!(p.uri.query(), Some("x=/../%61&y"));
        let mut p = parts("GET", "http://orders.shop/%61dmin?q=1");
        request(&mut p, Base).expect("normalizes");
        assert_eq!(p.uri.to_string(), "http://orders.shop/admin?q=1");
        let mut p = parts("get", "/");
        assert_eq!(
            request(&mut p, Base),
            Err(RequestError::MethodCase("get".into()))
        );
        let mut p = parts("Post", "/");
        assert!(request(&mut p, None).is_err());
        for m in ["GET", "M-SEARCH", "PROPFIND"] {
            assert!(request(&mut parts(m, "/"), Base).is_ok(), "{m}");
        }
        let mut p = parts("GET", "/a%00");
        assert!(matches!(
            request(&mut p, None),
            Err(RequestError::Nul { .. })
        ));
    }

    #[test]
    fn a_host_is_a_plain_authority() {
        let with_host = |h: &[&str]| {
            let mut p = parts("GET", "/public");
            for v in h {
                p.headers
                    .append(http::header::HOST, v.parse().expect("value"));
            }
            request(&mut p, Base)
        };
        assert!(with_host(&["orders.shop"]).is_ok());
        assert!(with_host(&["orders.shop:8080"]).is_ok());
        assert!(with_host(&["[fd00::1]:80"]).is_ok());
        assert!(with_host(&[]).is_ok());
        // A path, query or fragment in the Host would move into the path of
        // the URI rebuilt upstream; userinfo hides the host.
        for bad in [
            "orders/admin#",
            "orders?x",
            "orders#/x",
            "u@orders",
            "",
            ":80",
        ] {
            assert!(
                matches!(with_host(&[bad]), Err(RequestError::BadHost(_))),
                "{bad:?}"
            );
        }
        assert_eq!(with_host(&["a", "b"]), Err(RequestError::HostRepeated));
        let mut p = parts("GET", "http://u@orders.shop/x");
        assert!(matches!(
            request(&mut p, Base),
            Err(RequestError::BadHost(_))
        ));
    }

    #[test]
    fn the_target_is_a_path_and_the_host_is_one() {
        // Authority form: judged as "" yet sent as "/".
        let mut p = parts("GET", "orders:80");
        assert!(matches!(
            request(&mut p, Base),
            Err(RequestError::NotAPath(_))
        ));
        let mut p = parts("CONNECT", "orders:80");
        assert!(matches!(
            request(&mut p, Base),
            Err(RequestError::NotAPath(_))
        ));
        // HTTP/1: an absolute-form target's authority wins; the Host is
        // overwritten, so policy and backend read the same host.
        let mut p = parts("GET", "http://admin.shop/x");
        p.headers
            .insert(http::header::HOST, "public.shop".parse().expect("v"));
        assert!(request(&mut p, Base).is_ok());
        assert_eq!(p.headers[http::header::HOST], "admin.shop");
        // HTTP/2: a host header that disagrees with :authority is malformed.
        let mut p = parts("GET", "http://admin.shop/x");
        p.version = http::Version::HTTP_2;
        p.headers
            .insert(http::header::HOST, "public.shop".parse().expect("v"));
        assert!(matches!(
            request(&mut p, Base),
            Err(RequestError::HostMismatch { .. })
        ));
        let mut p = parts("GET", "http://admin.shop/x");
        p.headers
            .insert(http::header::HOST, "Admin.Shop".parse().expect("v"));
        assert!(request(&mut p, Base).is_ok());
        // HTTP/1.1 and HTTP/2 name a host; HTTP/1.0 may not.
        let mut p = parts("GET", "/x");
        p.version = http::Version::HTTP_11;
        assert_eq!(request(&mut p, Base), Err(RequestError::NoHost));
        let mut p = parts("GET", "/x");
        p.version = http::Version::HTTP_10;
        assert!(request(&mut p, Base).is_ok());
    }

    #[test]
    fn raw_non_ascii_is_spelled_as_its_escape() {
        // http accepts raw UTF-8 in a path; a policy on /caf%C3%A9 must
        // hold for it as for the escaped form.
        let raw = "/caf\u{e9}";
        assert_eq!(n(raw, Base), "/caf%C3%A9");
        assert_eq!(n("/caf%c3%a9", Base), "/caf%C3%A9");
    }

    #[test]
    fn options_read_as_istio_spells_them() {
        #[derive(Deserialize)]
        struct C {
            #[serde(default)]
            p: PathNormalization,
        }
        let read = |s: &str| serde_yaml::from_str::<C>(s).map(|c| c.p);
        assert_eq!(read("{}").ok(), Some(Base));
        for how in all() {
            assert_eq!(read(&format!("p: {}", how.as_str())).ok(), Some(how));
        }
        assert!(read("p: base").is_err());
        assert!(read("p: MERGE").is_err());
    }
}
