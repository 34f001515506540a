//! The typed configuration, as the rest of the gateway sees it after
//! [`super::load`] has parsed and validated `gateway.toml`.
//!
//! Every option that has a unit says so in its name (`_ms`, `_bytes`,
//! `_registers`). Paths are resolved relative to the config file's folder.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// The whole gateway configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Where the configuration was read from.
    pub source: PathBuf,
    pub gateway: GatewayConfig,
    pub signing: SigningConfig,
    pub mqtt: MqttConfig,
    pub outbox: OutboxConfig,
    pub audit: AuditConfig,
    /// `None` when the configuration has no `[commands]` table: the gateway
    /// then subscribes to no command topic and writes nothing.
    pub commands: Option<CommandsConfig>,
    /// `None` without a `[metrics]` table: no listening port at all.
    pub metrics: Option<MetricsConfig>,
    /// The command-flow baselines (`[watch]`, optional).
    pub watch: WatchConfig,
    pub devices: Vec<DeviceConfig>,
    /// Plausibility checks by tag name (the tags' `check` tables).
    pub checks: std::collections::BTreeMap<String, TagChecks>,
}

/// The kinds of certificate the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertKind {
    /// `[mqtt.tls] cert_file`.
    MqttClient,
    /// `[mqtt.tls] ca_file`.
    Ca,
    /// An OPC UA device's `certificate_file`.
    OpcUaClient,
    /// An OPC UA device's `user_certificate_file`.
    OpcUaUser,
}

/// One certificate file the configuration names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertFile<'a> {
    pub kind: CertKind,
    /// The OPC UA device it belongs to.
    pub device: Option<&'a str>,
    pub path: &'a Path,
}

impl Config {
    /// Every certificate file the configuration names, in this order: the
    /// MQTT client certificate, the CA file, then per OPC UA device its
    /// client and (X.509 login) user certificate. A file named twice is
    /// listed once, where it first appears.
    pub fn certificate_files(&self) -> Vec<CertFile<'_>> {
        let mut files = vec![
            CertFile {
                kind: CertKind::MqttClient,
                device: None,
                path: &self.mqtt.tls.cert_file,
            },
            CertFile {
                kind: CertKind::Ca,
                device: None,
                path: &self.mqtt.tls.ca_file,
            },
        ];
        for d in &self.devices {
            let DeviceConfig::OpcUa(d) = d else { continue };
            files.push(CertFile {
                kind: CertKind::OpcUaClient,
                device: Some(&d.name),
                path: &d.certificate_file,
            });
            if let OpcUaIdentity::X509 { cert_file, .. } = &d.identity {
                files.push(CertFile {
                    kind: CertKind::OpcUaUser,
                    device: Some(&d.name),
                    path: cert_file,
                });
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        files.retain(|f| seen.insert(f.path));
        files
    }
}

/// What the watch checks about one tag's values (its `check` table).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TagChecks {
    /// Engineering range: values outside are flagged `out_of_range`.
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Largest plausible change per second: faster is `rate_of_change`.
    pub max_rate_per_s: Option<f64>,
    /// A value that moved before and then stays exactly the same this long
    /// is `flatline`.
    pub flatline: Option<Duration>,
    /// No new sample this long: alert `sensor_stale`.
    pub stale: Option<Duration>,
    /// Learned baseline: values further than `sigma` standard deviations
    /// from the rolling mean are `outlier`, after `warmup` samples.
    pub baseline: Option<BaselineCheck>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BaselineCheck {
    pub sigma: f64,
    /// Samples learned before anything is flagged.
    pub warmup: u64,
    /// One baseline per hour of the day (24 baselines) instead of one.
    pub per_hour: bool,
    /// When every value has been an outlier for this long, the baseline is
    /// learned again from the new values (`sensor_baseline_relearned`).
    /// `None`: never (an outlier never teaches the baseline).
    pub relearn: Option<Duration>,
}

/// The command-flow baselines (`[watch]`, optional; see `watch::flows`).
#[derive(Debug, Clone)]
pub struct WatchConfig {
    /// When commands are expected; a command outside raises
    /// `command_outside_hours`. Without it, the hours are learned.
    pub(crate) usual_hours: Option<crate::policy::model::Window>,
    /// How long first-seen operators and keys, and the hours of commands,
    /// are learned silently after the first command.
    pub learn: Duration,
    /// A command step larger than this many times the largest step seen
    /// for the tag raises `command_unusual_step`.
    pub step_factor: f64,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            usual_hours: None,
            learn: Duration::from_secs(7 * 86_400),
            step_factor: 3.0,
        }
    }
}

