//! The library's top-level modules depend on each other in one direction only: the graph
//! of `crate::` (and `super::`) references between them has no cycle.
//!
//! A node is a top-level module of `src/`; a file of a submodule (`src/tokenizer/hf.rs`)
//! belongs to its top-level module (`tokenizer`). An edge `a -> b` is a `crate::b...` path
//! in code of `a`, a `use crate::{b, ...}` group, a `super::` path that climbs out of `a`,
//! or `crate::Item` where `src/lib.rs` re-exports `Item` from `b`. Comments (doc links
//! included) and string literals are not references.
//!
//! Three parts of `src/` sit on top and are not nodes: `src/lib.rs` (the crate root, which
//! declares the modules and re-exports their items), `src/ffi/` (the C ABI, which wraps
//! every module) and `src/bin/` (the CLI, a separate crate that uses the public API). They
//! may use anything; no module may use `ffi`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Where `from` refers to `to`: a file and a 1-based line.
type Site = (String, usize);
/// Edges `from -> to` with the first place each comes from.
type Graph = BTreeMap<String, BTreeMap<String, Site>>;

/// Directories (and files) under `src/` that sit on top of the graph.
const ON_TOP: &[&str] = &["lib.rs", "ffi", "bin"];

#[test]
fn src_modules_form_no_import_cycle() {
    let graph = src_graph();
    // Report more than the first cycle: drop the edge that closes each one found, look again.
    let mut rest = graph.clone();
    let mut cycles = Vec::new();
    while let Some(cycle) = find_cycle(&rest) {
        cycles.push(describe(&graph, &cycle));
        let n = cycle.len();
        rest.get_mut(&cycle[n - 2]).unwrap().remove(&cycle[n - 1]);
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules of src/ (each edge with its first reference):\n{}",
        cycles.join("\n  --\n")
    );
}

#[test]
fn no_src_module_uses_the_c_abi() {
    let graph = src_graph();
    let users: Vec<String> = graph
        .iter()
        .filter_map(|(from, to)| {
            to.get("ffi")
                .map(|(file, line)| format!("{from} ({file}:{line})"))
        })
        .collect();
    assert!(
        users.is_empty(),
        "ffi sits on top, yet these modules use it: {users:?}"
    );
}

/// runner -> chat -> tokenizer -> runner, and `error` outside the cycle.
fn three_module_cycle() -> Graph {
    graph_of(
        &[
            ("runner.rs", "use crate::chat::ChatTemplate;\n"),
            ("chat.rs", "use crate::tokenizer::Tokenizer;\n"),
            (
                "tokenizer.rs",
                "use crate::error::Error;\nfn f() -> crate::runner::Runner { todo!() }\n",
            ),
            ("error.rs", ""),
        ],
        "",
    )
}

#[test]
fn a_cycle_through_three_modules_is_found() {
    let cycle = find_cycle(&three_module_cycle());
    assert_eq!(
        cycle.expect("a cycle"),
        ["chat", "tokenizer", "runner", "chat"]
    );
}

#[test]
fn a_cycle_is_described_with_the_reference_behind_each_edge() {
    let graph = three_module_cycle();
    let text = describe(&graph, &find_cycle(&graph).expect("a cycle"));
    assert_eq!(
        text,
        "  chat -> tokenizer (chat.rs:1)\n  tokenizer -> runner (tokenizer.rs:2)\n  runner -> chat (runner.rs:1)"
    );
}

#[test]
fn an_acyclic_graph_has_no_cycle() {
    let graph = graph_of(
        &[
            (
                "runner.rs",
                "use crate::chat::ChatTemplate;\nuse crate::tokenizer::T;\n",
            ),
            ("chat.rs", "use crate::tokenizer::T;\n"),
            ("tokenizer.rs", ""),
        ],
        "",
    );
    assert_eq!(find_cycle(&graph), None);
}

