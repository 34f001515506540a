//! Build script of the gateway: a software bill of materials (SBOM) and build
//! information, both read by `src/sbom.rs`.
//!
//! # The SBOM
//! `$OUT_DIR/sbom.cdx.json` is a CycloneDX 1.5 JSON document listing the
//! packages the `gateway` binary is built from, taken from the workspace
//! `Cargo.lock` by this reachability rule:
//!
//! - start at the workspace member `gateway` (the document's metadata
//!   component, not one of its components);
//! - from a workspace member (a lock package without `source`), follow only
//!   the dependencies its own `Cargo.toml` names in `[dependencies]` and
//!   `[build-dependencies]`, including their `[target.*]` variants;
//! - from a registry package, follow its `dependencies` list in `Cargo.lock`.
//!
//! Dev-dependencies are left out because they are built only for tests,
//! examples and benches and never ship in the binary; but `Cargo.lock` lists a
//! member's dev-dependencies among its dependencies without telling them
//! apart, which is why members are followed through their manifests. (The lock
//! never records the dev-dependencies of registry packages.)
//!
//! The rule over-reports rather than omits: the lock records every platform's
//! target-specific dependencies and every optional dependency enabled anywhere
//! in the workspace, and all of them are listed.
//!
//! The document is deterministic (no timestamp, no serial number, everything
//! sorted): the same `Cargo.lock` and manifests give the same bytes.
//!
//! # Build information
//! `TWIN_BUILD_COMMIT`, `TWIN_BUILD_RUSTC`, `TWIN_BUILD_TARGET` and
//! `TWIN_BUILD_PROFILE` are passed to the compiler as environment variables.
//! The commit is the `TWIN_BUILD_COMMIT` environment variable when set (the
//! container build has no `.git`), else `git rev-parse HEAD` with `-dirty`
//! when tracked files have changes, else `unknown`. Git never fails the build.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace member the SBOM describes.
const ROOT_PACKAGE: &str = "gateway";
/// How `Cargo.lock` names crates.io as a package source.
const CRATES_IO: &str = "registry+https://github.com/rust-lang/crates.io-index";

