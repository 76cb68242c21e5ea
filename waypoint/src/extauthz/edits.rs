//! What an external authorization answer asks to change: headers of the
//! request, of the response, or of the denial it sends instead; the
//! request's query string. Everything is validated before anything is
//! changed, so a malformed answer changes nothing (and is an error).

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use mesh_proto::envoy::config::core::v3::{
    HeaderValueOption, QueryParameter, header_value_option::HeaderAppendAction,
};

/// Headers an answer may not set or remove: how the message is framed and
/// the host it is routed by are the proxy's.
const PROTECTED: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Append,
    Overwrite,
    AddIfAbsent,
    OverwriteIfExists,
}

/// The older `append` flag decides when set (true appends, false
/// replaces). Otherwise `append_action`; its zero value cannot be told from
/// "unset", which ext_authz documents as replacing, so it replaces.
fn op_of(o: &HeaderValueOption) -> Op {
    match o.append {
        Some(true) => Op::Append,
        Some(false) => Op::Overwrite,
        None => match HeaderAppendAction::try_from(o.append_action) {
            Ok(HeaderAppendAction::AddIfAbsent) => Op::AddIfAbsent,
            Ok(HeaderAppendAction::OverwriteIfExists) => Op::OverwriteIfExists,
            _ => Op::Overwrite,
        },
    }
}

/// Why an answer's edits cannot be applied (then nothing is changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("a header option without a header")]
    NoHeader,
    #[error("header name {0:?} is not valid")]
    BadName(String),
    #[error("the value of header {0:?} is not valid")]
    BadValue(String),
    #[error("header name {0:?} to remove is not valid")]
    BadRemoval(String),
    #[error("a query parameter to set has no name")]
    UnnamedQuery,
    #[error("the edited query does not parse: {0}")]
    Query(String),
    #[error("the edited URI does not parse: {0}")]
    Uri(String),
}

/// One header change, checked.
#[derive(Debug, Clone)]
pub struct HeaderOp {
    name: HeaderName,
    value: HeaderValue,
    op: Op,
}

/// Checks a list of header options; an invalid name or value is an error.
/// Protected headers and empty values (unless `keep_empty_value`) are
/// left out.
pub fn header_ops(list: &[HeaderValueOption]) -> Result<Vec<HeaderOp>, EditError> {
    let mut out = Vec::new();
    for o in list {
        let Some(h) = &o.header else {
            return Err(EditError::NoHeader);
        };
        let name = HeaderName::from_bytes(h.key.as_bytes())
            .map_err(|_| EditError::BadName(h.key.clone()))?;
        let raw: &[u8] = if h.value.is_empty() {
            &h.raw_value
        } else {
            h.value.as_bytes()
        };
        let value = HeaderValue::from_bytes(raw).map_err(|_| EditError::BadValue(h.key.clone()))?;
        if PROTECTED.contains(&name.as_str()) || (raw.is_empty() && !o.keep_empty_value) {
            continue;
        }
        out.push(HeaderOp {
            name,
            value,
            op: op_of(o),
        });
    }
    Ok(out)
}

pub fn apply(ops: &[HeaderOp], h: &mut HeaderMap) {
    for o in ops {
        let present = h.contains_key(&o.name);
        match o.op {
            Op::Append => {
                h.append(o.name.clone(), o.value.clone());
            }
            Op::Overwrite => {
                h.insert(o.name.clone(), o.value.clone());
            }
            Op::AddIfAbsent if !present => {
                h.insert(o.name.clone(), o.value.clone());
            }
            Op::OverwriteIfExists if present => {
                h.insert(o.name.clone(), o.value.clone());
            }
            Op::AddIfAbsent | Op::OverwriteIfExists => {}
        }
    }
}

/// Checks the names of headers to remove (pseudo-headers and protected
/// ones are never removed).
pub fn removals(names: &[String]) -> Result<Vec<HeaderName>, EditError> {
    let mut out = Vec::new();
    for n in names {
        if n.starts_with(':') {
            continue;
        }
        let name =
            HeaderName::from_bytes(n.as_bytes()).map_err(|_| EditError::BadRemoval(n.clone()))?;
        if !PROTECTED.contains(&name.as_str()) {
            out.push(name);
        }
    }
    Ok(out)
}

