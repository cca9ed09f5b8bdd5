//! The pages that walk through the code by symbol name only symbols and
//! files that exist: a rename or a move that forgets them fails here.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The pages that name code.
const PAGES: [&str; 2] = ["docs/architecture.md", "docs/lifetime-of-a-connection.md"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs" || e == "c") {
            out.push(path);
        }
    }
}

/// Every name the sources define: items, fields, variants, modules (files
/// included), macro-free.
fn defined(root: &Path) -> HashSet<String> {
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    let mut names = HashSet::new();
    let ident = |s: &str| {
        let end = s
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        s[..end].to_string()
    };
    for file in files {
        if let Some(stem) = file.file_stem().and_then(|s| s.to_str()) {
            names.insert(stem.to_string());
        }
        if let Some(dir) = file
            .parent()
            .and_then(|d| d.file_name())
            .and_then(|d| d.to_str())
        {
            names.insert(dir.to_string());
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for line in text.lines() {
            let t = line.trim_start();
            let t = t.strip_prefix("pub ").unwrap_or(t);
            let t = t
                .strip_prefix("pub(super) ")
                .or_else(|| t.strip_prefix("pub(crate) "))
                .unwrap_or(t);
            for kw in [
                "fn ",
                "struct ",
                "enum ",
                "const ",
                "mod ",
                "trait ",
                "type ",
                "static ",
                "macro_rules! ",
            ] {
                if let Some(rest) = t.strip_prefix(kw) {
                    names.insert(ident(rest));
                }
            }
            // A C function (the shim): `type name(`.
            if let Some(open) = t.find('(')
                && let Some(name) = t[..open].split_whitespace().last()
            {
                names.insert(name.trim_start_matches('*').to_string());
            }
            // Fields (`name: T,`) and variants (`Name,` `Name {` `Name(`).
            let name = ident(t);
            if !name.is_empty() {
                let after = t[name.len()..].trim_start();
                if after.starts_with(':') && !after.starts_with("::")
                    || after.starts_with(',')
                    || after.starts_with('{')
                    || after.starts_with('(')
                {
                    names.insert(name);
                }
            }
        }
    }
    names
}

/// The code-like spans of a page: paths (`a::b`), snake_case names and
/// file paths.
fn spans(page: &str) -> Vec<String> {
    page.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .filter(|s| !s.contains(' '))
        .collect()
}

#[test]
fn the_walkthroughs_name_only_what_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let names = defined(root);
    let mut files = Vec::new();
    sources(&root.join("src"), &mut files);
    files.extend(
        files
            .clone()
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf)),
    );
    let mut missing = Vec::new();
    for page in PAGES {
        let text = std::fs::read_to_string(root.join(page)).unwrap();
        for span in spans(&text) {
            let s = span.trim_end_matches("()");
            if s.ends_with(".rs") || s.ends_with(".c") || s.ends_with(".md") || s.ends_with('/') {
                // A path from the root, or within a folder the page named.
                let found = ["", "src/", "docs/", "tests/"]
                    .iter()
                    .any(|base| root.join(base).join(s).exists())
                    || files.iter().any(|f| f.ends_with(s.trim_end_matches('/')));
                if !found {
                    missing.push(format!("{page}: file `{s}`"));
                }
                continue;
            }
            let path = s.contains("::");
            let snake = s.contains('_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !(path || snake) {
                continue;
            }
            for segment in s.split("::") {
                let segment = segment.split(['[', '(', '.']).next().unwrap_or("");
                // `lb::…` is the crate itself; the others are its dependencies.
                if segment.is_empty()
                    || ["lb", "std", "mio", "libc", "nix", "socket2"].contains(&segment)
                {
                    continue;
                }
                if !names.contains(segment) {
                    missing.push(format!("{page}: `{s}` ({segment})"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named in the docs but not in the code:\n{}",
        missing.join("\n")
    );
}
