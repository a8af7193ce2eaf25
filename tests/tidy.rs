//! The shape of the workspace, checked: which crate may depend on which (the direction drawn
//! in ARCHITECTURE.md), where the storage engine, the consensus library and the transport may
//! be named, and that no crate's modules import each other in a circle. These are facts of the
//! source tree, so they are ordinary tests that read `cargo metadata` and the `.rs` files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The front ends: each may use the service crate, and nothing else of ours.
const PROTOCOLS: &[&str] = &[
    "mailgrid-smtp",
    "mailgrid-imap",
    "mailgrid-pop3",
    "mailgrid-outbound",
    "mailgrid-web",
];

/// Which workspace crates each workspace crate may depend on (any kind of dependency).
fn allowed(package: &str) -> Option<&'static [&'static str]> {
    const BELOW_PROTOCOLS: &[&str] = &["mailgrid-service"];
    Some(match package {
        "mailgrid-storage" => &[],
        "mailgrid-raft" => &["mailgrid-storage"],
        "mailgrid-service" => &["mailgrid-storage", "mailgrid-raft"],
        p if PROTOCOLS.contains(&p) => BELOW_PROTOCOLS,
        // The binary wires everything together; the drivers use it and the service's client.
        "mailgrid" => &[
            "mailgrid-storage",
            "mailgrid-raft",
            "mailgrid-service",
            "mailgrid-smtp",
            "mailgrid-imap",
            "mailgrid-pop3",
            "mailgrid-outbound",
            "mailgrid-web",
        ],
        "chaos" | "bench" => &[
            "mailgrid",
            "mailgrid-service",
            "mailgrid-storage",
            "mailgrid-raft",
        ],
        _ => return None,
    })
}

/// Outside crates that only one of ours may name: the crate, and the one place allowed.
const CONFINED: &[(&str, &str, &str)] = &[
    ("sled", "mailgrid-storage", "storage/src/"),
    ("openraft", "mailgrid-raft", "raft/src/"),
    ("quinn", "mailgrid-raft", "raft/src/transport.rs"),
];

struct Package {
    name: String,
    dir: PathBuf,
    deps: Vec<String>,
}

fn workspace() -> (PathBuf, Vec<Package>) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let root = PathBuf::from(meta["workspace_root"].as_str().expect("workspace_root"));
    let packages = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().expect("name").to_string(),
            dir: Path::new(p["manifest_path"].as_str().expect("manifest_path"))
                .parent()
                .expect("manifest in a directory")
                .to_path_buf(),
            deps: p["dependencies"]
                .as_array()
                .expect("dependencies")
                .iter()
                .map(|d| d["name"].as_str().expect("dependency name").to_string())
                .collect(),
        })
        .collect();
    (root, packages)
}

#[test]
fn crates_depend_only_downward() {
    // Goal: Cargo enforces the direction: storage ← raft ← service ← protocols ← mailgrid,
    // no protocol crate on another or on raft/storage, and every new crate given a place.
    let (_, packages) = workspace();
    let ours: BTreeSet<&str> = packages.iter().map(|p| p.name.as_str()).collect();
    let mut wrong = Vec::new();
    for p in &packages {
        let Some(allowed) = allowed(&p.name) else {
            wrong.push(format!(
                "{} is not placed in the layering (tests/tidy.rs `allowed`)",
                p.name
            ));
            continue;
        };
        for dep in p.deps.iter().filter(|d| ours.contains(d.as_str())) {
            if !allowed.contains(&dep.as_str()) {
                wrong.push(format!("{} depends on {dep}", p.name));
            }
        }
    }
    assert!(wrong.is_empty(), "against the layering: {wrong:#?}");
}