#[test]
fn every_module_of_a_use_group_is_an_edge() {
    let graph = graph_of(
        &[
            (
                "runner.rs",
                "use crate::{\n    chat::{ChatMessage, ChatTemplate},\n    stats::Stats, error,\n};\n",
            ),
            ("chat.rs", ""),
            ("stats.rs", ""),
            ("error.rs", ""),
        ],
        "",
    );
    assert_eq!(targets(&graph, "runner"), ["chat", "error", "stats"]);
}

#[test]
fn a_submodule_file_counts_as_its_top_level_module() {
    let graph = graph_of(
        &[
            ("tokenizer.rs", "mod hf;\n"),
            (
                "tokenizer/hf.rs",
                "use super::Tokenizer;\nuse crate::chat::token_text;\n",
            ),
            ("chat.rs", ""),
        ],
        "",
    );
    assert_eq!(targets(&graph, "tokenizer"), ["chat"]);
}

#[test]
fn super_out_of_a_top_level_file_reaches_the_crate_root() {
    let graph = graph_of(
        &[
            (
                "chat.rs",
                "use super::runner::Runner;\nmod tests {\n    use super::*;\n}\n",
            ),
            ("runner.rs", ""),
        ],
        "",
    );
    assert_eq!(targets(&graph, "chat"), ["runner"]);
}

#[test]
fn an_item_re_exported_by_the_crate_root_is_an_edge_to_its_module() {
    let graph = graph_of(
        &[
            (
                "chat.rs",
                "fn f(r: &mut crate::Runner) -> crate::Result<()> { todo!() }\n",
            ),
            ("runner.rs", ""),
            ("error.rs", ""),
        ],
        "pub use error::{Error, Result};\npub use runner::{Runner, RunnerOptions};\n",
    );
    assert_eq!(targets(&graph, "chat"), ["error", "runner"]);
}

#[test]
fn comments_and_strings_are_not_references() {
    let graph = graph_of(
        &[
            (
                "chat.rs",
                "//! See [`Runner`](crate::runner::Runner).\n\
                 /* crate::runner */ /// [`crate::runner`]\n\
                 const S: &str = \"crate::runner\"; const R: &str = r#\"crate::runner\"#;\n\
                 fn f<'a>(c: char) -> &'a str { if c == '\"' { S } else { R } } // crate::runner\n",
            ),
            ("runner.rs", ""),
        ],
        "",
    );
    assert_eq!(targets(&graph, "chat"), Vec::<&str>::new());
}

#[test]
#[should_panic(expected = "`crate::*` is neither a module")]
fn a_crate_path_that_names_no_module_fails_the_test() {
    graph_of(&[("chat.rs", "use crate::*;\n")], "");
}

/// The modules `from` depends on, sorted.
fn targets<'g>(graph: &'g Graph, from: &str) -> Vec<&'g str> {
    graph[from].keys().map(String::as_str).collect()
}

/// The graph of the crate's own `src/`.
fn src_graph() -> Graph {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect_rs(&src, &src, &mut files);
    assert!(
        files.len() > 10,
        "found only {files:?} under {}",
        src.display()
    );
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("src/lib.rs");
    let sources: Vec<(&str, &str)> = files
        .iter()
        .map(|(p, s)| (p.as_str(), s.as_str()))
        .collect();
    graph_of(&sources, &lib)
}

/// Every `.rs` file under `dir` that is not on top, as (path relative to `src`, source).
fn collect_rs(src: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path
            .strip_prefix(src)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if ON_TOP.contains(&rel.as_str()) {
            continue;
        }
        if path.is_dir() {
            collect_rs(src, &path, out);
        } else if rel.ends_with(".rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            out.push((rel, text));
        }
    }
}

