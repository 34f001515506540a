//! Reading a gateway's asset inventory and software bill of materials as
//! the twin receives them: every message verified with the gateway's key,
//! the SBOM reassembled from its parts and checked against the hashes in
//! its index and in the inventory (`docs/wire-format.md`, "Asset
//! inventory").
//!
//! [`Collector`] does the checking and holds no connection (tests feed it
//! messages); [`fetch`] collects the retained messages from the broker.

use std::collections::BTreeMap;
use std::time::Duration;

use twin_model::inventory::{Inventory, SbomIndex, INVENTORY_TYP, SBOM_PART_TYP, SBOM_TYP};
use twin_model::jws::sha256;
use twin_model::{topics, TrustStore, MAX_MESSAGE_BYTES};

use crate::client::ClientOptions;
use crate::operator::{follow_topic, Link};

/// What was verified: the inventory and the SBOM document it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub inventory: Inventory,
    /// The CycloneDX JSON document, exactly as published.
    pub sbom: Vec<u8>,
}

/// Collects one gateway's inventory messages and checks them.
pub struct Collector {
    trust: TrustStore,
    prefix: String,
    gateway: String,
    inventory: Option<Inventory>,
    index: Option<SbomIndex>,
    parts: BTreeMap<usize, Vec<u8>>,
    /// Messages that failed verification, with the reason.
    pub rejected: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Collector {
    pub fn new(trust: TrustStore, prefix: &str, gateway: &str) -> Self {
        Collector {
            trust,
            prefix: prefix.to_owned(),
            gateway: gateway.to_owned(),
            inventory: None,
            index: None,
            parts: BTreeMap::new(),
            rejected: Vec::new(),
        }
    }

    /// Takes one message of the gateway's topics (others are ignored).
    pub fn take(&mut self, topic: &str, payload: &[u8]) {
        let Some((gw, kind)) = topics::parse(&self.prefix, topic) else {
            return;
        };
        if gw != self.gateway {
            return;
        }
        // Verified, parsed, and about this gateway.
        fn signed<T: serde::de::DeserializeOwned>(
            trust: &TrustStore,
            topic: &str,
            payload: &[u8],
            typ: &str,
            gateway: &str,
            gateway_of: fn(&T) -> &str,
        ) -> Result<T, String> {
            let v: T = crate::watch::verify_json(trust, payload, typ, MAX_MESSAGE_BYTES)
                .map_err(|(code, why)| format!("{topic}: {code}: {why}"))?;
            match gateway_of(&v) {
                g if g == gateway => Ok(v),
                g => Err(format!("{topic}: names gateway {g}")),
            }
        }
        let (trust, gw) = (&self.trust, self.gateway.as_str());
        let result = match kind {
            topics::INVENTORY => {
                signed(trust, topic, payload, INVENTORY_TYP, gw, |i: &Inventory| {
                    &i.gateway_id
                })
                .map(|inv| self.inventory = Some(inv))
            }
            topics::SBOM => signed(trust, topic, payload, SBOM_TYP, gw, |i: &SbomIndex| {
                &i.gateway_id
            })
            .map(|index| self.index = Some(index)),
            other => match other
                .strip_prefix(topics::SBOM)
                .and_then(|rest| rest.strip_prefix('/'))
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) => trust
                    .verify_compact(payload, SBOM_PART_TYP, MAX_MESSAGE_BYTES)
                    .map(|v| {
                        self.parts.insert(i, v.payload);
                    })
                    .map_err(|e| format!("{topic}: {e}")),
                None => Ok(()),
            },
        };
        if let Err(why) = result {
            self.rejected.push(why);
        }
    }

    /// Whether the inventory, the index and every part it names are here.
    pub fn complete(&self) -> bool {
        self.inventory.is_some()
            && self
                .index
                .as_ref()
                .is_some_and(|i| (0..i.parts.len()).all(|k| self.parts.contains_key(&k)))
    }

    /// The verified inventory and SBOM, or everything that is wrong.
    pub fn finish(self) -> Result<Verified, Vec<String>> {
        let mut problems = self.rejected;
        let Some(inventory) = self.inventory else {
            problems.push("no inventory was received".into());
            return Err(problems);
        };
        let Some(index) = self.index else {
            problems.push("no SBOM index was received".into());
            return Err(problems);
        };
        let mut sbom = Vec::with_capacity(index.bytes);
        for (k, hash) in index.parts.iter().enumerate() {
            match self.parts.get(&k) {
                None => problems.push(format!("SBOM part {k} is missing")),
                Some(p) if hex(&sha256(p)) != *hash => problems.push(format!(
                    "SBOM part {k} does not match its hash in the index"
                )),
                Some(p) => sbom.extend_from_slice(p),
            }
        }
        if problems.is_empty() {
            let digest = hex(&sha256(&sbom));
            if sbom.len() != index.bytes || digest != index.sha256 {
                problems.push("the SBOM parts do not make the document of the index".into());
            } else if digest != inventory.gateway.sbom_sha256 {
                problems.push(format!(
                    "the SBOM published ({digest}) is not the one the inventory names ({})",
                    inventory.gateway.sbom_sha256
                ));
            }
        }
        if problems.is_empty() {
            Ok(Verified { inventory, sbom })
        } else {
            Err(problems)
        }
    }
}

