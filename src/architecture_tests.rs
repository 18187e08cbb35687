//! Checks of the source layout that keep the code easy to carry on: no import cycles between
//! files (a module that needs another must not be needed by it, directly or not), and
//! `routing` stays free of I/O (it may use the configuration and nothing else of the crate).
//!
//! The check reads the sources: every `crate::`, `super::` and `self::` path (use trees
//! expanded) outside `#[cfg(test)]` modules is resolved to the deepest module file it names,
//! following `pub use` re-exports; `mod` declarations and the re-exports themselves are not
//! imports of the file that writes them (a module's facade is not a use of its children).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One source file: its module path (`["proxy", "pipeline"]`) and the paths it imports.
struct SourceFile {
    module: Vec<String>,
    /// Whether it is a `mod.rs` (or the crate root): `super` of its items is its parent.
    is_dir_module: bool,
    paths: Vec<Vec<String>>,
    /// Names it re-exports with `pub use`, and the path each comes from.
    reexports: BTreeMap<String, Vec<String>>,
}

fn source_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            source_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a file under `root` (`a/b.rs` and `a/b/mod.rs` are `["a", "b"]`).
fn module_of(path: &Path, root: &Path) -> (Vec<String>, bool) {
    let relative = path.strip_prefix(root).unwrap_or(path);
    let mut parts: Vec<String> = relative
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    let last = parts.last().cloned().unwrap_or_default();
    if last == "mod" || last == "lib" || last == "main" {
        parts.pop();
        return (parts, true);
    }
    (parts, false)
}

/// The code of a file without comments and without its `#[cfg(test)]` modules (a test may
/// use anything).
fn code_of(text: &str) -> String {
    let mut code = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut pending_cfg_test = false;
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        let trimmed = line.trim();
        if let Some(depth) = skip_depth.as_mut() {
            *depth += line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if *depth <= 0 {
                skip_depth = None;
            }
            continue;
        }
        if trimmed == "#[cfg(test)]" {
            pending_cfg_test = true;
            continue;
        }
        if pending_cfg_test && trimmed.starts_with("mod ") {
            pending_cfg_test = false;
            let depth = line.matches('{').count() as i32 - line.matches('}').count() as i32;
            if depth > 0 {
                skip_depth = Some(depth);
            }
            continue;
        }
        pending_cfg_test = false;
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// Expands a use tree (`a::{b, c::{d, e as f}, self}`) into full paths.
fn expand_use_tree(prefix: &[String], tree: &str, out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if tree.is_empty() {
        return;
    }
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect();
        let mut base = prefix.to_vec();
        base.extend(head);
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let mut depth = 0;
        let mut start = 0;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_use_tree(&base, &inner[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        expand_use_tree(&base, &inner[start..], out);
        return;
    }
    let tree = tree.split(" as ").next().unwrap_or(tree);
    let mut path = prefix.to_vec();
    for segment in tree.split("::").map(str::trim) {
        if segment == "self" && !path.is_empty() {
            continue;
        }
        path.push(segment.to_string());
    }
    out.push(path);
}

fn parse(path: &Path, root: &Path) -> SourceFile {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let code = code_of(&text);
    let (module, is_dir_module) = module_of(path, root);
    let mut paths = Vec::new();
    let mut reexports = BTreeMap::new();
    // `use` statements, with their trees expanded.
    for statement in code.split(';') {
        let statement = statement.trim();
        let (public, tree) = if let Some(rest) = statement.strip_prefix("pub use ") {
            (true, rest)
        } else if let Some(rest) = statement.rsplit_once("\nuse ").map(|(_, r)| r) {
            (false, rest)
        } else if let Some(rest) = statement.strip_prefix("use ") {
            (false, rest)
        } else if let Some(rest) = statement.rsplit_once("pub use ").map(|(_, r)| r) {
            (true, rest)
        } else {
            continue;
        };
        let mut expanded = Vec::new();
        expand_use_tree(&[], tree, &mut expanded);
        for p in expanded {
            // A re-export is a pass-through for importers, not a use by this file.
            if public {
                if let Some(name) = p.last() {
                    reexports.insert(name.clone(), p);
                }
            } else {
                paths.push(p);
            }
        }
    }
    // Paths written inline in code (`crate::metrics::X.inc()`).
    let bytes = code.as_bytes();
    for keyword in ["crate::", "super::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(keyword) {
            let start = from + i;
            from = start + keyword.len();
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let end = code[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| start + e);
            let path: Vec<String> = code[start..end]
                .split("::")
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            paths.push(path);
        }
    }
    SourceFile {
        module,
        is_dir_module,
        paths,
        reexports,
    }
}

/// The module a path names, from the file that wrote it: the deepest known module along the
/// path, following re-exports of the modules it passes.
fn resolve(
    file: &SourceFile,
    path: &[String],
    files: &BTreeMap<Vec<String>, SourceFile>,
    depth: usize,
) -> Option<Vec<String>> {
    let (mut current, rest) = match path.first().map(String::as_str) {
        Some("crate") => (Vec::new(), &path[1..]),
        Some("super") => {
            let mut base = file.module.clone();
            let mut rest = path;
            // `super` of a file module is its directory's module; of a mod.rs, the parent.
            if !file.is_dir_module {
                base.pop();
                rest = &path[1..];
            }
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        Some("self") => (file.module.clone(), &path[1..]),
        // A path relative to the file's module (`use child::Item` in a mod.rs).
        Some(first) => {
            let base = if file.is_dir_module {
                file.module.clone()
            } else {
                file.module[..file.module.len().saturating_sub(1)].to_vec()
            };
            let mut child = base.clone();
            child.push(first.to_string());
            if !file.is_dir_module || !files.contains_key(&child) {
                return None;
            }
            (base, path)
        }
        None => return None,
    };
    for (i, segment) in rest.iter().enumerate() {
        let mut next = current.clone();
        next.push(segment.clone());
        if files.contains_key(&next) {
            current = next;
            continue;
        }
        // An item of `current`: re-exported from elsewhere?
        if depth < 8 {
            if let Some(module) = files.get(&current) {
                if let Some(source) = module.reexports.get(segment) {
                    let mut full = source.clone();
                    full.extend(rest[i + 1..].iter().cloned());
                    if let Some(target) = resolve(module, &full, files, depth + 1) {
                        return Some(target);
                    }
                }
            }
        }
        break;
    }
    Some(current)
}

/// Import edges between the files under `root` (the crate root file is not a node: it only
/// declares modules and re-exports).
fn import_graph(root: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut paths = Vec::new();
    source_files(root, &mut paths);
    let files: BTreeMap<Vec<String>, SourceFile> = paths
        .iter()
        .map(|p| {
            let file = parse(p, root);
            (file.module.clone(), file)
        })
        .collect();
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, file) in &files {
        if module.is_empty() {
            continue;
        }
        let edges = graph.entry(module.clone()).or_default();
        for path in &file.paths {
            if let Some(target) = resolve(file, path, &files, 0) {
                if !target.is_empty() && target != *module {
                    edges.insert(target);
                }
            }
        }
    }
    graph
}

/// Every cycle's files (strongly connected components of more than one file).
fn cycles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    // Reachability closure; small graphs (a hundred files) make this cheap.
    let nodes: Vec<&Vec<String>> = graph.keys().collect();
    let reach = |from: &Vec<String>| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(node) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&Vec<String>, BTreeSet<Vec<String>>> =
        nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    for node in &nodes {
        let component: Vec<String> = nodes
            .iter()
            .filter(|other| reachable[*node].contains(**other) && reachable[*other].contains(*node))
            .map(|n| n.join("::"))
            .collect();
        if component.len() > 1 {
            found.insert(component);
        }
    }
    found.into_iter().collect()
}

