//! The asset inventory: the gateway, its devices and what each device says
//! it is, published signed and retained (wire format:
//! `twin_model::inventory`).
//!
//! Stages:
//! - [`gateway_entry`]: the gateway's own version and build, what is
//!   switched on, the configuration hash, the certificates it uses (with
//!   fingerprints and validity) and the keys it signs with or trusts; the
//!   SBOM hash ([`crate::sbom`]).
//! - [`Inventory::identity`]: a device's identity as its driver read it
//!   after connecting (Modbus FC 43/14, OPC UA BuildInfo and server
//!   certificate), compared with the one recorded in
//!   `<data_dir>/device-identities.json`. The first identity of a device is
//!   recorded; a different one later raises `device_identity_changed` and
//!   becomes the recorded one. The record survives restarts, so a device
//!   swapped while the gateway was down is noticed at the next connection.
//! - [`Inventory::foreign_reply`]: a reply from something that is not the
//!   configured device raises `device_unknown_answering`.
//! - [`Inventory::due`]: the signed inventory, when something changed (at
//!   most once a second) and hourly, so `last_seen_ms` stays fresh.
//!
//! The downlink task owns it (it also owns the audit log, where the alerts
//! are recorded).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;
use twin_model::alert::Severity;
use twin_model::inventory::{
    CertificateEntry, DeviceEntry, DeviceIdentity, GatewayEntry, Inventory as Document, KeyEntry,
    SbomIndex, INVENTORY_TYP, SBOM_PART_TYP, SBOM_TYP,
};
use twin_model::jws::{b64url, sha256};
use twin_model::topics::Topics;
use twin_model::SigningKey;

use crate::config::{CertKind, Config, DeviceConfig};
use crate::metrics::DeviceStats;
use crate::mqtt::{Outgoing, OutgoingKind};
use crate::watch::alerts::{evidence, Alerts, Finding};

/// The file of recorded identities, in the data directory.
pub const IDENTITIES_FILE: &str = "device-identities.json";
/// How often the inventory is published without a change.
const REFRESH_MS: u64 = 3_600_000;
/// The shortest time between two publications.
const MIN_GAP_MS: u64 = 1_000;

/// The alert codes raised here.
pub mod codes {
    /// A device reported another identity than the recorded one.
    pub const DEVICE_IDENTITY_CHANGED: &str = "device_identity_changed";
    /// Something that is not the configured device answered.
    pub const DEVICE_UNKNOWN_ANSWERING: &str = "device_unknown_answering";
    /// A device does not identify itself as its `expect_identity`
    /// requires; it is not read.
    pub const DEVICE_IDENTITY_MISMATCH: &str = "device_identity_mismatch";
}

/// One device's recorded identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Recorded {
    identity: DeviceIdentity,
    since_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    changed_ms: Option<u64>,
}

/// `<data_dir>/device-identities.json`: device name -> recorded identity.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Identities {
    devices: BTreeMap<String, Recorded>,
}

