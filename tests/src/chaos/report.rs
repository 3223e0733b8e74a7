//! What a chaos run found: per fault kind, how many were injected, survived, not
//! reached (failpoints), how many rolled the VMs back, and the time to recover; the
//! violations with the command that replays them. A table for people, JSON for programs.
//!
//! A time to recover runs from the fault to the first status that shows the cluster
//! healthy with a newer committed epoch: from the SIGKILL (for a sidecar or the
//! coordinator, the 0..2 s before the runner restarts it included), from the death at a
//! failpoint, from the ballast's removal for a full store.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::faults::{FAILPOINTS, Kind};

/// The figures of one fault kind (or one failpoint).
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Faults injected.
    pub injected: u64,
    /// Faults after which every check passed.
    pub survived: u64,
    /// Failpoints not reached within the deadline (the daemon was restarted normally).
    pub not_reached: u64,
    /// Faults after which QEMUs had been relaunched (a rollback).
    pub rollbacks: u64,
    /// Times to recover of the survived faults, in ms.
    pub recover_ms: Vec<f64>,
}

impl Stats {
    fn json(&self) -> Value {
        json!({
            "injected": self.injected,
            "survived": self.survived,
            "not_reached": self.not_reached,
            "rollbacks": self.rollbacks,
            "recover_ms": {"p50": percentile(&self.recover_ms, 0.50), "p99": percentile(&self.recover_ms, 0.99),
                "max": percentile(&self.recover_ms, 1.0), "samples": self.recover_ms.len()},
        })
    }
}

/// A check that failed.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The fault's number (1-based; 0 before the first fault).
    pub fault: usize,
    /// Its kind.
    pub kind: String,
    /// What it hit.
    pub target: String,
    /// What did not hold.
    pub what: String,
}

/// The run's report.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Faults asked for.
    pub planned: usize,
    /// Faults injected.
    pub run: usize,
    /// Guests.
    pub guests: usize,
    /// The accelerator.
    pub accel: String,
    /// Wall time of the whole run, in seconds.
    pub elapsed_s: f64,
    /// Boot until the first committed epoch, in seconds.
    pub startup_s: f64,
    /// Per kind.
    pub kinds: BTreeMap<Kind, Stats>,
    /// Per failpoint name.
    pub failpoints: BTreeMap<&'static str, Stats>,
    /// What failed.
    pub violations: Vec<Violation>,
    /// The command that replays the run (up to the first violation, if any).
    pub replay: String,
}

/// The `p` quantile (nearest rank) of `v`, 0 when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (p * s.len() as f64).ceil().max(1.0) as usize;
    s[rank.min(s.len()) - 1]
}

impl Report {
    /// The figures of `kind`, created on first use.
    pub fn kind(&mut self, kind: Kind) -> &mut Stats {
        self.kinds.entry(kind).or_default()
    }

    /// The figures of a failpoint, created on first use.
    pub fn failpoint(&mut self, name: &str) -> Option<&mut Stats> {
        let name = FAILPOINTS.iter().find(|f| f.name == name)?.name;
        Some(self.failpoints.entry(name).or_default())
    }

    /// True when every check held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The report as JSON.
    pub fn json(&self) -> Value {
        let kinds: serde_json::Map<String, Value> =
            self.kinds.iter().map(|(k, s)| (k.name().to_owned(), s.json())).collect();
        let failpoints: serde_json::Map<String, Value> =
            self.failpoints.iter().map(|(k, s)| ((*k).to_owned(), s.json())).collect();
        let violations: Vec<Value> = self
            .violations
            .iter()
            .map(|v| json!({"fault": v.fault, "kind": v.kind, "target": v.target, "what": v.what}))
            .collect();
        json!({
            "ok": self.ok(), "seed": self.seed, "faults_planned": self.planned, "faults_run": self.run,
            "guests": self.guests, "accel": self.accel, "elapsed_s": self.elapsed_s, "startup_s": self.startup_s,
            "kinds": kinds, "failpoints": failpoints, "violations": violations, "replay": self.replay,
        })
    }

    /// The report as a table.
    pub fn table(&self) -> String {
        let row = |name: &str, s: &Stats| {
            format!(
                "{:<28} {:>8} {:>8} {:>11} {:>9} {:>9} {:>9}\n",
                name,
                s.injected,
                s.survived,
                s.not_reached,
                s.rollbacks,
                format!("{:.0}", percentile(&s.recover_ms, 0.50)),
                format!("{:.0}", percentile(&s.recover_ms, 0.99)),
            )
        };
        let mut out = format!(
            "chaos: seed {}, {} of {} faults, {} guests under {}, {:.0} s (startup {:.0} s): {}\n\n",
            self.seed,
            self.run,
            self.planned,
            self.guests,
            self.accel,
            self.elapsed_s,
            self.startup_s,
            if self.ok() { "every check held".to_owned() } else { format!("{} violation(s)", self.violations.len()) }
        );
        out.push_str(&format!(
            "{:<28} {:>8} {:>8} {:>11} {:>9} {:>9} {:>9}\n",
            "fault", "injected", "survived", "not-reached", "rollbacks", "p50 ms", "p99 ms"
        ));
        for (k, s) in &self.kinds {
            out.push_str(&row(k.name(), s));
        }
        for (f, s) in &self.failpoints {
            out.push_str(&row(&format!("  {f}"), s));
        }
        for v in &self.violations {
            out.push_str(&format!("\nviolation at fault {} ({} {}): {}\n", v.fault, v.kind, v.target, v.what));
        }
        if !self.ok() {
            out.push_str(&format!("replay: {}\n", self.replay));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