#[test]
fn storage_consensus_and_transport_libraries_stay_in_their_crates() {
    // Goal: sled only in storage, openraft only in raft, quinn only in raft's transport module,
    // both as dependencies and as paths in the source.
    let (root, packages) = workspace();
    let mut wrong = Vec::new();
    for p in &packages {
        for (lib, owner, _) in CONFINED {
            if p.name != *owner && p.deps.iter().any(|d| d == lib) {
                wrong.push(format!("{} depends on {lib}", p.name));
            }
        }
        for file in rust_files(&p.dir) {
            let rel = file.strip_prefix(&root).expect("inside the workspace");
            let rel = rel.to_string_lossy().replace('\\', "/");
            let code = code_of(&std::fs::read_to_string(&file).expect("readable source"));
            for (lib, _, place) in CONFINED {
                if mentions_path(&code, lib) && !rel.starts_with(place) {
                    wrong.push(format!("{rel} names `{lib}::` (allowed only in {place})"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "outside their crates: {wrong:#?}");
}

#[test]
fn modules_import_each_other_in_no_circle() {
    // Goal: within every crate, the top-level modules form a graph without cycles, so each
    // can be read (and later split out) knowing only what it depends on.
    let (_, packages) = workspace();
    let mut cycles = Vec::new();
    for p in &packages {
        let src = p.dir.join("src");
        let graph = module_graph(&src);
        for cycle in find_cycles(&graph) {
            cycles.push(format!("{}: {}", p.name, cycle.join(" → ")));
        }
    }
    assert!(cycles.is_empty(), "module cycles: {cycles:#?}");
}

#[test]
fn the_checks_see_what_they_look_for() {
    // Goal: the helpers above would notice a violation (a tidy test that finds nothing because
    // its scanner is blind passes for the wrong reason).
    // (Built at run time: this file is scanned too.)
    let import = format!("use {}::Db;", "sled");
    assert!(mentions_path(&code_of(&import), "sled"));
    assert!(!mentions_path(
        &code_of("// sled::Db is the engine"),
        "sled"
    ));
    assert!(!mentions_path(&code_of("let x = mysled::Db;"), "sled"));
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["c".to_string()]));
    graph.insert("c".to_string(), BTreeSet::from(["a".to_string()]));
    graph.insert("d".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(find_cycles(&graph), vec![vec!["a", "b", "c", "a"]]);
    graph.get_mut("c").expect("c").clear();
    assert!(find_cycles(&graph).is_empty());
    let refs = module_refs("use crate::{alpha, beta::X};\nuse super::gamma;\n", true);
    assert_eq!(
        refs,
        BTreeSet::from(["alpha", "beta", "gamma"].map(String::from))
    );
}

/// Every `.rs` file under `dir`, skipping build output and other packages' directories.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                // A subdirectory with its own manifest is another package (the workspace root
                // holds them all); `target` and dot-directories are not source.
                let nested = path != dir && path.join("Cargo.toml").exists();
                if !nested && name != "target" && !name.starts_with('.') {
                    stack.push(path);
                }
            } else if name.ends_with(".rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Source without line comments (doc links mention paths without depending on them) and
/// without the unit tests at the end of a file.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|line| match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `code` holds the path `lib::` as a path root (not as the tail of another name).
fn mentions_path(code: &str, lib: &str) -> bool {
    let needle = format!("{lib}::");
    code.match_indices(&needle).any(|(i, _)| {
        let before = code[..i].chars().next_back();
        !matches!(before, Some(c) if c.is_alphanumeric() || c == '_' || c == ':')
    })
}

/// The top-level modules of the crate at `src` and which others each one imports.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let Ok(entries) = std::fs::read_dir(src) else {
        return BTreeMap::new();
    };
    let mut modules = BTreeSet::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if entry.path().is_dir() {
            modules.insert(name);
        } else if let Some(stem) = name.strip_suffix(".rs") {
            if stem != "lib" && stem != "main" {
                modules.insert(stem.to_string());
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    for file in rust_files(src) {
        let rel = file.strip_prefix(src).expect("inside src");
        let mut parts = rel.iter().map(|p| p.to_string_lossy().to_string());
        let first = parts.next().expect("a file name");
        let top_level = rel.components().count() == 1;
        let module = first.strip_suffix(".rs").unwrap_or(&first).to_string();
        if !modules.contains(&module) {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&file).expect("readable source"));
        // `super::` from a top-level module's own file is the crate root.
        for target in module_refs(&code, top_level) {
            if target != module && modules.contains(&target) {
                graph.get_mut(&module).expect("module").insert(target);
            }
        }
    }
    graph
}

/// The names right after `crate::` (and `super::` when `super_is_root`), including each name
/// of a `crate::{a, b::c}` group.
fn module_refs(code: &str, super_is_root: bool) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut roots = vec!["crate::"];
    if super_is_root {
        roots.push("super::");
    }
    for root in roots {
        for (i, _) in code.match_indices(root) {
            let rest = &code[i + root.len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let group = &group[..group.find('}').unwrap_or(group.len())];
                for item in group.split(',') {
                    let name = leading_ident(item.trim());
                    if !name.is_empty() {
                        refs.insert(name.to_string());
                    }
                }
            } else {
                let name = leading_ident(rest);
                if !name.is_empty() {
                    refs.insert(name.to_string());
                }
            }
        }
    }
    refs
}

fn leading_ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// Each cycle once, as the path from its smallest module back to itself.
fn find_cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut cycles = Vec::new();
    let mut seen_sets = BTreeSet::new();
    for start in graph.keys() {
        // Depth-first search for a path back to `start` through modules after it in order,
        // so each cycle is reported from its smallest member only.
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut visited = BTreeSet::new();
        while let Some((node, path)) = stack.pop() {
            for next in graph.get(&node).into_iter().flatten() {
                if next == start {
                    let set: BTreeSet<String> = path.iter().cloned().collect();
                    if seen_sets.insert(set) {
                        let mut cycle = path.clone();
                        cycle.push(start.clone());
                        cycles.push(cycle);
                    }
                } else if next > start && visited.insert(next.clone()) {
                    let mut longer = path.clone();
                    longer.push(next.clone());
                    stack.push((next.clone(), longer));
                }
            }
        }
    }
    cycles
}
