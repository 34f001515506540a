//! The asset inventory: what the gateway is, what it talks to, and what each
//! device says it is.
//!
//! Published signed (JWS, `typ` [`INVENTORY_TYP`], the gateway's telemetry
//! key) and retained on `{prefix}/{gateway_id}/inventory`: at start, when a
//! device first reports its identity or reports a different one, and hourly
//! (which refreshes `last_seen_ms`). The software bill of materials it
//! names by hash (a CycloneDX 1.5 JSON document generated from the
//! gateway's `Cargo.lock` at build time) is published signed and retained
//! in parts: [`SbomIndex`] on `{prefix}/{gateway_id}/sbom`, the parts on
//! `{prefix}/{gateway_id}/sbom/<i>`.
//!
//! Device identities come from the devices themselves: Modbus Read Device
//! Identification (function 43, MEI type 14) and the OPC UA server's
//! `ServerStatus.BuildInfo`, application URI and certificate. A device
//! that reports another identity than the one recorded raises the alert
//! `device_identity_changed`; a Modbus reply from a unit id that is not
//! configured raises `device_unknown_answering`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// JWS `typ` of the inventory.
pub const INVENTORY_TYP: &str = "twin-inventory+jws";
/// JWS `typ` of the SBOM index.
pub const SBOM_TYP: &str = "twin-sbom+jws";
/// JWS `typ` of one part of the SBOM (its payload: the part's bytes).
pub const SBOM_PART_TYP: &str = "twin-sbom-part+jws";

/// The SBOM is published in parts, so that it fits any broker's message
/// size limit: the index (retained on `.../sbom`) names the document's
/// SHA-256 and size and each part's SHA-256; part `i` is retained on
/// `.../sbom/<i>`. The document is the parts' payloads concatenated in
/// order. Parts left over from an earlier, longer SBOM are not in the
/// index and are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SbomIndex {
    pub v: u32,
    pub gateway_id: String,
    /// `application/vnd.cyclonedx+json` (CycloneDX 1.5).
    pub media_type: String,
    /// Lowercase hex SHA-256 of the whole document (also in the inventory).
    pub sha256: String,
    pub bytes: usize,
    /// Lowercase hex SHA-256 of each part, in order.
    pub parts: Vec<String>,
}

/// Names of the identity fields, per protocol. Only what the device
/// reports is present.
pub mod field {
    /// Modbus object 0x00.
    pub const VENDOR_NAME: &str = "vendor_name";
    /// Modbus object 0x01.
    pub const PRODUCT_CODE: &str = "product_code";
    /// Modbus object 0x02 (MajorMinorRevision).
    pub const REVISION: &str = "revision";
    /// Modbus object 0x03.
    pub const VENDOR_URL: &str = "vendor_url";
    /// Modbus object 0x04; OPC UA `BuildInfo.ProductName`.
    pub const PRODUCT_NAME: &str = "product_name";
    /// Modbus object 0x05.
    pub const MODEL_NAME: &str = "model_name";
    /// Modbus object 0x06.
    pub const USER_APPLICATION_NAME: &str = "user_application_name";
    /// OPC UA `BuildInfo.ProductUri`.
    pub const PRODUCT_URI: &str = "product_uri";
    /// OPC UA `BuildInfo.ManufacturerName`.
    pub const MANUFACTURER_NAME: &str = "manufacturer_name";
    /// OPC UA `BuildInfo.SoftwareVersion`.
    pub const SOFTWARE_VERSION: &str = "software_version";
    /// OPC UA `BuildInfo.BuildNumber`.
    pub const BUILD_NUMBER: &str = "build_number";
    /// OPC UA `BuildInfo.BuildDate`, RFC 3339.
    pub const BUILD_DATE: &str = "build_date";
    /// OPC UA server's application URI (from its endpoint description).
    pub const APPLICATION_URI: &str = "application_uri";
    /// OPC UA server certificate: lowercase hex SHA-1 of the DER (the
    /// thumbprint OPC UA tools show).
    pub const CERTIFICATE_SHA1: &str = "certificate_sha1";
    /// OPC UA server certificate: lowercase hex SHA-256 of the DER.
    pub const CERTIFICATE_SHA256: &str = "certificate_sha256";
}

