//! Tests of the loader as a whole: the broken configurations under
//! `testdata/config/` (each names the errors it must produce), the example
//! configuration, defaults and path resolution.
//!
//! A case file starts with comment lines:
//! - `# expect: LINE:COL: TEXT`: an error at LINE:COL whose rendered text
//!   (message and help) contains TEXT; the set of positions must match
//!   exactly, so no other error may appear;
//! - `# file: PATH MODE`: a file to create (dummy PEM text, octal MODE)
//!   besides the dev-PKI files every case gets.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\nTUlJQg==\n-----END CERTIFICATE-----\n";
const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\nTUlJQg==\n-----END PRIVATE KEY-----\n";

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Writes a dummy PEM file with the given mode, creating its folder.
fn write_file(path: &Path, mode: u32) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let text = if path.to_string_lossy().contains(".key") {
        KEY_PEM
    } else {
        CERT_PEM
    };
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// The dev-PKI files the example and the cases name: certificates 0644,
/// private keys 0600.
fn write_dev_pki(dir: &Path) {
    write_file(&dir.join("pki/ca.crt.pem"), 0o644);
    write_file(&dir.join("pki/gateway.crt.pem"), 0o644);
    write_file(&dir.join("pki/gateway.key.pem"), 0o600);
    write_file(&dir.join("pki/gateway-signing.key.pem"), 0o600);
}

#[derive(Debug)]
struct Expect {
    line: usize,
    col: usize,
    text: String,
}

struct Case {
    name: String,
    text: String,
    expects: Vec<Expect>,
    files: Vec<(String, u32)>,
}

fn parse_case(path: &Path) -> Case {
    let name = path.file_stem().unwrap().to_string_lossy().into_owned();
    let text = fs::read_to_string(path).unwrap();
    let mut expects = Vec::new();
    let mut files = Vec::new();
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(rest) = line.strip_prefix("# expect: ") {
            let mut parts = rest.splitn(3, ':');
            let (Some(l), Some(c), Some(t)) = (parts.next(), parts.next(), parts.next()) else {
                panic!("{name}: malformed expect line: {line}");
            };
            expects.push(Expect {
                line: l.trim().parse().unwrap(),
                col: c.trim().parse().unwrap(),
                text: t.trim().to_string(),
            });
        } else if let Some(rest) = line.strip_prefix("# file: ") {
            let (p, mode) = rest.rsplit_once(' ').unwrap();
            files.push((p.to_string(), u32::from_str_radix(mode, 8).unwrap()));
        }
    }
    Case {
        name,
        text,
        expects,
        files,
    }
}

fn cases() -> Vec<Case> {
    let mut paths: Vec<PathBuf> = fs::read_dir(manifest_dir().join("testdata/config"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| parse_case(p)).collect()
}

/// Runs one case in a fresh folder; returns a description of each mismatch.
fn run_case(case: &Case) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    write_dev_pki(dir.path());
    for (p, mode) in &case.files {
        write_file(&dir.path().join(p), *mode);
    }
    let file = dir.path().join(format!("{}.toml", case.name));
    fs::write(&file, &case.text).unwrap();
    let errors = match load(&file) {
        Ok(_) => return vec![format!("{}: loaded without errors", case.name)],
        Err(e) => e,
    };
    let mut problems = Vec::new();
    let got: BTreeSet<(usize, usize)> = errors.errors.iter().map(|e| (e.line, e.col)).collect();
    let want: BTreeSet<(usize, usize)> = case.expects.iter().map(|e| (e.line, e.col)).collect();
    if got != want {
        problems.push(format!(
            "{}: error positions {got:?}, expected {want:?}",
            case.name
        ));
    }
    for x in &case.expects {
        let matched = errors
            .errors
            .iter()
            .any(|e| e.line == x.line && e.col == x.col && e.to_string().contains(&x.text));
        if !matched {
            problems.push(format!(
                "{}: no error at {}:{} containing {:?}",
                case.name, x.line, x.col, x.text
            ));
        }
    }
    if !problems.is_empty() {
        problems.push(format!("{}: got:\n{errors}", case.name));
    }
    problems
}

