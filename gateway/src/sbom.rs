//! The gateway's software bill of materials (SBOM) and build information, as
//! published in the signed asset inventory.
//!
//! Both are made at build time by `gateway/build.rs`:
//! - [`SBOM_JSON`]: a CycloneDX 1.5 JSON document whose metadata component is
//!   the gateway and whose components are the packages the `gateway` binary is
//!   built from, resolved from the workspace `Cargo.lock` (normal and build
//!   dependencies, transitively; dev-dependencies excluded), each crates.io
//!   package with its `Cargo.lock` SHA-256 checksum. It is deterministic: the
//!   same `Cargo.lock` gives the same bytes, hence the same [`sbom_sha256`].
//! - [`build()`]: the version, git commit, compiler, target and profile.
//!
//! The commit is the `TWIN_BUILD_COMMIT` environment variable at build time
//! when set (the container build has no `.git`), else `git rev-parse HEAD`
//! with `-dirty` when tracked files had changes, else `unknown`. Git is asked
//! when the build script runs (a new commit, a `Cargo.lock` or manifest
//! change), so the `-dirty` mark of a local build can be stale: release builds
//! set `TWIN_BUILD_COMMIT`.

use serde::de::IgnoredAny;
use std::sync::OnceLock;

/// The CycloneDX 1.5 JSON SBOM written by `build.rs`.
pub const SBOM_JSON: &str = include_str!(concat!(env!("OUT_DIR"), "/sbom.cdx.json"));

/// The lowercase hex SHA-256 of [`SBOM_JSON`].
pub fn sbom_sha256() -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, SBOM_JSON.as_bytes());
    digest
        .as_ref()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// The number of components (packages other than the gateway) in the SBOM.
pub fn component_count() -> usize {
    #[derive(serde::Deserialize)]
    struct Components {
        components: Vec<IgnoredAny>,
    }
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let bom: Components = serde_json::from_str(SBOM_JSON)
            .expect("build.rs serializes the SBOM with serde_json, always with a components array");
        bom.components.len()
    })
}

/// What the running gateway was built from.
#[derive(Debug, Clone, serde::Serialize, PartialEq, Eq)]
pub struct Build {
    /// The gateway package version.
    pub version: String,
    /// The git commit (`-dirty` when tracked files had changes), or `unknown`.
    pub commit: String,
    /// `rustc --version` of the compiler.
    pub rustc: String,
    /// The target triple, such as `x86_64-unknown-linux-musl`.
    pub target: String,
    /// The cargo profile: `debug` or `release`.
    pub profile: String,
}

