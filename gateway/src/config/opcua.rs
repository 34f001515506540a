//! The `[[devices]]` tables with `protocol = "opcua"`: the OPC UA client's
//! endpoint, security, identity, subscription settings and tags.
//!
//! Security is strict by default: SignAndEncrypt with the most secure of
//! Basic256Sha256, Aes128_Sha256_RsaOaep and Aes256_Sha256_RsaPss the
//! server offers. The deprecated Basic128Rsa15 and Basic256 are refused
//! with an explanation; `security_policy = "None"` is accepted only next to
//! the named setting `allow_security_none = true`, and reported at start.

use std::collections::HashMap;

use super::load::{Loader, NameSeen};
use super::model::*;
use super::read::{Field, Table};

const POLICIES: &[(&str, OpcUaPolicy)] = &[
    ("Basic256Sha256", OpcUaPolicy::Basic256Sha256),
    ("Aes128_Sha256_RsaOaep", OpcUaPolicy::Aes128Sha256RsaOaep),
    ("Aes256_Sha256_RsaPss", OpcUaPolicy::Aes256Sha256RsaPss),
    ("None", OpcUaPolicy::None),
];

/// Policies the standard deprecated (SHA-1, weak padding): never offered.
const DEPRECATED: &[&str] = &["Basic128Rsa15", "Basic256"];

const MODES: &[(&str, OpcUaMode)] = &[
    ("sign_and_encrypt", OpcUaMode::SignAndEncrypt),
    ("sign", OpcUaMode::Sign),
];

const READS: &[(&str, OpcUaRead)] = &[
    ("subscribe", OpcUaRead::Subscribe),
    ("poll", OpcUaRead::Poll),
];

const TYPES: &[(&str, OpcUaType)] = &[
    ("bool", OpcUaType::Bool),
    ("sbyte", OpcUaType::SByte),
    ("byte", OpcUaType::Byte),
    ("int16", OpcUaType::Int16),
    ("uint16", OpcUaType::UInt16),
    ("int32", OpcUaType::Int32),
    ("uint32", OpcUaType::UInt32),
    ("int64", OpcUaType::Int64),
    ("uint64", OpcUaType::UInt64),
    ("float", OpcUaType::Float),
    ("double", OpcUaType::Double),
    ("string", OpcUaType::String),
];

/// Whether `s` reads as an OPC UA node id: an optional `ns=<n>;` or
/// `nsu=<uri>;` followed by `i=<number>`, `s=<text>`, `g=<guid>` or
/// `b=<base64>`.
pub fn valid_node_id(s: &str) -> bool {
    let rest = if let Some(r) = s.strip_prefix("ns=") {
        match r.split_once(';') {
            Some((n, rest)) if n.parse::<u16>().is_ok() => rest,
            _ => return false,
        }
    } else if let Some(r) = s.strip_prefix("nsu=") {
        match r.split_once(';') {
            Some((uri, rest)) if !uri.is_empty() => rest,
            _ => return false,
        }
    } else {
        s
    };
    match rest.split_once('=') {
        Some(("i", n)) => n.parse::<u32>().is_ok(),
        Some(("s" | "g" | "b", v)) => !v.is_empty(),
        _ => false,
    }
}