#[test]
fn every_broken_config_reports_exactly_its_expected_errors() {
    let cases = cases();
    assert!(cases.len() >= 14, "only {} cases", cases.len());
    let mut problems = Vec::new();
    for case in &cases {
        if case.expects.is_empty() {
            problems.push(format!("{}: no `# expect:` line", case.name));
            continue;
        }
        problems.extend(run_case(case));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n"));
}

#[test]
fn errors_name_the_file_as_given_and_sort_by_position() {
    let dir = tempfile::tempdir().unwrap();
    write_dev_pki(dir.path());
    let case = parse_case(&manifest_dir().join("testdata/config/several_errors.toml"));
    let file = dir.path().join("gateway.toml");
    fs::write(&file, &case.text).unwrap();
    let errors = load(&file).unwrap_err();
    let positions: Vec<_> = errors.errors.iter().map(|e| (e.line, e.col)).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted);
    let shown = errors.to_string();
    let prefix = format!("{}:", file.display());
    assert!(
        shown
            .lines()
            .filter(|l| !l.starts_with("  help: "))
            .all(|l| l.starts_with(&prefix)),
        "{shown}"
    );
    assert!(shown.ends_with('\n'));
}

/// The example configuration, loaded from a folder with the dev-PKI files.
fn load_example() -> Config {
    let dir = tempfile::tempdir().unwrap();
    write_dev_pki(dir.path());
    let file = dir.path().join("gateway.toml");
    fs::copy(manifest_dir().join("gateway.example.toml"), &file).unwrap();
    match load(&file) {
        Ok(c) => c,
        Err(e) => panic!("the example configuration has errors:\n{e}"),
    }
}

#[test]
fn the_example_config_loads_without_errors_with_the_16_tank_tags() {
    let cfg = load_example();
    assert_eq!(cfg.gateway.id, "plant1-gw1");
    assert!(cfg.gateway.data_dir.ends_with("data"));
    assert!(cfg
        .signing
        .key_file
        .ends_with("pki/gateway-signing.key.pem"));
    assert_eq!(cfg.mqtt.host, "localhost");
    assert_eq!(cfg.mqtt.port, 8883);
    assert_eq!(cfg.mqtt.client_id, "plant1-gw1");
    assert_eq!(cfg.mqtt.tls.min_version, TlsVersion::Tls13);
    assert!(cfg.mqtt.tls.ca_file.ends_with("pki/ca.crt.pem"));
    assert!(cfg.mqtt.tls.cert_file.ends_with("pki/gateway.crt.pem"));
    assert!(cfg.mqtt.tls.key_file.ends_with("pki/gateway.key.pem"));
    assert_eq!(cfg.devices.len(), 1);
    let DeviceConfig::Modbus(plc) = &cfg.devices[0] else {
        panic!("a Modbus device")
    };
    assert_eq!(plc.name, "plc1");
    assert_eq!(plc.address, "127.0.0.1:5020");
    assert_eq!(plc.unit_id, 1);
    assert_eq!(plc.tags.len(), 16);
}

/// One row of the table in `docs/tank-register-map.md`.
fn register_map() -> Vec<ModbusTag> {
    let doc = fs::read_to_string(manifest_dir().join("../docs/tank-register-map.md")).unwrap();
    doc.lines()
        .filter(|l| l.starts_with("| tank1."))
        .map(|l| {
            let c: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            let data_type = match c[3] {
                "bool" => DataType::Bool,
                "u16" => DataType::U16,
                "i16" => DataType::I16,
                "u32" => DataType::U32,
                "i32" => DataType::I32,
                "u64" => DataType::U64,
                "f32" => DataType::F32,
                "f64" => DataType::F64,
                s => {
                    let n = s
                        .strip_prefix("string (")
                        .and_then(|s| s.strip_suffix(" registers)"))
                        .unwrap_or_else(|| panic!("type {s}"));
                    DataType::String {
                        registers: n.parse().unwrap(),
                    }
                }
            };
            ModbusTag {
                name: c[0].into(),
                area: match c[1] {
                    "coil" => Area::Coil,
                    "discrete_input" => Area::DiscreteInput,
                    "input_register" => Area::InputRegister,
                    "holding_register" => Area::HoldingRegister,
                    a => panic!("area {a}"),
                },
                address: c[2].parse().unwrap(),
                data_type,
                order: match c[4] {
                    "" | "ABCD" => ByteOrder::Abcd,
                    "BADC" => ByteOrder::Badc,
                    "CDAB" => ByteOrder::Cdab,
                    "DCBA" => ByteOrder::Dcba,
                    o => panic!("order {o}"),
                },
                scale: (!c[5].is_empty()).then(|| c[5].parse().unwrap()),
                offset: None,
                // A parenthesised "unit" is an explanation (an enumeration), not a unit.
                unit: (!c[6].is_empty() && !c[6].starts_with('(')).then(|| c[6].to_string()),
                writable: c[7] == "yes",
            }
        })
        .collect()
}

