//! Just enough PromQL reading to check a dashboard against what the mesh
//! exports: which metric names and which label names a query uses.

/// Functions, aggregations and keywords: identifiers that are not metrics.
const WORDS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "round",
    "abs",
    "ceil",
    "floor",
    "clamp_min",
    "clamp_max",
    "vector",
    "scalar",
    "time",
    "label_replace",
    "label_join",
    "sort",
    "sort_desc",
    "absent",
    "changes",
    "resets",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// The metric names and label names `expr` uses. Grafana's
/// `label_values(selector, label)` is read as its selector plus the label.
pub fn names(expr: &str) -> (Vec<String>, Vec<String>) {
    let expr = expr.trim();
    if let Some(inner) = expr
        .strip_prefix("label_values(")
        .and_then(|e| e.strip_suffix(')'))
    {
        let (sel, label) = match inner.rsplit_once(',') {
            Some((s, l)) => (s, Some(l.trim().to_string())),
            None => (inner, None),
        };
        let (m, mut l) = names(sel);
        l.extend(label);
        return (m, l);
    }
    let b = expr.as_bytes();
    let (mut metrics, mut labels) = (Vec::new(), Vec::new());
    let mut i = 0;
    let mut braces = 0;
    // After by/without/on/ignoring/group_*: the next (...) lists labels.
    let mut label_list = false;
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    while i < b.len() {
        let c = b[i];
        match c {
            b'"' | b'\'' | b'`' => {
                i += 1;
                while i < b.len() && b[i] != c {
                    i += if b[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'[' => {
                while i < b.len() && b[i] != b']' {
                    i += 1;
                }
                i += 1;
            }
            b'{' => {
                braces += 1;
                i += 1;
            }
            b'}' => {
                braces -= 1;
                i += 1;
            }
            b'(' if label_list => {
                let end = expr[i..].find(')').map_or(b.len(), |e| i + e);
                labels.extend(
                    expr[i + 1..end]
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
                label_list = false;
                i = end + 1;
            }
            b'$' => {
                // A template variable.
                i += 1;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
            }
            c if c.is_ascii_digit()
                || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) =>
            {
                while i < b.len() && (ident(b[i]) || b[i] == b'.') {
                    i += 1;
                }
            }
            c if ident(c) => {
                let start = i;
                while i < b.len() && ident(b[i]) {
                    i += 1;
                }
                let word = &expr[start..i];
                let next = expr[i..].trim_start().as_bytes().first().copied();
                if braces > 0 {
                    labels.push(word.to_string());
                } else if matches!(
                    word,
                    "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                ) {
                    label_list = true;
                } else if next == Some(b'(') || WORDS.contains(&word) {
                    // A function or an aggregation.
                } else {
                    metrics.push(word.to_string());
                }
            }
            _ => i += 1,
        }
    }
    (metrics, labels)
}

#[cfg(test)]
mod tests {
    use super::names;

    #[test]
    fn reads_metrics_and_labels() {
        let (m, l) = names(
            r#"histogram_quantile(0.99, sum(irate(istio_request_duration_milliseconds_bucket{reporter=~"source|waypoint", destination_workload=~"$workload"}[1m])) by (le, destination_service)) or vector(0)"#,
        );
        assert_eq!(m, ["istio_request_duration_milliseconds_bucket"]);
        assert_eq!(
            l,
            [
                "reporter",
                "destination_workload",
                "le",
                "destination_service"
            ]
        );
        let (m, l) = names(
            r#"label_values(istio_tcp_connections_opened_total{destination_workload_namespace=~"$namespace"}, destination_workload)"#,
        );
        assert_eq!(m, ["istio_tcp_connections_opened_total"]);
        assert_eq!(
            l,
            ["destination_workload_namespace", "destination_workload"]
        );
        let (m, l) =
            names("sum(rate(a_total{x!=\"y\"}[5m])) / sum(rate(b_total[5m])) by (z) * 100");
        assert_eq!(m, ["a_total", "b_total"]);
        assert_eq!(l, ["x", "z"]);
    }
}