impl Loader<'_> {
    pub(super) fn opcua_device(
        &mut self,
        t: &Table<'_, '_>,
        name: Option<String>,
        tag_names: &mut HashMap<String, NameSeen>,
    ) -> Option<OpcUaDeviceConfig> {
        self.r.unknown_keys(
            t,
            &[
                "name",
                "protocol",
                "endpoint_url",
                "security_policy",
                "security_mode",
                "allow_security_none",
                "pki_dir",
                "certificate_file",
                "private_key_file",
                "application_uri",
                "user",
                "password_file",
                "user_certificate_file",
                "user_key_file",
                "read",
                "publishing_interval_ms",
                "sampling_interval_ms",
                "queue_size",
                "deadband",
                "request_timeout_ms",
                "reconnect_min_ms",
                "reconnect_max_ms",
                "expect_identity",
                "tags",
            ],
        );
        let expect = self.expect_identity(t, twin_model::inventory::OPCUA_FIELDS);
        let url = self.r.shaped(
            t,
            "endpoint_url",
            "an opc.tcp:// URL",
            |u| match u.strip_prefix("opc.tcp://") {
                None => Some("it must start with opc.tcp://"),
                Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                    Some("the host is missing")
                }
                Some(_) => None,
            },
            "write it as opc.tcp://host:port/path, e.g. \"opc.tcp://192.168.1.20:4840/\"",
        );
        let url = self
            .r
            .required(t, "endpoint_url", "\"opc.tcp://192.168.1.20:4840/\"", url);
        let policy = match self.r.string(t, "security_policy") {
            Field::Valid(p) if DEPRECATED.contains(&p.get_ref().as_str()) => {
                self.r.error_help(
                    &p.span(),
                    format!(
                        "security_policy \"{}\" is deprecated (SHA-1) and never used",
                        p.get_ref()
                    ),
                    Some("use \"Basic256Sha256\", \"Aes128_Sha256_RsaOaep\" or \"Aes256_Sha256_RsaPss\", or remove the key to take the best the server offers; if the server offers no other, update its configuration"),
                );
                Field::Invalid
            }
            Field::Valid(_) => self.r.choice(t, "security_policy", POLICIES),
            Field::Absent => Field::Absent,
            Field::Invalid => Field::Invalid,
        };
        let mode = self.r.choice(t, "security_mode", MODES);
        let allow_none = self.r.boolean(t, "allow_security_none");
        if let (Some(p), false) = (
            policy.valid().filter(|p| *p.get_ref() == OpcUaPolicy::None),
            allow_none.get().copied().unwrap_or(false),
        ) {
            self.r.error_help(
                &p.span(),
                format!("security_policy \"None\" in {} sends values and passwords unprotected", t.name),
                Some("choose a secure policy; if this server really cannot do better, add `allow_security_none = true` to this device (it is reported at every start)"),
            );
            return None;
        }
        let pki_dir = self.r.non_empty(t, "pki_dir");
        let certificate_file = self.file(t, "certificate_file", "OPC UA client certificate", false);
        let private_key_file = self.file(t, "private_key_file", "OPC UA client private key", true);
        let application_uri = self.r.non_empty(t, "application_uri");
        let identity = self.opcua_identity(t);
        let read = self.r.choice(t, "read", READS);
        let publishing = self
            .r
            .integer::<u64>(t, "publishing_interval_ms", 10..=3_600_000);
        let sampling = self
            .r
            .integer::<u64>(t, "sampling_interval_ms", 0..=3_600_000);
        let queue_size = self.r.integer::<u32>(t, "queue_size", 1..=10_000);
        let deadband = self.r.number(t, "deadband").and_then(|d| {
            if *d.get_ref() >= 0.0 {
                Some(d.into_inner())
            } else {
                self.r.error(
                    &d.span(),
                    format!("deadband in {} must not be negative", t.name),
                );
                None
            }
        });
        let request_timeout = self
            .r
            .integer::<u64>(t, "request_timeout_ms", 100..=120_000);
        let reconnect = self.reconnect(t, 500, 30_000);
        let tags = self.opcua_tags(t, tag_names);
        let (reconnect_min, reconnect_max) = reconnect?;
        let pki_dir = match pki_dir {
            Field::Absent => self.resolve("pki/opcua"),
            f => self.resolve(&f.value()?),
        };
        Some(OpcUaDeviceConfig {
            name: name?,
            endpoint_url: url.value()?,
            security_policy: policy.optional()?,
            security_mode: mode.or(OpcUaMode::SignAndEncrypt)?,
            allow_security_none: allow_none.or(false)?,
            pki_dir,
            certificate_file: certificate_file?,
            private_key_file: private_key_file?,
            application_uri: application_uri.or("urn:twin-gateway".into())?,
            identity: identity?,
            read: read.or(OpcUaRead::Subscribe)?,
            publishing_interval: super::load::ms(publishing.or(500)?),
            sampling_interval: super::load::ms(sampling.or(100)?),
            queue_size: queue_size.or(10)?,
            deadband: deadband.or(0.0)?,
            request_timeout: super::load::ms(request_timeout.or(5_000)?),
            reconnect_min,
            reconnect_max,
            expect_identity: expect?,
            tags: tags?,
        })
    }

    fn opcua_identity(&mut self, t: &Table<'_, '_>) -> Option<OpcUaIdentity> {
        let user = self.r.non_empty(t, "user");
        let has_password = t.get("password_file").is_some();
        let has_cert = t.get("user_certificate_file").is_some() || t.get("user_key_file").is_some();
        match (user, has_cert) {
            (Field::Invalid, _) => None,
            (Field::Valid(u), true) => {
                self.r.error_help(
                    &u.span(),
                    format!("{} has both a user name and a user certificate", t.name),
                    Some("log in either with `user` and `password_file`, or with `user_certificate_file` and `user_key_file`"),
                );
                None
            }
            (Field::Valid(u), false) => {
                let password_file = self.file(t, "password_file", "OPC UA password file", true);
                Some(OpcUaIdentity::UserName {
                    user: u.into_inner(),
                    password_file: password_file?,
                })
            }
            (Field::Absent, true) => {
                let cert = self.file(t, "user_certificate_file", "OPC UA user certificate", false);
                let key = self.file(t, "user_key_file", "OPC UA user private key", true);
                Some(OpcUaIdentity::X509 {
                    cert_file: cert?,
                    key_file: key?,
                })
            }
            (Field::Absent, false) => {
                if has_password {
                    if let Some(span) = t.key_span("password_file") {
                        self.r.error_help(
                            &span,
                            format!("{} has a password_file but no user", t.name),
                            Some("add `user = \"...\"` (the login name for this server)"),
                        );
                    }
                    return None;
                }
                Some(OpcUaIdentity::Anonymous)
            }
        }
    }

    fn opcua_tags(
        &mut self,
        device: &Table<'_, '_>,
        names: &mut HashMap<String, NameSeen>,
    ) -> Option<Vec<OpcUaTag>> {
        let list = match self.r.array_of_tables(device, "tags") {
            Field::Valid(list) => list.into_inner(),
            Field::Absent => Vec::new(),
            Field::Invalid => return None,
        };
        let mut tags = Vec::with_capacity(list.len());
        let mut all_valid = true;
        for (i, (table, span)) in list.into_iter().enumerate() {
            let provisional = Table {
                table,
                span,
                name: format!("[[devices.tags]] #{} of {}", i + 1, device.name),
            };
            let name = self.tag_name(&provisional, device, names);
            let t = Table {
                name: match &name {
                    Some(n) => format!("tag \"{n}\""),
                    None => provisional.name.clone(),
                },
                ..provisional
            };
            self.r.unknown_keys(
                &t,
                &["name", "node_id", "type", "unit", "writable", "check"],
            );
            let node_id = self.r.non_empty(&t, "node_id").and_then(|n| {
                if valid_node_id(n.get_ref()) {
                    Some(n.into_inner())
                } else {
                    self.r.error_help(
                        &n.span(),
                        format!("node_id \"{}\" of {} is not an OPC UA node id", n.get_ref(), t.name),
                        Some("write it as ns=<index>;s=<name>, ns=<index>;i=<number> or nsu=<namespace uri>;s=<name>"),
                    );
                    None
                }
            });
            let node_id = self
                .r
                .required(&t, "node_id", "\"ns=2;s=Tank1.Level\"", node_id);
            let data_type = self.r.choice(&t, "type", TYPES);
            let data_type = self.r.required(&t, "type", "\"double\"", data_type);
            let unit = self.r.string(&t, "unit");
            let writable = self.r.boolean(&t, "writable");
            let checks_ok = self.tag_checks(&t, name.as_deref());
            let tag = (|| {
                Some(OpcUaTag {
                    name: name?,
                    node_id: node_id.value()?,
                    data_type: data_type.value()?,
                    unit: unit.optional()?,
                    writable: writable.or(false)?,
                })
            })();
            match tag.filter(|_| checks_ok) {
                Some(tag) => tags.push(tag),
                None => all_valid = false,
            }
        }
        all_valid.then_some(tags)
    }
}

#[cfg(test)]
mod tests {
    use super::valid_node_id;

    #[test]
    fn node_ids_in_their_written_forms() {
        for ok in [
            "ns=2;s=Tank1.Level",
            "ns=0;i=2258",
            "i=85",
            "nsu=urn:plant;s=A.B",
            "ns=3;g=09087e75-8e5e-499b-954f-f2a9603db28a",
        ] {
            assert!(valid_node_id(ok), "{ok}");
        }
        for bad in [
            "",
            "Tank1.Level",
            "ns=x;s=a",
            "ns=2;i=abc",
            "ns=2;s=",
            "nsu=;s=a",
            "q=1",
        ] {
            assert!(!valid_node_id(bad), "{bad}");
        }
    }
}
