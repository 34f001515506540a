//! The security self-check: what the plant's security team verifies
//! against the ISA/IEC 62443 expectations for this gateway, as a list of
//! findings, each with a stable code, a severity, the file, device or table
//! it concerns, what is wrong and what to do.
//!
//! [`check`] only reads: it opens no file for writing, creates nothing and
//! changes no permission, so it can run at start, periodically, or on its
//! own against a configuration whose files are missing (those are reported
//! as `file_missing`, never a panic).
//!
//! # Codes
//! | code | severity | when |
//! |---|---|---|
//! | `key_file_permissions` | high | a private key file named by the configuration is open to group or others, or not owned by the gateway's user |
//! | `file_missing` | high | a key or certificate file named by the configuration is missing or cannot be read |
//! | `certificate_invalid` | high | a certificate file holds no certificate that can be parsed |
//! | `certificate_expired` | critical | a certificate's validity ended |
//! | `certificate_not_yet_valid` | high | a certificate's validity has not begun |
//! | `certificate_expiring` | medium | a certificate expires within `expiry_warning_days` |
//! | `dev_pki_in_production` | critical (info in the dev profile) | a certificate carries `OU=twin-dev-pki` |
//! | `opcua_security_none` | high | an OPC UA device uses security policy None |
//! | `opcua_sign_only` | low | an OPC UA device signs but does not encrypt |
//! | `tls12_allowed` | low | `[mqtt.tls] min_version = "1.2"` |
//! | `commands_without_policy` | high | `[commands]` is configured but its policy is missing or invalid |
//! | `policy_audit_mode` | medium | the command policy is in audit mode |
//! | `no_operator_keys` | high | no operator key (`*.pem`) can be loaded |
//! | `audit_log_not_writable` | high | the audit log file or its folder cannot be written |
//! | `clock_not_plausible` | critical | the clock reads before 2024-01-01 or after 2100-01-01 |
//! | `metrics_not_loopback` | medium | `[metrics] listen` is not a loopback address |
//!
//! The JSON form of a [`Report`] is described by `docs/selfcheck.schema.json`.
//!
//! # Who "the gateway's user" is
//! File ownership and permission bits are compared with the effective user,
//! groups and capabilities of the running process, read from
//! `/proc/self/status` (without it, only the checks that need no identity
//! run). A process with `CAP_DAC_OVERRIDE` (root with its capabilities) may
//! write any folder; the container runs without it, as uid 65532.

/// JWS `typ` of the self-check report the gateway publishes (retained) on
/// `{prefix}/{gateway_id}/selfcheck`.
pub const REPORT_TYP: &str = "twin-selfcheck+jws";

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, Metadata, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use crate::command_auth::OperatorTrustStore;
use crate::config::{
    CertKind, Config, DeviceConfig, OpcUaIdentity, OpcUaMode, OpcUaPolicy, TlsVersion,
};
use crate::keyfile::{self, KeyFileError};
use crate::pki::DEV_OU;
use crate::policy::{Mode, Policy};

/// How serious a finding is. Ordered: `Info < Low < Medium < High < Critical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 5] = [
        Severity::Info,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// The name used in JSON and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A severity name that is not one of `info`, `low`, `medium`, `high`, `critical`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown severity {0:?}: expected info, low, medium, high or critical")]
pub struct UnknownSeverity(pub String);

impl FromStr for Severity {
    type Err = UnknownSeverity;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Severity::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownSeverity(s.to_string()))
    }
}

/// The stable finding codes.
pub mod codes {
    pub const KEY_FILE_PERMISSIONS: &str = "key_file_permissions";
    pub const FILE_MISSING: &str = "file_missing";
    pub const CERTIFICATE_INVALID: &str = "certificate_invalid";
    pub const CERTIFICATE_EXPIRED: &str = "certificate_expired";
    pub const CERTIFICATE_NOT_YET_VALID: &str = "certificate_not_yet_valid";
    pub const CERTIFICATE_EXPIRING: &str = "certificate_expiring";
    pub const DEV_PKI_IN_PRODUCTION: &str = "dev_pki_in_production";
    pub const OPCUA_SECURITY_NONE: &str = "opcua_security_none";
    pub const OPCUA_SIGN_ONLY: &str = "opcua_sign_only";
    pub const TLS12_ALLOWED: &str = "tls12_allowed";
    pub const COMMANDS_WITHOUT_POLICY: &str = "commands_without_policy";
    pub const POLICY_AUDIT_MODE: &str = "policy_audit_mode";
    pub const NO_OPERATOR_KEYS: &str = "no_operator_keys";
    pub const AUDIT_LOG_NOT_WRITABLE: &str = "audit_log_not_writable";
    pub const CLOCK_NOT_PLAUSIBLE: &str = "clock_not_plausible";
    pub const METRICS_NOT_LOOPBACK: &str = "metrics_not_loopback";
}

/// Every code with its severity (`dev_pki_in_production` is `info` instead
/// when the check runs with `dev_profile`).
pub const CODES: &[(&str, Severity)] = &[
    (codes::KEY_FILE_PERMISSIONS, Severity::High),
    (codes::FILE_MISSING, Severity::High),
    (codes::CERTIFICATE_INVALID, Severity::High),
    (codes::CERTIFICATE_EXPIRED, Severity::Critical),
    (codes::CERTIFICATE_NOT_YET_VALID, Severity::High),
    (codes::CERTIFICATE_EXPIRING, Severity::Medium),
    (codes::DEV_PKI_IN_PRODUCTION, Severity::Critical),
    (codes::OPCUA_SECURITY_NONE, Severity::High),
    (codes::OPCUA_SIGN_ONLY, Severity::Low),
    (codes::TLS12_ALLOWED, Severity::Low),
    (codes::COMMANDS_WITHOUT_POLICY, Severity::High),
    (codes::POLICY_AUDIT_MODE, Severity::Medium),
    (codes::NO_OPERATOR_KEYS, Severity::High),
    (codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
    (codes::CLOCK_NOT_PLAUSIBLE, Severity::Critical),
    (codes::METRICS_NOT_LOOPBACK, Severity::Medium),
];

/// One thing the self-check found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable, machine-readable: one of [`CODES`].
    pub code: &'static str,
    pub severity: Severity,
    /// The file, device or configuration table concerned.
    pub subject: String,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub fix: String,
}

/// The result of one self-check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub gateway_id: String,
    /// When the check ran (the `now_ms` it was given), ms since the Unix epoch.
    pub checked_ms: u64,
    /// Most severe first, then by code and subject.
    pub findings: Vec<Finding>,
}

impl Report {
    /// The highest severity found; `None` when nothing was found.
    pub fn max_severity(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.severity).max()
    }

    /// The findings of `severity` or above.
    pub fn at_least(&self, severity: Severity) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.severity >= severity)
    }

    /// The findings with this code.
    pub fn with_code<'a>(&'a self, code: &'a str) -> impl Iterator<Item = &'a Finding> {
        self.findings.iter().filter(move |f| f.code == code)
    }
}

/// The default of [`CheckOptions::expiry_warning_days`].
pub const DEFAULT_EXPIRY_WARNING_DAYS: u32 = 30;

/// What the check needs besides the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// The time the check runs at, ms since the Unix epoch.
    pub now_ms: u64,
    /// Certificates that expire within this many days are reported (default 30).
    pub expiry_warning_days: u32,
    /// The development profile: dev PKI material is expected (reported as info).
    pub dev_profile: bool,
}