fn main() {
    if let Err(message) = run() {
        eprintln!("error: the gateway build script failed: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    println!("cargo:rerun-if-changed=build.rs");
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or("the gateway package has no parent directory (the workspace root)")?;
    let lock = Lock::read(&root.join("Cargo.lock"))?;
    let workspace = Workspace::read(root)?;
    let graph = Graph::reachable(&lock, &workspace, &manifest_dir.join("Cargo.toml"))?;
    let json = sbom_json(&lock, &graph, &env_var("CARGO_PKG_VERSION")?)?;
    let out = PathBuf::from(env_var("OUT_DIR")?).join("sbom.cdx.json");
    std::fs::write(&out, json).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    emit_build_info(root);
    Ok(())
}

fn env_var(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|e| format!("environment variable {name}: {e}"))
}

/// Re-runs the build script when `path` changes.
fn watch(path: &Path) {
    println!("cargo:rerun-if-changed={}", path.display());
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    watch(path);
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("cannot parse {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------
// Cargo.lock

/// A package's index in [`Lock::packages`].
type PackageId = usize;

#[derive(Deserialize)]
struct Lock {
    #[serde(rename = "package", default)]
    packages: Vec<LockPackage>,
}

#[derive(Deserialize)]
struct LockPackage {
    name: String,
    version: String,
    /// `None` for workspace members (and other path packages).
    source: Option<String>,
    /// The SHA-256 of the `.crate` file, for registry packages.
    checksum: Option<String>,
    /// `"name"`, `"name version"` or `"name version (source)"`: as much as
    /// needed to tell the package apart from others of the same name.
    #[serde(default)]
    dependencies: Vec<String>,
}

impl Lock {
    fn read(path: &Path) -> Result<Self, String> {
        read_toml(path)
    }

    fn package(&self, id: PackageId) -> &LockPackage {
        &self.packages[id]
    }

    /// The workspace member called `name`.
    fn member(&self, name: &str) -> Result<PackageId, String> {
        self.find(name, None, None)
            .and_then(|id| match self.package(id).source {
                None => Ok(id),
                Some(_) => Err(format!("`{name}` in Cargo.lock is not a workspace member")),
            })
    }

    /// The packages `id` depends on according to the lock (dev-dependencies
    /// of workspace members included).
    fn dependencies(&self, id: PackageId) -> Result<Vec<PackageId>, String> {
        let package = self.package(id);
        package
            .dependencies
            .iter()
            .map(|entry| self.resolve(entry))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                format!(
                    "Cargo.lock, dependencies of {} {}: {e}",
                    package.name, package.version
                )
            })
    }

    /// The package a lock dependency entry names.
    fn resolve(&self, entry: &str) -> Result<PackageId, String> {
        let (name, rest) = match entry.split_once(' ') {
            Some((name, rest)) => (name, Some(rest)),
            None => (entry, None),
        };
        let (version, source) = match rest.map(|rest| rest.split_once(' ')) {
            None => (None, None),
            Some(None) => (rest, None),
            Some(Some((version, source))) => {
                let source = source.trim_start_matches('(').trim_end_matches(')');
                (Some(version), Some(source))
            }
        };
        self.find(name, version, source)
    }

    fn find(
        &self,
        name: &str,
        version: Option<&str>,
        source: Option<&str>,
    ) -> Result<PackageId, String> {
        let found: Vec<PackageId> = (0..self.packages.len())
            .filter(|&id| {
                let package = self.package(id);
                package.name == name
                    && version.is_none_or(|v| package.version == v)
                    && source.is_none_or(|s| package.source.as_deref() == Some(s))
            })
            .collect();
        match found.as_slice() {
            [id] => Ok(*id),
            [] => Err(format!(
                "no package `{name}` {} in Cargo.lock",
                version.unwrap_or("")
            )),
            _ => Err(format!(
                "`{name}` names {} packages in Cargo.lock",
                found.len()
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Workspace manifests

/// The workspace root and its `[workspace.dependencies]`, which member
/// manifests inherit with `foo.workspace = true`.
struct Workspace {
    root: PathBuf,
    dependencies: toml::Table,
}

/// A dependency as a member manifest declares it.
struct DependencySpec {
    /// The package name (differs from the table key after `package = "…"`).
    package: String,
    /// The version requirement, if any.
    requirement: Option<String>,
    /// The package directory, for a path (workspace member) dependency.
    path: Option<PathBuf>,
}

impl Workspace {
    fn read(root: &Path) -> Result<Self, String> {
        let manifest: toml::Table = read_toml(&root.join("Cargo.toml"))?;
        let dependencies = manifest
            .get("workspace")
            .and_then(|w| w.get("dependencies"))
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default();
        Ok(Self {
            root: root.to_path_buf(),
            dependencies,
        })
    }

    /// The dependencies a member manifest declares for the build, that is in
    /// `[dependencies]` and `[build-dependencies]` and their `[target.*]`
    /// variants, and not in `[dev-dependencies]`.
    fn build_dependencies(&self, manifest_path: &Path) -> Result<Vec<DependencySpec>, String> {
        let manifest: toml::Table = read_toml(manifest_path)?;
        let member_dir = manifest_path.parent().unwrap_or(Path::new("."));
        let platforms = manifest.get("target").and_then(toml::Value::as_table);
        let platform_tables = platforms
            .into_iter()
            .flat_map(|platforms| platforms.values())
            .filter_map(toml::Value::as_table);
        let mut specs = Vec::new();
        for owner in std::iter::once(&manifest).chain(platform_tables) {
            for kind in ["dependencies", "build-dependencies"] {
                let Some(table) = owner.get(kind).and_then(toml::Value::as_table) else {
                    continue;
                };
                for (key, value) in table {
                    let spec = self.spec(key, value, member_dir).map_err(|e| {
                        format!("{}, [{kind}] `{key}`: {e}", manifest_path.display())
                    })?;
                    specs.push(spec);
                }
            }
        }
        Ok(specs)
    }

    /// Reads one dependency declaration, inheriting from the workspace when it
    /// says `workspace = true`.
    fn spec(&self, key: &str, value: &toml::Value, base: &Path) -> Result<DependencySpec, String> {
        let inherits = value.get("workspace").and_then(toml::Value::as_bool) == Some(true);
        if inherits {
            let inherited = self
                .dependencies
                .get(key)
                .ok_or("`workspace = true` but [workspace.dependencies] does not declare it")?;
            return self.spec(key, inherited, &self.root);
        }
        let text = |field: &str| {
            value
                .get(field)
                .and_then(toml::Value::as_str)
                .map(str::to_owned)
        };
        Ok(DependencySpec {
            package: text("package").unwrap_or_else(|| key.to_owned()),
            requirement: value
                .as_str()
                .map(str::to_owned)
                .or_else(|| text("version")),
            path: text("path").map(|p| base.join(p)),
        })
    }
}

/// Whether `version` (from `Cargo.lock`) meets the requirement `requirement`
/// (from a manifest). Knows the caret (`"1"`, `"^0.17"`) and exact
/// (`"=0.61.2"`) forms; any other requirement matches every version, so that
/// an ambiguous dependency is over-reported rather than dropped.
fn requirement_matches(requirement: &str, version: &str) -> bool {
    let requirement = requirement.trim();
    let (exact, requirement) = match requirement.strip_prefix('=') {
        Some(rest) => (true, rest.trim()),
        None => (
            false,
            requirement.strip_prefix('^').unwrap_or(requirement).trim(),
        ),
    };
    let (Some(wanted), Some(have)) = (numeric_parts(requirement), numeric_parts(version)) else {
        return true;
    };
    if have.len() != 3 {
        return true;
    }
    let given = &have[..wanted.len()];
    if exact {
        return given == wanted.as_slice();
    }
    // Caret: the same up to the first non-zero part given, and not older.
    let fixed = wanted
        .iter()
        .position(|&p| p != 0)
        .map_or(wanted.len(), |i| i + 1);
    have[..fixed] == wanted[..fixed] && given >= wanted.as_slice()
}

/// `[major, minor, patch]` (or a prefix of it) of a version or requirement,
/// ignoring pre-release and build metadata.
fn numeric_parts(version: &str) -> Option<Vec<u64>> {
    let core = version.split(['-', '+']).next()?;
    let parts: Vec<u64> = core
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    (1..=3).contains(&parts.len()).then_some(parts)
}

// ---------------------------------------------------------------------------
// Reachability

/// The packages reachable from the root member, each with the packages it
/// depends on.
struct Graph {
    root: PackageId,
    edges: BTreeMap<PackageId, BTreeSet<PackageId>>,
}

impl Graph {
    fn reachable(lock: &Lock, workspace: &Workspace, root_manifest: &Path) -> Result<Self, String> {
        let root = lock.member(ROOT_PACKAGE)?;
        let mut manifests = BTreeMap::from([(root, root_manifest.to_path_buf())]);
        let mut edges = BTreeMap::new();
        let mut queue = VecDeque::from([root]);
        while let Some(id) = queue.pop_front() {
            if edges.contains_key(&id) {
                continue;
            }
            let dependencies = match manifests.get(&id) {
                Some(manifest) => {
                    let found = member_dependencies(lock, workspace, id, manifest)?;
                    for (dependency, path) in &found {
                        if let Some(dir) = path {
                            manifests.insert(*dependency, dir.join("Cargo.toml"));
                        }
                    }
                    found
                        .into_iter()
                        .map(|(dependency, _)| dependency)
                        .collect()
                }
                None if lock.package(id).source.is_none() => {
                    let name = &lock.package(id).name;
                    return Err(format!(
                        "path package `{name}` is not reached through a `path` dependency"
                    ));
                }
                None => lock.dependencies(id)?,
            };
            queue.extend(dependencies.iter().copied());
            edges.insert(id, dependencies.into_iter().collect());
        }
        Ok(Self { root, edges })
    }
}

/// The lock packages a workspace member builds with, each with its package
/// directory if it is a path dependency: the member's lock dependencies that
/// its manifest declares outside `[dev-dependencies]`.
fn member_dependencies(
    lock: &Lock,
    workspace: &Workspace,
    member: PackageId,
    manifest: &Path,
) -> Result<Vec<(PackageId, Option<PathBuf>)>, String> {
    let locked = lock.dependencies(member)?;
    let mut found = Vec::new();
    for spec in workspace.build_dependencies(manifest)? {
        let matching = locked.iter().copied().filter(|&id| {
            let package = lock.package(id);
            package.name == spec.package
                && spec.path.is_some() == package.source.is_none()
                && spec
                    .requirement
                    .as_deref()
                    .is_none_or(|r| requirement_matches(r, &package.version))
        });
        let before = found.len();
        found.extend(matching.map(|id| (id, spec.path.clone())));
        if found.len() == before {
            return Err(format!(
                "{} declares `{}` but Cargo.lock records no matching dependency of `{}`",
                manifest.display(),
                spec.package,
                lock.package(member).name,
            ));
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------------------
// The CycloneDX document

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bom {
    bom_format: &'static str,
    spec_version: &'static str,
    version: u32,
    metadata: Metadata,
    components: Vec<Component>,
    dependencies: Vec<Dependency>,
}

#[derive(Serialize)]
struct Metadata {
    tools: Tools,
    component: Component,
}

#[derive(Serialize)]
struct Tools {
    components: Vec<Tool>,
}

#[derive(Serialize)]
struct Tool {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'static str,
    version: String,
    description: &'static str,
}

#[derive(Serialize)]
struct Component {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "bom-ref")]
    bom_ref: String,
    name: String,
    version: String,
    purl: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    hashes: Vec<Hash>,
}

#[derive(Serialize)]
struct Hash {
    alg: &'static str,
    content: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Dependency {
    #[serde(rename = "ref")]
    reference: String,
    depends_on: Vec<String>,
}

/// The SBOM as pretty-printed JSON, ending with a newline.
fn sbom_json(lock: &Lock, graph: &Graph, version: &str) -> Result<String, String> {
    let order = |ids: &mut Vec<PackageId>| ids.sort_by_key(|&id| sort_key(lock.package(id)));
    let mut reached: Vec<PackageId> = graph.edges.keys().copied().collect();
    order(&mut reached);
    let components = reached
        .iter()
        .filter(|&&id| id != graph.root)
        .map(|&id| component(lock.package(id), "library"))
        .collect();
    let dependencies = reached
        .iter()
        .map(|id| {
            let mut depends_on: Vec<PackageId> = graph.edges[id].iter().copied().collect();
            order(&mut depends_on);
            Dependency {
                reference: purl(lock.package(*id)),
                depends_on: depends_on.iter().map(|&d| purl(lock.package(d))).collect(),
            }
        })
        .collect();
    let gateway = lock.package(graph.root);
    if gateway.version != version {
        return Err(format!(
            "Cargo.lock has gateway {} but the package is {version}",
            gateway.version
        ));
    }
    let bom = Bom {
        bom_format: "CycloneDX",
        spec_version: "1.5",
        version: 1,
        metadata: Metadata {
            tools: Tools {
                components: vec![Tool {
                    kind: "application",
                    name: "gateway/build.rs",
                    version: version.to_owned(),
                    description: "the gateway build script: Cargo.lock packages reachable from \
                                  the gateway, dev-dependencies excluded",
                }],
            },
            component: component(gateway, "application"),
        },
        components,
        dependencies,
    };
    // Compact: it travels over MQTT (`gateway sbom` prints it indented).
    serde_json::to_string(&bom).map_err(|e| format!("cannot write the SBOM: {e}"))
}

fn component(package: &LockPackage, kind: &'static str) -> Component {
    let hashes = package
        .checksum
        .iter()
        .map(|checksum| Hash {
            alg: "SHA-256",
            content: checksum.clone(),
        })
        .collect();
    Component {
        kind,
        bom_ref: purl(package),
        name: package.name.clone(),
        version: package.version.clone(),
        purl: purl(package),
        hashes,
    }
}

/// Components are listed by name, then by version (numerically).
fn sort_key(package: &LockPackage) -> (&str, Option<Vec<u64>>, &str) {
    (
        &package.name,
        numeric_parts(&package.version),
        &package.version,
    )
}

/// `pkg:cargo/<name>@<version>`, plus the source for packages not from
/// crates.io (so that two same-named packages keep distinct references).
fn purl(package: &LockPackage) -> String {
    let purl = format!(
        "pkg:cargo/{}@{}",
        percent_encode(&package.name),
        percent_encode(&package.version)
    );
    match package.source.as_deref() {
        None | Some(CRATES_IO) => purl,
        Some(source) => match source.strip_prefix("git+") {
            Some(_) => format!("{purl}?vcs_url={}", percent_encode(source)),
            None => {
                let url = source.split_once('+').map_or(source, |(_, url)| url);
                format!("{purl}?repository_url={}", percent_encode(url))
            }
        },
    }
}

/// Percent-encodes all but unreserved characters and `:` (as the purl
/// specification asks; a `+` in build metadata becomes `%2B`).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b':' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Build information

fn emit_build_info(root: &Path) {
    println!("cargo:rerun-if-env-changed=TWIN_BUILD_COMMIT");
    let commit = match std::env::var("TWIN_BUILD_COMMIT") {
        Ok(commit) if !commit.trim().is_empty() => commit,
        _ => git_commit(root).unwrap_or_else(|| "unknown".to_owned()),
    };
    let rustc = std::env::var("RUSTC")
        .ok()
        .and_then(|rustc| command_output(Command::new(rustc).arg("--version")));
    let env_or_unknown = |name| std::env::var(name).unwrap_or_else(|_| "unknown".to_owned());
    rustc_env("TWIN_BUILD_COMMIT", &commit);
    rustc_env("TWIN_BUILD_RUSTC", rustc.as_deref().unwrap_or("unknown"));
    rustc_env("TWIN_BUILD_TARGET", &env_or_unknown("TARGET"));
    rustc_env("TWIN_BUILD_PROFILE", &env_or_unknown("PROFILE"));
}

/// Passes a single-line value to the compiler (a newline would end the
/// `cargo:` instruction).
fn rustc_env(name: &str, value: &str) {
    let value = value.lines().next().unwrap_or("").trim();
    println!("cargo:rustc-env={name}={value}");
}

/// `HEAD`'s commit, with `-dirty` when tracked files have changes; `None`
/// when git is missing or `root` is not in a git checkout.
fn git_commit(root: &Path) -> Option<String> {
    watch_git_head(root);
    let head = git(root, &["rev-parse", "HEAD"]).filter(|head| !head.is_empty())?;
    let status = git(root, &["status", "--porcelain", "--untracked-files=no"]);
    let dirty = status.is_some_and(|status| !status.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

/// Re-runs the build script on a new commit or checkout: watches `HEAD` and
/// the ref it points to (or `packed-refs` when the ref is packed).
fn watch_git_head(root: &Path) {
    let Some(head) = git_path(root, "HEAD") else {
        return;
    };
    watch(&head);
    let Ok(text) = std::fs::read_to_string(&head) else {
        return;
    };
    if let Some(reference) = text.trim().strip_prefix("ref: ") {
        let file = git_path(root, reference).or_else(|| git_path(root, "packed-refs"));
        if let Some(file) = file {
            watch(&file);
        }
    }
}

/// A file in the git directory, if it exists (cargo would re-run the script
/// on every build for a watched file that does not exist).
fn git_path(root: &Path, name: &str) -> Option<PathBuf> {
    let path = root.join(git(root, &["rev-parse", "--git-path", name])?);
    path.exists().then_some(path)
}

fn git(root: &Path, args: &[&str]) -> Option<String> {
    command_output(Command::new("git").args(args).current_dir(root))
}

/// The trimmed standard output of a command that succeeded.
fn command_output(command: &mut Command) -> Option<String> {
    let output = command.output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8(output.stdout)
        .ok()
        .map(|s| s.trim().to_owned())
}
