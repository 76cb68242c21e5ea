//! Logging for every binary of the mesh.

/// Logging for every binary of the mesh: `RUST_LOG` filters by target
/// (`info`, `warn,ztunnel::proxy=debug`), default info.
///
/// Target filters rather than `EnvFilter`: its span and field matching
/// brings a regex engine, a few hundred KiB of code mapped into every
/// node proxy (`docs/performance.md`, idle RSS).
pub fn init_logging() {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref()).unwrap_or_else(|e| {
        eprintln!("{e}; logging at info");
        info_filter()
    });
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                // Plain text when logging to a file or pipe.
                .with_ansi(
                    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
                )
                .with_writer(std::io::stderr),
        )
        .with(filter)
        .init();
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
    use super::log_filter;
    use tracing::Level;

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