/// The build information of this binary.
pub fn build() -> Build {
    Build {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        commit: env!("TWIN_BUILD_COMMIT").to_owned(),
        rustc: env!("TWIN_BUILD_RUSTC").to_owned(),
        target: env!("TWIN_BUILD_TARGET").to_owned(),
        profile: env!("TWIN_BUILD_PROFILE").to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    fn bom() -> Value {
        serde_json::from_str(SBOM_JSON).unwrap()
    }

    fn components() -> Vec<Value> {
        bom()["components"].as_array().unwrap().clone()
    }

    fn text(value: &Value, field: &str) -> String {
        value[field].as_str().unwrap().to_owned()
    }

    fn workspace_root() -> &'static Path {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
    }

    fn read_toml(path: &Path) -> toml::Table {
        std::fs::read_to_string(path).unwrap().parse().unwrap()
    }

    /// The `[[package]]` entries of the workspace Cargo.lock.
    fn lock_packages() -> Vec<toml::Table> {
        let lock = read_toml(&workspace_root().join("Cargo.lock"));
        let packages = lock["package"].as_array().unwrap();
        packages
            .iter()
            .map(|p| p.as_table().unwrap().clone())
            .collect()
    }

    fn field<'a>(package: &'a toml::Table, name: &str) -> Option<&'a str> {
        package.get(name).and_then(toml::Value::as_str)
    }

    fn lock_dependency_entries(package: &toml::Table) -> Vec<String> {
        let entries = package.get("dependencies").and_then(toml::Value::as_array);
        let entries = entries.map(Vec::as_slice).unwrap_or_default();
        entries
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect()
    }

    /// The version of `name` the gateway is built with, as Cargo.lock says:
    /// the only package of that name, or the version in the gateway's entry.
    fn locked_version_for_gateway(name: &str) -> String {
        let packages = lock_packages();
        let named: Vec<&toml::Table> = packages
            .iter()
            .filter(|p| field(p, "name") == Some(name))
            .collect();
        if let [only] = named.as_slice() {
            return field(only, "version").unwrap().to_owned();
        }
        let gateway = packages
            .iter()
            .find(|p| field(p, "name") == Some("gateway"))
            .unwrap();
        let entry = lock_dependency_entries(gateway)
            .into_iter()
            .find(|e| e.split(' ').next() == Some(name))
            .unwrap();
        entry.split(' ').nth(1).unwrap().to_owned()
    }

    /// Package names reachable from the gateway without dev-dependencies,
    /// by name only (so a superset): the independent check that a package
    /// is dev-only before asserting that the SBOM leaves it out.
    fn names_reachable_without_dev_dependencies() -> BTreeSet<String> {
        let root = workspace_root();
        let root_manifest = read_toml(&root.join("Cargo.toml"));
        let mut member_manifests = BTreeMap::new();
        for member in root_manifest["workspace"]["members"].as_array().unwrap() {
            let path = root.join(member.as_str().unwrap()).join("Cargo.toml");
            let manifest = read_toml(&path);
            let name = manifest["package"]["name"].as_str().unwrap().to_owned();
            member_manifests.insert(name, manifest);
        }
        let packages = lock_packages();
        let mut reached = BTreeSet::new();
        let mut queue = vec!["gateway".to_owned()];
        while let Some(name) = queue.pop() {
            if !reached.insert(name.clone()) {
                continue;
            }
            if let Some(manifest) = member_manifests.get(&name) {
                let mut owners = vec![manifest];
                if let Some(platforms) = manifest.get("target").and_then(toml::Value::as_table) {
                    owners.extend(platforms.values().filter_map(toml::Value::as_table));
                }
                for owner in owners {
                    for kind in ["dependencies", "build-dependencies"] {
                        if let Some(table) = owner.get(kind).and_then(toml::Value::as_table) {
                            queue.extend(table.keys().cloned());
                        }
                    }
                }
            } else {
                for package in packages.iter().filter(|p| field(p, "name") == Some(&name)) {
                    for entry in lock_dependency_entries(package) {
                        queue.push(entry.split(' ').next().unwrap().to_owned());
                    }
                }
            }
        }
        reached
    }

    #[test]
    fn sbom_is_cyclonedx_1_5_json_describing_the_gateway() {
        let bom = bom();
        assert_eq!(bom["bomFormat"], "CycloneDX");
        assert_eq!(bom["specVersion"], "1.5");
        assert_eq!(bom["version"], 1);
        let gateway = &bom["metadata"]["component"];
        assert_eq!(gateway["type"], "application");
        assert_eq!(gateway["name"], "gateway");
        assert_eq!(gateway["version"], env!("CARGO_PKG_VERSION"));
        let purl = format!("pkg:cargo/gateway@{}", env!("CARGO_PKG_VERSION"));
        assert_eq!(gateway["purl"], purl.as_str());
        assert!(!bom["metadata"]["tools"]["components"]
            .as_array()
            .unwrap()
            .is_empty());
        assert!(bom.get("serialNumber").is_none());
        assert!(bom["metadata"].get("timestamp").is_none());
        assert!(components().iter().all(|c| c["name"] != "gateway"));
    }

    #[test]
    fn sbom_lists_runtime_dependencies_at_their_locked_versions() {
        let components = components();
        for name in [
            "tokio",
            "rumqttc",
            "redb",
            "async-opcua",
            "twin-model",
            "rustls",
            "aws-lc-rs",
        ] {
            let version = locked_version_for_gateway(name);
            assert!(
                components
                    .iter()
                    .any(|c| c["name"] == name && c["version"] == version.as_str()),
                "{name} {version} is missing from the SBOM"
            );
        }
    }

    #[test]
    fn every_crates_io_component_carries_its_lock_checksum() {
        let packages = lock_packages();
        for component in components() {
            let (name, version) = (text(&component, "name"), text(&component, "version"));
            let locked = packages
                .iter()
                .find(|p| field(p, "name") == Some(&name) && field(p, "version") == Some(&version))
                .unwrap_or_else(|| panic!("{name} {version} is not in Cargo.lock"));
            match field(locked, "checksum") {
                Some(checksum) => {
                    let hashes = component["hashes"].as_array().unwrap();
                    assert_eq!(hashes.len(), 1, "{name} {version}");
                    assert_eq!(hashes[0]["alg"], "SHA-256");
                    assert_eq!(hashes[0]["content"], checksum, "{name} {version}");
                    assert_eq!(
                        text(&component, "purl"),
                        format!("pkg:cargo/{name}@{}", version.replace('+', "%2B"))
                    );
                }
                None => assert!(
                    component.get("hashes").is_none(),
                    "{name} is a workspace member"
                ),
            }
            assert_eq!(component["bom-ref"], component["purl"]);
            assert_eq!(component["type"], "library");
        }
    }

    #[test]
    fn dev_only_dependencies_are_left_out() {
        let reachable = names_reachable_without_dev_dependencies();
        let names: BTreeSet<String> = components().iter().map(|c| text(c, "name")).collect();
        for dev_only in ["jsonschema", "proptest", "tempfile"] {
            assert!(
                !reachable.contains(dev_only),
                "{dev_only} is now reachable through normal dependencies; pick another dev-only name"
            );
            assert!(
                !names.contains(dev_only),
                "{dev_only} is only a dev-dependency"
            );
        }
    }

    #[test]
    fn dependency_graph_covers_every_component_and_names_only_components() {
        let bom = bom();
        let mut refs: BTreeSet<String> = components().iter().map(|c| text(c, "bom-ref")).collect();
        refs.insert(text(&bom["metadata"]["component"], "bom-ref"));
        let dependencies = bom["dependencies"].as_array().unwrap();
        let listed: BTreeSet<String> = dependencies.iter().map(|d| text(d, "ref")).collect();
        assert_eq!(listed, refs);
        for dependency in dependencies {
            for target in dependency["dependsOn"].as_array().unwrap() {
                assert!(
                    refs.contains(target.as_str().unwrap()),
                    "{target} is not a component"
                );
            }
        }
    }

    #[test]
    fn component_bom_refs_are_unique_and_sorted_by_name_then_version() {
        let components = components();
        let refs: BTreeSet<String> = components.iter().map(|c| text(c, "bom-ref")).collect();
        assert_eq!(refs.len(), components.len());
        let numeric = |version: &str| -> Vec<u64> {
            let core = version.split(['-', '+']).next().unwrap();
            core.split('.').map(|part| part.parse().unwrap()).collect()
        };
        for pair in components.windows(2) {
            let (a, b) = (text(&pair[0], "name"), text(&pair[1], "name"));
            assert!(a <= b, "{a} is listed before {b}");
            if a == b {
                let (va, vb) = (text(&pair[0], "version"), text(&pair[1], "version"));
                assert!(
                    numeric(&va) < numeric(&vb),
                    "{a} {va} is listed before {vb}"
                );
            }
        }
        assert_eq!(component_count(), components.len());
    }

    #[test]
    fn sbom_sha256_is_lowercase_hex_of_the_document() {
        let hash = sbom_sha256();
        assert_eq!(hash.len(), 64);
        assert!(hash
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(hash, sbom_sha256());
    }

    #[test]
    fn build_reports_the_crate_version_and_a_target() {
        let build = build();
        assert_eq!(build.version, env!("CARGO_PKG_VERSION"));
        assert!(!build.target.is_empty());
        assert!(!build.commit.is_empty());
        assert!(build.rustc.starts_with("rustc "), "{}", build.rustc);
        assert!(!build.profile.is_empty());
    }
}
