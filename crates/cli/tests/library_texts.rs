//! Library crates describe problems in their own terms (`lora_r`, "the output directory"); only
//! the CLI knows its flags and maps option names to them (crates/cli/src/flags.rs). A flag
//! written into a library string would be wrong for every other caller of the library and
//! stale when the CLI renames it, so none may appear.

use std::path::{Path, PathBuf};

/// Library strings that hold `--` for something other than an mpolm flag.
const ALLOWED: &[(&str, &str)] = &[
    // pip's own options, in the pip command that fetches a model and the one a failed fetch
    // tells the user to run by hand.
    ("crates/models/src/load/hub.rs", "--no-deps"),
    ("crates/models/src/load/hub.rs", "--only-binary=:all:"),
    (
        "crates/models/src/load/hub.rs",
        "--disable-pip-version-check",
    ),
];

/// String literals of Rust source with the 1-based line each starts on (comments, char
/// literals and lifetimes skipped; raw and byte strings included).
fn string_literals(src: &str) -> Vec<(usize, String)> {
    let b = src.as_bytes();
    let (mut i, mut line, mut out) = (0usize, 1usize, Vec::new());
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    while i < b.len() {
        let c = b[i];
        if c == b'\n' {
            line += 1;
            i += 1;
        } else if src[i..].starts_with("//") {
            i = src[i..].find('\n').map_or(b.len(), |j| i + j);
        } else if src[i..].starts_with("/*") {
            let end = src[i..].find("*/").map_or(b.len(), |j| i + j + 2);
            line += src[i..end].matches('\n').count();
            i = end;
        } else if (c == b'r' || c == b'b') && (i == 0 || !ident(b[i - 1])) && {
            let s = src[i..].strip_prefix('b').unwrap_or(&src[i..]);
            s.starts_with("r\"") || s.starts_with("r#")
        } {
            // Raw string: r"…" or r#"…"# (any number of #).
            let start = i;
            i += if c == b'b' { 2 } else { 1 };
            let hashes = src[i..].bytes().take_while(|&h| h == b'#').count();
            i += hashes;
            if b.get(i) != Some(&b'"') {
                continue; // an identifier such as r#type
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let end = src[i + 1..].find(&close).map_or(b.len(), |j| i + 1 + j);
            out.push((line, src[i + 1..end].to_string()));
            line += src[start..end].matches('\n').count();
            i = (end + close.len()).min(b.len());
        } else if c == b'"' {
            let start = i;
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            out.push((line, src[start + 1..i.min(b.len())].to_string()));
            line += src[start..i.min(b.len())].matches('\n').count();
            i += 1;
        } else if c == b'\'' {
            // A char literal ('"', '\'', '\u{..}') is skipped whole; a lifetime is one quote.
            let rest = &src[i + 1..];
            let len = if rest.starts_with('\\') {
                rest.get(2..).and_then(|r| r.find('\'')).map(|j| j + 4)
            } else {
                rest.chars()
                    .next()
                    .filter(|ch| rest[ch.len_utf8()..].starts_with('\''))
                    .map(|ch| ch.len_utf8() + 2)
            };
            i += len.unwrap_or(1);
        } else {
            i += 1;
        }
    }
    out
}

/// `--` followed by a lowercase letter: how every mpolm flag is spelled.
fn flags_in(s: &str) -> Vec<String> {
    let mut v = Vec::new();
    for (k, _) in s.match_indices("--") {
        let rest = &s[k + 2..];
        if rest.starts_with(|c: char| c.is_ascii_lowercase()) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "-_=:".contains(c)))
                .unwrap_or(rest.len());
            v.push(format!("--{}", &rest[..end]));
        }
    }
    v
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn the_scanner_finds_flags_in_every_kind_of_string_and_nothing_else() {
    let src = r###"
        // a comment about --not-a-literal
        let a = "plain --one"; let c = '"'; let q = '\''; fn f<'a>(x: &'a str) {}
        let b = r#"raw "quoted" --two"#;
        /* block --three */ let d = b"bytes --four";
        let e = "multi
            line --five";
        let g = "not a flag: -- or --Upper or x--";
    "###;
    let found: Vec<(usize, Vec<String>)> = string_literals(src)
        .into_iter()
        .map(|(l, s)| (l, flags_in(&s)))
        .filter(|(_, f)| !f.is_empty())
        .collect();
    let want = |l: usize, f: &str| (l, vec![f.to_string()]);
    assert_eq!(
        found,
        vec![
            want(3, "--one"),
            want(4, "--two"),
            want(5, "--four"),
            want(6, "--five")
        ]
    );
}

#[test]
fn library_strings_name_no_cli_flag() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut files = Vec::new();
    for krate in ["mpo", "data", "models", "methods", "eval"] {
        rust_files(&root.join("crates").join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 40, "{} files: wrong root?", files.len());
    let mut bad = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(&root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let src = std::fs::read_to_string(f).unwrap();
        for (line, s) in string_literals(&src) {
            for flag in flags_in(&s) {
                if !ALLOWED.iter().any(|(p, a)| *p == rel && *a == flag) {
                    bad.push(format!("{rel}:{line}: {flag}"));
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "library strings naming CLI flags (name the option as `field_name` in a typed \
         InvalidOption error; crates/cli/src/flags.rs maps it):\n{}",
        bad.join("\n")
    );
}
