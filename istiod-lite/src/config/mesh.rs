//! Mesh-wide settings in Istio's MeshConfig shape (what Istio keeps under
//! the `mesh` key of the `istio` ConfigMap), read from the file named by
//! `--mesh-config`. Of MeshConfig only `extensionProviders` is used: the
//! external authorization servers CUSTOM AuthorizationPolicies name.
//!
//! ```yaml
//! extensionProviders:
//! - name: my-authz
//!   envoyExtAuthzGrpc:
//!     service: ext-authz.authz.svc.cluster.local   # [<namespace>/]<hostname>
//!     port: 9000
//!     timeout: 0.5s        # default 600s
//!     failOpen: false      # default false
//!     statusOnError: "403" # default "403"
//! ```
//!
//! A provider that cannot be served exactly as written (an HTTP provider, an
//! unknown or unsupported field, a bad value, a name defined twice) is kept
//! as [`Provider::Unusable`] with the reason: a CUSTOM policy that names it
//! denies what it applies to and reports why. Other MeshConfig fields are
//! logged as unused; providers of other kinds (tracing, access logs) are
//! ignored.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

/// Istio's default check timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// Why a mesh config file could not be taken at all.
#[derive(Debug, thiserror::Error)]
pub enum MeshConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {source}")]
    Yaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: {reason}")]
    Shape { path: String, reason: String },
}

/// Why an `envoyExtAuthzGrpc` provider cannot be served as written (kept
/// as [`Provider::Unusable`] with this reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    #[error("not a map")]
    NotAMap,
    #[error("includeRequestBodyInCheck is not supported: the waypoint sends no body")]
    RequestBody,
    #[error("{0} is a field of envoyExtAuthzHttp (a gRPC check carries every request header)")]
    HttpOnlyField(String),
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("service is required")]
    NoService,
    #[error("port is required, 1 to 65535")]
    NoPort,
    #[error("timeout {0:?} is not a duration")]
    BadTimeout(String),
    #[error("timeout {0} is not a duration such as \"0.5s\"")]
    TimeoutNotString(String),
    #[error("failOpen {0} is not true or false")]
    BadFailOpen(String),
    #[error("statusOnError {0} is not an HTTP status")]
    BadStatus(String),
}

/// An `envoyExtAuthzGrpc` provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtAuthzGrpc {
    /// `[<namespace>/]<hostname>`.
    pub service: String,
    pub port: u16,
    pub timeout: Duration,
    pub fail_open: bool,
    pub status_on_error: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provider {
    ExtAuthzGrpc(ExtAuthzGrpc),
    /// Named, but not servable: why.
    Unusable(String),
}

/// What istiod-lite uses of the mesh config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshConfig {
    /// Providers by name.
    pub extension_providers: BTreeMap<String, Provider>,
    /// Top-level fields present and not used, for a warning.
    pub unused: Vec<String>,
}

impl MeshConfig {
    pub fn load(path: &std::path::Path) -> Result<MeshConfig, MeshConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MeshConfigError::Read {
            path: p.clone(),
            source,
        })?;
        MeshConfig::parse(&text).map_err(|e| match e {
            MeshConfigError::Yaml { source, .. } => MeshConfigError::Yaml { path: p, source },
            MeshConfigError::Shape { reason, .. } => MeshConfigError::Shape { path: p, reason },
            other => other,
        })
    }

    /// Parses MeshConfig YAML. Only a document that is not a map, or an
    /// `extensionProviders` that is not a list of named maps, is an error;
    /// a provider's own problems make it [`Provider::Unusable`].
    pub fn parse(text: &str) -> Result<MeshConfig, MeshConfigError> {
        let shape = |reason: String| MeshConfigError::Shape {
            path: String::new(),
            reason,
        };
        let doc: Value = serde_yaml::from_str(text).map_err(|source| MeshConfigError::Yaml {
            path: String::new(),
            source,
        })?;
        let top = match doc {
            Value::Null => return Ok(MeshConfig::default()),
            Value::Object(m) => m,
            _ => return Err(shape("the mesh config is not a map".into())),
        };
        let mut out = MeshConfig {
            unused: top
                .keys()
                .filter(|k| *k != "extensionProviders")
                .cloned()
                .collect(),
            ..MeshConfig::default()
        };
        let list = match top.get("extensionProviders") {
            None | Some(Value::Null) => return Ok(out),
            Some(Value::Array(l)) => l,
            Some(_) => return Err(shape("extensionProviders is not a list".into())),
        };
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (i, entry) in list.iter().enumerate() {
            let Some(m) = entry.as_object() else {
                return Err(shape(format!("extensionProviders[{i}] is not a map")));
            };
            let Some(name) = m
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            else {
                return Err(shape(format!("extensionProviders[{i}] has no name")));
            };
            *seen.entry(name.to_string()).or_default() += 1;
            if let Some(p) = provider(m) {
                out.extension_providers.insert(name.to_string(), p);
            }
        }
        for (name, n) in seen {
            if n > 1 {
                out.extension_providers.insert(
                    name,
                    Provider::Unusable(format!("the name is defined {n} times")),
                );
            }
        }
        Ok(out)
    }
}

