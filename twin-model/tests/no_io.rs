//! `twin-model` does no I/O: it must not depend, even indirectly, on an
//! async runtime, sockets, an MQTT client or a database. Checked against
//! `Cargo.lock` (the crates actually resolved), following only the normal
//! dependencies named in `twin-model/Cargo.toml`.

use std::collections::{BTreeMap, BTreeSet};

/// Crates whose presence would mean I/O in the shared vocabulary.
const FORBIDDEN: &[&str] = &[
    "tokio",
    "mio",
    "socket2",
    "async-std",
    "rumqttc",
    "redb",
    "tokio-modbus",
    "async-opcua",
    "reqwest",
    "hyper",
];

/// `Cargo.lock` as name -> [(version, dependency entries)].
fn lock() -> BTreeMap<String, Vec<(String, Vec<String>)>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock"))
        .expect("the workspace has a Cargo.lock");
    let mut out: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
    for block in text.split("[[package]]").skip(1) {
        let field = |key: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{key} = \"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        let (Some(name), Some(version)) = (field("name"), field("version")) else {
            continue;
        };
        let deps = block
            .split("dependencies = [")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .map(|list| {
                list.lines()
                    .map(|l| l.trim().trim_end_matches(',').trim_matches('"').to_owned())
                    .filter(|l| !l.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        out.entry(name).or_default().push((version, deps));
    }
    out
}

/// The normal dependencies named in twin-model's manifest.
fn manifest_dependencies() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("twin-model/Cargo.toml");
    text.split("\n[dependencies]\n")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [dependencies] table")
        .lines()
        .filter_map(|l| l.split(['.', '=', ' ']).next())
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn twin_model_depends_on_no_runtime_socket_or_database_crate() {
    let lock = lock();
    // "name", "name version" or "name version (source)".
    let resolve = |entry: &str| -> Option<(String, String)> {
        let mut parts = entry.split(' ');
        let name = parts.next()?.to_owned();
        let versions = lock.get(&name)?;
        let version = match parts.next() {
            Some(v) => v.to_owned(),
            None => versions.first()?.0.clone(),
        };
        Some((name, version))
    };
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(String, String)> = manifest_dependencies()
        .iter()
        .map(|n| resolve(n).unwrap_or_else(|| panic!("{n} is not in Cargo.lock")))
        .collect();
    assert!(
        todo.iter().any(|(n, _)| n == "serde"),
        "the manifest was read"
    );
    while let Some((name, version)) = todo.pop() {
        if !seen.insert((name.clone(), version.clone())) {
            continue;
        }
        let deps = lock
            .get(&name)
            .and_then(|vs| vs.iter().find(|(v, _)| *v == version))
            .map(|(_, d)| d.clone())
            .unwrap_or_default();
        todo.extend(deps.iter().filter_map(|d| resolve(d)));
    }
    let found: Vec<&String> = seen
        .iter()
        .map(|(n, _)| n)
        .filter(|n| FORBIDDEN.contains(&n.as_str()))
        .collect();
    assert!(
        found.is_empty(),
        "twin-model must do no I/O, but it reaches {found:?}"
    );
    assert!(seen.len() > 5, "the closure was computed: {seen:?}");
}
