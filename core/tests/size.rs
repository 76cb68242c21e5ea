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

mod scan;

use scan::{blank, is_ident, lines_before_tests, relative, sources};

const MAX_FILE_LINES: usize = 800;
const MAX_FN_LINES: usize = 150;

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