/// The provider an entry defines; None for kinds that are not about
/// authorization.
fn provider(m: &serde_json::Map<String, Value>) -> Option<Provider> {
    let kinds: Vec<&String> = m.keys().filter(|k| *k != "name").collect();
    let [kind] = kinds.as_slice() else {
        return Some(Provider::Unusable(format!(
            "it must set exactly one provider kind, not {kinds:?}"
        )));
    };
    match kind.as_str() {
        "envoyExtAuthzGrpc" => Some(match ext_authz_grpc(&m[*kind]) {
            Ok(g) => Provider::ExtAuthzGrpc(g),
            Err(e) => Provider::Unusable(format!("envoyExtAuthzGrpc: {e}")),
        }),
        "envoyExtAuthzHttp" => Some(Provider::Unusable(
            "envoyExtAuthzHttp is not supported (the waypoint speaks the gRPC check API: use envoyExtAuthzGrpc)".into(),
        )),
        _ => None,
    }
}

/// Fields of Istio's HTTP provider, named in the error when set on a gRPC one.
const HTTP_ONLY: &[&str] = &[
    "pathPrefix",
    "includeHeadersInCheck",
    "includeRequestHeadersInCheck",
    "includeAdditionalHeadersInCheck",
    "headersToUpstreamOnAllow",
    "headersToDownstreamOnDeny",
    "headersToDownstreamOnAllow",
];

fn ext_authz_grpc(v: &Value) -> Result<ExtAuthzGrpc, ProviderError> {
    let m = v.as_object().ok_or(ProviderError::NotAMap)?;
    for k in m.keys() {
        match k.as_str() {
            "service" | "port" | "timeout" | "failOpen" | "statusOnError" => {}
            "includeRequestBodyInCheck" => return Err(ProviderError::RequestBody),
            k if HTTP_ONLY.contains(&k) => return Err(ProviderError::HttpOnlyField(k.into())),
            k => return Err(ProviderError::UnknownField(k.into())),
        }
    }
    let service = m
        .get("service")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(ProviderError::NoService)?
        .to_string();
    let port = m
        .get("port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .ok_or(ProviderError::NoPort)?;
    let timeout = match m.get("timeout") {
        None | Some(Value::Null) => DEFAULT_TIMEOUT,
        Some(Value::String(s)) => {
            parse_duration(s).ok_or_else(|| ProviderError::BadTimeout(s.clone()))?
        }
        Some(other) => return Err(ProviderError::TimeoutNotString(other.to_string())),
    };
    let fail_open = match m.get("failOpen") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(ProviderError::BadFailOpen(other.to_string())),
    };
    let status_on_error = match m.get("statusOnError") {
        None | Some(Value::Null) => 403,
        Some(Value::String(s)) => parse_status(s)?,
        Some(Value::Number(n)) => parse_status(&n.to_string())?,
        Some(other) => return Err(ProviderError::BadStatus(other.to_string())),
    };
    Ok(ExtAuthzGrpc {
        service,
        port,
        timeout,
        fail_open,
        status_on_error,
    })
}

fn parse_status(s: &str) -> Result<u16, ProviderError> {
    s.parse::<u16>()
        .ok()
        .filter(|c| (200..=599).contains(c))
        .ok_or_else(|| ProviderError::BadStatus(format!("{s:?}")))
}

