//! Logging for every binary of the mesh.

/// Logging for every binary of the mesh: `RUST_LOG` filters by target
/// (`info`, `warn,ztunnel::proxy=debug`), default info; `LOG_FORMAT=json`
/// writes one JSON object per line (the access log included: its fields
/// are the object's keys), `plain` (the default) text.
///
/// Target filters rather than `EnvFilter`: its span and field matching
/// brings a regex engine, a few hundred KiB of code mapped into every
/// node proxy (`docs/performance.md`, idle RSS).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, bad_filter) = match log_filter(std::env::var("RUST_LOG").ok().as_deref()) {
        Ok(f) => (f, None),
        Err(e) => (info_filter(), Some(e)),
    };
    let (format, bad_format) = match log_format(std::env::var("LOG_FORMAT").ok().as_deref()) {
        Ok(f) => (f, None),
        Err(e) => (LogFormat::Plain, Some(e)),
    };
    // Plain text without colours when logging to a file or pipe.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::registry()
        .with(log_layer(format, std::io::stderr, ansi))
        .with(filter)
        .init();
    if let Some(e) = bad_filter {
        tracing::warn!("{e}; logging at info");
    }
    if let Some(e) = bad_format {
        tracing::warn!("{e}; logging as plain text");
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    /// One JSON object per line: `timestamp`, `level`, `target`, the
    /// event's fields (`message` and the rest) flattened beside them, and
    /// the spans it is in.
    Json,
}

/// A `LOG_FORMAT` value that names no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("LOG_FORMAT={0:?} is neither plain nor json")]
pub struct BadLogFormat(pub String);

/// The format a `LOG_FORMAT` value names: plain when unset or blank, an
/// error naming the value when it is neither `plain` nor `json`.
pub fn log_format(spec: Option<&str>) -> Result<LogFormat, BadLogFormat> {
    match spec.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("plain") | Some("text") => Ok(LogFormat::Plain),
        Some("json") => Ok(LogFormat::Json),
        Some(_) => Err(BadLogFormat(spec.unwrap_or_default().to_string())),
    }
}

/// The layer that writes events to `writer` in `format`.
pub fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    match format {
        LogFormat::Plain => Box::new(fmt.with_ansi(ansi)),
        LogFormat::Json => Box::new(fmt.json().flatten_event(true).with_ansi(false)),
    }
}

/// A `RUST_LOG` value that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("RUST_LOG={spec:?} is not a list of target=level filters ({source})")]
pub struct LogFilterError {
    pub spec: String,
    #[source]
    pub source: tracing_subscriber::filter::ParseError,
}

/// The log filter for a `RUST_LOG` value: info when unset or blank, an
/// error naming the value when it does not parse.
pub fn log_filter(
    spec: Option<&str>,
) -> Result<tracing_subscriber::filter::Targets, LogFilterError> {
    match spec.map(str::trim) {
        None | Some("") => Ok(info_filter()),
        Some(spec) => spec.parse().map_err(|source| LogFilterError {
            spec: spec.to_string(),
            source,
        }),
    }
}

fn info_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO)
}

#[cfg(test)]
mod tests {
    use super::{LogFormat, log_filter, log_format, log_layer};
    use std::sync::{Arc, Mutex};
    use tracing::Level;
    use tracing_subscriber::layer::SubscriberExt;

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_logs_are_one_object_per_line_with_the_fields_as_keys() {
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::registry().with(log_layer(
            LogFormat::Json,
            move || w.clone(),
            true,
        ));
        tracing::subscriber::with_default(sub, || {
            let span = tracing::info_span!("conn", id = 7);
            let _e = span.enter();
            tracing::info!(
                target: "access",
                bytes_sent = 12u64,
                src.addr = %"10.0.0.1:4000",
                response_flags = "DENY",
                "connection complete"
            );
            tracing::warn!("a \"quoted\"\nmultiline message");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let a = &lines[0];
        assert_eq!(a["target"], "access", "{a}");
        assert_eq!(a["level"], "INFO");
        assert_eq!(a["message"], "connection complete");
        assert_eq!(a["src.addr"], "10.0.0.1:4000");
        assert_eq!(a["bytes_sent"], 12);
        assert_eq!(a["response_flags"], "DENY");
        assert!(a["timestamp"].is_string(), "{a}");
        assert_eq!(a["span"]["id"], 7, "{a}");
        assert_eq!(lines[1]["message"], "a \"quoted\"\nmultiline message");
        assert!(!text.contains('\x1b'), "no colours in JSON");
    }

    #[test]
    fn log_format_reads_plain_and_json_and_names_a_bad_value() {
        for plain in [None, Some(""), Some("plain"), Some(" PLAIN ")] {
            assert_eq!(log_format(plain), Ok(LogFormat::Plain), "{plain:?}");
        }
        assert_eq!(log_format(Some("json")), Ok(LogFormat::Json));
        assert_eq!(log_format(Some("JSON")), Ok(LogFormat::Json));
        assert!(
            log_format(Some("xml"))
                .unwrap_err()
                .to_string()
                .contains("xml")
        );
    }

    #[test]
    fn log_filter_reads_levels_per_target() {
        let f = log_filter(Some("warn,ztunnel::proxy=debug")).unwrap();
        assert!(f.would_enable("ztunnel::proxy::pool", &Level::DEBUG));
        assert!(!f.would_enable("ztunnel::proxy::pool", &Level::TRACE));
        assert!(f.would_enable("ztunnel::xds", &Level::WARN));
        assert!(!f.would_enable("ztunnel::xds", &Level::INFO));
        let f = log_filter(Some("warn,access=info")).unwrap();
        assert!(f.would_enable("access", &Level::INFO));
        assert!(!f.would_enable("h2::codec", &Level::INFO));
    }

    #[test]
    fn log_filter_defaults_to_info_and_names_a_bad_value() {
        for unset in [None, Some(""), Some("  ")] {
            let f = log_filter(unset).unwrap();
            assert!(f.would_enable("ztunnel", &Level::INFO), "{unset:?}");
            assert!(!f.would_enable("ztunnel", &Level::DEBUG), "{unset:?}");
        }
        let e = log_filter(Some("ztunnel=verbose")).unwrap_err().to_string();
        assert!(e.contains("ztunnel=verbose"), "{e}");
    }
}
