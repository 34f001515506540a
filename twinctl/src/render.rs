//! The live twin for people (a text table) and for machines (JSON lines).

use crate::watch::{GatewayView, WatchEvent};
use std::fmt::Write as _;
use twin_model::status::State;
use twin_model::{Continuity, Quality};

/// The twin of every gateway as a text table; `now_ms` gives each tag's age.
pub fn table(
    gateways: &std::collections::BTreeMap<String, GatewayView>,
    rejected: u64,
    now_ms: u64,
    color: bool,
) -> String {
    let (red, yellow, green, reset) = if color {
        ("\x1b[1;31m", "\x1b[33m", "\x1b[32m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let mut out = String::new();
    if gateways.is_empty() {
        let _ = writeln!(out, "waiting for the first verified message...");
    }
    for (gw, v) in gateways {
        let state = match v.status.as_ref().map(|s| s.state) {
            Some(State::Online) => format!("{green}online{reset}"),
            Some(State::Offline) => format!("{red}OFFLINE{reset}"),
            None => "status unknown".into(),
        };
        let _ = writeln!(
            out,
            "gateway {gw}  {state}  seq {}  batches {}  points {}  twin v{}  duplicates {}",
            v.latest_seq,
            v.batches,
            v.points,
            v.reported.as_ref().map_or(0, |r| r.version),
            v.duplicates
        );
        let _ = writeln!(
            out,
            "{:<28} {:>18} {:<8} {:<10} {:>8}  REASON",
            "TAG", "VALUE", "UNIT", "QUALITY", "AGE"
        );
        for (tag, t) in &v.tags {
            let unit = v
                .reported
                .as_ref()
                .and_then(|r| r.tags.get(tag))
                .and_then(|s| s.unit.clone())
                .unwrap_or_default();
            let value = t.value.as_ref().map_or("-".to_string(), |x| x.to_string());
            let q = match t.quality {
                Quality::Good => format!("{green}{:<10}{reset}", "good"),
                Quality::Uncertain => format!("{yellow}{:<10}{reset}", "uncertain"),
                Quality::Bad => format!("{red}{:<10}{reset}", "BAD"),
            };
            let age = now_ms.saturating_sub(t.ts_ms) as f64 / 1000.0;
            let _ = writeln!(
                out,
                "{tag:<28} {value:>18} {unit:<8} {q} {age:>7.1}s  {}",
                t.reason.as_deref().unwrap_or("")
            );
        }
        if !v.gap_records.is_empty() {
            let mut reasons: Vec<&str> =
                v.gap_records.values().map(|g| g.reason.as_str()).collect();
            reasons.dedup();
            let batches: u64 = v.gap_records.values().map(|g| g.batches()).sum();
            let points = v
                .lost_points()
                .map_or("an unknown number of".to_string(), |p| p.to_string());
            let _ = writeln!(out, "{yellow}!! {batches} batch(es) with {points} point(s) dropped by the gateway and accounted ({}){reset}", reasons.join(", "));
        }
        if v.unexplained() > 0 {
            let _ = writeln!(
                out,
                "{red}!! {} batch(es) MISSING: {:?}{reset}",
                v.unexplained(),
                v.gaps
            );
        }
        if v.rejected > 0 {
            let _ = writeln!(
                out,
                "{red}!! {} message(s) REJECTED for this gateway{reset}",
                v.rejected
            );
        }
    }
    if rejected > 0 {
        let _ = writeln!(
            out,
            "{red}!! {rejected} message(s) rejected in total{reset}"
        );
    }
    out
}

/// One event as a JSON line.
pub fn json_line(ev: &WatchEvent) -> String {
    let v = match ev {
        WatchEvent::Batch {
            gateway,
            seq,
            points,
            continuity,
        } => {
            let (c, missing) = match continuity {
                Continuity::First => ("first", None),
                Continuity::InOrder => ("in_order", None),
                Continuity::Duplicate => ("duplicate", None),
                Continuity::Gap { from, to } => ("gap", Some([*from, *to])),
            };
            serde_json::json!({"event":"batch","gateway":gateway,"seq":seq,"points":points,"continuity":c,"missing":missing})
        }
        WatchEvent::Reported { gateway, version } => {
            serde_json::json!({"event":"reported","gateway":gateway,"version":version})
        }
        WatchEvent::Status { gateway, status } => {
            serde_json::json!({"event":"status","gateway":gateway,"state":status.state,"session":status.session})
        }
        WatchEvent::Rejected {
            topic,
            code,
            message,
        } => serde_json::json!({"event":"rejected","topic":topic,"code":code,"message":message}),
        WatchEvent::Gap { gateway, record } => {
            serde_json::json!({"event":"gap","gateway":gateway,"gap_id":record.gap_id,"seqs":record.seqs,"points":record.points,"reason":record.reason})
        }
        WatchEvent::Ignored { topic } => serde_json::json!({"event":"ignored","topic":topic}),
    };
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watch::{GatewayView, TagView};
    use std::collections::BTreeMap;
    use twin_model::Value;

    #[test]
    fn gaps_rejections_and_bad_quality_are_shown_loudly() {
        let mut v = GatewayView::default();
        v.tags.insert(
            "tank1.level".into(),
            TagView {
                value: Some(Value::Float(2.5)),
                quality: Quality::Good,
                reason: None,
                ts_ms: 1_000,
            },
        );
        v.tags.insert(
            "tank1.flow".into(),
            TagView {
                value: None,
                quality: Quality::Bad,
                reason: Some("timeout".into()),
                ts_ms: 500,
            },
        );
        v.gaps = vec![(5, 7)];
        v.rejected = 2;
        let mut gws = BTreeMap::new();
        gws.insert("gw".to_string(), v);
        let t = table(&gws, 2, 3_000, false);
        assert!(
            t.contains("tank1.level") && t.contains("2.5") && t.contains("2.0s"),
            "{t}"
        );
        assert!(t.contains("BAD") && t.contains("timeout"), "{t}");
        assert!(t.contains("!! 3 batch(es) MISSING: [(5, 7)]"), "{t}");
        assert!(t.contains("!! 2 message(s) REJECTED"), "{t}");
    }

    #[test]
    fn events_are_json_lines() {
        let ev = WatchEvent::Batch {
            gateway: "gw".into(),
            seq: 9,
            points: 3,
            continuity: Continuity::Gap { from: 4, to: 8 },
        };
        let v: serde_json::Value = serde_json::from_str(&json_line(&ev)).unwrap();
        assert_eq!(v["continuity"], "gap");
        assert_eq!(v["missing"], serde_json::json!([4, 8]));
    }
}