/// A protobuf JSON duration ("0.5s", "600s"), or whole milliseconds,
/// minutes or hours ("250ms", "1m", "1h"). Zero is refused.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().ok()?)
    } else if let Some(secs) = s.strip_suffix('s') {
        let f: f64 = secs.parse().ok()?;
        if !(0.0..=1e9).contains(&f) {
            return None;
        }
        Duration::from_secs_f64(f)
    } else if let Some(m) = s.strip_suffix('m') {
        Duration::from_secs(m.parse::<u64>().ok()?.checked_mul(60)?)
    } else if let Some(h) = s.strip_suffix('h') {
        Duration::from_secs(h.parse::<u64>().ok()?.checked_mul(3600)?)
    } else {
        return None;
    };
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(p: &Provider) -> &ExtAuthzGrpc {
        match p {
            Provider::ExtAuthzGrpc(g) => g,
            other => panic!("not usable: {other:?}"),
        }
    }

    #[test]
    fn providers_parse_with_istios_defaults() {
        let c = MeshConfig::parse(
            r#"
accessLogFile: /dev/stdout
extensionProviders:
- name: full
  envoyExtAuthzGrpc: {service: authz/ext.authz.svc.cluster.local, port: 9000, timeout: 0.25s, failOpen: true, statusOnError: "503"}
- name: minimal
  envoyExtAuthzGrpc: {service: ext.authz.svc.cluster.local, port: 9000}
- name: tracing
  zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
"#,
        )
        .expect("parses");
        assert_eq!(c.unused, vec!["accessLogFile"]);
        let full = grpc(&c.extension_providers["full"]);
        assert_eq!(
            full,
            &ExtAuthzGrpc {
                service: "authz/ext.authz.svc.cluster.local".into(),
                port: 9000,
                timeout: Duration::from_millis(250),
                fail_open: true,
                status_on_error: 503,
            }
        );
        let min = grpc(&c.extension_providers["minimal"]);
        assert_eq!(
            (min.timeout, min.fail_open, min.status_on_error),
            (DEFAULT_TIMEOUT, false, 403)
        );
        assert!(!c.extension_providers.contains_key("tracing"));
    }

    #[test]
    fn a_provider_not_servable_as_written_is_unusable_with_the_reason() {
        let c = MeshConfig::parse(
            r#"
extensionProviders:
- name: http
  envoyExtAuthzHttp: {service: ext.authz.svc.cluster.local, port: 8000}
- name: body
  envoyExtAuthzGrpc: {service: s, port: 1, includeRequestBodyInCheck: {maxRequestBytes: 10}}
- name: headers
  envoyExtAuthzGrpc: {service: s, port: 1, includeRequestHeadersInCheck: [x-a]}
- name: typo
  envoyExtAuthzGrpc: {service: s, port: 1, failopen: true}
- name: noport
  envoyExtAuthzGrpc: {service: s}
- name: badtimeout
  envoyExtAuthzGrpc: {service: s, port: 1, timeout: soon}
- name: twice
  envoyExtAuthzGrpc: {service: s, port: 1}
- name: twice
  envoyExtAuthzGrpc: {service: s, port: 2}
"#,
        )
        .expect("parses");
        let want = [
            ("http", "envoyExtAuthzHttp is not supported"),
            ("body", "includeRequestBodyInCheck is not supported"),
            (
                "headers",
                "includeRequestHeadersInCheck is a field of envoyExtAuthzHttp",
            ),
            ("typo", "unknown field \"failopen\""),
            ("noport", "port is required"),
            ("badtimeout", "timeout \"soon\" is not a duration"),
            ("twice", "defined 2 times"),
        ];
        for (name, reason) in want {
            match &c.extension_providers[name] {
                Provider::Unusable(r) => assert!(r.contains(reason), "{name}: {r}"),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_file_is_an_error() {
        for bad in [
            "[1, 2]",
            "extensionProviders: {a: 1}",
            "extensionProviders: [{envoyExtAuthzGrpc: {}}]",
        ] {
            assert!(MeshConfig::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MeshConfig::parse("").expect("empty"), MeshConfig::default());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.5s"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("600s"), Some(Duration::from_secs(600)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "0s", "-1s", "1", "NaNs", "1d"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
