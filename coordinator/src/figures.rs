//! What `status` reports of the past, bounded: counts, percentiles over a window of the
//! latest samples, and the last few events. Hours of epochs take the same room as one.

use std::collections::VecDeque;

use serde::Serialize;
use serde_json::{Value, json};

/// Samples kept for percentiles.
const WINDOW: usize = 256;
/// Events kept in lists.
const RECENT: usize = 8;

/// A figure's count, max and percentiles over the latest [`WINDOW`] samples.
#[derive(Debug, Default, Clone)]
pub struct Series {
    count: u64,
    max: f64,
    recent: VecDeque<f64>,
}

impl Series {
    /// Adds a sample.
    pub fn push(&mut self, v: f64) {
        self.count += 1;
        self.max = self.max.max(v);
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(v);
    }

    /// The `q` quantile (0..=1) of the window, if any sample.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let mut v: Vec<f64> = self.recent.iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * q).round() as usize;
        v.get(i).copied()
    }

    /// As JSON: count, min (of the window), p50, p99, max, last.
    pub fn summary(&self) -> Value {
        json!({"count": self.count, "min": self.quantile(0.0), "p50": self.quantile(0.5), "p99": self.quantile(0.99),
            "max": if self.count > 0 { Some(self.max) } else { None }, "last": self.recent.back()})
    }
}

/// The last [`RECENT`] events of a kind, and how many there were.
#[derive(Debug, Default, Clone)]
pub struct Recent {
    count: u64,
    items: VecDeque<Value>,
}

impl Recent {
    /// Adds an event.
    pub fn push(&mut self, v: Value) {
        self.count += 1;
        if self.items.len() == RECENT {
            self.items.pop_front();
        }
        self.items.push_back(v);
    }

    /// How many there were in all.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Serialize for Recent {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        json!({"count": self.count, "last": self.items}).serialize(s)
    }
}

/// Everything `status` reports of the past.
#[derive(Debug, Default)]
pub struct Figures {
    /// Guest pause per member cut.
    pub pause_ms: Series,
    /// Output hold per member.
    pub hold_ms: Series,
    /// Record write latency.
    pub commit_ms: Series,
    /// Whole epoch.
    pub epoch_ms: Series,
    /// Failure detection to the cluster running again.
    pub recovery_ms: Series,
    /// Committed epochs.
    pub committed: Recent,
    /// Aborted epochs, with why.
    pub aborted: Recent,
    /// Aborts since the last commit: how long checkpoints have been failing.
    pub aborted_in_a_row: u64,
    /// VM failures detected.
    pub detections: Recent,
    /// Recoveries that finished.
    pub recoveries: Recent,
    /// Times recovery gave up.
    pub halts: Recent,
    /// VMs of lost hosts placed on surviving ones.
    pub placements: Recent,
    /// Restores of members (where, how long, of which the fetch).
    pub restores: Recent,
    /// Messages discarded (another incarnation or epoch, or not allowed in the state).
    pub discarded: u64,
}

impl Figures {
    /// As JSON for `status`.
    pub fn to_json(&self) -> Value {
        json!({
            "pause_ms": self.pause_ms.summary(),
            "hold_ms": self.hold_ms.summary(),
            "commit_ms": self.commit_ms.summary(),
            "epoch_ms": self.epoch_ms.summary(),
            "recovery_ms": self.recovery_ms.summary(),
            "epochs_committed": self.committed.count(),
            "epochs_aborted": self.aborted.count(),
            "aborted_in_a_row": self.aborted_in_a_row,
            "recoveries": self.recoveries.count(),
            "halts": self.halts.count(),
            "discarded_messages": self.discarded,
            "recent": {
                "committed": self.committed,
                "aborted": self.aborted,
                "detections": self.detections,
                "recoveries": self.recoveries,
                "halts": self.halts,
                "placements": self.placements,
                "restores": self.restores,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_stay_bounded_after_many_epochs() {
        let mut f = Figures::default();
        for i in 0..100_000u64 {
            f.pause_ms.push(i as f64);
            f.committed.push(json!({"epoch": i, "members": ["vm0", "vm1", "vm2"]}));
        }
        let text = f.to_json().to_string();
        assert!(text.len() < 8 * 1024, "status figures take {} bytes", text.len());
        let j = f.to_json();
        assert_eq!(j["epochs_committed"], 100_000);
        assert_eq!(j["pause_ms"]["max"], 99_999.0);
        assert_eq!(j["pause_ms"]["p50"], (100_000 - 128) as f64);
    }
}
