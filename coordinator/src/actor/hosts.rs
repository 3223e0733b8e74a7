//! The hosts side of the actor: host agents registering and renewing their leases, a lost
//! host's VMs failed and placed on surviving hosts.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

use serde_json::json;
use sidecar::proto::{Envelope, Msg, PROTOCOL, VectorClock};

use super::{Actor, Tx, ms, now_ms};
use crate::hosts::{HostInfo, Leases};
use crate::phase::Event;

impl Actor {
    /// A host agent registers: welcome it, then reconcile what it runs with the membership.
    pub(super) fn on_host_register(&mut self, conn: u64, tx: Tx, env: Envelope) {
        let Msg::HostRegister { version, cluster, host, address, cores, mem_total, mem_available, qemu, vms, .. } =
            env.msg
        else {
            return;
        };
        let refuse = |what: String| {
            tracing::warn!("host registration refused: {what}");
            let _ = tx.send(Envelope::plain(Msg::Error { what }));
        };
        if let Err(e) = self.admit(&format!("host {host}"), version, &cluster) {
            return refuse(e);
        }
        if let Err(e) = sidecar::VmName::new(&host) {
            return refuse(format!("bad host name: {e}"));
        }
        let info = HostInfo { address, cores, mem_total, mem_available, qemu };
        let registered = self.leases().register(&host, info, conn, Instant::now());
        if let Err(e) = registered {
            return refuse(e.to_string());
        }
        let _ = tx.send(Envelope {
            inc: self.incarnation(),
            vt: VectorClock::default(),
            msg: Msg::HostWelcome {
                version: PROTOCOL,
                incarnation: self.incarnation(),
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
                lease_ms: self.cfg.lease.as_millis() as u64,
            },
        });
        tracing::info!(host = %host, vms = ?vms, "host registered");
        // Every VM it reports, and every VM placed on it, gets an order: run it here
        // (placed here, or not a member yet: it joins from here), or evict it (placed
        // elsewhere: it moved while this host was away). Its agent starts no sidecar
        // without one.
        let mut names: BTreeSet<&String> = vms.iter().collect();
        names.extend(
            self.durable.members.iter().filter(|(_, m)| m.host.as_deref() == Some(host.as_str())).map(|(n, _)| n),
        );
        for vm in names {
            let member = self.durable.members.get(vm);
            let msg = match member.and_then(|m| m.host.as_deref()) {
                Some(placed) if placed != host => {
                    Msg::Evict { name: vm.clone(), reason: format!("{vm} runs on host {placed} now") }
                }
                _ if self.unplaced.contains(vm) => continue,
                _ => Msg::Run { name: vm.clone(), qmp: member.map(|m| m.qmp.clone()).unwrap_or_default() },
            };
            let _ = tx.send(Envelope::plain(msg));
        }
        self.host_tx.insert(host, tx);
    }

    /// A host agent's later message (its heartbeats are granted by its connection, see
    /// [`grant`]): nothing else is expected.
    pub(super) fn on_host_msg(&mut self, conn: u64, env: Envelope) {
        let host = self.leases().of_conn(conn).map(str::to_owned).unwrap_or_default();
        tracing::debug!(host = %host, "ignored {} from a host agent", env.msg.kind());
    }

    /// `host`'s lease and margin ran out: its VMs are failed (fenced there by now) and
    /// placed on surviving hosts; the recovery then rolls the cluster back and their new
    /// sidecars restore them there.
    pub(super) async fn host_lost(&mut self, host: &str, why: &str) {
        tracing::error!(host = %host, "host lost: {why}");
        let since_grant_ms =
            self.leases().hosts.get(host).map_or(0.0, |h| ms(Instant::now().duration_since(h.last_grant)));
        self.figures.detections.push(json!({"host": host, "reason": why, "at_unix_ms": now_ms(),
            "last_grant_unix_ms": now_ms().saturating_sub(since_grant_ms as u64)}));
        if let Some(tx) = self.host_tx.remove(host) {
            let _ = tx.send(Envelope::plain(Msg::Revoked { reason: why.to_owned() }));
        }
        let moved: Vec<String> = self
            .durable
            .members
            .iter()
            .filter(|(_, m)| m.host.as_deref() == Some(host))
            .map(|(n, _)| n.clone())
            .collect();
        for n in moved {
            if let Some(m) = self.members.get_mut(&n) {
                m.conn = None;
                m.pid = None;
            }
            self.vm_failed(&n, format!("host {host} lost: {why}"));
            self.step(Event::Disconnected { name: n.clone() });
            self.unplaced.insert(n);
        }
        self.place_pending().await;
    }

    /// Places the VMs of lost hosts on the hosts up now, records where, and has those
    /// hosts run their sidecars; what finds no room waits for a host to come.
    pub(super) async fn place_pending(&mut self) {
        if self.unplaced.is_empty() {
            return;
        }
        let vms: Vec<(String, u64)> = self
            .unplaced
            .iter()
            .map(|n| (n.clone(), self.durable.members.get(n).and_then(|m| m.ram_bytes).unwrap_or(256 << 20)))
            .collect();
        let placed = self.leases().place(&vms, self.cfg.standby.as_deref(), &[]);
        let placement = match placed {
            Ok(p) => p,
            Err(e) => {
                // Said once per reason, not at every tick.
                if self.placement_wait.as_deref() != Some(e.as_str()) {
                    tracing::warn!(vms = ?self.unplaced, "waiting for a host: {e}");
                    self.placement_wait = Some(e);
                }
                return;
            }
        };
        let mut next = self.durable.clone();
        for (vm, to) in &placement {
            if let Some(m) = next.members.get_mut(vm) {
                m.host = Some(to.clone());
            }
        }
        if let Err(e) = self.save(next).await {
            tracing::error!("cannot record where the VMs of lost hosts go: {e}");
            return;
        }
        self.placement_wait = None;
        for (vm, to) in placement {
            self.unplaced.remove(&vm);
            let qmp = self.durable.members.get(&vm).map(|m| m.qmp.clone()).unwrap_or_default();
            tracing::warn!(vm = %vm, to = %to, "placed on a surviving host");
            self.figures.placements.push(json!({"vm": vm, "to": to, "at_unix_ms": now_ms()}));
            if let Some(m) = self.members.get_mut(&vm) {
                m.info.host = Some(to.clone());
            }
            if let Some(tx) = self.host_tx.get(&to) {
                let _ = tx.send(Envelope::plain(Msg::Run { name: vm, qmp }));
            }
        }
    }
}

/// Grants (or refuses) a heartbeat that arrived on connection `conn`, in the connection's
/// own task: the answer, `Lease` or `Revoked`, or `None` when `conn` is no host's.
pub fn grant(leases: &Mutex<Leases>, conn: u64, msg: &Msg) -> Option<Msg> {
    let Msg::HostHeartbeat { seq, mem_available, vms } = msg else { return None };
    let mut l = leases.lock().unwrap_or_else(|e| e.into_inner());
    let host = l.of_conn(conn)?.to_owned();
    Some(match l.heartbeat(&host, conn, *mem_available, vms.clone(), Instant::now()) {
        Ok(ms) => Msg::Lease { seq: *seq, ms },
        Err(e) => Msg::Revoked { reason: e.to_string() },
    })
}
