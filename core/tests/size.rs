//! The size rules, checked over every `src/` file of the workspace (a
//! crate's `tests/` folder aside):
//!
//! - no source file has more than 800 lines before its `#[cfg(test)]`
//!   module;
//! - no function (an `fn` item with a body, wherever it is, tests included)
//!   spans more than 150 lines, from its `fn` line to its closing brace.
//!
//! The scanner blanks comments, string and character literals first, so a
//! brace inside one does not count, then matches each function's braces.

use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 150;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the core crate is inside the workspace")
        .to_path_buf()
}

/// Every `.rs` file under each workspace member's `src/`.
fn sources() -> Vec<PathBuf> {
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

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `text` with the insides of comments, strings and character literals
/// replaced by spaces (line breaks kept, so line numbers still hold).
fn blank(text: &str) -> String {
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

/// Each function with a body in `text`: (its name, its first line, its
/// length in lines from the `fn` line to the closing brace).
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code: Vec<char> = blank(text).chars().collect();
    let line_at = |i: usize| 1 + code[..i].iter().filter(|c| **c == '\n').count();
    let mut out = Vec::new();
    for i in 0..code.len().saturating_sub(3) {
        let before = if i > 0 { code[i - 1] } else { ' ' };
        if code[i] != 'f' || code[i + 1] != 'n' || is_ident(before) || !code[i + 2].is_whitespace()
        {
            continue;
        }
        let mut j = i + 2;
        while j < code.len() && code[j].is_whitespace() {
            j += 1;
        }
        let name: String = code[j..].iter().take_while(|c| is_ident(**c)).collect();
        if name.is_empty() {
            continue; // a `fn(..)` pointer type
        }
        // The body's opening brace, unless a `;` ends a bodiless declaration
        // first (brackets tracked: `[u8; 4]` is a type, not an end).
        let mut depth = 0i32;
        let mut open = None;
        while j < code.len() {
            match code[j] {
                '(' | '[' => depth += 1,
                ')' | ']' => depth -= 1,
                ';' if depth == 0 => break,
                '{' if depth == 0 => {
                    open = Some(j);
                    break;
                }
                _ => {}
            }
            j += 1;
        }
        let Some(open) = open else { continue };
        let mut braces = 0i32;
        let mut close = None;
        for (k, ch) in code.iter().enumerate().skip(open) {
            match ch {
                '{' => braces += 1,
                '}' => {
                    braces -= 1;
                    if braces == 0 {
                        close = Some(k);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.unwrap_or_else(|| panic!("fn {name}: unbalanced braces"));
        let first = line_at(i);
        out.push((name, first, line_at(close) - first + 1));
    }
    out
}

/// The lines before the file's `#[cfg(test)]` module (all of them if it
/// has none).
fn lines_before_tests(text: &str) -> usize {
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

fn relative(p: &Path) -> String {
    p.strip_prefix(root()).unwrap_or(p).display().to_string()
}

#[test]
fn no_source_file_over_800_lines_before_its_tests() {
    let files = sources();
    assert!(files.len() > 50, "too few sources found: {}", files.len());
    let mut long = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("source readable");
        let n = lines_before_tests(&text);
        if n > MAX_FILE_LINES {
            long.push(format!("{}: {n} lines", relative(f)));
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines before the tests:\n{}",
        long.join("\n")
    );
}

#[test]
fn no_function_over_150_lines() {
    let mut long = Vec::new();
    let mut seen = 0;
    for f in sources() {
        let text = std::fs::read_to_string(&f).expect("source readable");
        for (name, line, len) in functions(&text) {
            seen += 1;
            if len > MAX_FN_LINES {
                long.push(format!("{}:{line}: fn {name}: {len} lines", relative(&f)));
            }
        }
    }
    assert!(seen > 500, "too few functions found: {seen}");
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_scanner_sees_what_it_must() {
    // A long function is measured from `fn` to its closing brace, braces in
    // strings, characters and comments aside; a lifetime is not a char.
    let mut long = String::from("pub(crate) async fn big<'a>(x: &'a str) -> [u8; 2] {\n");
    for _ in 0..200 {
        long.push_str("    let _ = \"}\"; let _ = '}'; // }\n");
    }
    long.push_str("    /* { */ let _ = r#\"}\"#; [0; 2]\n}\nfn after() {}\n");
    let found = functions(&long);
    assert_eq!(found[0], ("big".to_string(), 1, 203));
    assert_eq!(found[1], ("after".to_string(), 204, 1));
    // Declarations without bodies and pointer types are not functions.
    let decl = "trait T { fn a(&self) -> [u8; 4]; fn b(&self) {} }\nlet f: fn(u8) = g;";
    assert_eq!(functions(decl), [("b".to_string(), 1, 1)]);
    // A nested function counts inside its parent, and on its own.
    let nested = "fn outer() {\n    fn inner() {\n    }\n}\n";
    assert_eq!(
        functions(nested),
        [("outer".to_string(), 1, 4), ("inner".to_string(), 2, 2)]
    );
    // The file length stops at the test module, not at a test-only item.
    let file =
        "fn a() {}\n#[cfg(test)]\nuse x;\nfn b() {}\n#[cfg(test)]\n#[allow(x)]\nmod tests {\n}\n";
    assert_eq!(lines_before_tests(file), 4);
    assert_eq!(lines_before_tests("fn a() {}\nfn b() {}\n"), 2);
}
