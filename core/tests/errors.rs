//! Errors are typed: no `src/` code of the workspace (before a file's
//! `#[cfg(test)]` module) names a `Result` whose error is a `String`, as a
//! function's return, a closure's, a field or a type alias. A caller can
//! then branch on a variant rather than on words of a message, and the
//! message is made once, by the error's `Display`.
//!
//! Left out: the e2e lab's kubelet (`e2e/src/kubelet/`), whose strings are
//! the pod statuses it reports, as a kubelet's are.

mod scan;

use scan::{blank, is_ident, lines_before_tests, relative, sources};

/// Folders whose code may still carry errors as strings.
const EDGE: &[&str] = &["e2e/src/kubelet/"];

/// The `Result<..>` types in `text` (comments and literals aside), each
/// with its line and its generic arguments split at the top level.
fn results(text: &str) -> Vec<(usize, Vec<String>)> {
    let code: Vec<char> = blank(text).chars().collect();
    let line_at = |i: usize| 1 + code[..i].iter().filter(|c| **c == '\n').count();
    let mut out = Vec::new();
    let word: Vec<char> = "Result".chars().collect();
    let mut i = 0;
    while i + word.len() < code.len() {
        let before = if i > 0 { code[i - 1] } else { ' ' };
        if code[i..i + word.len()] != word[..] || is_ident(before) {
            i += 1;
            continue;
        }
        let mut j = i + word.len();
        while j < code.len() && code[j].is_whitespace() {
            j += 1;
        }
        if code.get(j) != Some(&'<') {
            i += 1;
            continue;
        }
        // The arguments, to the matching `>`: brackets of every kind nest
        // (a tuple's comma is not the Result's), and `->` is no bracket.
        let mut depth = 0i32;
        let mut args = vec![String::new()];
        while j < code.len() {
            let c = code[j];
            match c {
                '<' | '(' | '[' => depth += 1,
                '>' if code[j - 1] == '-' => {}
                '>' | ')' | ']' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                break;
            }
            if depth == 1 && c == ',' {
                args.push(String::new());
            } else if depth > 1 || c != '<' {
                args.last_mut().expect("one argument at least").push(c);
            }
            j += 1;
        }
        let args: Vec<String> = args
            .into_iter()
            .map(|a| a.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|a| !a.is_empty())
            .collect();
        out.push((line_at(i), args));
        // On past the name only: a Result inside this one is seen too.
        i += word.len();
    }
    out
}

/// Whether a type as written is `String`.
fn is_string(ty: &str) -> bool {
    matches!(
        ty,
        "String" | "string::String" | "std::string::String" | "alloc::string::String"
    )
}

/// The lines of `text`, before its test module, naming `Result<_, String>`.
fn string_errors(text: &str) -> Vec<(usize, String)> {
    let code: String = text
        .lines()
        .take(lines_before_tests(text))
        .collect::<Vec<_>>()
        .join("\n");
    results(&code)
        .into_iter()
        .filter(|(_, args)| args.len() == 2 && is_string(&args[1]))
        .map(|(line, args)| (line, format!("Result<{}>", args.join(", "))))
        .collect()
}

#[test]
fn no_result_has_a_string_error() {
    let files = sources();
    assert!(files.len() > 50, "too few sources found: {}", files.len());
    let (mut seen, mut found) = (0, Vec::new());
    for f in &files {
        let rel = relative(f);
        if EDGE.iter().any(|e| rel.starts_with(e)) {
            continue;
        }
        let text = std::fs::read_to_string(f).expect("source readable");
        seen += results(&text).len();
        for (line, ty) in string_errors(&text) {
            found.push(format!("{rel}:{line}: {ty}"));
        }
    }
    // The scanner finds the workspace's Results (there are hundreds).
    assert!(seen > 300, "too few Result types found: {seen}");
    assert!(
        found.is_empty(),
        "errors as strings (use a thiserror enum with context):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_scanner_finds_string_errors_wherever_they_are_written() {
    let text = r#"
fn a() -> Result<(), String> {}
fn b(x: u8) -> std::result::Result<(String, u32), std::string::String> {}
type R<T> = Result<T, String>;
struct S { done: JoinHandle<Result<Vec<u8>, String>> }
fn c() { let f = |s: &str| -> Result<u32, String> { todo!() }; }
fn nested() -> Result<Result<u8, String>, Error> {}
fn fine() -> Result<BTreeMap<String, String>, Error> {}
fn fine2() -> Result<String, Box<dyn Fn(u8) -> String>> {}
fn fine3() -> io::Result<String> {}
// fn commented() -> Result<(), String>
const DOC: &str = "Result<(), String>";
#[cfg(test)]
mod tests {
    fn helper() -> Result<(), String> { Ok(()) }
}
"#;
    let found: Vec<usize> = string_errors(text).into_iter().map(|(l, _)| l).collect();
    assert_eq!(found, vec![2, 3, 4, 5, 6, 7]);
    assert_eq!(
        string_errors("fn x() -> Result<(String, u32), String> {}"),
        vec![(1, "Result<(String, u32), String>".to_string())]
    );
    // Every Result is seen, the well-typed ones and the test module's too.
    assert_eq!(results(text).len(), 11);
}
