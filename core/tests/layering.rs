//! The layering that docs/architecture.md ("Crate layout and layering")
//! describes, checked against the code so the picture cannot go stale:
//!
//! - the crates and their directories are the workspace's members;
//! - each crate depends (`cargo metadata`) on exactly the crates of ours it
//!   is documented to use, every one of them listed before it;
//! - inside a crate whose modules are listed, the modules are the ones its
//!   `lib.rs` (or `main.rs`) declares, and a module imports (`crate::x`)
//!   only modules listed before it; the order its `lib.rs` documents is the
//!   same one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One crate of the documented list.
#[derive(Debug)]
struct Documented {
    name: String,
    dir: String,
    uses: BTreeSet<String>,
    test_uses: BTreeSet<String>,
    modules: Vec<String>,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the core crate is inside the workspace")
        .to_path_buf()
}

/// The items between backticks in `s`, in order.
fn ticked(s: &str) -> Vec<String> {
    s.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
        .map(|(_, t)| t.to_string())
        .collect()
}

/// The list under "## Crate layout and layering": a bullet per crate,
/// ``- `name` (`dir/`) uses `a`, `b`; its tests also `c`: what it is.``
/// (or `uses nothing of ours`), then an indented `Modules:` line (which may
/// wrap) naming its modules from the bottom up.
fn documented() -> Vec<Documented> {
    let text = std::fs::read_to_string(root().join("docs/architecture.md"))
        .expect("docs/architecture.md is readable");
    let start = text
        .find("\n## Crate layout and layering\n")
        .expect("architecture.md has a \"Crate layout and layering\" section");
    let section = &text[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |e| e + 3)];
    // Each bullet with its continuation lines, and its Modules lines.
    let mut items: Vec<(String, String)> = Vec::new();
    let mut in_modules = false;
    for line in section.lines() {
        if line.starts_with("- `") {
            in_modules = false;
            items.push((line.to_string(), String::new()));
        } else if let Some(m) = line.trim_start().strip_prefix("Modules: ") {
            in_modules = true;
            let item = items.last_mut().expect("a Modules line follows its crate");
            item.1.push_str(m);
        } else if line.starts_with("  ") && !line.trim().is_empty() {
            if let Some(item) = items.last_mut() {
                let part = if in_modules { &mut item.1 } else { &mut item.0 };
                part.push(' ');
                part.push_str(line.trim());
            }
        } else {
            in_modules = false;
        }
    }
    let mut crates: Vec<Documented> = Vec::new();
    for (line, modules) in items {
        let head = &line[..line.find(": ").unwrap_or(line.len())];
        let names = ticked(head);
        assert!(
            names.len() >= 2,
            "a crate line names a crate and its dir: {line}"
        );
        let after = head
            .split_once(") uses ")
            .unwrap_or_else(|| panic!("a crate line says what it uses: {line}"))
            .1;
        let (uses, test_uses) = after.split_once("; its tests also ").unwrap_or((after, ""));
        assert!(
            !ticked(uses).is_empty() || uses.starts_with("nothing of ours"),
            "{line}"
        );
        crates.push(Documented {
            name: names[0].clone(),
            dir: names[1].trim_end_matches('/').to_string(),
            uses: ticked(uses).into_iter().collect(),
            test_uses: ticked(test_uses).into_iter().collect(),
            modules: ticked(&modules),
        });
    }
    assert!(
        crates.len() >= 3,
        "the layering list was not found: {crates:?}"
    );
    crates
}

/// Each workspace member: (name, dir relative to the root, its normal
/// dependencies on members, its dev-dependencies on members).
type Member = (String, String, BTreeSet<String>, BTreeSet<String>);

fn members() -> Vec<Member> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let packages = meta["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = packages
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect();
    let root = root();
    packages
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("name").to_string();
            let manifest = PathBuf::from(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest
                .parent()
                .and_then(|d| d.strip_prefix(&root).ok())
                .map(|d| d.display().to_string())
                .expect("members live under the workspace root");
            let (mut normal, mut dev) = (BTreeSet::new(), BTreeSet::new());
            for d in p["dependencies"].as_array().into_iter().flatten() {
                let dep = d["name"].as_str().expect("dependency name").to_string();
                if !names.contains(&dep) {
                    continue;
                }
                match d["kind"].as_str() {
                    Some("dev") => dev.insert(dep),
                    _ => normal.insert(dep),
                };
            }
            let dev = dev.difference(&normal).cloned().collect();
            (name, dir, normal, dev)
        })
        .collect()
}

