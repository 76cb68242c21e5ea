//! Output: aligned tables by default, or the same rows as JSON or YAML.

use std::fmt::Write;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// Rows with named columns: printed as a table, or serialized as a list of
/// objects (keys are the column names, lower-cased).
#[derive(Debug, Clone, Default)]
pub struct Table {
    pub title: Option<String>,
    pub headers: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            title: None,
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn titled(mut self, t: impl Into<String>) -> Table {
        self.title = Some(t.into());
        self
    }

    pub fn push(&mut self, row: Vec<String>) {
        self.rows.push(row);
    }

    /// The rows as objects keyed by column name (for JSON and YAML).
    pub fn objects(&self) -> Vec<serde_json::Map<String, serde_json::Value>> {
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

    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate() {
                if let Some(w) = widths.get_mut(i) {
                    *w = (*w).max(c.chars().count());
                }
            }
        }
        let mut out = String::new();
        if let Some(t) = &self.title {
            let _ = writeln!(out, "{t}");
        }
        let line = |cells: Vec<&str>| {
            let mut l = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    l.push_str(c);
                } else {
                    let _ = write!(l, "{c:<w$}  ", w = widths[i]);
                }
            }
            l.trim_end().to_string()
        };
        let _ = writeln!(out, "{}", line(self.headers.clone()));
        for r in &self.rows {
            let _ = writeln!(out, "{}", line(r.iter().map(String::as_str).collect()));
        }
        if self.rows.is_empty() {
            let _ = writeln!(out, "(none)");
        }
        out
    }
}

/// Prints tables in `format`. Several tables in JSON/YAML become one object
/// keyed by their titles.
pub fn print(format: Format, tables: &[Table]) -> String {
    match format {
        Format::Table => tables
            .iter()
            .map(Table::render)
            .collect::<Vec<_>>()
            .join("\n"),
        Format::Json | Format::Yaml => {
            let value = if tables.len() == 1 {
                serde_json::to_value(tables[0].objects()).unwrap_or_default()
            } else {
                let m: serde_json::Map<String, serde_json::Value> = tables
                    .iter()
                    .map(|t| {
                        (
                            t.title.clone().unwrap_or_default().to_ascii_lowercase(),
                            serde_json::to_value(t.objects()).unwrap_or_default(),
                        )
                    })
                    .collect();
                serde_json::Value::Object(m)
            };
            value_string(format, &value)
        }
    }
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

    #[test]
    fn tables_align_and_serialize() {
        let mut t = Table::new(&["NAME", "NODE"]);
        t.push(vec!["client-0".into(), "node-1".into()]);
        t.push(vec!["a".into(), "node-22".into()]);
        assert_eq!(
            t.render(),
            "NAME      NODE\nclient-0  node-1\na         node-22\n"
        );
        let json = print(Format::Json, std::slice::from_ref(&t));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[1]["node"], "node-22");
        assert!(print(Format::Yaml, &[t]).contains("name: client-0"));
    }
}