impl Identities {
    /// Reads the file; a missing file is an empty record, an unreadable one
    /// is set aside (renamed `*.unreadable`) and logged, and the gateway
    /// starts learning again.
    fn load(path: &Path) -> Identities {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Identities::default(),
            Err(e) => {
                tracing::error!(file = %path.display(), error = %e, "cannot read the recorded device identities; identity changes are detected again from the next connections");
                return Identities::default();
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(ids) => ids,
            Err(e) => {
                let aside = path.with_extension("json.unreadable");
                let _ = std::fs::rename(path, &aside);
                tracing::error!(file = %path.display(), set_aside = %aside.display(), error = %e, "the recorded device identities are not valid JSON; set aside, identities are learned again");
                Identities::default()
            }
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename).
    fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

/// The inventory and the identity watch.
pub struct Inventory {
    gateway_id: String,
    key: Arc<SigningKey>,
    topics: Topics,
    alerts: Alerts,
    path: PathBuf,
    ids: Identities,
    gateway: GatewayEntry,
    devices: Vec<DeviceEntry>,
    stats: Vec<(String, Arc<DeviceStats>)>,
    dirty: bool,
    published_ms: Option<u64>,
    /// The broker's message size limit (`mqtt.max_message_bytes`).
    max_message_bytes: usize,
    /// Each device's `expect_identity`.
    expected: BTreeMap<String, BTreeMap<String, String>>,
}

impl Inventory {
    /// The inventory of `cfg`, with the identities recorded earlier.
    pub fn new(
        cfg: &Config,
        key: Arc<SigningKey>,
        topics: Topics,
        alerts: Alerts,
        stats: Vec<(String, Arc<DeviceStats>)>,
    ) -> Inventory {
        let path = cfg.gateway.data_dir.join(IDENTITIES_FILE);
        let ids = Identities::load(&path);
        let gateway = gateway_entry(cfg, &key);
        let devices = cfg.devices.iter().map(device_entry).collect();
        let mut inv = Inventory {
            gateway_id: cfg.gateway.id.clone(),
            key,
            topics,
            alerts,
            path,
            ids,
            gateway,
            devices,
            stats,
            dirty: true,
            published_ms: None,
            max_message_bytes: cfg.mqtt.max_message_bytes,
            expected: cfg
                .devices
                .iter()
                .filter_map(|d| {
                    let e = match d {
                        DeviceConfig::Modbus(m) => m.expect_identity.clone(),
                        DeviceConfig::OpcUa(o) => o.expect_identity.clone(),
                    };
                    e.map(|e| (d.name().to_owned(), e))
                })
                .collect(),
        };
        inv.fill_identities();
        inv
    }

    fn fill_identities(&mut self) {
        for d in &mut self.devices {
            if let Some(r) = self.ids.devices.get(&d.name) {
                d.identity = Some(r.identity.clone());
                d.identity_since_ms = Some(r.since_ms);
                d.identity_changed_ms = r.changed_ms;
            }
        }
    }

    /// The policy in force changed (its fingerprint, or `None`).
    pub fn set_policy(&mut self, fingerprint: Option<String>) {
        if self.gateway.policy_sha256 != fingerprint {
            self.gateway.policy_sha256 = fingerprint;
            self.dirty = true;
        }
    }

    /// What `device` reported about itself after connecting.
    pub fn identity(
        &mut self,
        device: &str,
        reported: Result<DeviceIdentity, String>,
        now_ms: u64,
    ) {
        let Some(index) = self.devices.iter().position(|d| d.name == device) else {
            return;
        };
        if let Err(why) =
            crate::device::check_identity(self.expected.get(device), reported.as_ref().ok())
        {
            self.alerts.raise(Finding {
                code: codes::DEVICE_IDENTITY_MISMATCH,
                severity: Severity::Critical,
                subject: format!("device:{device}"),
                message: format!("device {device} is not read: {why}"),
                evidence: evidence([
                    ("expected", json!(self.expected.get(device))),
                    (
                        "reported",
                        match &reported {
                            Ok(id) => json!(id.fields),
                            Err(status) => json!(status),
                        },
                    ),
                ]),
                at_ms: now_ms,
            });
        }
        let identity = match reported {
            Ok(identity) => identity,
            Err(status) => {
                // A device that identified itself before and now refuses
                // to is a different device (or different firmware).
                let refused = status.starts_with("not_supported");
                if let (true, Some(before)) = (refused, self.ids.devices.get(device)) {
                    let before = before.identity.clone();
                    self.changed(device, &before, None, &status, now_ms);
                }
                let entry = &mut self.devices[index];
                if entry.identity_status.as_deref() != Some(status.as_str()) {
                    entry.identity_status = Some(status);
                    self.dirty = true;
                }
                return;
            }
        };
        self.devices[index].identity_status = None;
        match self.ids.devices.get(device) {
            Some(r) if r.identity == identity => {}
            Some(r) => {
                let before = r.identity.clone();
                self.changed(device, &before, Some(&identity), "", now_ms);
                self.ids.devices.insert(
                    device.to_owned(),
                    Recorded {
                        identity,
                        since_ms: now_ms,
                        changed_ms: Some(now_ms),
                    },
                );
                self.record();
            }
            None => {
                tracing::info!(device, identity = ?identity.fields, "device identity recorded");
                self.ids.devices.insert(
                    device.to_owned(),
                    Recorded {
                        identity,
                        since_ms: now_ms,
                        changed_ms: None,
                    },
                );
                self.record();
            }
        }
    }

    fn changed(
        &mut self,
        device: &str,
        before: &DeviceIdentity,
        after: Option<&DeviceIdentity>,
        status: &str,
        now_ms: u64,
    ) {
        let empty = DeviceIdentity::default();
        let diff: Vec<serde_json::Value> = before
            .diff(after.unwrap_or(&empty))
            .into_iter()
            .map(|(field, b, a)| json!({"field": field, "before": b, "after": a}))
            .collect();
        let what = match after {
            Some(_) => format!("{} field(s) differ", diff.len()),
            None => format!("it no longer identifies itself ({status})"),
        };
        self.alerts.raise(Finding {
            code: codes::DEVICE_IDENTITY_CHANGED,
            severity: Severity::High,
            subject: format!("device:{device}"),
            message: format!(
                "device {device} reports another identity than the one recorded: {what}; a replaced device or new firmware must be confirmed by the plant"
            ),
            evidence: evidence([
                ("changes", json!(diff)),
                ("before", json!(before.fields)),
                ("after", json!(after.map(|a| &a.fields))),
            ]),
            at_ms: now_ms,
        });
    }

    /// Stores the identities and marks the inventory for publication.
    fn record(&mut self) {
        if let Err(e) = self.ids.save(&self.path) {
            tracing::error!(file = %self.path.display(), error = %e, "cannot record the device identities; a change across a restart may go unnoticed");
        }
        self.fill_identities();
        self.dirty = true;
    }

    /// A reply that came from something else than the configured device.
    pub fn foreign_reply(&mut self, device: &str, answered: &str, detail: &str, now_ms: u64) {
        let endpoint = self
            .devices
            .iter()
            .find(|d| d.name == device)
            .map(|d| d.endpoint.clone())
            .unwrap_or_default();
        self.alerts.raise(Finding {
            code: codes::DEVICE_UNKNOWN_ANSWERING,
            severity: Severity::High,
            subject: format!("device:{device}"),
            message: format!(
                "{answered} answered at {endpoint} in place of device {device}, and it is not in the configuration; its replies are not used"
            ),
            evidence: evidence([
                ("endpoint", json!(endpoint)),
                ("answered", json!(answered)),
                ("detail", json!(detail)),
            ]),
            at_ms: now_ms,
        });
    }

    /// The inventory as it stands.
    pub fn document(&self, now_ms: u64) -> Document {
        let mut devices = self.devices.clone();
        for d in &mut devices {
            if let Some((_, s)) = self.stats.iter().find(|(n, _)| *n == d.name) {
                let seen = s.last_seen_ms.load(Ordering::Relaxed);
                d.last_seen_ms = (seen > 0).then_some(seen);
            }
            if d.identity.is_none() && d.identity_status.is_none() {
                d.identity_status = Some("not_read_yet".into());
            }
        }
        Document {
            v: twin_model::WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            ts_ms: now_ms,
            gateway: self.gateway.clone(),
            devices,
        }
    }

    /// The signed inventory, when it changed or is due for a refresh.
    pub fn due(&mut self, now_ms: u64) -> Option<Outgoing> {
        let since = self.published_ms.map(|p| now_ms.saturating_sub(p));
        let due = match since {
            None => true,
            Some(s) => (self.dirty && s >= MIN_GAP_MS) || s >= REFRESH_MS,
        };
        if !due {
            return None;
        }
        self.dirty = false;
        self.published_ms = Some(now_ms);
        let mut doc = self.document(now_ms);
        let sign = |doc: &Document| {
            let json = serde_json::to_vec(doc).expect("inventory serializes");
            self.key.sign_compact(INVENTORY_TYP, &json).into_bytes()
        };
        let mut payload = sign(&doc);
        if payload.len() > self.max_message_bytes {
            // Too many tags for one message: their names are left out (the
            // counts stay; the configuration has them).
            for d in &mut doc.devices {
                d.tags.clear();
                d.tags_omitted = true;
            }
            payload = sign(&doc);
            tracing::warn!(
                bytes = payload.len(),
                limit = self.max_message_bytes,
                "the inventory with every tag name is larger than mqtt.max_message_bytes; it is published without the tag names"
            );
        }
        if payload.len() > self.max_message_bytes {
            tracing::error!(
                bytes = payload.len(),
                limit = self.max_message_bytes,
                "the inventory is larger than mqtt.max_message_bytes even without tag names; it is not published"
            );
            return None;
        }
        Some(Outgoing {
            topic: self.topics.inventory(),
            payload,
            retain: true,
            kind: OutgoingKind::Alert,
        })
    }

    /// The signed SBOM index and parts (published once at start,
    /// retained), each message within `max_message_bytes`.
    pub fn sbom(&self, max_message_bytes: usize) -> Vec<Outgoing> {
        let doc = crate::sbom::SBOM_JSON.as_bytes();
        // A JWS carries its payload in base64url (4 bytes per 3) after a
        // header of about 100 bytes.
        let part_len = (max_message_bytes.saturating_sub(512) / 4 * 3).max(256);
        let mut out = Vec::new();
        let mut hashes = Vec::new();
        for (i, part) in doc.chunks(part_len).enumerate() {
            hashes.push(hex(&sha256(part)));
            out.push(Outgoing {
                topic: self.topics.sbom_part(i),
                payload: self.key.sign_compact(SBOM_PART_TYP, part).into_bytes(),
                retain: true,
                kind: OutgoingKind::Alert,
            });
        }
        let index = SbomIndex {
            v: twin_model::WIRE_VERSION,
            gateway_id: self.gateway_id.clone(),
            media_type: "application/vnd.cyclonedx+json".into(),
            sha256: crate::sbom::sbom_sha256(),
            bytes: doc.len(),
            parts: hashes,
        };
        let json = serde_json::to_vec(&index).expect("the index serializes");
        out.push(Outgoing {
            topic: self.topics.sbom(),
            payload: self.key.sign_compact(SBOM_TYP, &json).into_bytes(),
            retain: true,
            kind: OutgoingKind::Alert,
        });
        out
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn device_entry(d: &DeviceConfig) -> DeviceEntry {
    let tags = d.tag_names().into_iter().map(str::to_owned).collect();
    let (protocol, endpoint, unit_id, security, writable) = match d {
        DeviceConfig::Modbus(m) => (
            "modbus_tcp",
            m.address.clone(),
            Some(m.unit_id),
            None,
            m.tags
                .iter()
                .filter(|t| t.writable)
                .map(|t| t.name.clone())
                .collect(),
        ),
        DeviceConfig::OpcUa(o) => (
            "opcua",
            o.endpoint_url.clone(),
            None,
            Some(format!(
                "{}/{:?}",
                o.security_policy.map_or("any secure policy", |p| p.name()),
                o.security_mode
            )),
            o.tags
                .iter()
                .filter(|t| t.writable)
                .map(|t| t.name.clone())
                .collect(),
        ),
    };
    DeviceEntry {
        name: d.name().to_owned(),
        protocol: protocol.to_owned(),
        endpoint,
        unit_id,
        security,
        tag_count: d.tag_count(),
        tags,
        tags_omitted: false,
        writable,
        identity: None,
        identity_status: None,
        identity_since_ms: None,
        identity_changed_ms: None,
        last_seen_ms: None,
    }
}

/// The gateway's own entry (the policy fingerprint is set by the downlink).
pub fn gateway_entry(cfg: &Config, key: &SigningKey) -> GatewayEntry {
    let build = crate::sbom::build();
    let mut features = Vec::new();
    let mut feature = |on: bool, name: &str| {
        if on {
            features.push(name.to_owned());
        }
    };
    let has = |f: fn(&DeviceConfig) -> bool| cfg.devices.iter().any(f);
    feature(has(|d| matches!(d, DeviceConfig::Modbus(_))), "modbus_tcp");
    feature(has(|d| matches!(d, DeviceConfig::OpcUa(_))), "opcua");
    feature(cfg.commands.is_some(), "commands");
    feature(
        cfg.commands
            .as_ref()
            .is_some_and(|c| c.candidate_policy_dir.is_some()),
        "shadow_policy",
    );
    feature(cfg.metrics.is_some(), "metrics");
    feature(
        cfg.outbox.encryption_key_file.is_some(),
        "outbox_encryption",
    );
    feature(!cfg.checks.is_empty(), "sensor_checks");
    let text = std::fs::read(&cfg.source).unwrap_or_default();
    let mut keys = vec![KeyEntry {
        role: "telemetry_signing".into(),
        kid: key.kid().to_owned(),
        alg: "EdDSA".into(),
    }];
    if let Some(cc) = &cfg.commands {
        if let Ok(store) = crate::command_auth::OperatorTrustStore::load_dir(&cc.operator_keys_dir)
        {
            keys.extend(store.keys().map(|k| KeyEntry {
                role: "operator".into(),
                kid: k.kid().to_owned(),
                alg: k.algorithm().as_str().to_owned(),
            }));
        }
    }
    GatewayEntry {
        version: build.version,
        commit: build.commit,
        rustc: build.rustc,
        target: build.target,
        profile: build.profile,
        deployment_profile: if cfg.gateway.dev_profile {
            "dev"
        } else {
            "production"
        }
        .into(),
        features,
        config_sha256: b64url(&sha256(&text)),
        policy_sha256: None,
        sbom_sha256: crate::sbom::sbom_sha256(),
        sbom_components: crate::sbom::component_count(),
        certificates: certificates(cfg),
        keys,
    }
}

/// Every certificate the configuration names, parsed.
fn certificates(cfg: &Config) -> Vec<CertificateEntry> {
    let mut out: Vec<CertificateEntry> = Vec::new();
    for f in cfg.certificate_files() {
        let (role, path) = (
            match f.kind {
                CertKind::MqttClient => "mqtt_client",
                CertKind::Ca => "mqtt_ca",
                CertKind::OpcUaClient => "opcua_client",
                CertKind::OpcUaUser => "opcua_user",
            },
            f.path,
        );
        let Ok(bytes) = std::fs::read(path) else {
            continue;
        };
        let Ok(ders) = crate::selfcheck::certificate_ders(&bytes) else {
            continue;
        };
        for der in ders {
            let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
                continue;
            };
            let entry = CertificateEntry {
                role: role.to_owned(),
                file: path.display().to_string(),
                subject: cert.subject().to_string(),
                issuer: cert.issuer().to_string(),
                sha256: hex(&sha256(&der)),
                not_before_ms: cert.validity().not_before.timestamp() * 1000,
                not_after_ms: cert.validity().not_after.timestamp() * 1000,
            };
            if !out
                .iter()
                .any(|c| c.sha256 == entry.sha256 && c.role == entry.role)
            {
                out.push(entry);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{self, DevPkiOptions};
    use tokio::sync::mpsc;
    use twin_model::inventory::field;

    const TOML: &str = r#"
[gateway]
id = "inv-gw"
data_dir = "data"
[signing]
key_file = "pki/gateway-signing.key.pem"
[mqtt]
host = "localhost"
[mqtt.tls]
ca_file = "pki/ca.crt.pem"
cert_file = "pki/gateway.crt.pem"
key_file = "pki/gateway.key.pem"
[[devices]]
name = "plc1"
protocol = "modbus-tcp"
address = "10.0.0.5:502"
unit_id = 3
[[devices.tags]]
name = "tank1.level"
area = "holding_register"
address = 0
type = "u16"
writable = true
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        cfg: Config,
        key: Arc<SigningKey>,
    }

    fn fixture() -> Fixture {
        fixture_with("")
    }

    /// The fixture with more configuration text after the first tag.
    fn fixture_with(more: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let files = pki::create_dev_pki(&DevPkiOptions {
            out_dir: root.join("pki"),
            gateway_id: "inv-gw".into(),
            broker_hosts: vec!["localhost".into()],
            operator: "operator-1".into(),
            valid_days: 30,
        })
        .unwrap();
        std::fs::create_dir(root.join("data")).unwrap();
        std::fs::write(root.join("gateway.toml"), format!("{TOML}{more}")).unwrap();
        let cfg = crate::config::load(&root.join("gateway.toml")).unwrap();
        let key = Arc::new(crate::run::load_signing_key(&files.gateway_signing_key).unwrap());
        Fixture {
            _dir: dir,
            cfg,
            key,
        }
    }

    fn inventory(f: &Fixture) -> (Inventory, mpsc::UnboundedReceiver<Finding>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = vec![("plc1".to_string(), Arc::new(DeviceStats::default()))];
        let topics = Topics::new("twin", "inv-gw");
        let inv = Inventory::new(&f.cfg, f.key.clone(), topics, Alerts::new(tx), stats);
        (inv, rx)
    }

    fn ident(revision: &str) -> DeviceIdentity {
        DeviceIdentity {
            fields: [
                (field::VENDOR_NAME, "ACME"),
                (field::PRODUCT_CODE, "PLC-9"),
                (field::REVISION, revision),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        }
    }

    fn codes(rx: &mut mpsc::UnboundedReceiver<Finding>) -> Vec<&'static str> {
        let mut v = Vec::new();
        while let Ok(f) = rx.try_recv() {
            v.push(f.code);
        }
        v
    }

    #[test]
    fn the_same_identity_again_and_again_raises_nothing_a_new_one_raises_once_and_a_restart_remembers(
    ) {
        let f = fixture();
        let (mut inv, mut rx) = inventory(&f);
        for t in 0..10 {
            inv.identity("plc1", Ok(ident("1.0")), 1000 + t);
        }
        assert!(
            codes(&mut rx).is_empty(),
            "reconnects with the same identity"
        );
        let doc = inv.document(2000);
        let d = &doc.devices[0];
        assert_eq!((d.unit_id, d.endpoint.as_str()), (Some(3), "10.0.0.5:502"));
        assert_eq!(d.writable, vec!["tank1.level".to_string()]);
        assert_eq!(d.identity, Some(ident("1.0")));
        assert_eq!(d.identity_since_ms, Some(1000));

        // New firmware while the gateway was stopped.
        drop(inv);
        let (mut inv, mut rx) = inventory(&f);
        assert_eq!(inv.document(0).devices[0].identity, Some(ident("1.0")));
        inv.identity("plc1", Ok(ident("2.0")), 5000);
        let found: Vec<Finding> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].code, codes::DEVICE_IDENTITY_CHANGED);
        assert_eq!(
            found[0].evidence["changes"],
            json!([{"field": "revision", "before": "1.0", "after": "2.0"}])
        );
        inv.identity("plc1", Ok(ident("2.0")), 6000);
        assert!(
            codes(&mut rx).is_empty(),
            "the new identity is the recorded one"
        );
        assert_eq!(inv.document(0).devices[0].identity_changed_ms, Some(5000));

        // A device that identified itself and now refuses to.
        inv.identity("plc1", Err("not_supported (illegal function)".into()), 7000);
        assert_eq!(codes(&mut rx), vec![codes::DEVICE_IDENTITY_CHANGED]);
        // A timeout is not a refusal.
        inv.identity("plc1", Err("no_answer".into()), 8000);
        assert!(codes(&mut rx).is_empty());
        assert_eq!(
            inv.document(0).devices[0].identity_status.as_deref(),
            Some("no_answer")
        );
    }

    #[test]
    fn an_unreadable_identity_file_is_set_aside_and_learning_starts_again() {
        let f = fixture();
        let path = f.cfg.gateway.data_dir.join(IDENTITIES_FILE);
        std::fs::write(&path, b"{\"devices\": [garbage").unwrap();
        let (mut inv, mut rx) = inventory(&f);
        assert!(path.with_extension("json.unreadable").exists());
        inv.identity("plc1", Ok(ident("1.0")), 1);
        assert!(codes(&mut rx).is_empty());
        assert!(path.exists(), "recorded again");
    }

    #[test]
    fn the_signed_inventory_describes_the_gateway_and_is_published_on_change_and_hourly() {
        let f = fixture();
        let (mut inv, _rx) = inventory(&f);
        let first = inv.due(10_000).expect("published at start");
        assert!(first.retain);
        assert_eq!(first.topic, "twin/inv-gw/inventory");
        let mut trust = twin_model::TrustStore::new();
        trust.add_pem(&f.key.public_key_pem()).unwrap();
        let v = trust
            .verify_compact(&first.payload, INVENTORY_TYP, 1 << 20)
            .unwrap();
        let doc: Document = serde_json::from_slice(&v.payload).unwrap();
        let g = &doc.gateway;
        assert_eq!(g.deployment_profile, "production");
        assert_eq!(g.features, vec!["modbus_tcp".to_string()]);
        assert_eq!(
            g.config_sha256,
            b64url(&sha256(&std::fs::read(&f.cfg.source).unwrap()))
        );
        let roles: Vec<&str> = g.certificates.iter().map(|c| c.role.as_str()).collect();
        assert_eq!(roles, vec!["mqtt_client", "mqtt_ca"]);
        assert!(g.certificates[0].subject.contains("inv-gw"));
        assert_eq!(g.keys[0].kid, f.key.kid());
        assert_eq!(
            doc.devices[0].identity_status.as_deref(),
            Some("not_read_yet")
        );
        // Nothing new: not again before an hour.
        assert!(inv.due(20_000).is_none());
        inv.identity("plc1", Ok(ident("1.0")), 20_000);
        assert!(
            inv.due(20_500).is_some(),
            "a change goes out within a second"
        );
        assert!(inv.due(30_000).is_none());
        assert!(inv.due(20_500 + REFRESH_MS).is_some(), "hourly");
        inv.set_policy(Some("fp".into()));
        assert!(inv.due(20_500 + REFRESH_MS + 1_000).is_some());
    }

    #[test]
    fn an_inventory_too_large_for_the_broker_leaves_out_the_tag_names_then_is_not_sent() {
        let tags: String = (1..40)
            .map(|i| {
                format!("[[devices.tags]]\nname = \"tank1.level_{i}\"\narea = \"holding_register\"\naddress = {i}\ntype = \"u16\"\n")
            })
            .collect();
        let f = fixture_with(&tags);
        let (mut inv, _rx) = inventory(&f);
        let full = inv.due(1_000).expect("published at start").payload.len();
        inv.max_message_bytes = full - 1;
        inv.dirty = true;
        let msg = inv.due(2_000).expect("still published");
        assert!(msg.payload.len() < full);
        let mut trust = twin_model::TrustStore::new();
        trust.add_pem(&f.key.public_key_pem()).unwrap();
        let v = trust
            .verify_compact(&msg.payload, INVENTORY_TYP, 1 << 20)
            .unwrap();
        let doc: Document = serde_json::from_slice(&v.payload).unwrap();
        let d = &doc.devices[0];
        assert!(d.tags.is_empty() && d.tags_omitted);
        assert_eq!((d.tag_count, d.writable.len()), (40, 1));
        inv.max_message_bytes = 100;
        inv.dirty = true;
        assert!(inv.due(3_000).is_none(), "not sent at all");
    }

    #[test]
    fn the_sbom_goes_out_in_parts_that_fit_the_limit_and_make_the_document() {
        let f = fixture();
        let (inv, _rx) = inventory(&f);
        let mut trust = twin_model::TrustStore::new();
        trust.add_pem(&f.key.public_key_pem()).unwrap();
        for limit in [1024, 16 * 1024, 131_072, 1 << 20] {
            let msgs = inv.sbom(limit);
            let (index_msg, parts) = msgs.split_last().unwrap();
            assert_eq!(index_msg.topic, "twin/inv-gw/sbom");
            let index: SbomIndex = serde_json::from_slice(
                &trust
                    .verify_compact(&index_msg.payload, SBOM_TYP, 1 << 20)
                    .unwrap()
                    .payload,
            )
            .unwrap();
            assert_eq!(index.parts.len(), parts.len());
            let mut doc = Vec::new();
            for (i, m) in parts.iter().enumerate() {
                assert!(m.payload.len() <= limit, "{} > {limit}", m.payload.len());
                assert_eq!(m.topic, format!("twin/inv-gw/sbom/{i}"));
                let part = trust
                    .verify_compact(&m.payload, SBOM_PART_TYP, 1 << 20)
                    .unwrap()
                    .payload;
                assert_eq!(hex(&sha256(&part)), index.parts[i]);
                doc.extend_from_slice(&part);
            }
            assert_eq!(doc, crate::sbom::SBOM_JSON.as_bytes());
            assert_eq!(index.sha256, crate::sbom::sbom_sha256());
        }
    }
}
