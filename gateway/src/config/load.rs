//! `gateway.toml` -> [`Config`]: parse, read every section, check the rules
//! that span several values, check the files the configuration names.
//!
//! Stages, in order:
//! 1. syntax: the TOML parser recovers and reports every syntax error; if
//!    there is any, the file is not read further (a half-parsed table would
//!    only add misleading "missing key" errors);
//! 2. sections: every table is read key by key ([`super::read`]): unknown
//!    keys, missing keys, wrong types and out-of-range values;
//! 3. tags: the rules of one tag (area and type, byte order, scale, width,
//!    writability), then those across tags (unique names, no overlapping
//!    registers);
//! 4. files: certificates and keys exist and are readable, private keys
//!    are not open to group or others.
//!
//! Every stage reports all it finds; the result is a [`Config`] only when
//! nothing was found.

use std::collections::HashMap;
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_spanned::Spanned;

use super::errors::{ConfigError, ConfigErrors};
use super::model::*;
use super::position::LineIndex;
use super::read::{parse_document, Field, Reader, Table};
use super::registers::{overlaps, Claim};
use crate::keyfile::{self, KeyFileError};

/// Reads, parses and validates a configuration file, and checks the files it
/// names. Relative paths in it are resolved against the file's folder.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let whole_file = |message: String| {
        ConfigErrors::new(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            col: 0,
            message,
            help: None,
        }])
    };
    let bytes = fs::read(path).map_err(|e| whole_file(format!("cannot read the file: {e}")))?;
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let prefix = String::from_utf8_lossy(&e.as_bytes()[..valid]);
            let (line, col) = LineIndex::new(&prefix).position(valid);
            return Err(ConfigErrors::new(vec![ConfigError {
                file: path.to_path_buf(),
                line,
                col,
                message: "the file is not valid UTF-8".into(),
                help: Some("save the file as UTF-8".into()),
            }]));
        }
    };
    parse_str(path, &text)
}

/// Parses and validates configuration text as if read from
/// `path_for_messages`: errors name that file, and relative paths are
/// resolved against its folder (the files they name are checked too).
pub fn parse_str(path_for_messages: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut r = Reader::new(path_for_messages, text);
    let Some(root) = parse_document(
        &mut r,
        text,
        "a key or a [table] may be defined only once; repeated tables are written [[name]]",
    ) else {
        return Err(ConfigErrors::new(r.into_errors()));
    };
    let base = path_for_messages
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let root_table = Table {
        table: root.get_ref(),
        span: 0..0,
        name: "the top level".into(),
    };
    let mut loader = Loader {
        r,
        base,
        source: path_for_messages,
        checks: Default::default(),
    };
    let config = loader.config(&root_table);
    let errors = loader.r.into_errors();
    match config {
        Some(config) if errors.is_empty() => Ok(config),
        _ if !errors.is_empty() => Err(ConfigErrors::new(errors)),
        // Every read that yields no value reports why; this is a safety net.
        _ => Err(ConfigErrors::new(vec![ConfigError {
            file: path_for_messages.to_path_buf(),
            line: 0,
            col: 0,
            message: "the configuration is incomplete".into(),
            help: None,
        }])),
    }
}

/// Known protocols of `[[devices]]`.
#[derive(Debug, Clone, Copy)]
enum Protocol {
    ModbusTcp,
    OpcUa,
}

const PROTOCOLS: &[(&str, Protocol)] = &[
    ("modbus-tcp", Protocol::ModbusTcp),
    ("opcua", Protocol::OpcUa),
];

const AREAS: &[(&str, Area)] = &[
    ("coil", Area::Coil),
    ("discrete_input", Area::DiscreteInput),
    ("input_register", Area::InputRegister),
    ("holding_register", Area::HoldingRegister),
];

/// `None` stands for "string", whose width comes from `length_registers`.
const TYPES: &[(&str, Option<DataType>)] = &[
    ("bool", Some(DataType::Bool)),
    ("u16", Some(DataType::U16)),
    ("i16", Some(DataType::I16)),
    ("u32", Some(DataType::U32)),
    ("i32", Some(DataType::I32)),
    ("u64", Some(DataType::U64)),
    ("i64", Some(DataType::I64)),
    ("f32", Some(DataType::F32)),
    ("f64", Some(DataType::F64)),
    ("string", None),
];

const ORDERS: &[(&str, ByteOrder)] = &[
    ("ABCD", ByteOrder::Abcd),
    ("BADC", ByteOrder::Badc),
    ("CDAB", ByteOrder::Cdab),
    ("DCBA", ByteOrder::Dcba),
];

const TLS_VERSIONS: &[(&str, TlsVersion)] =
    &[("1.3", TlsVersion::Tls13), ("1.2", TlsVersion::Tls12)];

const FULL_POLICIES: &[(&str, FullPolicy)] = &[
    ("drop_oldest", FullPolicy::DropOldest),
    ("drop_newest", FullPolicy::DropNewest),
];

/// Upper bound of any `reconnect_*_ms`: one hour.
const MAX_RECONNECT_MS: i64 = 3_600_000;

fn type_name(t: DataType) -> &'static str {
    match t {
        DataType::String { .. } => "string",
        t => TYPES
            .iter()
            .find(|(_, d)| *d == Some(t))
            .map_or("?", |(n, _)| n),
    }
}

fn area_name(a: Area) -> &'static str {
    AREAS.iter().find(|(_, x)| *x == a).map_or("?", |(n, _)| n)
}

/// What one unit of an area is called, in the plural.
fn area_units(a: Area) -> &'static str {
    match a {
        Area::Coil => "coils",
        Area::DiscreteInput => "discrete inputs",
        Area::InputRegister => "input registers",
        Area::HoldingRegister => "holding registers",
    }
}

