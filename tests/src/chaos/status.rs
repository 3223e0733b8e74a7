//! The coordinator's answers as the chaos runner reads them: `cutline status --json` and
//! `cutline list --json`, read defensively because their shape grows.

use serde_json::Value;

/// What the coordinator is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No epoch and no recovery in flight.
    Idle,
    /// An epoch runs.
    Epoch,
    /// The cluster is being rolled back.
    Recovery,
    /// The coordinator gave up and waits for an operator.
    Halted,
    /// A shape this runner does not know.
    Unknown,
}

/// One member as the status reports it.
#[derive(Debug, Clone)]
pub struct Member {
    /// VM name.
    pub name: String,
    /// `up` when healthy.
    pub health: String,
    /// Its sidecar is connected.
    pub connected: bool,
    /// Its QEMU's pid.
    pub pid: Option<i32>,
}

/// The parts of `cutline status --json` the runner uses.
#[derive(Debug, Clone)]
pub struct Status {
    /// The last committed epoch.
    pub last_committed: Option<u64>,
    /// The members.
    pub members: Vec<Member>,
    /// What runs now.
    pub phase: Phase,
    /// Recoveries since this coordinator started.
    pub recoveries: u64,
    /// The whole answer.
    pub raw: Value,
}

fn phase_of(v: &Value) -> Phase {
    let word = |s: &str| match s {
        "idle" => Phase::Idle,
        "epoch" => Phase::Epoch,
        "recovery" | "recovering" => Phase::Recovery,
        "halted" => Phase::Halted,
        _ => Phase::Unknown,
    };
    match &v["phase"] {
        Value::String(s) => return word(s),
        Value::Object(o) => {
            if let Some(s) = o.get("state").and_then(Value::as_str) {
                return word(s);
            }
        }
        _ => {}
    }
    match &v["now"] {
        Value::String(s) => word(s),
        Value::Object(o) if o.contains_key("recovering_to") => Phase::Recovery,
        Value::Object(o) if o.contains_key("epoch") => Phase::Epoch,
        Value::Object(o) if o.contains_key("halted") => Phase::Halted,
        _ => Phase::Unknown,
    }
}

impl Status {
    /// Reads a status answer.
    pub fn parse(v: Value) -> Status {
        let members = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| Member {
                name: m["name"].as_str().unwrap_or_default().to_owned(),
                health: m["health"].as_str().unwrap_or_default().to_owned(),
                connected: m["connected"].as_bool().unwrap_or(false),
                pid: m["pid"].as_i64().and_then(|p| i32::try_from(p).ok()),
            })
            .collect();
        let recoveries = match &v["figures"]["recoveries"] {
            Value::Array(a) => a.len() as u64,
            other => other.as_u64().unwrap_or(0),
        };
        Status { last_committed: v["last_committed"].as_u64(), members, phase: phase_of(&v), recoveries, raw: v }
    }

    /// Healthy: idle or in an epoch, exactly the members `names`, each up and connected.
    pub fn healthy(&self, names: &[String]) -> bool {
        matches!(self.phase, Phase::Idle | Phase::Epoch)
            && self.members.len() == names.len()
            && names.iter().all(|n| {
                self.members.iter().any(|m| &m.name == n && m.health == "up" && m.connected && m.pid.is_some())
            })
    }

    /// The QEMU pid the coordinator knows for `name`.
    pub fn pid(&self, name: &str) -> Option<i32> {
        self.members.iter().find(|m| m.name == name).and_then(|m| m.pid)
    }

    /// One line for progress and violations.
    pub fn summary(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                format!(
                    "{}:{}{}:pid {}",
                    m.name,
                    m.health,
                    if m.connected { "" } else { ",disconnected" },
                    m.pid.map_or("-".into(), |p| p.to_string())
                )
            })
            .collect();
        format!(
            "phase {:?}, last committed {}, recoveries {}, members [{}]",
            self.phase,
            self.last_committed.map_or("none".into(), |e| e.to_string()),
            self.recoveries,
            members.join(", ")
        )
    }
}

/// The records of `cutline list --json` that do not name every member of `names`:
/// `(epoch, members it names)`.
pub fn partial_records(list: &Value, names: &[String]) -> Vec<(u64, Vec<String>)> {
    list["epochs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let members: Vec<String> = r["members"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["name"].as_str().or_else(|| m.as_str()).map(str::to_owned))
                .collect();
            let whole = members.len() == names.len() && names.iter().all(|n| members.contains(n));
            (!whole).then(|| (r["epoch"].as_u64().unwrap_or(0), members))
        })
        .collect()
}

/// The epochs `cutline list --json` holds.
pub fn epochs(list: &Value) -> Vec<u64> {
    list["epochs"].as_array().into_iter().flatten().filter_map(|r| r["epoch"].as_u64()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn legacy_and_new_shapes_read_alike() {
        let legacy = Status::parse(json!({
            "last_committed": 4, "now": "idle", "figures": {"recoveries": [{}, {}]},
            "members": [{"name": "vm0", "health": "up", "connected": true, "pid": 7}],
        }));
        assert_eq!((legacy.phase, legacy.recoveries, legacy.last_committed), (Phase::Idle, 2, Some(4)));
        assert!(legacy.healthy(&["vm0".into()]));
        let new = Status::parse(json!({
            "last_committed": null, "phase": {"state": "halted"}, "figures": {"recoveries": 3},
            "members": [{"name": "vm0", "health": "up", "connected": true, "pid": 7}],
        }));
        assert_eq!((new.phase, new.recoveries, new.last_committed), (Phase::Halted, 3, None));
        assert!(!new.healthy(&["vm0".into()]));
        let epoch = Status::parse(json!({"now": {"epoch": 5, "votes": 1}}));
        assert_eq!(epoch.phase, Phase::Epoch);
    }

    #[test]
    fn a_record_missing_a_member_is_partial() {
        let list = json!({"epochs": [
            {"epoch": 1, "members": [{"name": "vm0"}, {"name": "vm1"}]},
            {"epoch": 2, "members": [{"name": "vm0"}]},
        ]});
        let names = vec!["vm0".to_owned(), "vm1".to_owned()];
        assert_eq!(partial_records(&list, &names), vec![(2, vec!["vm0".to_owned()])]);
        assert_eq!(epochs(&list), vec![1, 2]);
    }
}