#[test]
fn crates_depend_as_documented_and_only_downwards() {
    let doc = documented();
    let members = members();
    let listed: BTreeSet<&str> = doc.iter().map(|c| c.name.as_str()).collect();
    let real: BTreeSet<&str> = members.iter().map(|m| m.0.as_str()).collect();
    assert_eq!(listed, real, "documented crates vs workspace members");
    for (name, dir, normal, dev) in &members {
        let pos = doc.iter().position(|c| &c.name == name).expect("listed");
        let c = &doc[pos];
        assert_eq!(&c.dir, dir, "{name}'s directory");
        assert_eq!(&c.uses, normal, "{name}: documented uses vs Cargo.toml");
        assert_eq!(
            &c.test_uses, dev,
            "{name}: documented test-only uses vs Cargo.toml"
        );
        for used in normal.iter().chain(dev) {
            let at = doc.iter().position(|c| &c.name == used).expect("listed");
            assert!(
                at < pos,
                "{name} uses {used}, which is listed after it: dependencies run one way"
            );
        }
    }
}

/// The modules a crate root declares (`mod x;`, `pub mod x;`).
fn declared(src: &Path) -> BTreeSet<String> {
    let root = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .find(|p| p.exists())
        .expect("a crate root");
    let text = std::fs::read_to_string(root).expect("crate root readable");
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            l.strip_suffix(';').map(str::to_string)
        })
        .collect()
}

/// A module's source files: `x.rs` and everything under `x/`; `true` for
/// the files whose `super` is the crate root.
fn files_of(src: &Path, module: &str) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        out.push((file, true));
    }
    let mut dirs = vec![src.join(module)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let top = p == src.join(module).join("mod.rs");
                out.push((p, top));
            }
        }
    }
    out
}

/// The identifiers that follow `prefix` in `line`, including each of a
/// `prefix{a, b::c}` group's first segments.
fn after(line: &str, prefix: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    for (i, _) in line.match_indices(prefix) {
        let before = line[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &line[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(group.split(',').map(|g| ident(g.trim())));
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// The modules of its own crate that `module` imports.
fn imports(src: &Path, module: &str) -> BTreeMap<String, PathBuf> {
    let mut found = BTreeMap::new();
    for (path, top) in files_of(src, module) {
        let text = std::fs::read_to_string(&path).expect("source readable");
        // Tests may reach anywhere.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for line in code.lines() {
            let line = line.trim_start();
            if line.starts_with("//") {
                continue;
            }
            let mut names = after(line, "crate::");
            if top {
                names.extend(after(line, "super::"));
            }
            for n in names {
                found.entry(n).or_insert_with(|| path.clone());
            }
        }
    }
    found
}

/// The order a crate root's `//!` docs give after "Layering", if any.
fn lib_doc_order(src: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(src.join("lib.rs")).ok()?;
    let docs: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("//!")).collect();
    let at = docs.iter().position(|l| l.contains("Layering"))?;
    let mut order = Vec::new();
    for l in &docs[at + 1..] {
        if l.trim().is_empty() {
            break;
        }
        order.extend(ticked(l));
    }
    Some(order)
}

#[test]
fn modules_import_only_those_listed_before_them() {
    let root = root();
    let mut checked = 0;
    for c in documented() {
        if c.modules.is_empty() {
            continue;
        }
        let src = root.join(&c.dir).join("src");
        let listed: BTreeSet<String> = c.modules.iter().cloned().collect();
        assert_eq!(
            listed.len(),
            c.modules.len(),
            "{}: a module listed twice",
            c.name
        );
        assert_eq!(
            listed,
            declared(&src),
            "{}: documented modules vs those its crate root declares",
            c.name
        );
        if let Some(order) = lib_doc_order(&src) {
            assert_eq!(
                order, c.modules,
                "{}: the order in its lib.rs vs architecture.md",
                c.name
            );
        }
        for (i, m) in c.modules.iter().enumerate() {
            for (used, file) in imports(&src, m) {
                if let Some(j) = c.modules.iter().position(|x| *x == used) {
                    assert!(
                        j <= i,
                        "{}: `{m}` imports `{used}` ({}), which is listed after it",
                        c.name,
                        file.display()
                    );
                }
            }
        }
        checked += 1;
    }
    assert!(checked >= 2, "no crate's modules were checked");
}

#[test]
fn the_import_scan_sees_what_it_must() {
    assert_eq!(
        after("use crate::{state::Workload, tls};", "crate::"),
        ["state", "tls"]
    );
    assert_eq!(after("x: crate::hbone::H2Stream,", "crate::"), ["hbone"]);
    assert!(after("mesh_core::state::x", "core::").is_empty());
    assert_eq!(ticked("`a` -> `b` -> `c`"), ["a", "b", "c"]);
}