fn crate_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

#[test]
fn no_import_cycles_between_files() {
    // The router, the wire crate both it and gitnode use, and gitnode.
    for (dir, at_least) in [("src", 50), ("crates/wire/src", 10), ("gitnode/src", 10)] {
        let graph = import_graph(&crate_dir(dir));
        assert!(
            graph.len() >= at_least,
            "{dir}: read too few files: {}",
            graph.len()
        );
        let found = cycles(&graph);
        assert!(
            found.is_empty(),
            "{dir}: files importing each other: {found:#?}"
        );
    }
}

#[test]
fn routing_uses_only_the_configuration() {
    let graph = import_graph(&crate_dir("src"));
    for (module, edges) in graph.iter().filter(|(m, _)| m[0] == "routing") {
        for target in edges {
            assert!(
                target[0] == "routing" || target[0] == "config",
                "{} imports {}",
                module.join("::"),
                target.join("::")
            );
        }
    }
}

#[test]
fn the_checker_sees_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "mod a;\nmod b;\nmod c;\n");
    write("a/mod.rs", "mod x;\npub use x::Thing;\nuse crate::b::B;\n");
    write("a/x.rs", "pub struct Thing;\n");
    write("b.rs", "use super::c::{self, C};\npub struct B;\n#[cfg(test)]\nmod tests {\n    use crate::a::x::Thing;\n}\n");
    write("c.rs", "pub struct C(crate::a::Thing);\n");
    let graph = import_graph(dir.path());
    assert!(cycles(&graph).is_empty(), "{graph:?}");
    // c -> a::x (through the re-export), b -> c, a -> b: no cycle until x imports b.
    write("a/x.rs", "pub struct Thing(crate::b::B);\n");
    let graph = import_graph(dir.path());
    assert_eq!(
        cycles(&graph),
        vec![vec!["a::x".to_string(), "b".to_string(), "c".to_string()]],
        "{graph:?}"
    );
}