/// The module graph of `files` (paths relative to `src/`, with their source); `lib` is the
/// crate root's source, read for its `pub use module::Item` re-exports.
fn graph_of(files: &[(&str, &str)], lib: &str) -> Graph {
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(p, _)| file_module(p)[0].clone())
        .collect();
    let reexports = root_reexports(lib);
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    for (path, text) in files {
        let file_path = file_module(path);
        let from = file_path[0].clone();
        for (target, line) in references(text, &file_path) {
            let to = if modules.contains(&target) || target == "ffi" {
                target
            } else if let Some(module) = reexports.get(&target) {
                module.clone()
            } else {
                panic!(
                    "{path}:{line}: `crate::{target}` is neither a module of src/ nor an item \
                     that src/lib.rs re-exports with `pub use module::...`"
                );
            };
            if to != from {
                graph
                    .get_mut(&from)
                    .unwrap()
                    .entry(to)
                    .or_insert_with(|| (path.to_string(), line));
            }
        }
    }
    graph
}

/// The module path of a file: `chat.rs` is `[chat]`, `et/mod.rs` is `[et]`,
/// `tokenizer/hf.rs` is `[tokenizer, hf]`.
fn file_module(path: &str) -> Vec<String> {
    let mut parts: Vec<String> = path
        .trim_end_matches(".rs")
        .split('/')
        .map(String::from)
        .collect();
    if parts.len() > 1 && parts.last().map(String::as_str) == Some("mod") {
        parts.pop();
    }
    parts
}

/// `Item -> module` for every `pub use module::Item` and `pub use module::{A, B}` of the
/// crate root.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let code = strip_comments_and_strings(lib);
    let mut map = BTreeMap::new();
    for statement in code.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest
            .strip_prefix("crate::")
            .or(rest.strip_prefix("self::"))
            .unwrap_or(rest);
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let name = item
                .split_once(" as ")
                .map_or(item, |(_, alias)| alias.trim());
            let name = name.rsplit("::").next().unwrap();
            map.insert(name.to_string(), module.trim().to_string());
        }
    }
    map
}