/// The identity fields a Modbus device can report (Read Device
/// Identification objects 0x00-0x06).
pub const MODBUS_FIELDS: &[&str] = &[
    field::VENDOR_NAME,
    field::PRODUCT_CODE,
    field::REVISION,
    field::VENDOR_URL,
    field::PRODUCT_NAME,
    field::MODEL_NAME,
    field::USER_APPLICATION_NAME,
];

/// The identity fields of an OPC UA server.
pub const OPCUA_FIELDS: &[&str] = &[
    field::PRODUCT_URI,
    field::PRODUCT_NAME,
    field::MANUFACTURER_NAME,
    field::SOFTWARE_VERSION,
    field::BUILD_NUMBER,
    field::BUILD_DATE,
    field::APPLICATION_URI,
    field::CERTIFICATE_SHA1,
    field::CERTIFICATE_SHA256,
];

/// What a device reports about itself. Two identities are the same device
/// when all their fields are equal (a firmware update changes the revision
/// or software version and counts as a change).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceIdentity {
    /// Field name (see [`field`]) to value; printable text, at most 255
    /// characters each.
    pub fields: BTreeMap<String, String>,
}

impl DeviceIdentity {
    /// The fields of `expected` this identity does not have as expected:
    /// `(name, expected, reported)`. Empty when it matches.
    pub fn mismatches<'a>(
        &'a self,
        expected: &'a BTreeMap<String, String>,
    ) -> Vec<(&'a str, &'a str, Option<&'a str>)> {
        expected
            .iter()
            .filter_map(|(k, want)| {
                let got = self.fields.get(k).map(String::as_str);
                (got != Some(want.as_str())).then_some((k.as_str(), want.as_str(), got))
            })
            .collect()
    }

    /// The fields that differ between `self` (before) and `after`:
    /// `(name, before, after)`, `None` where a field is absent.
    pub fn diff<'a>(
        &'a self,
        after: &'a DeviceIdentity,
    ) -> Vec<(&'a str, Option<&'a str>, Option<&'a str>)> {
        let mut names: Vec<&str> = self
            .fields
            .keys()
            .chain(after.fields.keys())
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names.dedup();
        names
            .into_iter()
            .filter_map(|n| {
                let b = self.fields.get(n).map(String::as_str);
                let a = after.fields.get(n).map(String::as_str);
                (b != a).then_some((n, b, a))
            })
            .collect()
    }
}

/// One configured device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// The device's name in `gateway.toml`.
    pub name: String,
    /// `modbus_tcp` or `opcua`.
    pub protocol: String,
    /// Modbus: `host:port`; OPC UA: the endpoint URL.
    pub endpoint: String,
    /// Modbus unit id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u8>,
    /// OPC UA: the security the gateway requires, e.g.
    /// `Basic256Sha256/SignAndEncrypt`, or `any secure policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security: Option<String>,
    /// How many tags the device has.
    pub tag_count: usize,
    /// Tag names, in configuration order; empty with `tags_omitted` (the
    /// inventory would not fit the broker's message size otherwise).
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tags_omitted: bool,
    /// The tags commands may write.
    pub writable: Vec<String>,
    /// The identity last reported; absent until the device has reported
    /// one (or when it does not support identification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<DeviceIdentity>,
    /// Why there is no identity, e.g. `not_supported` (the device
    /// answered the request with an exception) or `not_read_yet`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_status: Option<String>,
    /// When the recorded identity was first reported, ms since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_since_ms: Option<u64>,
    /// When the identity last changed (the alert `device_identity_changed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_changed_ms: Option<u64>,
    /// The last time the device answered (a Modbus read cycle, exceptions
    /// included; an OPC UA read, data change or standing subscription).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_ms: Option<u64>,
}

/// A certificate the gateway uses or trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateEntry {
    /// `mqtt_client`, `mqtt_ca`, `opcua_client` or `opcua_user`.
    pub role: String,
    /// The file, as configured.
    pub file: String,
    pub subject: String,
    pub issuer: String,
    /// Lowercase hex SHA-256 of the DER.
    pub sha256: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
}