impl CheckOptions {
    /// The defaults at `now_ms`: 30 days of expiry warning, production profile.
    pub fn at(now_ms: u64) -> Self {
        CheckOptions {
            now_ms,
            expiry_warning_days: DEFAULT_EXPIRY_WARNING_DAYS,
            dev_profile: false,
        }
    }
}

impl Default for CheckOptions {
    /// The defaults at the current time.
    fn default() -> Self {
        CheckOptions::at(crate::clock::now_ms())
    }
}

/// 2024-01-01T00:00:00Z.
const PLAUSIBLE_FROM_MS: u64 = 1_704_067_200_000;
/// 2100-01-01T00:00:00Z.
const PLAUSIBLE_UNTIL_MS: u64 = 4_102_444_800_000;
const DAY_MS: i128 = 86_400_000;

/// Runs every check against `cfg` as the running process.
pub fn check(cfg: &Config, opts: &CheckOptions) -> Report {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok();
    check_as(
        cfg,
        opts,
        Identity::current().as_ref(),
        mountinfo.as_deref(),
    )
}

/// [`check`] for a given identity and mount table (tests use both).
fn check_as(
    cfg: &Config,
    opts: &CheckOptions,
    who: Option<&Identity>,
    mountinfo: Option<&str>,
) -> Report {
    let mut c = Checker {
        opts,
        who,
        findings: Vec::new(),
    };
    c.clock();
    c.key_files(cfg);
    c.certificates(cfg);
    c.opcua(cfg);
    c.tls(cfg);
    c.commands(cfg);
    c.audit_log(cfg, mountinfo);
    c.metrics(cfg);
    let mut findings = c.findings;
    findings.sort_by(|a, b| {
        b.severity
            .cmp(&a.severity)
            .then_with(|| a.code.cmp(b.code))
            .then_with(|| a.subject.cmp(&b.subject))
    });
    Report {
        gateway_id: cfg.gateway.id.clone(),
        checked_ms: opts.now_ms,
        findings,
    }
}

/// The effective user, groups and file-access override of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    uid: u32,
    /// The effective group and the supplementary groups.
    gids: Vec<u32>,
    /// `CAP_DAC_OVERRIDE`: permission bits do not restrict this process.
    dac_override: bool,
}

const CAP_DAC_OVERRIDE: u32 = 1;

impl Identity {
    fn current() -> Option<Identity> {
        Identity::parse_status(&fs::read_to_string("/proc/self/status").ok()?)
    }

    /// Reads `Uid:`, `Gid:`, `Groups:` and `CapEff:` of `/proc/<pid>/status`.
    fn parse_status(text: &str) -> Option<Identity> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        let effective =
            |name: &str| -> Option<u32> { field(name)?.split_whitespace().nth(1)?.parse().ok() };
        let uid = effective("Uid")?;
        let mut gids = vec![effective("Gid")?];
        for g in field("Groups").unwrap_or("").split_whitespace() {
            gids.push(g.parse().ok()?);
        }
        let caps = u64::from_str_radix(field("CapEff").unwrap_or("0"), 16).ok()?;
        Some(Identity {
            uid,
            gids,
            dac_override: caps & (1 << CAP_DAC_OVERRIDE) != 0,
        })
    }

    /// Whether the permission bits of `meta` grant all of `want` (a
    /// combination of 4 = read, 2 = write, 1 = search) to this identity.
    fn allows(&self, meta: &Metadata, want: u32) -> bool {
        if self.dac_override {
            return true;
        }
        let mode = meta.mode();
        let class = if meta.uid() == self.uid {
            mode >> 6
        } else if self.gids.contains(&meta.gid()) {
            mode >> 3
        } else {
            mode
        };
        class & want == want
    }
}

