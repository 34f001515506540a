//! The signed gap record: batches the gateway signed but will never deliver,
//! with how many points they held and why, so a twin can tell "lost and
//! accounted" from "not yet arrived".
//!
//! Published on `{prefix}/{gateway_id}/gaps` (QoS 1, not retained), JWS
//! with `typ` [`GAP_TYP`]. Gap records are never dropped themselves.

use serde::{Deserialize, Serialize};

/// JWS `typ` of a gap record.
pub const GAP_TYP: &str = "twin-gap+jws";

/// Why batches were dropped. Stable codes.
pub mod reason {
    /// The outbox reached `max_size_mib` (policy drop_oldest or drop_newest).
    pub const OUTBOX_FULL: &str = "outbox_full";
    /// Batches older than `max_age_s`.
    pub const MAX_AGE: &str = "max_age";
    /// A stored record failed its integrity check and was quarantined.
    pub const QUARANTINED: &str = "quarantined";
    /// The outbox could not be written (disk full, I/O error).
    pub const STORAGE_ERROR: &str = "storage_error";
    /// The outbox database was unreadable at start and was set aside; the
    /// batches it held are unknown (`points` is absent).
    pub const OUTBOX_LOST: &str = "outbox_lost";
}

/// Payload of a gap record. Field order is the serialization order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GapRecord {
    pub v: u32,
    pub gateway_id: String,
    /// 1, 2, 3, ... per gateway; lets a twin drop duplicate gap records.
    pub gap_id: u64,
    /// The sequence numbers dropped, as inclusive `[from, to]` runs.
    pub seqs: Vec<[u64; 2]>,
    /// Points in the dropped batches; absent when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub points: Option<u64>,
    pub reason: String,
    pub created_ms: u64,
}

impl GapRecord {
    /// Number of batches named.
    pub fn batches(&self) -> u64 {
        self.seqs
            .iter()
            .map(|[a, b]| b.saturating_sub(*a) + 1)
            .sum()
    }

    /// Whether `seq` is named.
    pub fn contains(&self, seq: u64) -> bool {
        self.seqs.iter().any(|[a, b]| (*a..=*b).contains(&seq))
    }
}

/// Folds sorted sequence numbers into inclusive runs.
pub fn runs(sorted: impl IntoIterator<Item = u64>) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for s in sorted {
        match out.last_mut() {
            Some(last) if last[1] + 1 == s => last[1] = s,
            _ => out.push([s, s]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_fold_and_count() {
        let r = runs([1, 2, 3, 7, 9, 10]);
        assert_eq!(r, vec![[1, 3], [7, 7], [9, 10]]);
        let g = GapRecord {
            v: 1,
            gateway_id: "g".into(),
            gap_id: 1,
            seqs: r,
            points: Some(5),
            reason: reason::OUTBOX_FULL.into(),
            created_ms: 0,
        };
        assert_eq!(g.batches(), 6);
        assert!(g.contains(7) && !g.contains(8));
    }
}