impl PartialEq for WatchConfig {
    fn eq(&self, other: &Self) -> bool {
        self.usual_hours.as_ref().map(|w| &w.text) == other.usual_hours.as_ref().map(|w| &w.text)
            && self.learn == other.learn
            && self.step_factor == other.step_factor
    }
}

/// The metrics and health endpoint (`[metrics]`, optional).
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsConfig {
    /// Where `GET /metrics` and `GET /health` are served; default
    /// 127.0.0.1:9464 (loopback only).
    pub listen: std::net::SocketAddr,
}

/// The audit log (`[audit]`, optional).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditConfig {
    /// The log file; default `audit.jsonl` in the data directory.
    pub file: PathBuf,
    /// A signed checkpoint at least this often while records are written.
    pub checkpoint_interval: Duration,
    /// A signed checkpoint after at most this many records.
    pub checkpoint_records: u64,
}

/// Commands from the twin (`[commands]`, optional).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandsConfig {
    /// The enforced policy: every `*.toml` of the folder except `*.tests.toml`.
    pub policy_dir: PathBuf,
    /// A candidate policy evaluated beside the enforced one (shadow mode):
    /// where they would decide differently is audited; it never permits.
    pub candidate_policy_dir: Option<PathBuf>,
    /// Operators' public keys (`*.pem`, Ed25519 or P-256), the only keys
    /// command and approval tokens are accepted from.
    pub operator_keys_dir: PathBuf,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// Largest command message (token plus approvals), checked before
    /// anything is read.
    pub max_message_bytes: usize,
    /// Longest `exp - iat` accepted.
    pub max_token_lifetime: Duration,
    /// Clock leeway for `exp`, `nbf` and `iat`.
    pub clock_leeway: Duration,
    /// Global limit on command messages, before any is verified: sustained
    /// rate per second and burst.
    pub rate_per_s: u32,
    pub burst: u32,
    /// Limit per authenticated operator: sustained rate per second and burst.
    pub operator_rate_per_s: u32,
    pub operator_burst: u32,
    /// Longest write plus read-back before the command is reported failed.
    pub write_timeout: Duration,
    /// How often the policy folders are checked for changes.
    pub policy_reload: Duration,
    /// Most token ids remembered for replay protection.
    pub replay_capacity: u64,
}

/// What happens when the outbox reaches a bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FullPolicy {
    /// Drop the oldest batches to make room (default): the twin keeps the present.
    #[default]
    DropOldest,
    /// Keep the backlog and drop new batches.
    DropNewest,
}

/// The durable outbox between signing and publishing (`[outbox]`, optional).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxConfig {
    /// Bound on the stored batches, in bytes (configured in MiB).
    pub max_bytes: u64,
    /// Batches older than this are dropped (and accounted).
    pub max_age: Duration,
    pub full_policy: FullPolicy,
    /// 32-byte AES-256-GCM key (64 hex characters), mode 0600; encrypts
    /// records at rest when set.
    pub encryption_key_file: Option<PathBuf>,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            max_bytes: 256 * 1024 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            full_policy: FullPolicy::DropOldest,
            encryption_key_file: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    /// Gateway id: 1-64 characters of `A-Z a-z 0-9 _ - .`; the MQTT topic level.
    pub id: String,
    /// Durable state: chain position, outbox, replay store and (by default) the audit log.
    pub data_dir: PathBuf,
    /// `dev`: development PKI material is expected (the security
    /// self-check then reports it as info, not critical). Default production.
    pub dev_profile: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SigningConfig {
    /// Ed25519 private key, PKCS#8 PEM, mode 0600.
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    /// CA certificate(s), PEM, that the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The gateway's client certificate chain, PEM.
    pub cert_file: PathBuf,
    /// The gateway's client private key, PEM, mode 0600.
    pub key_file: PathBuf,
    /// Lowest TLS version offered: 1.3 unless "1.2" is configured.
    pub min_version: TlsVersion,
    /// Name checked against the broker certificate; defaults to `host`.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// MQTT client id; defaults to the gateway id.
    pub client_id: String,
    /// First topic level; default "twin".
    pub topic_prefix: String,
    pub keep_alive: Duration,
    /// Largest MQTT message the gateway sends; batches are split below it.
    pub max_message_bytes: usize,
    /// A batch is flushed when a poll cycle completes or after this long.
    pub flush_interval: Duration,
    /// The reported twin is republished at most this often (when changed).
    pub reported_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub tls: TlsConfig,
}

