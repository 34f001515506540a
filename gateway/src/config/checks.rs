//! The `check` table of a tag: the plausibility checks the gateway's watch
//! applies to its values (see `gateway/src/watch/`).
//!
//! ```toml
//! [[devices.tags]]
//! name = "tank1.level"
//! # ...
//! check = { min = 0.0, max = 5.0, max_rate_per_s = 0.5, flatline_s = 600,
//!           stale_s = 10, baseline_sigma = 6.0 }
//! ```

use std::time::Duration;

use super::load::Loader;
use super::model::{BaselineCheck, TagChecks};
use super::read::{Field, Table};

const KEYS: &[&str] = &[
    "min",
    "max",
    "max_rate_per_s",
    "flatline_s",
    "stale_s",
    "baseline_sigma",
    "baseline_warmup",
    "baseline_per_hour",
    "baseline_relearn_s",
];

impl Loader<'_> {
    /// Reads the optional `check` table of tag `t` and records it for
    /// `name`. Returns false when it has errors (already reported).
    pub(super) fn tag_checks(&mut self, t: &Table<'_, '_>, name: Option<&str>) -> bool {
        let c = match self
            .r
            .table(t, "check", &format!("the check table of {}", t.name))
        {
            Field::Absent => return true,
            Field::Invalid => return false,
            Field::Valid(c) => c.into_inner(),
        };
        self.r.unknown_keys(&c, KEYS);
        let min = self.r.number(&c, "min");
        let max = self.r.number(&c, "max");
        let rate = self.positive(&c, "max_rate_per_s");
        let flatline_s = self.r.integer::<u64>(&c, "flatline_s", 1..=31_536_000);
        let stale_s = self.r.integer::<u64>(&c, "stale_s", 1..=31_536_000);
        let sigma = self.positive(&c, "baseline_sigma");
        let warmup = self
            .r
            .integer::<u64>(&c, "baseline_warmup", 10..=10_000_000);
        let per_hour = self.r.boolean(&c, "baseline_per_hour");
        let relearn_s = self
            .r
            .integer::<u64>(&c, "baseline_relearn_s", 60..=31_536_000);
        if let (Some(lo), Some(hi)) = (min.get(), max.get()) {
            if lo >= hi {
                if let Some(span) = max.span() {
                    self.r.error_help(
                        &span,
                        format!("max ({hi}) is not above min ({lo}) in {}", c.name),
                        Some("the engineering range is min .. max"),
                    );
                }
                return false;
            }
        }
        let baseline = match sigma {
            Field::Absent => {
                if warmup.get().is_some() || per_hour.get().is_some() || relearn_s.get().is_some() {
                    self.r.error_help(
                        &c.span,
                        format!("{} sets baseline options without baseline_sigma", c.name),
                        Some("add baseline_sigma (how many standard deviations from the learned mean count as an outlier, e.g. 6)"),
                    );
                    return false;
                }
                Some(None)
            }
            Field::Invalid => None,
            Field::Valid(s) => (|| {
                Some(Some(BaselineCheck {
                    sigma: *s.get_ref(),
                    warmup: warmup.or(300)?,
                    per_hour: per_hour.or(false)?,
                    relearn: relearn_s.optional()?.map(Duration::from_secs),
                }))
            })(),
        };
        let checks = (|| {
            Some(TagChecks {
                min: min.optional()?,
                max: max.optional()?,
                max_rate_per_s: rate.optional()?,
                flatline: flatline_s.optional()?.map(Duration::from_secs),
                stale: stale_s.optional()?.map(Duration::from_secs),
                baseline: baseline?,
            })
        })();
        match (checks, name) {
            (Some(checks), Some(name)) => {
                self.checks.insert(name.to_owned(), checks);
                true
            }
            (Some(_), None) => true,
            (None, _) => false,
        }
    }

    fn positive(&mut self, t: &Table<'_, '_>, key: &str) -> Field<f64> {
        let name = t.name.clone();
        self.r.number(t, key).and_then(|n| {
            if *n.get_ref() > 0.0 {
                Some(n.into_inner())
            } else {
                self.r
                    .error(&n.span(), format!("{key} in {name} must be above 0"));
                None
            }
        })
    }
}
