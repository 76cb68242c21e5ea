//! What the source checks (`size.rs`, `errors.rs`) share: the workspace's
//! `src/` files, and a scanner that blanks comments and literals so what
//! is left is code.

use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the core crate is inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under each workspace member's `src/`.
pub fn sources() -> Vec<PathBuf> {
    let manifest = std::fs::read_to_string(root().join("Cargo.toml")).expect("Cargo.toml");
    let members = manifest
        .lines()
        .find_map(|l| l.trim().strip_prefix("members = "))
        .expect("the workspace lists its members");
    let mut dirs: Vec<PathBuf> = members
        .split('"')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, m)| root().join(m).join("src"))
        .collect();
    assert!(dirs.len() >= 3, "members not found in {members}");
    let mut out = Vec::new();
    while let Some(d) = dirs.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

pub fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` with the insides of comments, strings and character literals
/// replaced by spaces (line breaks kept, so line numbers still hold).
pub fn blank(text: &str) -> String {
    let s: Vec<char> = text.chars().collect();
    let mut out: Vec<char> = Vec::with_capacity(s.len());
    let keep = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let prev = if i > 0 { s[i - 1] } else { ' ' };
        let next = s.get(i + 1).copied().unwrap_or(' ');
        if c == '/' && next == '/' {
            while i < s.len() && s[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == '*' {
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.extend([' ', ' ']);
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.extend([' ', ' ']);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep(s[i]));
                    i += 1;
                }
            }
        } else if (c == 'r' || (c == 'b' && next == 'r')) && !is_ident(prev) && {
            let mut j = i + if c == 'b' { 2 } else { 1 };
            while s.get(j) == Some(&'#') {
                j += 1;
            }
            s.get(j) == Some(&'"')
        } {
            // A raw string: r"..", r#".."#, br#".."#.
            let mut j = i + if c == 'b' { 2 } else { 1 };
            let mut hashes = 0;
            while s[j] == '#' {
                hashes += 1;
                j += 1;
            }
            out.extend(std::iter::repeat_n(' ', j + 1 - i));
            i = j + 1;
            while i < s.len() {
                if s[i] == '"' && (1..=hashes).all(|k| s.get(i + k) == Some(&'#')) {
                    out.extend(std::iter::repeat_n(' ', hashes + 1));
                    i += hashes + 1;
                    break;
                }
                out.push(keep(s[i]));
                i += 1;
            }
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < s.len() && s[i] != '"' {
                if s[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < s.len() {
                    out.push(keep(s[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && next == '\\' {
            // An escaped character literal: '\n', '\'', '\u{7f}'.
            out.extend([' ', ' ', ' ']);
            i += 3;
            while i < s.len() && s[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && s.get(i + 2) == Some(&'\'') {
            // A plain character literal: 'x', '{'.
            out.extend([' ', ' ', ' ']);
            i += 3;
        } else {
            // Code, lifetimes ('a) included.
            out.push(c);
            i += 1;
        }
    }
    out.into_iter().collect()
}

/// The lines before the file's `#[cfg(test)]` module (all of them if it
/// has none).
pub fn lines_before_tests(text: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    for (n, l) in lines.iter().enumerate() {
        if l.trim_end() != "#[cfg(test)]" {
            continue;
        }
        let item = lines[n + 1..]
            .iter()
            .find(|l| !l.trim_start().starts_with("#["))
            .map(|l| l.trim_start());
        if item.is_some_and(|l| l.starts_with("mod ") || l.starts_with("pub mod ")) {
            return n;
        }
    }
    lines.len()
}

/// `p` from the workspace's root.
pub fn relative(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}