/// One device. Dispatch on the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceConfig {
    Modbus(ModbusDeviceConfig),
    OpcUa(OpcUaDeviceConfig),
}

impl DeviceConfig {
    pub fn name(&self) -> &str {
        match self {
            DeviceConfig::Modbus(d) => &d.name,
            DeviceConfig::OpcUa(d) => &d.name,
        }
    }

    /// Names of the device's tags, in configuration order.
    pub fn tag_names(&self) -> Vec<&str> {
        match self {
            DeviceConfig::Modbus(d) => d.tags.iter().map(|t| t.name.as_str()).collect(),
            DeviceConfig::OpcUa(d) => d.tags.iter().map(|t| t.name.as_str()).collect(),
        }
    }

    pub fn tag_count(&self) -> usize {
        match self {
            DeviceConfig::Modbus(d) => d.tags.len(),
            DeviceConfig::OpcUa(d) => d.tags.len(),
        }
    }

    pub fn writable_count(&self) -> usize {
        match self {
            DeviceConfig::Modbus(d) => d.tags.iter().filter(|t| t.writable).count(),
            DeviceConfig::OpcUa(d) => d.tags.iter().filter(|t| t.writable).count(),
        }
    }

    /// Tags with their engineering units.
    pub fn units(&self) -> Vec<(&str, &str)> {
        match self {
            DeviceConfig::Modbus(d) => d
                .tags
                .iter()
                .filter_map(|t| Some((t.name.as_str(), t.unit.as_deref()?)))
                .collect(),
            DeviceConfig::OpcUa(d) => d
                .tags
                .iter()
                .filter_map(|t| Some((t.name.as_str(), t.unit.as_deref()?)))
                .collect(),
        }
    }

    /// How often the device is read (OPC UA: the sampling interval).
    pub fn poll_interval(&self) -> Duration {
        match self {
            DeviceConfig::Modbus(d) => d.poll_interval,
            DeviceConfig::OpcUa(d) => d.sampling_interval,
        }
    }
}

/// OPC UA message security policies the gateway offers. Basic128Rsa15 and
/// Basic256 are deprecated and never used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcUaPolicy {
    Basic256Sha256,
    Aes128Sha256RsaOaep,
    Aes256Sha256RsaPss,
    /// No security: only with `allow_security_none = true`.
    None,
}