/// A public key the gateway signs with or trusts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// `telemetry_signing` or `operator`.
    pub role: String,
    /// The key id (JWS `kid`).
    pub kid: String,
    /// The signature algorithm (`EdDSA` or `ES256`).
    pub alg: String,
}

/// The gateway itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayEntry {
    /// Package version.
    pub version: String,
    /// Source commit, `-dirty` when built from a modified tree, or `unknown`.
    pub commit: String,
    /// Compiler, target triple and build profile.
    pub rustc: String,
    pub target: String,
    pub profile: String,
    /// `production` or `dev`.
    pub deployment_profile: String,
    /// What is switched on, e.g. `commands`, `metrics`, `outbox_encryption`,
    /// `modbus_tcp`, `opcua`, `sensor_checks`.
    pub features: Vec<String>,
    /// SHA-256 of the configuration file as read at start, base64url
    /// (the same value as the audit log's `config_changed` record).
    pub config_sha256: String,
    /// Fingerprint of the policy files in force, base64url (the same value
    /// as the audit log's `policy_loaded` record); absent without commands
    /// or without a valid policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sha256: Option<String>,
    /// Lowercase hex SHA-256 of the SBOM published on the `sbom` topic,
    /// and its number of components.
    pub sbom_sha256: String,
    pub sbom_components: usize,
    pub certificates: Vec<CertificateEntry>,
    pub keys: Vec<KeyEntry>,
}

/// The whole inventory. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inventory {
    pub v: u32,
    pub gateway_id: String,
    /// When this inventory was made, ms since the Unix epoch.
    pub ts_ms: u64,
    pub gateway: GatewayEntry,
    pub devices: Vec<DeviceEntry>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(pairs: &[(&str, &str)]) -> DeviceIdentity {
        DeviceIdentity {
            fields: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    #[test]
    fn diff_names_changed_added_and_removed_fields() {
        let before = id(&[
            ("vendor_name", "A"),
            ("revision", "1.0"),
            ("model_name", "M"),
        ]);
        let after = id(&[
            ("vendor_name", "A"),
            ("revision", "1.1"),
            ("product_code", "P"),
        ]);
        assert_eq!(
            before.diff(&after),
            vec![
                ("model_name", Some("M"), None),
                ("product_code", None, Some("P")),
                ("revision", Some("1.0"), Some("1.1")),
            ]
        );
        assert!(before.diff(&before).is_empty());
    }

    #[test]
    fn an_inventory_round_trips_and_unknown_fields_are_refused() {
        let inv = Inventory {
            v: crate::WIRE_VERSION,
            gateway_id: "gw-1".into(),
            ts_ms: 1,
            gateway: GatewayEntry {
                version: "0.1.0".into(),
                commit: "unknown".into(),
                rustc: "rustc".into(),
                target: "x86_64-unknown-linux-gnu".into(),
                profile: "release".into(),
                deployment_profile: "production".into(),
                features: vec!["modbus_tcp".into()],
                config_sha256: "00".into(),
                policy_sha256: None,
                sbom_sha256: "11".into(),
                sbom_components: 3,
                certificates: vec![],
                keys: vec![],
            },
            devices: vec![DeviceEntry {
                name: "plc1".into(),
                protocol: "modbus_tcp".into(),
                endpoint: "10.0.0.5:502".into(),
                unit_id: Some(1),
                security: None,
                tag_count: 1,
                tags: vec!["tank.level".into()],
                tags_omitted: false,
                writable: vec![],
                identity: Some(id(&[("vendor_name", "ACME")])),
                identity_status: None,
                identity_since_ms: Some(5),
                identity_changed_ms: None,
                last_seen_ms: Some(9),
            }],
        };
        let json = serde_json::to_string(&inv).unwrap();
        assert_eq!(serde_json::from_str::<Inventory>(&json).unwrap(), inv);
        let extra = json.replacen("\"v\":1", "\"v\":1,\"x\":0", 1);
        assert!(serde_json::from_str::<Inventory>(&extra).is_err());
    }
}
