//! What `cutline status` shows of the actor: members and where they run, hosts and their
//! leases, the phase, the figures.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::{Value, json};

use super::{Actor, health_str, ms};
use crate::phase::Phase;

impl Actor {
    /// The status, as `cutline status --json` prints it.
    pub(super) fn status(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|(n, m)| {
                let restoring = matches!(&self.phase, Phase::Recovery(r) if r.targets.contains_key(n));
                let health = if restoring { "restoring".into() } else { health_str(&m.health, m.conn.is_some()) };
                json!({"name": n, "health": health, "pid": m.pid, "connected": m.conn.is_some(),
                    "last_heartbeat_ms": ms(m.last_seen.elapsed()), "qmp": m.info.qmp, "store": m.info.store,
                    "host": m.info.host})
            })
            .collect();
        let phase = match &self.phase {
            Phase::Idle => json!({"state": "idle"}),
            Phase::Epoch(r) => json!({"state": "epoch", "epoch": r.epoch, "step": r.step,
                "members": r.members.iter().map(|(n, p)| (n.clone(), format!("{:?}", p.stage).split([' ', '{']).next().unwrap_or("").to_lowercase())).collect::<BTreeMap<_, _>>()}),
            Phase::Recovery(r) => json!({"state": "recovery", "to": r.epoch, "step": r.step, "attempt": r.attempt,
                "reason": r.reason, "targets": r.targets.iter().map(|(n, t)| (n.clone(), t.state)).collect::<BTreeMap<_, _>>(),
                "deadline_in_ms": ms(r.deadline.saturating_duration_since(Instant::now()))}),
            Phase::Halted { reason, paused } => json!({"state": "halted", "reason": reason, "paused": paused}),
        };
        let paused: Vec<&String> = match &self.phase {
            Phase::Recovery(r) => r
                .targets
                .iter()
                .filter(|(_, t)| t.state == crate::phase::TargetState::Restored)
                .map(|(n, _)| n)
                .collect(),
            Phase::Halted { paused, .. } => paused.iter().collect(),
            _ => Vec::new(),
        };
        let now = Instant::now();
        let hosts: Vec<Value> = self
            .leases()
            .hosts
            .iter()
            .map(|(n, h)| {
                json!({"name": n, "state": h.state, "address": h.info.address, "connected": h.conn.is_some(),
                    "cores": h.info.cores, "mem_available": h.info.mem_available, "qemu": h.info.qemu,
                    "vms": h.vms, "since_grant_ms": ms(now.duration_since(h.last_grant))})
            })
            .collect();
        json!({
            "cluster": self.cluster,
            "incarnation": self.incarnation(),
            "members": members,
            "hosts": hosts,
            "lease_ms": self.cfg.lease.as_millis() as u64,
            "last_committed": self.catalog.epochs().last(),
            "next_epoch": self.durable.next_epoch,
            "phase": phase,
            "now": if matches!(self.phase, Phase::Idle) { json!("idle") } else { json!(self.phase.name()) },
            "paused_vms": paused,
            "vt": self.clock,
            "figures": self.figures.to_json(),
        })
    }
}