fn valid_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.chars().count() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(super) fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Where a tag sits, for the checks across tags.
struct TagClaim {
    name: String,
    area: Area,
    range: Range<u32>,
    address_span: Range<usize>,
}

/// One tag as read: each part `None` when invalid (and reported).
struct TagRead {
    tag: Option<ModbusTag>,
    /// The name, for the uniqueness check across devices.
    name: Option<Spanned<String>>,
    /// Where it sits, for the overlap check.
    claim: Option<TagClaim>,
}

/// A tag's name as written, for the uniqueness check.
pub(super) struct NameSeen {
    line: usize,
    device: String,
}

pub(super) struct Loader<'a> {
    pub(super) r: Reader<'a>,
    /// The tags' `check` tables, by tag name.
    pub(super) checks: std::collections::BTreeMap<String, TagChecks>,
    /// The config file's folder; relative paths are resolved against it.
    base: PathBuf,
    source: &'a Path,
}

impl Loader<'_> {
    fn config(&mut self, root: &Table<'_, '_>) -> Option<Config> {
        self.r.unknown_keys(
            root,
            &[
                "gateway", "signing", "mqtt", "outbox", "audit", "commands", "metrics", "watch",
                "devices",
            ],
        );
        let gateway = self
            .section(root, "gateway", "[gateway]")
            .and_then(|t| self.gateway(&t));
        let signing = self
            .section(root, "signing", "[signing]")
            .and_then(|t| self.signing(&t));
        let gateway_id = gateway.as_ref().map(|g| g.id.clone());
        let mqtt = self
            .section(root, "mqtt", "[mqtt]")
            .and_then(|t| self.mqtt(&t, gateway_id.as_deref()));
        let outbox = self.outbox(root);
        let audit = self.audit(root, gateway.as_ref().map(|g| g.data_dir.as_path()));
        let commands = self.commands(root);
        let metrics = self.metrics(root);
        let watch = self.watch(root);
        let devices = self.devices(root);
        Some(Config {
            source: self.source.to_path_buf(),
            gateway: gateway?,
            signing: signing?,
            mqtt: mqtt?,
            outbox: outbox?,
            audit: audit?,
            commands: commands?,
            metrics: metrics?,
            watch: watch?,
            devices: devices?,
            checks: std::mem::take(&mut self.checks),
        })
    }

    /// A required table.
    fn section<'t, 'i>(
        &mut self,
        parent: &Table<'t, 'i>,
        key: &str,
        name: &str,
    ) -> Option<Table<'t, 'i>> {
        match self.r.table(parent, key, name) {
            Field::Valid(t) => Some(t.into_inner()),
            Field::Absent => {
                let where_ = if parent.span.is_empty() {
                    String::new()
                } else {
                    format!(" (under {})", parent.name)
                };
                self.r.error_help(
                    &parent.span,
                    format!("missing required table {name}{where_}"),
                    Some(format!("add a {name} table")),
                );
                None
            }
            Field::Invalid => None,
        }
    }

    fn gateway(&mut self, t: &Table<'_, '_>) -> Option<GatewayConfig> {
        self.r.unknown_keys(t, &["id", "data_dir", "profile"]);
        let id = self.r.string(t, "id").and_then(|id| {
            if twin_model::topics::valid_level(id.get_ref()) {
                Some(id.into_inner())
            } else {
                self.r.error_help(
                    &id.span(),
                    format!(
                        "gateway id \"{}\" is not a valid MQTT topic level",
                        id.get_ref()
                    ),
                    Some(
                        "use 1-64 characters of A-Z a-z 0-9 _ - . (no spaces, no '/', '+' or '#')",
                    ),
                );
                None
            }
        });
        let id = self.r.required(t, "id", "\"plant1-gw1\"", id);
        let data_dir = self.r.non_empty(t, "data_dir");
        let data_dir = self.r.required(t, "data_dir", "\"data\"", data_dir);
        let profile = self
            .r
            .choice(t, "profile", &[("production", false), ("dev", true)]);
        Some(GatewayConfig {
            id: id.value()?,
            data_dir: self.resolve(&data_dir.value()?),
            dev_profile: profile.or(false)?,
        })
    }

    fn signing(&mut self, t: &Table<'_, '_>) -> Option<SigningConfig> {
        self.r.unknown_keys(t, &["key_file"]);
        let key_file = self.file(t, "key_file", "signing key file", true);
        Some(SigningConfig {
            key_file: key_file?,
        })
    }

    fn mqtt(&mut self, t: &Table<'_, '_>, gateway_id: Option<&str>) -> Option<MqttConfig> {
        self.r.unknown_keys(
            t,
            &[
                "host",
                "port",
                "client_id",
                "topic_prefix",
                "keep_alive_s",
                "max_message_bytes",
                "flush_interval_ms",
                "reported_interval_ms",
                "reconnect_min_ms",
                "reconnect_max_ms",
                "tls",
            ],
        );
        let host = self.r.non_empty(t, "host");
        let host = self.r.required(t, "host", "\"broker.example\"", host);
        let port = self.r.integer::<u16>(t, "port", 1..=65535);
        let client_id = self.r.non_empty(t, "client_id");
        let topic_prefix = self.r.string(t, "topic_prefix").and_then(|p| {
            if twin_model::topics::valid_level(p.get_ref()) {
                Some(p.into_inner())
            } else {
                self.r.error_help(
                    &p.span(),
                    format!(
                        "topic_prefix \"{}\" is not a valid MQTT topic level",
                        p.get_ref()
                    ),
                    Some("use 1-64 characters of A-Z a-z 0-9 _ - . (one level: no '/')"),
                );
                None
            }
        });
        let keep_alive_s = self.r.integer::<u64>(t, "keep_alive_s", 5..=3600);
        let max_message_bytes = self
            .r
            .integer::<usize>(t, "max_message_bytes", 1024..=268_435_455);
        let flush_interval_ms = self.r.integer::<u64>(t, "flush_interval_ms", 1..=10_000);
        let reported_interval_ms = self
            .r
            .integer::<u64>(t, "reported_interval_ms", 10..=3_600_000);
        let reconnect = self.reconnect(t, 500, 30_000);
        let tls = self
            .section(t, "tls", "[mqtt.tls]")
            .and_then(|tls| self.tls(&tls));
        let client_id = match client_id {
            Field::Absent => gateway_id.map(str::to_string),
            f => f.value(),
        };
        let (reconnect_min, reconnect_max) = reconnect?;
        Some(MqttConfig {
            host: host.value()?,
            port: port.or(8883)?,
            client_id: client_id?,
            topic_prefix: topic_prefix.or("twin".into())?,
            keep_alive: Duration::from_secs(keep_alive_s.or(30)?),
            max_message_bytes: max_message_bytes.or(131_072)?,
            flush_interval: ms(flush_interval_ms.or(5)?),
            reported_interval: ms(reported_interval_ms.or(1000)?),
            reconnect_min,
            reconnect_max,
            tls: tls?,
        })
    }

    /// The optional `[outbox]` table.
    fn outbox(&mut self, root: &Table<'_, '_>) -> Option<OutboxConfig> {
        let t = match self.r.table(root, "outbox", "[outbox]") {
            Field::Absent => return Some(OutboxConfig::default()),
            Field::Invalid => return None,
            Field::Valid(t) => t.into_inner(),
        };
        self.r.unknown_keys(
            &t,
            &[
                "max_size_mib",
                "max_age_s",
                "full_policy",
                "encryption_key_file",
            ],
        );
        let d = OutboxConfig::default();
        let max_size_mib = self.r.integer::<u64>(&t, "max_size_mib", 1..=1_048_576);
        let max_age_s = self.r.integer::<u64>(&t, "max_age_s", 60..=31_536_000);
        let full_policy = self.r.choice(&t, "full_policy", FULL_POLICIES);
        let key = match self.r.non_empty(&t, "encryption_key_file") {
            Field::Absent => Some(None),
            Field::Invalid => None,
            Field::Valid(_) => self
                .file(
                    &t,
                    "encryption_key_file",
                    "outbox encryption key file",
                    true,
                )
                .map(Some),
        };
        Some(OutboxConfig {
            max_bytes: max_size_mib.or(d.max_bytes / (1024 * 1024))? * 1024 * 1024,
            max_age: Duration::from_secs(max_age_s.or(d.max_age.as_secs())?),
            full_policy: full_policy.or(d.full_policy)?,
            encryption_key_file: key?,
        })
    }

    /// The optional `[audit]` table.
    fn audit(&mut self, root: &Table<'_, '_>, data_dir: Option<&Path>) -> Option<AuditConfig> {
        let t = match self.r.table(root, "audit", "[audit]") {
            Field::Absent => None,
            Field::Invalid => return None,
            Field::Valid(t) => Some(t.into_inner()),
        };
        let (file, interval_s, records) = match &t {
            None => (Field::Absent, Field::Absent, Field::Absent),
            Some(t) => {
                self.r
                    .unknown_keys(t, &["file", "checkpoint_interval_s", "checkpoint_records"]);
                (
                    self.r.non_empty(t, "file"),
                    self.r
                        .integer::<u64>(t, "checkpoint_interval_s", 1..=86_400),
                    self.r
                        .integer::<u64>(t, "checkpoint_records", 1..=1_000_000),
                )
            }
        };
        let file = match file {
            Field::Absent => data_dir?.join("audit.jsonl"),
            f => self.resolve(&f.value()?),
        };
        Some(AuditConfig {
            file,
            checkpoint_interval: Duration::from_secs(interval_s.or(60)?),
            checkpoint_records: records.or(100)?,
        })
    }

    /// The optional `[metrics]` table.
    fn metrics(&mut self, root: &Table<'_, '_>) -> Option<Option<MetricsConfig>> {
        let t = match self.r.table(root, "metrics", "[metrics]") {
            Field::Absent => return Some(None),
            Field::Invalid => return None,
            Field::Valid(t) => t.into_inner(),
        };
        self.r.unknown_keys(&t, &["listen"]);
        let listen = self.r.non_empty(&t, "listen").and_then(|l| {
            match l.get_ref().parse::<std::net::SocketAddr>() {
                Ok(a) => Some(a),
                Err(_) => {
                    self.r.error_help(
                        &l.span(),
                        format!("listen \"{}\" in [metrics] is not an IP address and port", l.get_ref()),
                        Some("write it as \"127.0.0.1:9464\" (loopback only, the default) or another local address and port"),
                    );
                    None
                }
            }
        });
        let default: std::net::SocketAddr = ([127, 0, 0, 1], 9464).into();
        Some(Some(MetricsConfig {
            listen: listen.or(default)?,
        }))
    }

    /// The optional `expect_identity` table of a device: identity fields
    /// (from `allowed`) and the values the device must report.
    pub(super) fn expect_identity(
        &mut self,
        t: &Table<'_, '_>,
        allowed: &[&str],
    ) -> Option<Option<std::collections::BTreeMap<String, String>>> {
        let c = match self.r.table(
            t,
            "expect_identity",
            &format!("expect_identity of {}", t.name),
        ) {
            Field::Absent => return Some(None),
            Field::Invalid => return None,
            Field::Valid(c) => c.into_inner(),
        };
        self.r.unknown_keys(&c, allowed);
        let mut fields = std::collections::BTreeMap::new();
        let mut valid = true;
        for key in allowed {
            match self.r.non_empty(&c, key) {
                Field::Valid(v) => {
                    fields.insert((*key).to_owned(), v.into_inner());
                }
                Field::Invalid => valid = false,
                Field::Absent => {}
            }
        }
        if valid && fields.is_empty() {
            self.r.error_help(
                &c.span,
                format!("{} names no identity field", c.name),
                Some(format!(
                    "name what the device must report, e.g. {}",
                    allowed
                        .iter()
                        .take(3)
                        .map(|k| format!("{k} = \"...\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
            return None;
        }
        valid.then_some(Some(fields))
    }

    /// The optional `[watch]` table.
    fn watch(&mut self, root: &Table<'_, '_>) -> Option<WatchConfig> {
        let t = match self.r.table(root, "watch", "[watch]") {
            Field::Absent => return Some(WatchConfig::default()),
            Field::Invalid => return None,
            Field::Valid(t) => t.into_inner(),
        };
        self.r
            .unknown_keys(&t, &["usual_hours", "learn_days", "unusual_step_factor"]);
        let usual_hours = match self.r.table(&t, "usual_hours", "[watch] usual_hours") {
            Field::Absent => Some(None),
            Field::Invalid => None,
            Field::Valid(w) => crate::policy::load::window(&mut self.r, &w.into_inner()).map(Some),
        };
        let learn_days = self.r.integer::<u64>(&t, "learn_days", 0..=365);
        let factor = self.r.number(&t, "unusual_step_factor").and_then(|f| {
            if f.get_ref().is_finite() && *f.get_ref() > 1.0 {
                Some(*f.get_ref())
            } else {
                self.r.error_help(
                    &f.span(),
                    format!("unusual_step_factor = {} in [watch] must be more than 1", f.get_ref()),
                    Some("a command step this many times larger than the largest one seen for the tag raises an alert; 3 is a good start"),
                );
                None
            }
        });
        let default = WatchConfig::default();
        Some(WatchConfig {
            usual_hours: usual_hours?,
            learn: learn_days
                .and_then(|d| Some(Duration::from_secs(d.into_inner() * 86_400)))
                .or(default.learn)?,
            step_factor: factor.or(default.step_factor)?,
        })
    }

    /// The optional `[commands]` table.
    fn commands(&mut self, root: &Table<'_, '_>) -> Option<Option<CommandsConfig>> {
        let t = match self.r.table(root, "commands", "[commands]") {
            Field::Absent => return Some(None),
            Field::Invalid => return None,
            Field::Valid(t) => t.into_inner(),
        };
        self.r.unknown_keys(
            &t,
            &[
                "policy_dir",
                "candidate_policy_dir",
                "operator_keys_dir",
                "issuer",
                "max_message_bytes",
                "max_token_lifetime_s",
                "clock_leeway_s",
                "rate_per_s",
                "burst",
                "operator_rate_per_s",
                "operator_burst",
                "write_timeout_ms",
                "policy_reload_ms",
                "replay_capacity",
            ],
        );
        let policy_dir = self.r.non_empty(&t, "policy_dir");
        let policy_dir = self
            .r
            .required(&t, "policy_dir", "\"policies\"", policy_dir);
        let candidate = self.r.non_empty(&t, "candidate_policy_dir");
        let keys = self.r.non_empty(&t, "operator_keys_dir");
        let keys = self
            .r
            .required(&t, "operator_keys_dir", "\"operators\"", keys);
        let issuer = self.r.non_empty(&t, "issuer");
        let issuer = self.r.required(&t, "issuer", "\"plant-ops\"", issuer);
        let max_message_bytes = self
            .r
            .integer::<usize>(&t, "max_message_bytes", 1024..=1_048_576);
        let lifetime_s = self
            .r
            .integer::<u64>(&t, "max_token_lifetime_s", 1..=86_400);
        let leeway_s = self.r.integer::<u64>(&t, "clock_leeway_s", 0..=600);
        let rate = self.r.integer::<u32>(&t, "rate_per_s", 1..=10_000);
        let burst = self.r.integer::<u32>(&t, "burst", 1..=100_000);
        let op_rate = self.r.integer::<u32>(&t, "operator_rate_per_s", 1..=10_000);
        let op_burst = self.r.integer::<u32>(&t, "operator_burst", 1..=100_000);
        let write_timeout_ms = self.r.integer::<u64>(&t, "write_timeout_ms", 10..=60_000);
        let reload_ms = self
            .r
            .integer::<u64>(&t, "policy_reload_ms", 100..=3_600_000);
        let capacity = self
            .r
            .integer::<u64>(&t, "replay_capacity", 100..=100_000_000);
        let candidate = match candidate {
            Field::Absent => Some(None),
            f => f.value().map(|p| Some(self.resolve(&p))),
        };
        Some(Some(CommandsConfig {
            policy_dir: self.resolve(&policy_dir.value()?),
            candidate_policy_dir: candidate?,
            operator_keys_dir: self.resolve(&keys.value()?),
            issuer: issuer.value()?,
            max_message_bytes: max_message_bytes.or(65_536)?,
            max_token_lifetime: Duration::from_secs(lifetime_s.or(300)?),
            clock_leeway: Duration::from_secs(leeway_s.or(30)?),
            rate_per_s: rate.or(20)?,
            burst: burst.or(40)?,
            operator_rate_per_s: op_rate.or(5)?,
            operator_burst: op_burst.or(10)?,
            write_timeout: ms(write_timeout_ms.or(2_000)?),
            policy_reload: ms(reload_ms.or(1_000)?),
            replay_capacity: capacity.or(100_000)?,
        }))
    }

    fn tls(&mut self, t: &Table<'_, '_>) -> Option<TlsConfig> {
        self.r.unknown_keys(
            t,
            &[
                "ca_file",
                "cert_file",
                "key_file",
                "min_version",
                "server_name",
            ],
        );
        let ca_file = self.file(t, "ca_file", "CA certificate file", false);
        let cert_file = self.file(t, "cert_file", "client certificate file", false);
        let key_file = self.file(t, "key_file", "client key file", true);
        let min_version = self.r.choice(t, "min_version", TLS_VERSIONS);
        let server_name = self.r.non_empty(t, "server_name");
        Some(TlsConfig {
            ca_file: ca_file?,
            cert_file: cert_file?,
            key_file: key_file?,
            min_version: min_version.or(TlsVersion::Tls13)?,
            server_name: server_name.optional()?,
        })
    }

    /// `reconnect_min_ms` and `reconnect_max_ms`, with min <= max.
    pub(super) fn reconnect(
        &mut self,
        t: &Table<'_, '_>,
        default_min: u64,
        default_max: u64,
    ) -> Option<(Duration, Duration)> {
        let min = self
            .r
            .integer::<u64>(t, "reconnect_min_ms", 1..=MAX_RECONNECT_MS);
        let max = self
            .r
            .integer::<u64>(t, "reconnect_max_ms", 1..=MAX_RECONNECT_MS);
        let (min_span, max_span) = (min.span(), max.span());
        let (min, max) = (min.or(default_min)?, max.or(default_max)?);
        if min > max {
            let (span, default_note) = match (&max_span, &min_span) {
                (Some(s), _) => (s.clone(), ""),
                (None, Some(s)) => (s.clone(), ", the default"),
                (None, None) => (t.span.clone(), ""),
            };
            self.r.error_help(
                &span,
                format!(
                    "reconnect_max_ms ({max}{default_note}) is less than reconnect_min_ms ({min}) in {}",
                    t.name
                ),
                Some("the backoff grows from reconnect_min_ms up to reconnect_max_ms; raise reconnect_max_ms or lower reconnect_min_ms"),
            );
            return None;
        }
        Some((ms(min), ms(max)))
    }

    /// A required file path, resolved and checked.
    pub(super) fn file(
        &mut self,
        t: &Table<'_, '_>,
        key: &str,
        what: &str,
        private: bool,
    ) -> Option<PathBuf> {
        let value = self.r.non_empty(t, key);
        let value = self
            .r
            .required(t, key, "\"path/to/file.pem\"", value)
            .valid()
            .cloned()?;
        let path = self.resolve(value.get_ref());
        let span = value.span();
        self.check_file(&span, what, &path, private).then_some(path)
    }

    pub(super) fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base.join(p)
        }
    }

    /// Whether the file exists and is readable (and, for a private key,
    /// closed to group and others); reports why not.
    fn check_file(&mut self, span: &Range<usize>, what: &str, path: &Path, private: bool) -> bool {
        let shown = path.display();
        let opened = fs::metadata(path).and_then(|m| {
            if m.is_dir() {
                Err(std::io::Error::other("it is a directory"))
            } else {
                fs::File::open(path).map(drop)
            }
        });
        if let Err(e) = opened {
            let help = match e.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "check the path; a relative path is resolved against the folder of the configuration file ({})",
                    if self.base.as_os_str().is_empty() {
                        ".".into()
                    } else {
                        self.base.display().to_string()
                    }
                ),
                std::io::ErrorKind::PermissionDenied => {
                    "make the file readable by the user that runs the gateway".into()
                }
                _ => "point the key at a readable file".into(),
            };
            self.r.error_help(
                span,
                format!("cannot read {what} \"{shown}\": {e}"),
                Some(help),
            );
            return false;
        }
        if !private {
            return true;
        }
        match keyfile::check_private(path) {
            Ok(()) => true,
            Err(KeyFileError::TooOpen { mode, .. }) => {
                self.r.error_help(
                    span,
                    format!(
                        "{what} \"{shown}\" is a private key readable by group or others (mode {mode:04o})"
                    ),
                    Some(format!("run chmod 600 {shown}")),
                );
                false
            }
            Err(e) => {
                self.r.error(span, e.to_string());
                false
            }
        }
    }

    fn devices(&mut self, root: &Table<'_, '_>) -> Option<Vec<DeviceConfig>> {
        let list = match self.r.array_of_tables(root, "devices") {
            Field::Valid(list) => list,
            Field::Invalid => return None,
            Field::Absent => Spanned::new(0..0, Vec::new()),
        };
        if list.get_ref().is_empty() {
            self.r.error_help(
                &list.span(),
                "no devices: the gateway needs at least one [[devices]] table",
                Some("add a [[devices]] table with name, protocol and address, and its [[devices.tags]]"),
            );
            return None;
        }
        let mut device_names: HashMap<String, usize> = HashMap::new();
        let mut tag_names: HashMap<String, NameSeen> = HashMap::new();
        let mut devices = Vec::new();
        let mut all_valid = true;
        for (i, (table, span)) in list.into_inner().into_iter().enumerate() {
            let provisional = Table {
                table,
                span: span.clone(),
                name: format!("[[devices]] #{}", i + 1),
            };
            let name = self.r.string(&provisional, "name").and_then(|n| {
                if valid_name(n.get_ref(), 64) {
                    Some(n.into_inner())
                } else {
                    self.r.error_help(
                        &n.span(),
                        format!("invalid device name \"{}\"", n.get_ref()),
                        Some("use 1-64 characters of A-Z a-z 0-9 _ . -"),
                    );
                    None
                }
            });
            let name = self.r.required(&provisional, "name", "\"plc1\"", name);
            if let Some(n) = name.valid() {
                let line = self.r.line(&n.span());
                if let Some(first) = device_names.get(n.get_ref()) {
                    self.r.error_help(
                        &n.span(),
                        format!(
                            "duplicate device name \"{}\" (first defined at line {first})",
                            n.get_ref()
                        ),
                        Some("device names must be unique; rename one of the two devices"),
                    );
                    all_valid = false;
                } else {
                    device_names.insert(n.get_ref().clone(), line);
                }
            }
            let t = Table {
                name: match name.get() {
                    Some(n) => format!("device \"{n}\""),
                    None => provisional.name.clone(),
                },
                ..provisional
            };
            let protocol = self.r.choice(&t, "protocol", PROTOCOLS);
            let protocol = self.r.required(&t, "protocol", "\"modbus-tcp\"", protocol);
            let device = match protocol.value() {
                Some(Protocol::ModbusTcp) => self
                    .modbus_device(&t, name.value(), &mut tag_names)
                    .map(DeviceConfig::Modbus),
                Some(Protocol::OpcUa) => self
                    .opcua_device(&t, name.value(), &mut tag_names)
                    .map(DeviceConfig::OpcUa),
                // The other keys depend on the protocol: nothing more to check.
                None => None,
            };
            match device {
                Some(d) => devices.push(d),
                None => all_valid = false,
            }
        }
        all_valid.then_some(devices)
    }

    fn modbus_device(
        &mut self,
        t: &Table<'_, '_>,
        name: Option<String>,
        tag_names: &mut HashMap<String, NameSeen>,
    ) -> Option<ModbusDeviceConfig> {
        self.r.unknown_keys(
            t,
            &[
                "name",
                "protocol",
                "address",
                "unit_id",
                "poll_interval_ms",
                "request_timeout_ms",
                "max_gap_registers",
                "max_registers_per_request",
                "max_bits_per_request",
                "reconnect_min_ms",
                "reconnect_max_ms",
                "identify",
                "expect_identity",
                "tags",
            ],
        );
        let identify = self.r.boolean(t, "identify");
        let expect = self.expect_identity(t, twin_model::inventory::MODBUS_FIELDS);
        if let (Some(false), Some(Some(_))) = (identify.get(), expect.as_ref()) {
            if let Some(span) = identify.span() {
                self.r.error_help(
                    &span,
                    format!("identify = false in {} contradicts expect_identity", t.name),
                    Some("the identity can only be checked when it is read: remove identify = false, or expect_identity"),
                );
            }
        }
        let address = self.r.shaped(
            t,
            "address",
            "host:port",
            |a| match a.rsplit_once(':') {
                None => Some("it has no port"),
                Some(("", _)) => Some("the host is empty"),
                Some((_, port)) => match port.parse::<u16>() {
                    Ok(p) if p >= 1 => None,
                    _ => Some("the port must be a number from 1 to 65535"),
                },
            },
            "write it as host:port, e.g. \"192.168.1.10:502\"",
        );
        let address = self
            .r
            .required(t, "address", "\"192.168.1.10:502\"", address);
        let unit_id = self.r.integer::<u8>(t, "unit_id", 0..=255);
        let poll_interval_ms = self
            .r
            .integer::<u64>(t, "poll_interval_ms", 10..=86_400_000);
        let request_timeout_ms = self.r.integer::<u64>(t, "request_timeout_ms", 10..=60_000);
        let max_gap_registers = self.r.integer::<u16>(t, "max_gap_registers", 0..=125);
        let max_registers = self
            .r
            .integer::<u16>(t, "max_registers_per_request", 1..=125);
        let max_bits = self.r.integer::<u16>(t, "max_bits_per_request", 1..=2000);
        let reconnect = self.reconnect(t, 200, 10_000);
        let max_registers_line = max_registers.span().map(|s| self.r.line(&s));
        let max_registers = max_registers.or(125);
        let tags = self.tags(t, max_registers.map(|m| (m, max_registers_line)), tag_names);
        let (reconnect_min, reconnect_max) = reconnect?;
        Some(ModbusDeviceConfig {
            name: name?,
            address: address.value()?,
            unit_id: unit_id.or(1)?,
            poll_interval: ms(poll_interval_ms.or(1000)?),
            request_timeout: ms(request_timeout_ms.or(1000)?),
            max_gap_registers: max_gap_registers.or(8)?,
            max_registers_per_request: max_registers?,
            max_bits_per_request: max_bits.or(2000)?,
            reconnect_min,
            reconnect_max,
            identify: identify.or(true)?,
            expect_identity: expect?,
            tags: tags?,
        })
    }

    /// The tags of one device, with the checks across them.
    fn tags(
        &mut self,
        device: &Table<'_, '_>,
        max_registers: Option<(u16, Option<usize>)>,
        names: &mut HashMap<String, NameSeen>,
    ) -> Option<Vec<ModbusTag>> {
        let list = match self.r.array_of_tables(device, "tags") {
            Field::Valid(list) => list.into_inner(),
            Field::Absent => Vec::new(),
            Field::Invalid => return None,
        };
        let mut tags = Vec::with_capacity(list.len());
        let mut claims: Vec<TagClaim> = Vec::new();
        let mut all_valid = true;
        for (i, (table, span)) in list.into_iter().enumerate() {
            let provisional = Table {
                table,
                span,
                name: format!("[[devices.tags]] #{} of {}", i + 1, device.name),
            };
            let read = self.tag(provisional, max_registers);
            if let Some(name) = &read.name {
                all_valid &= self.claim_name(name, device, names);
            }
            if let Some(c) = read.claim {
                claims.push(c);
            }
            match read.tag {
                Some(tag) => tags.push(tag),
                None => all_valid = false,
            }
        }
        for area in AREAS.iter().map(|(_, a)| *a) {
            let in_area: Vec<&TagClaim> = claims.iter().filter(|c| c.area == area).collect();
            let ranges: Vec<Claim> = in_area
                .iter()
                .enumerate()
                .map(|(order, c)| Claim {
                    range: c.range.clone(),
                    order,
                })
                .collect();
            for o in overlaps(&ranges) {
                let (later, earlier) = (in_area[o.later], in_area[o.earlier]);
                let earlier_line = self.r.line(&earlier.address_span);
                self.r.error_help(
                    &later.address_span,
                    format!(
                        "tag \"{}\" ({} {}) overlaps tag \"{}\" ({} {}, line {earlier_line})",
                        later.name,
                        area_units(area),
                        show_range(&later.range),
                        earlier.name,
                        area_units(area),
                        show_range(&earlier.range),
                    ),
                    Some("each register (or bit) belongs to one tag only; check the addresses and the types' widths"),
                );
                all_valid = false;
            }
        }
        all_valid.then_some(tags)
    }

    /// Records a tag name; false (and reported) when another tag has it.
    pub(super) fn claim_name(
        &mut self,
        name: &Spanned<String>,
        device: &Table<'_, '_>,
        names: &mut HashMap<String, NameSeen>,
    ) -> bool {
        let line = self.r.line(&name.span());
        if let Some(first) = names.get(name.get_ref()) {
            let device_note = if first.device == device.name {
                String::new()
            } else {
                format!(", in {}", first.device)
            };
            self.r.error_help(
                &name.span(),
                format!(
                    "duplicate tag name \"{}\" (first defined at line {}{device_note})",
                    name.get_ref(),
                    first.line
                ),
                Some("tag names are the keys of the twin and must be unique across all devices; rename one of the two tags"),
            );
            return false;
        }
        names.insert(
            name.get_ref().clone(),
            NameSeen {
                line,
                device: device.name.clone(),
            },
        );
        true
    }

    /// A tag's name: valid, and not taken by another tag.
    pub(super) fn tag_name(
        &mut self,
        t: &Table<'_, '_>,
        device: &Table<'_, '_>,
        names: &mut HashMap<String, NameSeen>,
    ) -> Option<String> {
        let name = self.valid_tag_name(t);
        let name = self
            .r
            .required(t, "name", "\"tank1.level\"", name)
            .valid()
            .cloned()?;
        self.claim_name(&name, device, names)
            .then(|| name.into_inner())
    }

    /// The `name` key of a tag table, checked.
    fn valid_tag_name(&mut self, t: &Table<'_, '_>) -> Field<String> {
        self.r.string(t, "name").and_then(|n| {
            if valid_name(n.get_ref(), 128) {
                Some(n.into_inner())
            } else {
                self.r.error_help(
                    &n.span(),
                    format!("invalid tag name \"{}\"", n.get_ref()),
                    Some("use 1-128 characters of A-Z a-z 0-9 _ . -"),
                );
                None
            }
        })
    }

    /// One tag, its name (for the uniqueness check) and its claim on the
    /// register map (for the overlap check), each `None` when invalid.
    fn tag(
        &mut self,
        provisional: Table<'_, '_>,
        max_registers: Option<(u16, Option<usize>)>,
    ) -> TagRead {
        let name = self.valid_tag_name(&provisional);
        let name = self
            .r
            .required(&provisional, "name", "\"tank1.level\"", name);
        let t = Table {
            name: match name.get() {
                Some(n) => format!("tag \"{n}\""),
                None => provisional.name.clone(),
            },
            ..provisional
        };
        self.r.unknown_keys(
            &t,
            &[
                "name",
                "area",
                "address",
                "type",
                "length_registers",
                "order",
                "scale",
                "offset",
                "unit",
                "writable",
                "check",
            ],
        );
        let area = self.r.choice(&t, "area", AREAS);
        let area = self.r.required(&t, "area", "\"holding_register\"", area);
        let address = self.r.integer::<u16>(&t, "address", 0..=65535);
        let address = self.r.required(&t, "address", "0", address);
        let kind = self.r.choice(&t, "type", TYPES);
        let kind = self.r.required(&t, "type", "\"f32\"", kind);
        let length = self.r.integer::<u16>(&t, "length_registers", 1..=125);
        let order = self.r.choice(&t, "order", ORDERS);
        let scale = self.r.number(&t, "scale").and_then(|s| {
            if *s.get_ref() == 0.0 {
                self.r.error_help(
                    &s.span(),
                    format!("scale of {} must not be 0", t.name),
                    Some("engineering value = raw * scale + offset; remove scale for 1"),
                );
                None
            } else {
                Some(s.into_inner())
            }
        });
        let offset = self.r.number(&t, "offset");
        let unit = self.r.string(&t, "unit");
        let writable = self.r.boolean(&t, "writable");
        let checks_ok = self.tag_checks(&t, name.get().map(String::as_str));

        // The type, with the string's length.
        let data_type: Option<Spanned<DataType>> = match (kind.valid(), &length) {
            (Some(k), Field::Valid(n)) if k.get_ref().is_none() => Some(Spanned::new(
                k.span(),
                DataType::String {
                    registers: *n.get_ref(),
                },
            )),
            (Some(k), Field::Absent) if k.get_ref().is_none() => {
                self.r.error_help(
                    &k.span(),
                    format!("{} has type \"string\" but no length_registers", t.name),
                    Some("add `length_registers = N`: the string's length in registers (2 bytes each, 1-125)"),
                );
                None
            }
            (Some(k), _) => match *k.get_ref() {
                None => None,
                Some(d) => {
                    if let Some(key) = t.key_span("length_registers") {
                        self.r.error_help(
                            &key,
                            format!(
                                "length_registers applies only to type \"string\", not to \"{}\"",
                                type_name(d)
                            ),
                            Some("remove length_registers; the width of a number follows from its type"),
                        );
                    }
                    Some(Spanned::new(k.span(), d))
                }
            },
            (None, _) => None,
        };
        let mut ok = true;
        let dt = data_type.as_ref().map(|d| *d.get_ref());
        let type_span = data_type.as_ref().map(Spanned::span);
        // Where to point at the width: the length of a string, or its type.
        let width_span = match (&dt, length.span()) {
            (Some(DataType::String { .. }), Some(s)) => Some(s),
            _ => type_span.clone(),
        };

        // Area and type.
        let compatible = match (area.get(), dt, &type_span) {
            (Some(&a), Some(d), Some(span)) => {
                let bool_type = d == DataType::Bool;
                if bool_type && !a.is_bits() {
                    self.r.error_help(
                        span,
                        format!(
                            "type \"bool\" cannot be read from area \"{}\": bools live in \"coil\" or \"discrete_input\"",
                            area_name(a)
                        ),
                        Some("use area = \"coil\" or \"discrete_input\" for a bit, or a numeric type (e.g. \"u16\") for a register"),
                    );
                    ok = false;
                } else if !bool_type && a.is_bits() {
                    self.r.error_help(
                        span,
                        format!(
                            "type \"{}\" cannot be read from area \"{}\": bit areas hold only type \"bool\"",
                            type_name(d),
                            area_name(a)
                        ),
                        Some("use type = \"bool\", or area = \"holding_register\" or \"input_register\" for a register value"),
                    );
                    ok = false;
                }
                ok
            }
            _ => false,
        };

        // Width: inside the address space, and readable in one request.
        if let (Some(d), Some(addr)) = (dt, address.valid()) {
            let end = u32::from(*addr.get_ref()) + u32::from(d.width());
            if end > 65_536 {
                self.r.error_help(
                    &addr.span(),
                    format!(
                        "{} at address {} is {} wide and would end past the last address 65535",
                        t.name,
                        addr.get_ref(),
                        plural(d.width(), "register")
                    ),
                    Some(format!(
                        "the highest address a {} tag can start at is {}",
                        type_name(d),
                        65_536 - u32::from(d.width())
                    )),
                );
                ok = false;
            }
        }
        if let (true, Some(a), Some(d), Some((max, max_line)), Some(span)) =
            (compatible, area.get(), dt, max_registers, &width_span)
        {
            if !a.is_bits() && d.width() > max {
                let set_at = match max_line {
                    Some(line) => format!("max_registers_per_request = {max}, line {line}"),
                    None => format!("max_registers_per_request = {max}, the default"),
                };
                self.r.error_help(
                    span,
                    format!(
                        "{} is {} wide, more than the device reads in one request ({set_at}): it can never be read",
                        t.name,
                        plural(d.width(), "register")
                    ),
                    Some("raise max_registers_per_request (at most 125) or make the tag narrower"),
                );
                ok = false;
            }
        }

        // Byte order: swapping registers needs at least two of them.
        if let (Some(o), Some(d)) = (order.valid(), dt) {
            let one_register = d.width() == 1 || matches!(d, DataType::String { .. });
            if one_register && matches!(o.get_ref(), ByteOrder::Cdab | ByteOrder::Dcba) {
                let what = match d {
                    DataType::String { .. } => "a string (bytes in register order)".to_string(),
                    DataType::Bool => "a bool".to_string(),
                    d => format!("the 16-bit type \"{}\"", type_name(d)),
                };
                self.r.error_help(
                    &o.span(),
                    format!(
                        "order \"{}\" swaps registers, which has no meaning for {what}",
                        ORDERS
                            .iter()
                            .find(|(_, x)| x == o.get_ref())
                            .map_or("?", |(n, _)| n)
                    ),
                    Some("use order = \"ABCD\" (as sent) or \"BADC\" (bytes swapped in each register)"),
                );
                ok = false;
            }
        }

        // Scaling applies to numbers only.
        if let Some(d) = dt {
            if matches!(d, DataType::Bool | DataType::String { .. }) {
                for key in ["scale", "offset"] {
                    if let Some(span) = t.key_span(key) {
                        self.r.error_help(
                            &span,
                            format!(
                                "{key} applies only to numbers, not to type \"{}\"",
                                type_name(d)
                            ),
                            Some(format!("remove {key} from {}", t.name)),
                        );
                        ok = false;
                    }
                }
            }
        }

        // Read-only areas.
        if let (Some(w), Some(&a)) = (writable.valid(), area.get()) {
            if *w.get_ref() && matches!(a, Area::DiscreteInput | Area::InputRegister) {
                self.r.error_help(
                    &w.span(),
                    format!(
                        "{} is in area \"{}\", which is read-only: it cannot be writable",
                        t.name,
                        area_name(a)
                    ),
                    Some("remove `writable = true`, or use area \"coil\" / \"holding_register\" if the device accepts writes there"),
                );
                ok = false;
            }
        }

        let claim = match (&name, area.get(), dt, address.valid(), compatible) {
            (Field::Valid(n), Some(&a), Some(d), Some(addr), true) => Some(TagClaim {
                name: n.get_ref().clone(),
                area: a,
                range: u32::from(*addr.get_ref())
                    ..(u32::from(*addr.get_ref()) + u32::from(d.width())).min(65_536),
                address_span: addr.span(),
            }),
            _ => None,
        };
        let name_for_check = name.valid().cloned();
        let tag = (|| {
            if !ok || !checks_ok {
                return None;
            }
            Some(ModbusTag {
                name: name.value()?,
                area: area.value()?,
                address: address.value()?,
                data_type: dt?,
                order: order.or(ByteOrder::Abcd)?,
                scale: scale.optional()?,
                offset: offset.optional()?,
                unit: unit.optional()?,
                writable: writable.or(false)?,
            })
        })();
        TagRead {
            tag,
            name: name_for_check,
            claim,
        }
    }
}

fn plural(n: u16, unit: &str) -> String {
    if n == 1 {
        format!("1 {unit}")
    } else {
        format!("{n} {unit}s")
    }
}

/// `0-1` for registers 0 and 1, `7` for register 7 alone.
fn show_range(r: &Range<u32>) -> String {
    if r.end <= r.start + 1 {
        r.start.to_string()
    } else {
        format!("{}-{}", r.start, r.end - 1)
    }
}
