//! The current value of every tag, as the policy sees it (step limits,
//! interlocks): updated by the uplink from every sample.

use std::collections::HashMap;
use std::sync::Mutex;

use twin_model::Sample;

use crate::policy::{CurrentValue, CurrentValues};

/// Latest value and quality per tag, shared between the uplink (writer)
/// and the downlink (reader).
#[derive(Debug, Default)]
pub struct CurrentTable {
    tags: Mutex<HashMap<String, CurrentValue>>,
}

impl CurrentTable {
    /// Records the samples of one poll cycle.
    pub fn update(&self, samples: &[Sample]) {
        let mut tags = self.tags.lock().expect("current values lock");
        for s in samples {
            let next = CurrentValue {
                value: s.value.clone(),
                quality: s.quality,
            };
            match tags.get_mut(&s.tag) {
                Some(cur) => *cur = next,
                None => {
                    tags.insert(s.tag.clone(), next);
                }
            }
        }
    }
}

impl CurrentValues for CurrentTable {
    fn current(&self, tag: &str) -> Option<CurrentValue> {
        self.tags
            .lock()
            .expect("current values lock")
            .get(tag)
            .cloned()
    }
}
