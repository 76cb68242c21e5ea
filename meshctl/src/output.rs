//! Output: aligned tables with one header line (`-o short`, the default, or
//! `-o wide` with more columns), or the structured objects behind the rows
//! as JSON or YAML.

use std::fmt::Write;

use serde::Serialize;
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// A table of the main columns (`table` is accepted too).
    #[default]
    #[value(alias = "table")]
    Short,
    /// A table with every column.
    Wide,
    /// The objects behind the rows, as JSON.
    Json,
    /// The objects behind the rows, as YAML.
    Yaml,
}

impl Format {
    pub fn is_table(self) -> bool {
        matches!(self, Format::Short | Format::Wide)
    }
}

/// Rows with named columns, printed as a table; and, for JSON and YAML, the
/// structured object behind each row (or, when a command has none, the row
/// as an object keyed by the lower-cased column names).
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// What the rows are ("workloads"): the key when several tables are
    /// printed as one JSON or YAML object. Never printed in a table.
    pub kind: &'static str,
    pub headers: Vec<&'static str>,
    /// How many of the last `headers` only `-o wide` shows.
    pub wide: usize,
    pub rows: Vec<Vec<String>>,
    /// One object per row, when the command has them.
    pub items: Vec<Value>,
    /// A summary for people ("all 13 checks passed"): printed on stderr
    /// with a table, never on stdout, so scripts read one header line.
    pub note: Option<String>,
}

impl Table {
    pub fn new(kind: &'static str, headers: &[&'static str]) -> Table {
        Table {
            kind,
            headers: headers.to_vec(),
            ..Default::default()
        }
    }

    /// Adds columns that only `-o wide` shows (after the others).
    pub fn with_wide(mut self, headers: &[&'static str]) -> Table {
        self.headers.extend_from_slice(headers);
        self.wide = headers.len();
        self
    }

    pub fn noted(mut self, n: impl Into<String>) -> Table {
        self.note = Some(n.into());
        self
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// A row and the object it shows.
    pub fn push_item(&mut self, row: Vec<String>, item: Value) {
        self.rows.push(row);
        self.items.push(item);
    }

    /// The rows as objects keyed by column name (for rows without items).
    pub fn objects(&self) -> Vec<serde_json::Map<String, Value>> {
        self.rows
            .iter()
            .map(|r| {
                self.headers
                    .iter()
                    .zip(r)
                    .map(|(h, v)| (h.to_ascii_lowercase().replace(' ', "_"), v.clone().into()))
                    .collect()
            })
            .collect()
    }

    /// The structured value: the items when every row has one.
    pub fn value(&self) -> Value {
        if !self.items.is_empty() && self.items.len() == self.rows.len() {
            Value::Array(self.items.clone())
        } else {
            serde_json::to_value(self.objects()).unwrap_or_default()
        }
    }

    /// The table: one header line, then the rows (none when empty).
    pub fn render(&self, wide: bool) -> String {
        let cols = if wide {
            self.headers.len()
        } else {
            self.headers.len() - self.wide.min(self.headers.len())
        };
        let mut widths: Vec<usize> = self.headers[..cols].iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().take(cols).enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    let pad = widths[i].saturating_sub(c.chars().count());
                    let _ = write!(l, "{c}{}  ", " ".repeat(pad));
                }
            }
            l.trim_end().to_string()
        };
        let mut out = String::new();
        let _ = writeln!(out, "{}", line(self.headers[..cols].to_vec()));
        for r in &self.rows {
            let _ = writeln!(
                out,
                "{}",
                line(r.iter().take(cols).map(String::as_str).collect())
            );
        }
        out
    }
}

/// Prints tables in `format`: tables separated by a blank line, or, in JSON
/// and YAML, one table's objects as a list and several tables as one object
/// keyed by their kinds. Notes go to stderr with tables.
pub fn print(format: Format, tables: &[Table]) -> String {
    if format.is_table() {
        for n in tables.iter().filter_map(|t| t.note.as_ref()) {
            eprintln!("{n}");
        }
        return tables
            .iter()
            .map(|t| t.render(format == Format::Wide))
            .collect::<Vec<_>>()
            .join("\n");
    }
    let value = if tables.len() == 1 {
        tables[0].value()
    } else {
        Value::Object(
            tables
                .iter()
                .map(|t| (t.kind.to_string(), t.value()))
                .collect(),
        )
    };
    value_string(format, &value)
}

/// Any serializable value as JSON or YAML (tables fall back to JSON).
pub fn value_string<T: Serialize>(format: Format, v: &T) -> String {
    match format {
        Format::Yaml => serde_yaml::to_string(v).unwrap_or_default(),
        _ => format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Table {
        let mut t = Table::new("pods", &["NAME", "NODE"]).with_wide(&["IP"]);
        t.push_item(
            vec!["client-0".into(), "node-1".into(), "10.0.0.1".into()],
            json!({"name": "client-0", "node": "node-1", "ports": [80, 443]}),
        );
        t.push_item(
            vec!["a".into(), "node-22".into(), "10.0.0.2".into()],
            json!({"name": "a", "node": "node-22", "ports": []}),
        );
        t
    }

    #[test]
    fn short_has_one_header_line_and_wide_every_column() {
        let t = sample().noted("2 pods");
        assert_eq!(
            print(Format::Short, std::slice::from_ref(&t)),
            "NAME      NODE\nclient-0  node-1\na         node-22\n"
        );
        assert_eq!(
            print(Format::Wide, &[t]),
            "NAME      NODE     IP\nclient-0  node-1   10.0.0.1\na         node-22  10.0.0.2\n"
        );
        let empty = Table::new("pods", &["NAME", "NODE"]);
        assert_eq!(empty.render(false), "NAME  NODE\n");
    }

    #[test]
    fn json_and_yaml_are_the_objects_not_rows_of_strings() {
        let t = sample();
        let v: Value =
            serde_json::from_str(&print(Format::Json, std::slice::from_ref(&t))).unwrap();
        assert_eq!(v[0]["ports"], json!([80, 443]));
        assert_eq!(v[1]["node"], "node-22");
        let y: Value =
            serde_yaml::from_str(&print(Format::Yaml, std::slice::from_ref(&t))).unwrap();
        assert_eq!(y, v);
        // Several tables: keyed by kind.
        let mut other = Table::new("nodes", &["NAME"]);
        other.push(vec!["node-1".into()]);
        let v: Value = serde_json::from_str(&print(Format::Json, &[t, other])).unwrap();
        assert_eq!(v["pods"][0]["ports"][1], 443);
        assert_eq!(v["nodes"][0]["name"], "node-1");
    }
}