/// Collects the retained inventory and SBOM of `gateway` from the broker,
/// for at most `wait` (less once everything is here).
pub async fn fetch(
    opts: &ClientOptions,
    prefix: &str,
    gateway: &str,
    trust: TrustStore,
    wait: Duration,
) -> anyhow::Result<Result<Verified, Vec<String>>> {
    let mut c = Collector::new(trust, prefix, gateway);
    let mut lost = None;
    let topic = format!("{prefix}/{gateway}/#");
    let done = tokio::sync::Notify::new();
    let collect = follow_topic(opts, &topic, Some(wait), |link| match link {
        Link::Message { topic, payload } => {
            c.take(&topic, &payload);
            if c.complete() {
                done.notify_one();
            }
        }
        Link::Lost(why) => lost = Some(why),
        Link::Subscribed => {}
    });
    tokio::select! {
        r = collect => r?,
        () = done.notified() => {}
    }
    if let (Some(why), false) = (lost, c.complete()) {
        c.rejected.push(format!("connection to the broker: {why}"));
    }
    Ok(c.finish())
}

/// The inventory in lines for people.
pub fn describe(v: &Verified) -> String {
    let inv = &v.inventory;
    let g = &inv.gateway;
    let mut out = format!(
        "gateway {} {} (commit {}, {} {}, {}), profile {}\n  features: {}\n  config sha256 {}; policy {}\n  SBOM: {} components, sha256 {}\n",
        inv.gateway_id,
        g.version,
        g.commit,
        g.target,
        g.profile,
        g.rustc,
        g.deployment_profile,
        g.features.join(", "),
        g.config_sha256,
        g.policy_sha256.as_deref().unwrap_or("none"),
        g.sbom_components,
        g.sbom_sha256,
    );
    let date = |ms: i64| gateway::clock::rfc3339_ms(i128::from(ms));
    for c in &g.certificates {
        out.push_str(&format!(
            "  certificate {} {}: {} (issuer {}), valid {} .. {}, sha256 {}\n",
            c.role,
            c.file,
            c.subject,
            c.issuer,
            date(c.not_before_ms),
            date(c.not_after_ms),
            c.sha256
        ));
    }
    for k in &g.keys {
        out.push_str(&format!("  key {} {} ({})\n", k.role, k.kid, k.alg));
    }
    for d in &inv.devices {
        out.push_str(&format!(
            "device {} ({} {}{}), {} tag(s), {} writable\n",
            d.name,
            d.protocol,
            d.endpoint,
            d.unit_id.map(|u| format!(" unit {u}")).unwrap_or_default(),
            d.tags.len(),
            d.writable.len()
        ));
        match (&d.identity, &d.identity_status) {
            (Some(id), _) => {
                for (k, v) in &id.fields {
                    out.push_str(&format!("  {k}: {v}\n"));
                }
            }
            (None, Some(s)) => out.push_str(&format!("  identity: {s}\n")),
            (None, None) => {}
        }
        if let Some(ms) = d.identity_changed_ms {
            out.push_str(&format!("  identity changed at {}\n", date(ms as i64)));
        }
        match d.last_seen_ms {
            Some(ms) => out.push_str(&format!("  last seen {}\n", date(ms as i64))),
            None => out.push_str("  never seen\n"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use twin_model::golden;

    fn collector() -> Collector {
        let mut trust = TrustStore::new();
        trust.add_pem(&golden::key().public_key_pem()).unwrap();
        Collector::new(trust, "twin", "plant1-gw1")
    }

    /// The golden messages, as the broker delivers them.
    fn messages() -> Vec<(String, Vec<u8>)> {
        let (_, index, parts) = golden::sbom_messages();
        let mut m = vec![
            (
                "twin/plant1-gw1/inventory".to_string(),
                golden::inventory().1.into_bytes(),
            ),
            ("twin/plant1-gw1/sbom".to_string(), index.into_bytes()),
        ];
        for (i, p) in parts.into_iter().enumerate() {
            m.push((format!("twin/plant1-gw1/sbom/{i}"), p.into_bytes()));
        }
        m
    }

    #[test]
    fn the_golden_inventory_and_sbom_verify_and_reassemble() {
        let mut c = collector();
        for (t, p) in messages().into_iter().rev() {
            c.take(&t, &p);
        }
        c.take("twin/plant1-gw1/telemetry", b"ignored");
        c.take("twin/other-gw/inventory", b"ignored");
        assert!(c.complete());
        let v = c.finish().unwrap();
        assert_eq!(v.sbom, golden::sbom().as_bytes());
        let text = describe(&v);
        assert!(text.contains("vendor_name: Twin Gateway Project"), "{text}");
        assert!(
            text.contains("device plc1 (modbus_tcp 192.168.1.10:502 unit 1)"),
            "{text}"
        );
    }

    #[test]
    fn a_forged_a_missing_or_a_swapped_part_is_named() {
        // A part signed by another key.
        let mut c = collector();
        let other = twin_model::SigningKey::from_seed(&[9; 32]).unwrap();
        for (t, p) in messages() {
            let p = if t.ends_with("/sbom/1") {
                other.sign_compact(SBOM_PART_TYP, b"evil").into_bytes()
            } else {
                p
            };
            c.take(&t, &p);
        }
        let problems = c.finish().unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("sbom/1")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("part 1 is missing")),
            "{problems:?}"
        );

        // Parts in the wrong places: each is genuine, but not where the index says.
        let mut c = collector();
        for (t, p) in messages() {
            let t = match t.as_str() {
                "twin/plant1-gw1/sbom/0" => "twin/plant1-gw1/sbom/1".to_string(),
                "twin/plant1-gw1/sbom/1" => "twin/plant1-gw1/sbom/0".to_string(),
                _ => t,
            };
            c.take(&t, &p);
        }
        let problems = c.finish().unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("does not match its hash")),
            "{problems:?}"
        );

        // No inventory at all.
        let mut c = collector();
        for (t, p) in messages().into_iter().skip(1) {
            c.take(&t, &p);
        }
        assert_eq!(
            c.finish().unwrap_err(),
            vec!["no inventory was received".to_string()]
        );
    }
}