/// The mount point of the mount holding `path` (already canonical), if that
/// mount or its file system is read-only, from `/proc/self/mountinfo` text.
fn read_only_mount(path: &Path, mountinfo: &str) -> Option<PathBuf> {
    let mut best: Option<(usize, PathBuf, bool)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        if fields.len() < 6 || sep < 6 {
            continue;
        }
        let point = PathBuf::from(unescape_mount(fields[4]));
        if !path.starts_with(&point) {
            continue;
        }
        let ro = |opts: Option<&&str>| opts.is_some_and(|o| o.split(',').any(|o| o == "ro"));
        let read_only = ro(fields.get(5)) || ro(fields.get(sep + 3));
        let depth = point.components().count();
        // Later lines of the same depth are mounts on top of earlier ones.
        if best.as_ref().is_none_or(|(d, _, _)| depth >= *d) {
            best = Some((depth, point, read_only));
        }
    }
    best.filter(|(_, _, ro)| *ro).map(|(_, p, _)| p)
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo fields.
fn unescape_mount(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
                out.push(v as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn show(path: &Path) -> String {
    path.display().to_string()
}

/// An instant (ms since the epoch) as RFC 3339.
fn date_ms(ms: i128) -> String {
    crate::clock::rfc3339_ms(ms)
}

/// What to do about a certificate of this kind.
fn renew(kind: CertKind, file: &str) -> String {
    match kind {
        CertKind::MqttClient => format!(
            "issue a new client certificate for the gateway from the plant's CA, replace {file} and the key in [mqtt.tls] key_file, and restart the gateway"
        ),
        CertKind::Ca => format!(
            "replace {file} with the plant CA's current certificate (the broker's certificate must chain to it) and restart the gateway"
        ),
        CertKind::OpcUaClient => format!(
            "make a new application instance certificate and key, replace {file} (DER) and private_key_file, have the server's administrator trust the new certificate, and restart the gateway"
        ),
        CertKind::OpcUaUser => format!(
            "issue a new user certificate, replace {file} and user_key_file, have the server's administrator accept it, and restart the gateway"
        ),
    }
}

struct Checker<'a> {
    opts: &'a CheckOptions,
    who: Option<&'a Identity>,
    findings: Vec<Finding>,
}

impl Checker<'_> {
    fn add(
        &mut self,
        code: &'static str,
        severity: Severity,
        subject: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.findings.push(Finding {
            code,
            severity,
            subject: subject.into(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    fn clock(&mut self) {
        let now = self.opts.now_ms;
        let when = if now < PLAUSIBLE_FROM_MS {
            "before 2024-01-01"
        } else if now > PLAUSIBLE_UNTIL_MS {
            "after 2100-01-01"
        } else {
            return;
        };
        self.add(
            codes::CLOCK_NOT_PLAUSIBLE,
            Severity::Critical,
            "clock",
            format!(
                "the system clock reads {} ({when}): certificate validity, token times, policy time windows and signed timestamps are all wrong",
                date_ms(i128::from(now))
            ),
            "set the clock and keep it synchronised (NTP or PTP from the plant's time source; a real-time clock with a battery on edge boxes), then run the check again",
        );
    }

    fn file_missing(&mut self, path: &Path, what: &str, why: String) {
        let file = show(path);
        self.add(
            codes::FILE_MISSING,
            Severity::High,
            file.clone(),
            format!("{what} {file} {why}: the gateway cannot start with it"),
            format!("put the {what} at {file}, readable by the gateway's user, or correct the path in gateway.toml"),
        );
    }

    /// Every private key (and secret) file the configuration names.
    fn key_files(&mut self, cfg: &Config) {
        let mut files: Vec<(String, &Path)> = vec![
            ("signing key".into(), &cfg.signing.key_file),
            ("MQTT client private key".into(), &cfg.mqtt.tls.key_file),
        ];
        if let Some(k) = &cfg.outbox.encryption_key_file {
            files.push(("outbox encryption key".into(), k));
        }
        for d in &cfg.devices {
            let DeviceConfig::OpcUa(d) = d else { continue };
            files.push((
                format!("OPC UA client private key of device {}", d.name),
                &d.private_key_file,
            ));
            match &d.identity {
                OpcUaIdentity::Anonymous => {}
                OpcUaIdentity::UserName { password_file, .. } => files.push((
                    format!("OPC UA password file of device {}", d.name),
                    password_file,
                )),
                OpcUaIdentity::X509 { key_file, .. } => files.push((
                    format!("OPC UA user private key of device {}", d.name),
                    key_file,
                )),
            }
        }
        let mut seen = BTreeSet::new();
        for (what, path) in files {
            if seen.insert(path) {
                self.key_file(&what, path);
            }
        }
    }

    fn key_file(&mut self, what: &str, path: &Path) {
        let meta = match fs::metadata(path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => return self.file_missing(path, what, "is not a plain file".into()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.file_missing(path, what, "does not exist".into())
            }
            Err(e) => return self.file_missing(path, what, format!("cannot be examined ({e})")),
        };
        let file = show(path);
        let mut wrong = Vec::new();
        let mut fix = Vec::new();
        match keyfile::check_private(path) {
            Ok(()) => {}
            Err(KeyFileError::TooOpen { mode, .. }) => {
                wrong.push(format!("is readable by group or others (mode {mode:04o})"));
                fix.push(format!("chmod 600 {file}"));
            }
            Err(e) => return self.file_missing(path, what, format!("cannot be examined ({e})")),
        }
        if let Some(who) = self.who {
            if meta.uid() != who.uid {
                wrong.push(format!(
                    "is owned by uid {}, not by the gateway's user (uid {})",
                    meta.uid(),
                    who.uid
                ));
                fix.push(format!("chown {} {file}", who.uid));
            }
        }
        if !wrong.is_empty() {
            self.add(
                codes::KEY_FILE_PERMISSIONS,
                Severity::High,
                file.clone(),
                format!("{what} {file} {}", wrong.join(" and ")),
                format!(
                    "run `{}`; a key another account could read must be considered disclosed: replace it if that may have happened",
                    fix.join(" && ")
                ),
            );
        }
        if let Err(e) = fs::File::open(path) {
            self.file_missing(path, what, format!("cannot be read ({e})"));
        }
    }

    /// Every certificate file the configuration names.
    fn certificates(&mut self, cfg: &Config) {
        for f in cfg.certificate_files() {
            let device = f.device.unwrap_or_default();
            let what = match f.kind {
                CertKind::MqttClient => "MQTT client certificate".to_string(),
                CertKind::Ca => "CA file".to_string(),
                CertKind::OpcUaClient => format!("OPC UA client certificate of device {device}"),
                CertKind::OpcUaUser => format!("OPC UA user certificate of device {device}"),
            };
            self.certificate_file(&what, f.kind, f.path);
        }
    }

    fn certificate_file(&mut self, what: &str, kind: CertKind, path: &Path) {
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return self.file_missing(path, what, "does not exist".into())
            }
            Err(e) => return self.file_missing(path, what, format!("cannot be read ({e})")),
        };
        let file = show(path);
        let invalid = |c: &mut Self, why: String| {
            c.add(
                codes::CERTIFICATE_INVALID,
                Severity::High,
                file.clone(),
                format!("{what} {file} {why}"),
                format!("put the certificate in {file} (PEM, or DER for the OPC UA client certificate) or correct the path in gateway.toml"),
            );
        };
        let ders = match certificate_ders(&bytes) {
            Ok(d) if d.is_empty() => return invalid(self, "holds no certificate".into()),
            Ok(d) => d,
            Err(why) => return invalid(self, why),
        };
        let count = ders.len();
        for (i, der) in ders.iter().enumerate() {
            let cert = match x509_parser::parse_x509_certificate(der) {
                Ok((_, cert)) => cert,
                Err(e) => {
                    invalid(
                        self,
                        format!("certificate {} cannot be parsed ({e})", i + 1),
                    );
                    continue;
                }
            };
            let subject = cert.subject().to_string();
            let name = if count > 1 {
                format!(
                    "{what} {file}: certificate {} of {count} ({subject})",
                    i + 1
                )
            } else {
                format!("{what} {file} ({subject})")
            };
            self.validity(&file, &name, kind, &cert);
            let dev = [cert.subject(), cert.issuer()].into_iter().any(|n| {
                n.iter_organizational_unit()
                    .any(|ou| ou.as_str().is_ok_and(|s| s == DEV_OU))
            });
            if dev {
                self.dev_pki(&file, &name, kind);
            }
        }
    }

    fn validity(
        &mut self,
        file: &str,
        name: &str,
        kind: CertKind,
        cert: &x509_parser::certificate::X509Certificate<'_>,
    ) {
        let now = i128::from(self.opts.now_ms);
        let not_before = i128::from(cert.validity().not_before.timestamp()) * 1000;
        let not_after = i128::from(cert.validity().not_after.timestamp()) * 1000;
        let warn = i128::from(self.opts.expiry_warning_days) * DAY_MS;
        if not_after < now {
            self.add(
                codes::CERTIFICATE_EXPIRED,
                Severity::Critical,
                file,
                format!("{name} expired on {}: peers refuse it", date_ms(not_after)),
                renew(kind, file),
            );
        } else if not_before > now {
            self.add(
                codes::CERTIFICATE_NOT_YET_VALID,
                Severity::High,
                file,
                format!(
                    "{name} is valid only from {}: peers refuse it until then",
                    date_ms(not_before)
                ),
                format!(
                    "check the clock of this machine and of the issuer; if both are right, {}",
                    renew(kind, file)
                ),
            );
        } else if not_after - now <= warn {
            let left = match not_after - now {
                ms if ms < DAY_MS => "in less than a day".to_string(),
                ms if ms < DAY_MS * 3 / 2 => "in 1 day".to_string(),
                ms => format!("in {} days", (ms + DAY_MS / 2) / DAY_MS),
            };
            self.add(
                codes::CERTIFICATE_EXPIRING,
                Severity::Medium,
                file,
                format!("{name} expires on {} ({left})", date_ms(not_after)),
                format!("before it expires, {}", renew(kind, file)),
            );
        }
    }

    fn dev_pki(&mut self, file: &str, name: &str, kind: CertKind) {
        if self.opts.dev_profile {
            self.add(
                codes::DEV_PKI_IN_PRODUCTION,
                Severity::Info,
                file,
                format!("{name} comes from the development PKI ({DEV_OU}), as expected in the dev profile"),
                "nothing in the dev profile; replace every dev PKI certificate and key before the gateway goes into production",
            );
        } else {
            self.add(
                codes::DEV_PKI_IN_PRODUCTION,
                Severity::Critical,
                file,
                format!("{name} comes from the development PKI ({DEV_OU}): its keys were made on a developer's machine and are not under the plant's control"),
                format!("use the plant's PKI: {}", renew(kind, file)),
            );
        }
    }

    fn opcua(&mut self, cfg: &Config) {
        for d in &cfg.devices {
            let DeviceConfig::OpcUa(d) = d else { continue };
            if d.security_policy == Some(OpcUaPolicy::None) {
                self.add(
                    codes::OPCUA_SECURITY_NONE,
                    Severity::High,
                    d.name.clone(),
                    format!(
                        "device {} ({}) uses OPC UA security policy None: values, writes and the login travel unsigned and unencrypted",
                        d.name, d.endpoint_url
                    ),
                    format!(
                        "enable a secure endpoint on the server (Basic256Sha256, Aes128_Sha256_RsaOaep or Aes256_Sha256_RsaPss with SignAndEncrypt), then remove security_policy = \"None\" and allow_security_none from device {}",
                        d.name
                    ),
                );
            } else if d.security_mode == OpcUaMode::Sign {
                self.add(
                    codes::OPCUA_SIGN_ONLY,
                    Severity::Low,
                    d.name.clone(),
                    format!(
                        "device {} ({}) uses security mode Sign: messages are signed but values travel unencrypted",
                        d.name, d.endpoint_url
                    ),
                    format!(
                        "offer SignAndEncrypt on the server and set security_mode = \"sign_and_encrypt\" (the default) for device {}",
                        d.name
                    ),
                );
            }
        }
    }

    fn tls(&mut self, cfg: &Config) {
        if cfg.mqtt.tls.min_version == TlsVersion::Tls12 {
            self.add(
                codes::TLS12_ALLOWED,
                Severity::Low,
                "[mqtt.tls]",
                "min_version = \"1.2\": the gateway also offers TLS 1.2 to the broker, so a downgraded or older broker is accepted",
                "once the broker supports TLS 1.3, set min_version = \"1.3\" in [mqtt.tls] (or remove the key: 1.3 is the default)",
            );
        }
    }

    fn commands(&mut self, cfg: &Config) {
        let Some(cc) = &cfg.commands else { return };
        let dir = show(&cc.policy_dir);
        match Policy::load_dir(&cc.policy_dir, cfg) {
            Err(errors) => {
                let first = errors
                    .errors
                    .first()
                    .map(|e| format!(", the first: {e}"))
                    .unwrap_or_default();
                self.add(
                    codes::COMMANDS_WITHOUT_POLICY,
                    Severity::High,
                    dir.clone(),
                    format!(
                        "[commands] is configured but the policy in {dir} cannot be used ({} error(s){first}): every command is denied",
                        errors.errors.len()
                    ),
                    format!("put a valid policy in {dir} and check it with `gateway policy check {dir} -c gateway.toml`; or remove [commands] if the gateway should accept no command"),
                );
            }
            Ok((policy, _)) if policy.mode() == Mode::Audit => {
                self.add(
                    codes::POLICY_AUDIT_MODE,
                    Severity::Medium,
                    dir.clone(),
                    format!("the command policy in {dir} is in audit mode: every command is denied and only recorded"),
                    "when the policy has been tried, set mode = \"enforce\" in its [policy] table",
                );
            }
            Ok(_) => {}
        }
        let keys = show(&cc.operator_keys_dir);
        let problem = match OperatorTrustStore::load_dir(&cc.operator_keys_dir) {
            Ok(store) if store.is_empty() => Some(format!("{keys} holds no operator key (*.pem)")),
            Ok(_) => None,
            Err(e) => Some(format!(
                "the operator keys in {keys} cannot be loaded ({e})"
            )),
        };
        if let Some(problem) = problem {
            self.add(
                codes::NO_OPERATOR_KEYS,
                Severity::High,
                keys.clone(),
                format!("{problem}: every command is refused"),
                format!("put the operators' public keys (one *.pem each, Ed25519 or P-256) in {keys} and restart the gateway"),
            );
        }
    }

    fn audit_log(&mut self, cfg: &Config, mountinfo: Option<&str>) {
        let path = &cfg.audit.file;
        let file = show(path);
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let shown = show(&folder);
        let not_writable = |c: &mut Self, subject: &str, why: String, fix: String| {
            c.add(
                codes::AUDIT_LOG_NOT_WRITABLE,
                Severity::High,
                subject,
                format!("the audit log {file} {why}: every command is refused (audit_unavailable) while it cannot be written"),
                fix,
            );
        };
        let user = match self.who {
            Some(w) => format!("the gateway's user (uid {})", w.uid),
            None => "the gateway's user".to_string(),
        };
        match fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_file() => not_writable(
                self,
                &file,
                "is not a plain file (a symlink, folder or device; the audit log refuses those)".into(),
                format!("move it away and let the gateway create {file}, or point [audit] file at a plain file"),
            ),
            Ok(m) => {
                if let Some(who) = self.who {
                    if !who.allows(&m, 0o6) {
                        not_writable(
                            self,
                            &file,
                            format!(
                                "cannot be read and appended to by {user} (mode {:04o}, owner uid {})",
                                m.mode() & 0o7777,
                                m.uid()
                            ),
                            format!("chown {} {file} && chmod 600 {file}", who.uid),
                        );
                    }
                }
                if let Err(e) = OpenOptions::new().read(true).append(true).open(path) {
                    not_writable(
                        self,
                        &file,
                        format!("cannot be opened for append ({e})"),
                        format!("make {file} readable and writable by {user} (mode 0600), on a writable file system"),
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => not_writable(
                self,
                &file,
                format!("cannot be examined ({e})"),
                format!("make {shown} accessible to {user}"),
            ),
        }

        // The folder: the log is created there, and a log that does not
        // verify is renamed aside there.
        let existing = match fs::metadata(&folder) {
            Ok(m) if m.is_dir() => Some(folder.clone()),
            Ok(_) => {
                not_writable(
                    self,
                    &shown,
                    format!("is in {shown}, which is not a folder"),
                    "point [audit] file at a file in a writable folder".into(),
                );
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if folder == cfg.gateway.data_dir {
                    // The gateway creates its data directory at start.
                    folder
                        .ancestors()
                        .skip(1)
                        .find(|a| a.is_dir())
                        .map(Path::to_path_buf)
                } else {
                    not_writable(
                        self,
                        &shown,
                        format!("is in {shown}, which does not exist (the gateway creates only its data directory)"),
                        format!("create {shown}, writable by {user} (mode 0700), or put the audit log in the data directory"),
                    );
                    None
                }
            }
            Err(e) => {
                not_writable(
                    self,
                    &shown,
                    format!("is in {shown}, which cannot be examined ({e})"),
                    format!("make {shown} accessible to {user}"),
                );
                None
            }
        };
        let Some(dir) = existing else { return };
        let dir_shown = show(&dir);
        if let (Some(who), Ok(m)) = (self.who, fs::metadata(&dir)) {
            if !who.allows(&m, 0o3) {
                not_writable(
                    self,
                    &dir_shown,
                    format!(
                        "is in {dir_shown}, where {user} cannot create or rename files (mode {:04o}, owner uid {})",
                        m.mode() & 0o7777,
                        m.uid()
                    ),
                    format!("chown {} {dir_shown} && chmod 700 {dir_shown}", who.uid),
                );
            }
        }
        let canonical = fs::canonicalize(&dir).unwrap_or(dir);
        if let Some(point) = mountinfo.and_then(|m| read_only_mount(&canonical, m)) {
            not_writable(
                self,
                &dir_shown,
                format!(
                    "is in {dir_shown}, on the read-only mount {}",
                    point.display()
                ),
                "put the audit log on a writable volume (the data directory, /data in the container)".into(),
            );
        }
    }

    fn metrics(&mut self, cfg: &Config) {
        let Some(m) = &cfg.metrics else { return };
        if !m.listen.ip().to_canonical().is_loopback() {
            self.add(
                codes::METRICS_NOT_LOOPBACK,
                Severity::Medium,
                "[metrics]",
                format!(
                    "the metrics and health endpoint listens on {} without authentication or TLS: anyone who can reach it learns the devices, their state and the command outcomes",
                    m.listen
                ),
                "set listen = \"127.0.0.1:9464\" in [metrics] and let a local agent or an authenticating proxy forward the metrics; if it must listen on the network, allow only the monitoring server in the host's firewall",
            );
        }
    }
}

/// The certificates of a PEM file (every `CERTIFICATE` block) or a DER file.
pub fn certificate_ders(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let is_pem = bytes
        .windows(b"-----BEGIN ".len())
        .any(|w| w == b"-----BEGIN ");
    if !is_pem {
        return Ok(if bytes.is_empty() {
            Vec::new()
        } else {
            vec![bytes.to_vec()]
        });
    }
    let mut ders = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bytes) {
        let pem = pem.map_err(|e| format!("holds a PEM block that cannot be read ({e})"))?;
        if pem.label == "CERTIFICATE" {
            ders.push(pem.contents);
        }
    }
    Ok(ders)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, MetricsConfig};
    use crate::pki::{self, Ca, DevPkiFiles, DevPkiOptions, Validity};
    use std::os::unix::fs::PermissionsExt;

    const POLICY: &str = r#"
[policy]
mode = "enforce"

[[roles]]
name = "operator"
subjects = ["alice@plant1"]

[[rules]]
id = "setpoint"
description = "Operators adjust the setpoint."
roles = ["operator"]
tags = ["tank.setpoint"]
min = 0
max = 100
"#;

    const GATEWAY_TOML: &str = r#"
[gateway]
id = "selfcheck-gw"
data_dir = "data"

[signing]
key_file = "pki/gateway-signing.key.pem"

[mqtt]
host = "localhost"

[mqtt.tls]
ca_file = "pki/ca.crt.pem"
cert_file = "pki/gateway.crt.pem"
key_file = "pki/gateway.key.pem"

[outbox]
encryption_key_file = "pki/outbox.key"

[commands]
policy_dir = "policies"
operator_keys_dir = "operators"
issuer = "plant-ops"

[metrics]
listen = "127.0.0.1:9464"

[[devices]]
name = "plc1"
protocol = "modbus-tcp"
address = "127.0.0.1:5020"

[[devices.tags]]
name = "tank.setpoint"
area = "holding_register"
address = 0
type = "u16"
writable = true

[[devices]]
name = "opc1"
protocol = "opcua"
endpoint_url = "opc.tcp://127.0.0.1:4840/"
certificate_file = "pki/opcua/own/cert.der"
private_key_file = "pki/opcua/private/private.pem"
user = "gateway"
password_file = "pki/opcua-password"

[[devices.tags]]
name = "tank.level"
node_id = "ns=2;s=Tank.Level"
type = "double"

[[devices]]
name = "opc2"
protocol = "opcua"
endpoint_url = "opc.tcp://127.0.0.1:4841/"
certificate_file = "pki/opcua/own/cert.der"
private_key_file = "pki/opcua/private/private.pem"
user_certificate_file = "pki/operator.crt.pem"
user_key_file = "pki/operator.key.pem"

[[devices.tags]]
name = "tank.temperature"
node_id = "ns=2;s=Tank.Temperature"
type = "double"
"#;

    /// A complete, healthy installation in a temporary folder: the dev
    /// PKI, an outbox key, an OPC UA password file, a policy, an operator
    /// key, a data directory with an audit log, and its configuration.
    struct Fixture {
        dir: tempfile::TempDir,
        pki: DevPkiFiles,
        cfg: Config,
        opts: CheckOptions,
        who: Identity,
    }

    fn chmod(path: &Path, mode: u32) {
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path();
            let pki = pki::create_dev_pki(&DevPkiOptions {
                out_dir: root.join("pki"),
                gateway_id: "selfcheck-gw".into(),
                broker_hosts: vec!["localhost".into()],
                operator: "operator-1".into(),
                valid_days: 365,
            })
            .unwrap();
            crate::keyfile::write_private(&root.join("pki/outbox.key"), &"ab".repeat(32)).unwrap();
            crate::keyfile::write_private(&root.join("pki/opcua-password"), "secret").unwrap();
            fs::create_dir(root.join("policies")).unwrap();
            fs::write(root.join("policies/plant.toml"), POLICY).unwrap();
            fs::create_dir(root.join("operators")).unwrap();
            fs::copy(
                &pki.operator_signing_pub,
                root.join("operators/operator-1.pem"),
            )
            .unwrap();
            fs::create_dir(root.join("data")).unwrap();
            chmod(&root.join("data"), 0o700);
            crate::keyfile::write_private(&root.join("data/audit.jsonl"), "").unwrap();
            let path = root.join("gateway.toml");
            fs::write(&path, GATEWAY_TOML).unwrap();
            let cfg = match config::load(&path) {
                Ok(cfg) => cfg,
                Err(e) => panic!("fixture configuration:\n{e}"),
            };
            // The test process may be root: judge permission bits as a
            // plain user owning the files would.
            let meta = fs::metadata(root).unwrap();
            let who = Identity {
                uid: meta.uid(),
                gids: vec![meta.gid()],
                dac_override: false,
            };
            let mut opts = CheckOptions::at(crate::clock::now_ms());
            opts.dev_profile = true;
            Fixture {
                dir,
                pki,
                cfg,
                opts,
                who,
            }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.dir.path().join(rel)
        }

        fn run(&self) -> Report {
            check_as(&self.cfg, &self.opts, Some(&self.who), None)
        }

        /// The subjects of the findings with `code`, all of `severity`.
        fn found(&self, code: &str, severity: Severity) -> BTreeSet<String> {
            let report = self.run();
            report
                .with_code(code)
                .map(|f| {
                    assert_eq!(f.severity, severity, "{f:?}");
                    assert!(!f.message.is_empty() && !f.fix.is_empty(), "{f:?}");
                    f.subject.clone()
                })
                .collect()
        }

        fn opcua(&mut self, name: &str) -> &mut crate::config::OpcUaDeviceConfig {
            self.cfg
                .devices
                .iter_mut()
                .find_map(|d| match d {
                    DeviceConfig::OpcUa(d) if d.name == name => Some(d),
                    _ => None,
                })
                .unwrap()
        }
    }

    fn set<P: AsRef<Path>>(paths: impl IntoIterator<Item = P>) -> BTreeSet<String> {
        paths.into_iter().map(|p| show(p.as_ref())).collect()
    }

    /// The key files of the fixture, one of each kind.
    fn key_files(f: &Fixture) -> Vec<PathBuf> {
        vec![
            f.pki.gateway_signing_key.clone(),
            f.pki.gateway_key.clone(),
            f.path("pki/outbox.key"),
            f.pki.opcua_key.clone(),
            f.path("pki/opcua-password"),
            f.pki.operator_key.clone(),
        ]
    }

    /// The certificate files of the fixture.
    fn cert_files(f: &Fixture) -> Vec<PathBuf> {
        vec![
            f.pki.gateway_cert.clone(),
            f.pki.ca_cert.clone(),
            f.pki.opcua_cert.clone(),
            f.pki.operator_cert.clone(),
        ]
    }

    fn validity_days(from: i64, to: i64) -> Validity {
        let now = time::OffsetDateTime::now_utc();
        Validity {
            not_before: now + time::Duration::days(from),
            not_after: now + time::Duration::days(to),
        }
    }

    /// Writes a CA file, an MQTT client certificate and an OPC UA client
    /// certificate with this validity.
    fn write_certs(f: &Fixture, validity: Validity) {
        let ca = Ca::new("plant CA", validity).unwrap();
        fs::write(&f.pki.ca_cert, &ca.cert_pem).unwrap();
        let client = ca.issue_client("selfcheck-gw", validity).unwrap();
        fs::write(&f.pki.gateway_cert, &client.cert_pem).unwrap();
        let (der, _) = pki::opcua_application_cert("urn:selfcheck", &[], validity).unwrap();
        fs::write(&f.pki.opcua_cert, der).unwrap();
    }

    #[test]
    fn selfcheck_clean_fixture_has_nothing_above_info() {
        let f = Fixture::new();
        let report = f.run();
        assert_eq!(report.gateway_id, "selfcheck-gw");
        assert_eq!(report.checked_ms, f.opts.now_ms);
        assert_eq!(report.max_severity(), Some(Severity::Info), "{report:#?}");
        // The only remark: the dev PKI, on every certificate file.
        assert!(report
            .findings
            .iter()
            .all(|x| x.code == codes::DEV_PKI_IN_PRODUCTION));
        let files = cert_files(&f);
        assert_eq!(
            f.found(codes::DEV_PKI_IN_PRODUCTION, Severity::Info),
            set(&files)
        );
        // The same as the running process, with its own mount table.
        let own = check(&f.cfg, &f.opts);
        assert_eq!(own.max_severity(), Some(Severity::Info), "{own:#?}");
        assert!(report.at_least(Severity::Low).next().is_none());
    }

    #[test]
    fn selfcheck_key_file_permissions_and_owner() {
        let mut f = Fixture::new();
        let keys = key_files(&f);
        let all = set(&keys);
        for k in &keys {
            chmod(k, 0o644);
        }
        assert_eq!(f.found(codes::KEY_FILE_PERMISSIONS, Severity::High), all);
        let report = f.run();
        let one = report
            .with_code(codes::KEY_FILE_PERMISSIONS)
            .next()
            .unwrap();
        assert!(one.message.contains("mode 0644"), "{one:?}");
        assert!(one.fix.contains("chmod 600"), "{one:?}");
        for k in &keys {
            chmod(k, 0o600);
        }
        assert!(f
            .found(codes::KEY_FILE_PERMISSIONS, Severity::High)
            .is_empty());

        // Owned by another user than the one the gateway runs as.
        f.who.uid += 1;
        let report = f.run();
        let owner: BTreeSet<String> = report
            .with_code(codes::KEY_FILE_PERMISSIONS)
            .inspect(|x| assert!(x.message.contains("not by the gateway's user"), "{x:?}"))
            .map(|x| x.subject.clone())
            .collect();
        assert_eq!(owner, all);
        f.who.uid -= 1;
        assert!(f
            .found(codes::KEY_FILE_PERMISSIONS, Severity::High)
            .is_empty());
    }

    #[test]
    fn selfcheck_missing_files_are_reported_not_panicked_on() {
        let f = Fixture::new();
        let key = fs::read(&f.pki.gateway_signing_key).unwrap();
        fs::remove_file(&f.pki.gateway_signing_key).unwrap();
        assert_eq!(
            f.found(codes::FILE_MISSING, Severity::High),
            set([&f.pki.gateway_signing_key])
        );
        fs::write(&f.pki.gateway_signing_key, key).unwrap();
        chmod(&f.pki.gateway_signing_key, 0o600);
        assert!(f.found(codes::FILE_MISSING, Severity::High).is_empty());

        // Nothing of the PKI left: every key and certificate is reported.
        fs::rename(f.path("pki"), f.path("pki.away")).unwrap();
        let mut files = key_files(&f);
        files.extend(cert_files(&f));
        assert_eq!(f.found(codes::FILE_MISSING, Severity::High), set(&files));
        fs::rename(f.path("pki.away"), f.path("pki")).unwrap();
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_expired_certificates() {
        let f = Fixture::new();
        write_certs(&f, Validity::expired());
        let expected = set([&f.pki.ca_cert, &f.pki.gateway_cert, &f.pki.opcua_cert]);
        assert_eq!(
            f.found(codes::CERTIFICATE_EXPIRED, Severity::Critical),
            expected
        );
        assert_eq!(f.run().max_severity(), Some(Severity::Critical));
        write_certs(&f, Validity::days(365));
        assert!(f
            .found(codes::CERTIFICATE_EXPIRED, Severity::Critical)
            .is_empty());
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_expiring_and_not_yet_valid_certificates() {
        let mut f = Fixture::new();
        let now = time::OffsetDateTime::now_utc();
        write_certs(
            &f,
            Validity {
                not_before: now - time::Duration::hours(1),
                not_after: now + time::Duration::days(5),
            },
        );
        let expected = set([&f.pki.ca_cert, &f.pki.gateway_cert, &f.pki.opcua_cert]);
        assert_eq!(
            f.found(codes::CERTIFICATE_EXPIRING, Severity::Medium),
            expected
        );
        let report = f.run();
        let one = report
            .with_code(codes::CERTIFICATE_EXPIRING)
            .next()
            .unwrap();
        assert!(one.message.contains("in 5 days"), "{one:?}");
        // Below the warning period: not reported.
        f.opts.expiry_warning_days = 3;
        assert!(f
            .found(codes::CERTIFICATE_EXPIRING, Severity::Medium)
            .is_empty());
        f.opts.expiry_warning_days = DEFAULT_EXPIRY_WARNING_DAYS;
        write_certs(&f, Validity::days(365));
        assert!(f
            .found(codes::CERTIFICATE_EXPIRING, Severity::Medium)
            .is_empty());

        write_certs(&f, validity_days(2, 400));
        assert_eq!(
            f.found(codes::CERTIFICATE_NOT_YET_VALID, Severity::High),
            expected
        );
        write_certs(&f, Validity::days(365));
        assert!(f
            .found(codes::CERTIFICATE_NOT_YET_VALID, Severity::High)
            .is_empty());
    }

    #[test]
    fn selfcheck_unreadable_certificates() {
        let f = Fixture::new();
        let good = fs::read(&f.pki.ca_cert).unwrap();
        fs::write(&f.pki.ca_cert, "not a certificate").unwrap();
        assert_eq!(
            f.found(codes::CERTIFICATE_INVALID, Severity::High),
            set([&f.pki.ca_cert])
        );
        // A PEM file with a key but no certificate.
        fs::copy(&f.pki.gateway_signing_pub, &f.pki.ca_cert).unwrap();
        assert_eq!(
            f.found(codes::CERTIFICATE_INVALID, Severity::High),
            set([&f.pki.ca_cert])
        );
        fs::write(&f.pki.ca_cert, good).unwrap();
        assert!(f
            .found(codes::CERTIFICATE_INVALID, Severity::High)
            .is_empty());
    }

    #[test]
    fn selfcheck_dev_pki_in_production() {
        let mut f = Fixture::new();
        f.opts.dev_profile = false;
        let files = cert_files(&f);
        assert_eq!(
            f.found(codes::DEV_PKI_IN_PRODUCTION, Severity::Critical),
            set(&files)
        );
        // A certificate from another PKI is not dev material.
        let other = rcgen::generate_simple_self_signed(vec!["selfcheck-gw".to_string()]).unwrap();
        fs::write(&f.pki.gateway_cert, other.cert.pem()).unwrap();
        let found = f.found(codes::DEV_PKI_IN_PRODUCTION, Severity::Critical);
        assert!(!found.contains(&show(&f.pki.gateway_cert)), "{found:?}");
        assert_eq!(found.len(), 3);
        // The dev profile expects dev material.
        f.opts.dev_profile = true;
        assert!(f
            .found(codes::DEV_PKI_IN_PRODUCTION, Severity::Info)
            .contains(&show(&f.pki.ca_cert)));
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_opcua_security() {
        let mut f = Fixture::new();
        let d = f.opcua("opc1");
        d.security_policy = Some(OpcUaPolicy::None);
        d.allow_security_none = true;
        assert_eq!(
            f.found(codes::OPCUA_SECURITY_NONE, Severity::High),
            BTreeSet::from(["opc1".to_string()])
        );
        assert!(f.found(codes::OPCUA_SIGN_ONLY, Severity::Low).is_empty());
        let d = f.opcua("opc1");
        d.security_policy = Some(OpcUaPolicy::Basic256Sha256);
        d.allow_security_none = false;
        assert!(f
            .found(codes::OPCUA_SECURITY_NONE, Severity::High)
            .is_empty());

        f.opcua("opc2").security_mode = OpcUaMode::Sign;
        assert_eq!(
            f.found(codes::OPCUA_SIGN_ONLY, Severity::Low),
            BTreeSet::from(["opc2".to_string()])
        );
        f.opcua("opc2").security_mode = OpcUaMode::SignAndEncrypt;
        assert!(f.found(codes::OPCUA_SIGN_ONLY, Severity::Low).is_empty());
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_tls12_allowed() {
        let mut f = Fixture::new();
        f.cfg.mqtt.tls.min_version = TlsVersion::Tls12;
        assert_eq!(
            f.found(codes::TLS12_ALLOWED, Severity::Low),
            BTreeSet::from(["[mqtt.tls]".to_string()])
        );
        f.cfg.mqtt.tls.min_version = TlsVersion::Tls13;
        assert!(f.found(codes::TLS12_ALLOWED, Severity::Low).is_empty());
    }

    #[test]
    fn selfcheck_commands_policy_and_operator_keys() {
        let f = Fixture::new();
        let policy = f.path("policies/plant.toml");
        let dir = BTreeSet::from([show(&f.path("policies"))]);
        // Missing policy.
        fs::remove_file(&policy).unwrap();
        assert_eq!(f.found(codes::COMMANDS_WITHOUT_POLICY, Severity::High), dir);
        // Invalid policy.
        fs::write(&policy, POLICY.replace("tank.setpoint", "tank.nowhere")).unwrap();
        assert_eq!(f.found(codes::COMMANDS_WITHOUT_POLICY, Severity::High), dir);
        // Audit mode.
        fs::write(&policy, POLICY.replace("\"enforce\"", "\"audit\"")).unwrap();
        assert!(f
            .found(codes::COMMANDS_WITHOUT_POLICY, Severity::High)
            .is_empty());
        assert_eq!(f.found(codes::POLICY_AUDIT_MODE, Severity::Medium), dir);
        fs::write(&policy, POLICY).unwrap();
        assert!(f
            .found(codes::POLICY_AUDIT_MODE, Severity::Medium)
            .is_empty());

        let keys = BTreeSet::from([show(&f.path("operators"))]);
        let key = f.path("operators/operator-1.pem");
        fs::rename(&key, f.path("operators/operator-1.pem.off")).unwrap();
        assert_eq!(f.found(codes::NO_OPERATOR_KEYS, Severity::High), keys);
        fs::write(&key, "not a key").unwrap();
        assert_eq!(f.found(codes::NO_OPERATOR_KEYS, Severity::High), keys);
        fs::rename(f.path("operators/operator-1.pem.off"), &key).unwrap();
        assert!(f.found(codes::NO_OPERATOR_KEYS, Severity::High).is_empty());
        assert_eq!(f.run().max_severity(), Some(Severity::Info));

        // Without [commands], neither is looked at.
        let mut f = f;
        fs::remove_file(&policy).unwrap();
        fs::remove_file(&key).unwrap();
        f.cfg.commands = None;
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_audit_log_not_writable() {
        let mut f = Fixture::new();
        let log = f.cfg.audit.file.clone();
        let data = f.path("data");
        assert_eq!(log, data.join("audit.jsonl"));
        let none = || BTreeSet::<String>::new();

        // The file is read-only.
        chmod(&log, 0o400);
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            set([&log])
        );
        chmod(&log, 0o600);
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            none()
        );

        // Not a plain file: the real open fails too, whoever runs the test.
        fs::remove_file(&log).unwrap();
        fs::create_dir(&log).unwrap();
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            set([&log])
        );
        fs::remove_dir(&log).unwrap();
        // Not there yet: created at start.
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            none()
        );

        // The folder cannot be written.
        chmod(&data, 0o500);
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            set([&data])
        );
        chmod(&data, 0o700);
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            none()
        );

        // A folder that does not exist: only the data directory is created.
        f.cfg.audit.file = f.path("elsewhere/audit.jsonl");
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            set([&f.path("elsewhere")])
        );
        f.cfg.gateway.data_dir = f.path("elsewhere");
        assert_eq!(
            f.found(codes::AUDIT_LOG_NOT_WRITABLE, Severity::High),
            none()
        );

        // The folder is on a read-only mount.
        f.cfg.gateway.data_dir = data.clone();
        f.cfg.audit.file = log.clone();
        let root = fs::canonicalize(f.dir.path()).unwrap();
        let mountinfo = format!(
            "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
             40 22 0:40 / {} ro,nosuid shared:9 - tmpfs tmpfs rw\n",
            root.display()
        );
        let report = check_as(&f.cfg, &f.opts, Some(&f.who), Some(&mountinfo));
        let ro: Vec<&Finding> = report.with_code(codes::AUDIT_LOG_NOT_WRITABLE).collect();
        assert_eq!(ro.len(), 1, "{report:#?}");
        assert!(ro[0].message.contains("read-only mount"), "{:?}", ro[0]);
        let rw = mountinfo.replace("ro,nosuid", "rw,nosuid");
        let report = check_as(&f.cfg, &f.opts, Some(&f.who), Some(&rw));
        assert_eq!(report.with_code(codes::AUDIT_LOG_NOT_WRITABLE).count(), 0);
    }

    #[test]
    fn selfcheck_clock_not_plausible() {
        let mut f = Fixture::new();
        let now = f.opts.now_ms;
        let clock = BTreeSet::from(["clock".to_string()]);
        f.opts.now_ms = 1_000; // 1970
        assert_eq!(
            f.found(codes::CLOCK_NOT_PLAUSIBLE, Severity::Critical),
            clock
        );
        f.opts.now_ms = PLAUSIBLE_FROM_MS - 1;
        assert_eq!(
            f.found(codes::CLOCK_NOT_PLAUSIBLE, Severity::Critical),
            clock
        );
        f.opts.now_ms = 7_258_118_400_000; // 2200
        assert_eq!(
            f.found(codes::CLOCK_NOT_PLAUSIBLE, Severity::Critical),
            clock
        );
        f.opts.now_ms = now;
        assert!(f
            .found(codes::CLOCK_NOT_PLAUSIBLE, Severity::Critical)
            .is_empty());
        assert_eq!(f.run().max_severity(), Some(Severity::Info));
    }

    #[test]
    fn selfcheck_metrics_not_loopback() {
        let mut f = Fixture::new();
        let table = BTreeSet::from(["[metrics]".to_string()]);
        for (listen, exposed) in [
            ("0.0.0.0:9464", true),
            ("192.0.2.10:9464", true),
            ("[::]:9464", true),
            ("127.0.0.1:9464", false),
            ("[::1]:9464", false),
            ("[::ffff:127.0.0.1]:9464", false),
        ] {
            f.cfg.metrics = Some(MetricsConfig {
                listen: listen.parse().unwrap(),
            });
            let found = f.found(codes::METRICS_NOT_LOOPBACK, Severity::Medium);
            assert_eq!(found == table, exposed, "{listen}: {found:?}");
            assert_eq!(found.is_empty(), !exposed, "{listen}");
        }
        f.cfg.metrics = None;
        assert!(f
            .found(codes::METRICS_NOT_LOOPBACK, Severity::Medium)
            .is_empty());
    }

    #[test]
    fn selfcheck_severity_order_names_and_report_helpers() {
        let mut sorted = Severity::ALL;
        sorted.sort();
        assert_eq!(sorted, Severity::ALL);
        assert!(Severity::Info < Severity::Low && Severity::High < Severity::Critical);
        for s in Severity::ALL {
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.to_string())
            );
        }
        assert_eq!("HIGH".parse::<Severity>(), Ok(Severity::High));
        assert!("severe".parse::<Severity>().is_err());
        let empty = Report {
            gateway_id: "gw".into(),
            checked_ms: 0,
            findings: Vec::new(),
        };
        assert_eq!(empty.max_severity(), None);
        let codes: BTreeSet<&str> = CODES.iter().map(|(c, _)| *c).collect();
        assert_eq!(codes.len(), CODES.len(), "codes are unique");
    }

    #[test]
    fn selfcheck_findings_are_ordered_most_severe_first() {
        let mut f = Fixture::new();
        f.opts.dev_profile = false;
        f.cfg.mqtt.tls.min_version = TlsVersion::Tls12;
        f.opcua("opc2").security_mode = OpcUaMode::Sign;
        chmod(&f.pki.gateway_key, 0o640);
        let report = f.run();
        let severities: Vec<Severity> = report.findings.iter().map(|x| x.severity).collect();
        let mut sorted = severities.clone();
        sorted.sort_by(|a, b| b.cmp(a));
        assert_eq!(severities, sorted);
        assert_eq!(report.max_severity(), Some(Severity::Critical));
        assert_eq!(report.at_least(Severity::High).count(), 5, "{report:#?}");
    }

    #[test]
    fn selfcheck_reads_process_status_and_mountinfo() {
        let status = "Name:\tgateway\nUid:\t1000\t65532\t65532\t65532\nGid:\t100\t65533\t65533\t65533\nGroups:\t10 20 \nCapEff:\t0000000000000000\n";
        assert_eq!(
            Identity::parse_status(status),
            Some(Identity {
                uid: 65532,
                gids: vec![65533, 10, 20],
                dac_override: false
            })
        );
        let root = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\nCapEff:\t000001ffffffffff\n";
        assert!(Identity::parse_status(root).unwrap().dac_override);
        assert_eq!(Identity::parse_status("Name:\tx\n"), None);
        if let Some(me) = Identity::current() {
            let meta = fs::metadata("/proc/self").unwrap();
            assert_eq!(me.uid, meta.uid());
        }

        let mountinfo = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 8:2 / /data rw,relatime shared:2 - ext4 /dev/sda2 rw
31 22 8:3 / /config ro,relatime shared:3 - ext4 /dev/sda3 rw
32 22 8:4 / /mnt/with\\040space rw,relatime shared:4 - ext4 /dev/sda4 ro
33 30 8:5 / /data/ro rw - ext4 /dev/sda5 rw
34 30 8:6 / /data/ro ro - ext4 /dev/sda6 rw
";
        let ro = |p: &str| read_only_mount(Path::new(p), mountinfo);
        assert_eq!(ro("/data/audit"), None);
        assert_eq!(ro("/config/x"), Some(PathBuf::from("/config")));
        assert_eq!(ro("/configs"), None);
        assert_eq!(
            ro("/mnt/with space/a"),
            Some(PathBuf::from("/mnt/with space"))
        );
        // The last mount on a mount point is the one in use.
        assert_eq!(ro("/data/ro/x"), Some(PathBuf::from("/data/ro")));
        assert_eq!(ro("/var/lib"), None);
        assert_eq!(unescape_mount("a\\040b\\011c\\\\"), "a b\tc\\\\");
    }

    /// The JSON of a report with findings of many kinds validates against
    /// `docs/selfcheck.schema.json`, and the schema lists exactly the codes
    /// and severities of this module.
    #[test]
    fn selfcheck_report_json_matches_the_schema() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/selfcheck.schema.json");
        let schema: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        assert!(
            jsonschema::draft202012::meta::is_valid(&schema),
            "the schema is not a valid draft 2020-12 schema"
        );
        let validator = jsonschema::draft202012::new(&schema).unwrap();

        let mut f = Fixture::new();
        f.opts.dev_profile = false;
        f.cfg.mqtt.tls.min_version = TlsVersion::Tls12;
        f.opcua("opc2").security_mode = OpcUaMode::Sign;
        let d = f.opcua("opc1");
        d.security_policy = Some(OpcUaPolicy::None);
        d.allow_security_none = true;
        f.cfg.metrics = Some(MetricsConfig {
            listen: "0.0.0.0:9464".parse().unwrap(),
        });
        chmod(&f.pki.gateway_key, 0o644);
        fs::write(
            f.path("policies/plant.toml"),
            POLICY.replace("\"enforce\"", "\"audit\""),
        )
        .unwrap();
        fs::remove_file(f.path("operators/operator-1.pem")).unwrap();
        fs::remove_file(&f.pki.operator_key).unwrap();
        write_certs(&f, Validity::expired());
        let report = f.run();
        let found: BTreeSet<&str> = report.findings.iter().map(|x| x.code).collect();
        assert!(found.len() >= 10, "{found:?}");

        let json = serde_json::to_value(&report).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
        // Field names as documented.
        let first = &json["findings"][0];
        for field in ["code", "severity", "subject", "message", "fix"] {
            assert!(first[field].is_string(), "{field}: {first}");
        }
        assert!(json["checked_ms"].is_u64() && json["gateway_id"].is_string());

        // The validator does reject what breaks the schema.
        let mut bad = json.clone();
        bad["findings"][0]["severity"] = "severe".into();
        assert!(!validator.is_valid(&bad));
        let mut bad = json.clone();
        bad["findings"][0].as_object_mut().unwrap().remove("fix");
        assert!(!validator.is_valid(&bad));
        let mut bad = json.clone();
        bad["findings"][0]["code"] = "made_up".into();
        assert!(!validator.is_valid(&bad));
        let mut bad = json;
        bad["checked_ms"] = (-1).into();
        assert!(!validator.is_valid(&bad));

        // The schema's lists are this module's.
        let strings = |v: &serde_json::Value| -> Vec<String> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            strings(&schema["$defs"]["code"]["enum"]),
            CODES.iter().map(|(c, _)| c.to_string()).collect::<Vec<_>>()
        );
        assert_eq!(
            strings(&schema["$defs"]["severity"]["enum"]),
            Severity::ALL
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        );
    }
}