impl OpcUaPolicy {
    /// The name as written in the configuration and in the standard.
    pub fn name(self) -> &'static str {
        match self {
            OpcUaPolicy::Basic256Sha256 => "Basic256Sha256",
            OpcUaPolicy::Aes128Sha256RsaOaep => "Aes128_Sha256_RsaOaep",
            OpcUaPolicy::Aes256Sha256RsaPss => "Aes256_Sha256_RsaPss",
            OpcUaPolicy::None => "None",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcUaMode {
    Sign,
    SignAndEncrypt,
}

/// How the gateway logs in to an OPC UA server.
#[derive(Debug, Clone, PartialEq)]
pub enum OpcUaIdentity {
    Anonymous,
    /// User name; the password is read from a file (mode 0600), never
    /// written in the configuration.
    UserName {
        user: String,
        password_file: PathBuf,
    },
    /// X.509 user certificate (DER or PEM) and its private key (mode 0600).
    X509 {
        cert_file: PathBuf,
        key_file: PathBuf,
    },
}

/// How values are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcUaRead {
    /// Monitored items in one subscription (default).
    Subscribe,
    /// The Read service every `sampling_interval_ms`.
    Poll,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaDeviceConfig {
    pub name: String,
    /// `opc.tcp://host:port/path`.
    pub endpoint_url: String,
    /// `None`: the most secure of the allowed policies the server offers.
    pub security_policy: Option<OpcUaPolicy>,
    pub security_mode: OpcUaMode,
    /// The named insecure setting: accept an endpoint without security.
    pub allow_security_none: bool,
    /// The client's PKI folder: `trusted/` (server certificates an engineer
    /// approved) and `rejected/` (certificates refused, for review).
    pub pki_dir: PathBuf,
    /// The gateway's application instance certificate (DER) and key (PEM, 0600).
    pub certificate_file: PathBuf,
    pub private_key_file: PathBuf,
    /// The application URI in the certificate.
    pub application_uri: String,
    pub identity: OpcUaIdentity,
    pub read: OpcUaRead,
    pub publishing_interval: Duration,
    pub sampling_interval: Duration,
    pub queue_size: u32,
    /// Absolute deadband on numeric values (0: every change).
    pub deadband: f64,
    pub request_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// The identity the server must report (BuildInfo, application URI,
    /// certificate thumbprints); a server that reports another is not read.
    pub expect_identity: Option<std::collections::BTreeMap<String, String>>,
    pub tags: Vec<OpcUaTag>,
}

/// The value type of an OPC UA tag (the node's DataType).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpcUaType {
    Bool,
    SByte,
    Byte,
    Int16,
    UInt16,
    Int32,
    UInt32,
    Int64,
    UInt64,
    Float,
    Double,
    String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OpcUaTag {
    /// Unique across the gateway; the key in the twin.
    pub name: String,
    /// The node, e.g. `ns=2;s=Tank1.Level` or `nsu=urn:plant;s=Tank1.Level`.
    pub node_id: String,
    pub data_type: OpcUaType,
    pub unit: Option<String>,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusDeviceConfig {
    pub name: String,
    /// `host:port` as written (resolved when connecting).
    pub address: String,
    pub unit_id: u8,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    /// Registers (or bits) between two tags that may be read along to
    /// merge them into one request.
    pub max_gap_registers: u16,
    /// At most 125 (the Modbus limit for FC 3/4).
    pub max_registers_per_request: u16,
    /// At most 2000 (the Modbus limit for FC 1/2).
    pub max_bits_per_request: u16,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Read the device's identity (FC 43/14) after each connect, for the
    /// asset inventory (`identify = false` for devices that misbehave on it).
    pub identify: bool,
    /// The identity the device must report (field -> value); a device
    /// that reports another one, or none, is not read.
    pub expect_identity: Option<std::collections::BTreeMap<String, String>>,
    pub tags: Vec<ModbusTag>,
}

/// Which Modbus table a tag lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Area {
    /// FC 1, read/write bits.
    Coil,
    /// FC 2, read-only bits.
    DiscreteInput,
    /// FC 4, read-only registers.
    InputRegister,
    /// FC 3, read/write registers.
    HoldingRegister,
}

impl Area {
    pub fn is_bits(self) -> bool {
        matches!(self, Area::Coil | Area::DiscreteInput)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
    /// Fixed-length string occupying `registers` registers (2 bytes each).
    String {
        registers: u16,
    },
}

impl DataType {
    /// Registers (or bits, for Bool in a bit area) the type occupies.
    pub fn width(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 | DataType::I64 | DataType::F64 => 4,
            DataType::String { registers } => registers,
        }
    }
}

/// Byte and word order of multi-byte values, named after the position of
/// the bytes of a 32-bit value `A B C D` (A most significant) on the wire.
/// 64-bit values extend the same rule to four registers: `ABCD` is
/// big-endian throughout, `DCBA` little-endian throughout, `BADC` swaps the
/// bytes inside each register, `CDAB` reverses the order of the registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    #[default]
    Abcd,
    Badc,
    Cdab,
    Dcba,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModbusTag {
    /// Unique across the gateway; the key in the twin.
    pub name: String,
    pub area: Area,
    /// Zero-based protocol address.
    pub address: u16,
    pub data_type: DataType,
    pub order: ByteOrder,
    /// Engineering value = raw * scale + offset (numbers only).
    pub scale: Option<f64>,
    pub offset: Option<f64>,
    pub unit: Option<String>,
    /// Whether commands may ever write this tag (enforced by the policy path).
    pub writable: bool,
}
