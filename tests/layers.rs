//! The layer map of docs/architecture.md, checked: every `crate::` path in `src/` names a module
//! of the same layer or a lower one, and no two top-level modules import each other, directly
//! or through others. A new top-level module must be given a layer here and in the doc.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top. Modules of one layer may import each other, as long as no cycle forms.
const LAYERS: &[&[&str]] = &[
    &["codec"],
    &["clock", "topic", "metrics"],
    &["config", "logging", "tls", "auth"],
    &["receipt", "message"],
    &["router", "retain", "store", "receipts", "cluster"],
    &["session"],
    &["broker"],
    &["connection"],
    &["listener", "http", "sys", "figures", "pressure", "webhook"],
    &["server"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (None for lib.rs and main.rs).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
    (name != "lib" && name != "main").then_some(name)
}

/// Every top-level module a source text names with `crate::`, including inside
/// `use crate::{a, b::c}` groups. Comments are skipped: a doc line may mention a module.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else { continue };
        let text = std::fs::read_to_string(&file).unwrap();
        let deps = graph.entry(module.clone()).or_default();
        for dep in imports(&text) {
            if dep != module {
                deps.insert(dep);
            }
        }
    }
    graph
}

#[test]
fn every_module_has_a_layer() {
    let missing: Vec<String> = graph().keys().filter(|m| layer_of(m).is_none()).cloned().collect();
    assert!(missing.is_empty(), "modules without a layer in tests/layers.rs: {missing:?}");
}

#[test]
fn no_module_imports_from_a_higher_layer() {
    let mut upward = Vec::new();
    for (module, deps) in graph() {
        let Some(own) = layer_of(&module) else { continue };
        for dep in deps {
            match layer_of(&dep) {
                Some(l) if l > own => upward.push(format!("{module} (layer {own}) -> {dep} (layer {l})")),
                None => upward.push(format!("{module} -> {dep} (no layer)")),
                _ => {}
            }
        }
    }
    assert!(upward.is_empty(), "imports from a higher layer:\n{}", upward.join("\n"));
}

#[test]
fn no_cycle_between_top_level_modules() {
    let graph = graph();
    // Depth-first search with colours; a grey node met again closes a cycle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
        cycles: &mut Vec<String>,
    ) {
        colour.insert(node.to_owned(), 1);
        path.push(node.to_owned());
        for dep in graph.get(node).into_iter().flatten() {
            match colour.get(dep.as_str()).copied().unwrap_or(0) {
                0 => visit(dep, graph, colour, path, cycles),
                1 => {
                    let from = path.iter().position(|p| p == dep).unwrap();
                    cycles.push(format!("{} -> {dep}", path[from..].join(" -> ")));
                }
                _ => {}
            }
        }
        path.pop();
        colour.insert(node.to_owned(), 2);
    }
    let mut colour = BTreeMap::new();
    let mut cycles = Vec::new();
    for node in graph.keys() {
        if colour.get(node.as_str()).copied().unwrap_or(0) == 0 {
            visit(node, &graph, &mut colour, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

/// The check itself catches what it is for: an upward import and a cycle in a made-up graph of
/// source texts.
#[test]
fn the_import_reader_sees_grouped_and_nested_paths() {
    let text = "use crate::{codec::QoS, topic};\nlet x = crate::broker::Broker::open(c); // crate::server\n";
    let found: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(found, vec!["broker", "codec", "topic"]);
}