/// Bytes outside RFC 3986's unreserved set are percent-encoded.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The URI with query parameters removed (by exact name) and set (each
/// replacing every parameter of its name, else added at the end). Names
/// in the query are compared as they are written (not decoded).
pub fn edit_query(uri: &Uri, set: &[QueryParameter], remove: &[String]) -> Result<Uri, EditError> {
    if set.is_empty() && remove.is_empty() {
        return Ok(uri.clone());
    }
    let mut pairs: Vec<(String, Option<String>)> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (p.to_string(), None),
        })
        .collect();
    pairs.retain(|(k, _)| !remove.contains(k));
    for q in set {
        if q.key.is_empty() {
            return Err(EditError::UnnamedQuery);
        }
        let key = encode(&q.key);
        let value = Some(encode(&q.value));
        match pairs.iter().position(|(k, _)| *k == key || *k == q.key) {
            Some(i) => {
                pairs[i] = (key.clone(), value);
                let mut n = 0;
                pairs.retain(|(k, _)| {
                    n += 1;
                    n - 1 <= i || (*k != key && *k != q.key)
                });
            }
            None => pairs.push((key, value)),
        }
    }
    let query: Vec<String> = pairs
        .into_iter()
        .map(|(k, v)| match v {
            Some(v) => format!("{k}={v}"),
            None => k,
        })
        .collect();
    let pq = if query.is_empty() {
        uri.path().to_string()
    } else {
        format!("{}?{}", uri.path(), query.join("&"))
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse::<PathAndQuery>()
            .map_err(|e| EditError::Query(e.to_string()))?,
    );
    Uri::from_parts(parts).map_err(|e| EditError::Uri(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::envoy::config::core::v3::HeaderValue as PbHeader;

    fn opt(
        key: &str,
        value: &str,
        append: Option<bool>,
        action: HeaderAppendAction,
    ) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(PbHeader {
                key: key.into(),
                value: value.into(),
                raw_value: Vec::new(),
            }),
            append,
            append_action: action as i32,
            keep_empty_value: false,
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn values(h: &HeaderMap, k: &str) -> Vec<String> {
        h.get_all(k)
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect()
    }

    #[test]
    fn append_and_append_action_as_ext_authz_reads_them() {
        use HeaderAppendAction as A;
        let ops = header_ops(&[
            opt("x-set", "new", None, A::AppendIfExistsOrAdd),
            opt("x-append", "2", Some(true), A::AppendIfExistsOrAdd),
            opt("x-replace", "2", Some(false), A::AppendIfExistsOrAdd),
            opt("x-absent", "2", None, A::AddIfAbsent),
            opt("x-present", "2", None, A::AddIfAbsent),
            opt("x-only-if", "2", None, A::OverwriteIfExists),
            opt("x-overwrite", "2", None, A::OverwriteIfExistsOrAdd),
            opt("x-empty", "", Some(true), A::AppendIfExistsOrAdd),
            opt("content-length", "9", None, A::OverwriteIfExistsOrAdd),
            opt("host", "evil", None, A::OverwriteIfExistsOrAdd),
        ])
        .expect("valid");
        let mut h = headers(&[
            ("x-set", "old"),
            ("x-append", "1"),
            ("x-replace", "1"),
            ("x-present", "1"),
            ("x-overwrite", "1"),
            ("content-length", "3"),
            ("host", "svc"),
        ]);
        apply(&ops, &mut h);
        assert_eq!(values(&h, "x-set"), vec!["new"]);
        assert_eq!(values(&h, "x-append"), vec!["1", "2"]);
        assert_eq!(values(&h, "x-replace"), vec!["2"]);
        assert_eq!(values(&h, "x-absent"), vec!["2"]);
        assert_eq!(values(&h, "x-present"), vec!["1"]);
        assert!(values(&h, "x-only-if").is_empty());
        assert_eq!(values(&h, "x-overwrite"), vec!["2"]);
        assert!(!h.contains_key("x-empty"));
        assert_eq!(values(&h, "content-length"), vec!["3"]);
        assert_eq!(values(&h, "host"), vec!["svc"]);
    }

    #[test]
    fn raw_values_and_invalid_headers() {
        let mut raw = opt("x-raw", "", None, HeaderAppendAction::AppendIfExistsOrAdd);
        if let Some(h) = raw.header.as_mut() {
            h.raw_value = b"bytes".to_vec();
        }
        let mut h = HeaderMap::new();
        apply(&header_ops(&[raw]).expect("valid"), &mut h);
        assert_eq!(values(&h, "x-raw"), vec!["bytes"]);
        let bad = [
            opt(
                "bad name",
                "v",
                None,
                HeaderAppendAction::AppendIfExistsOrAdd,
            ),
            opt(
                "x-ok",
                "line\nbreak",
                None,
                HeaderAppendAction::AppendIfExistsOrAdd,
            ),
        ];
        for b in bad {
            assert!(header_ops(&[b]).is_err());
        }
        assert!(header_ops(&[HeaderValueOption::default()]).is_err());
        let names =
            removals(&["authorization".into(), ":path".into(), "Host".into()]).expect("valid");
        assert_eq!(names, vec![HeaderName::from_static("authorization")]);
        assert!(removals(&["a b".into()]).is_err());
    }

    #[test]
    fn query_parameters_are_set_and_removed() {
        let uri: Uri = "/p?a=1&token=s3cret&b&a=2".parse().expect("uri");
        let set = [
            QueryParameter {
                key: "a".into(),
                value: "x y".into(),
            },
            QueryParameter {
                key: "c".into(),
                value: "3".into(),
            },
        ];
        let got = edit_query(&uri, &set, &["token".into()]).expect("edits");
        assert_eq!(got.to_string(), "/p?a=x%20y&b&c=3");
        let cleared =
            edit_query(&"/p?token=1".parse().expect("uri"), &[], &["token".into()]).expect("edits");
        assert_eq!(cleared.to_string(), "/p");
        assert_eq!(edit_query(&uri, &[], &[]).expect("same"), uri);
        let nameless = [QueryParameter::default()];
        assert!(edit_query(&uri, &nameless, &[]).is_err());
    }
}