/// The first segment after the crate root of every path in `text` that starts at the
/// root (`crate::x`, `super::...::x` climbing to the root, each member of
/// `crate::{x, y}`) or climbs out of the file's top-level module, with its line.
/// `file_path` is the file's module path.
fn references(text: &str, file_path: &[String]) -> Vec<(String, usize)> {
    let code = strip_comments_and_strings(text);
    let tokens = tokenize(&code);
    let mut found = Vec::new();
    // The module path at each point: the file's, plus the inline `mod x { ... }` entered.
    let mut inline: Vec<(String, usize)> = Vec::new(); // (name, brace depth inside it)
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let (tok, line) = (&tokens[i].0, tokens[i].1);
        match tok.as_str() {
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth = depth.saturating_sub(1);
            }
            "mod" if i + 2 < tokens.len() && tokens[i + 2].0 == "{" => {
                inline.push((tokens[i + 1].0.clone(), depth + 1));
            }
            "crate" | "super" if tokens.get(i + 1).is_some_and(|t| t.0 == "::") => {
                let mut here: Vec<String> = file_path.to_vec();
                here.extend(inline.iter().map(|(n, _)| n.clone()));
                let mut j = i;
                if tok == "crate" {
                    here.clear();
                    j += 2;
                } else {
                    while tokens.get(j).is_some_and(|t| t.0 == "super")
                        && tokens.get(j + 1).is_some_and(|t| t.0 == "::")
                    {
                        here.pop();
                        j += 2;
                    }
                }
                if let Some(top) = here.first() {
                    // Still inside a top-level module: a reference to itself or below.
                    found.push((top.clone(), line));
                } else {
                    for name in first_segments(&tokens, j) {
                        found.push((name, line));
                    }
                }
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// The first segment of the path at `tokens[at]`: one name, or each member's first name
/// of a `{a::b, c, ...}` group. `self` in a group stands for the root and is skipped.
fn first_segments(tokens: &[(String, usize)], at: usize) -> Vec<String> {
    let Some((tok, _)) = tokens.get(at) else {
        return Vec::new();
    };
    if tok != "{" {
        // A glob (`crate::*`) is reported as `*`, which resolves to no module.
        return if is_ident(tok) || tok == "*" {
            vec![tok.clone()]
        } else {
            Vec::new()
        };
    }
    let mut names = Vec::new();
    let mut nesting = 0;
    let mut item_start = true;
    for (tok, _) in &tokens[at + 1..] {
        match tok.as_str() {
            "{" => nesting += 1,
            "}" if nesting == 0 => break,
            "}" => nesting -= 1,
            "," if nesting == 0 => item_start = true,
            t if item_start && nesting == 0 => {
                if is_ident(t) && t != "self" {
                    names.push(t.to_string());
                }
                item_start = false;
            }
            _ => {}
        }
    }
    names
}

fn is_ident(tok: &str) -> bool {
    tok.chars()
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::`, and single punctuation characters, each with its line.
fn tokenize(code: &str) -> Vec<(String, usize)> {
    let chars: Vec<char> = code.chars().collect();
    let mut tokens = Vec::new();
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            tokens.push((chars[start..i].iter().collect(), line));
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            tokens.push(("::".to_string(), line));
            i += 2;
        } else {
            tokens.push((c.to_string(), line));
            i += 1;
        }
    }
    tokens
}

/// `code` with comments, string literals and char literals blanked out (newlines kept,
/// so lines still count).
fn strip_comments_and_strings(code: &str) -> String {
    let c: Vec<char> = code.chars().collect();
    let mut out = String::with_capacity(code.len());
    let blank = |out: &mut String, s: &[char]| {
        out.extend(s.iter().map(|&ch| if ch == '\n' { '\n' } else { ' ' }));
    };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied();
        let start = i;
        if at(0) == Some('/') && at(1) == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(0) == Some('/') && at(1) == Some('*') {
            let mut nesting = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    nesting += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    nesting -= 1;
                    i += 2;
                    if nesting == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if at(0) == Some('r')
            && matches!(at(1), Some('"') | Some('#'))
            && (start == 0 || !(c[start - 1].is_alphanumeric() || c[start - 1] == '_'))
            && {
                let hashes = c[i + 1..].iter().take_while(|&&ch| ch == '#').count();
                c.get(i + 1 + hashes) == Some(&'"')
            }
        {
            let hashes = c[i + 1..].iter().take_while(|&&ch| ch == '#').count();
            i += 2 + hashes;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '"'
                    && c[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&ch| ch == '#')
                        .count()
                        == hashes
                {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if at(0) == Some('"') {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if at(0) == Some('\'') && at(1) == Some('\\') {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if at(0) == Some('\'') && at(2) == Some('\'') {
            i += 3; // 'x'
        } else {
            out.push(c[i]); // code, or the quote of a lifetime
            i += 1;
            continue;
        }
        let end = i.min(c.len());
        blank(&mut out, &c[start..end]);
        i = end;
    }
    out
}

/// A cycle as its modules, the first repeated at the end, if the graph has one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        New,
        OnPath,
        Done,
    }
    fn visit(
        graph: &Graph,
        node: &str,
        state: &mut BTreeMap<String, State>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), State::OnPath);
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(BTreeMap::keys) {
            match state.get(next).copied().unwrap_or(State::New) {
                State::OnPath => {
                    let start = path.iter().position(|n| n == next).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                State::New => {
                    if let Some(cycle) = visit(graph, next, state, path) {
                        return Some(cycle);
                    }
                }
                State::Done => {}
            }
        }
        path.pop();
        state.insert(node.to_string(), State::Done);
        None
    }
    let mut state = BTreeMap::new();
    for node in graph.keys() {
        if state.get(node).copied().unwrap_or(State::New) == State::New {
            if let Some(cycle) = visit(graph, node, &mut state, &mut Vec::new()) {
                return Some(cycle);
            }
        }
    }
    None
}

/// Each edge of `cycle` with the place it comes from, one a line.
fn describe(graph: &Graph, cycle: &[String]) -> String {
    cycle
        .windows(2)
        .map(|pair| {
            let (file, line) = &graph[&pair[0]][&pair[1]];
            format!("  {} -> {} ({file}:{line})", pair[0], pair[1])
        })
        .collect::<Vec<_>>()
        .join("\n")
}