#[test]
fn the_example_config_reads_exactly_the_documented_register_map() {
    let cfg = load_example();
    let DeviceConfig::Modbus(plc) = &cfg.devices[0] else {
        panic!("a Modbus device")
    };
    let documented = register_map();
    assert_eq!(documented.len(), 16);
    assert_eq!(plc.tags, documented);
}

#[test]
fn defaults_apply_and_relative_paths_resolve_against_the_config_folder() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("site");
    write_dev_pki(&conf);
    let text = r#"
[gateway]
id = "gw"
data_dir = "state"
[signing]
key_file = "pki/gateway-signing.key.pem"
[mqtt]
host = "broker"
[mqtt.tls]
ca_file = "pki/ca.crt.pem"
cert_file = "pki/gateway.crt.pem"
key_file = "pki/gateway.key.pem"
[[devices]]
name = "d"
protocol = "modbus-tcp"
address = "plc.local:502"
[[devices.tags]]
name = "t"
area = "input_register"
address = 3
type = "i16"
"#;
    let cfg = parse_str(&conf.join("gateway.toml"), text).unwrap();
    assert_eq!(cfg.source, conf.join("gateway.toml"));
    assert_eq!(cfg.gateway.data_dir, conf.join("state"));
    assert_eq!(cfg.mqtt.tls.key_file, conf.join("pki/gateway.key.pem"));
    let m = &cfg.mqtt;
    assert_eq!(m.port, 8883);
    assert_eq!(m.client_id, "gw");
    assert_eq!(m.topic_prefix, "twin");
    assert_eq!(m.keep_alive, Duration::from_secs(30));
    assert_eq!(m.max_message_bytes, 131_072);
    assert_eq!(m.flush_interval, Duration::from_millis(5));
    assert_eq!(m.reported_interval, Duration::from_millis(1000));
    assert_eq!(m.reconnect_min, Duration::from_millis(500));
    assert_eq!(m.reconnect_max, Duration::from_millis(30_000));
    assert_eq!(m.tls.min_version, TlsVersion::Tls13);
    assert_eq!(m.tls.server_name, None);
    let DeviceConfig::Modbus(d) = &cfg.devices[0] else {
        panic!("a Modbus device")
    };
    assert_eq!(d.unit_id, 1);
    assert_eq!(d.poll_interval, Duration::from_millis(1000));
    assert_eq!(d.request_timeout, Duration::from_millis(1000));
    assert_eq!(d.max_gap_registers, 8);
    assert_eq!(d.max_registers_per_request, 125);
    assert_eq!(d.max_bits_per_request, 2000);
    assert_eq!(d.reconnect_min, Duration::from_millis(200));
    assert_eq!(d.reconnect_max, Duration::from_millis(10_000));
    let t = &d.tags[0];
    assert_eq!(t.order, ByteOrder::Abcd);
    assert_eq!(
        (t.scale, t.offset, t.unit.as_deref(), t.writable),
        (None, None, None, false)
    );

    // An absolute path is kept as written.
    let abs = conf.join("pki/ca.crt.pem");
    let text = text.replace(
        "ca_file = \"pki/ca.crt.pem\"",
        &format!("ca_file = \"{}\"", abs.display()),
    );
    let cfg = parse_str(Path::new("/elsewhere/gateway.toml"), &text).unwrap_err();
    // Only the relative files are now missing (resolved against /elsewhere).
    assert_eq!(cfg.errors.len(), 3, "{cfg}");
    assert!(
        cfg.errors
            .iter()
            .all(|e| e.message.contains("/elsewhere/pki/")),
        "{cfg}"
    );
}

#[test]
fn an_unreadable_or_non_utf8_file_is_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let e = load(&missing).unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert_eq!((e.errors[0].line, e.errors[0].col), (0, 0));
    assert!(e
        .to_string()
        .starts_with(&format!("{}: error: cannot read", missing.display())));

    let bad = dir.path().join("bad.toml");
    fs::write(&bad, b"[gateway]\nid = \"gw\xff\"\n").unwrap();
    let e = load(&bad).unwrap_err();
    assert_eq!(e.errors.len(), 1);
    assert_eq!((e.errors[0].line, e.errors[0].col), (2, 9));
    assert!(e.errors[0].message.contains("UTF-8"));
}
