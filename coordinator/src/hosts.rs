//! The hosts of a cluster and their leases, as a pure table. A host agent's granted
//! heartbeat gives its host a lease of [`Leases::lease`] from when the host sent it; the
//! coordinator counts from when it received it (never earlier than the send), and
//! declares the host lost only `lease + margin` after that. By then the host has fenced
//! (killed its VMs) on its own, as long as the clocks' rates differ by less than the
//! margin covers (docs/HOSTS.md). Only then may its VMs start elsewhere.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What a host said of itself when it registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostInfo {
    /// Its address, for operators.
    pub address: String,
    /// CPU cores.
    pub cores: u32,
    /// Memory in all, bytes.
    pub mem_total: u64,
    /// Memory available at its last heartbeat, bytes.
    pub mem_available: u64,
    /// The QEMU system emulators it has.
    pub qemu: Vec<String>,
}

/// A host's standing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum HostState {
    /// Holds a lease (or may: the last grant has not run out plus the margin).
    Up,
    /// Declared lost: its VMs may run elsewhere; it must register again, fenced.
    Lost {
        /// Why.
        why: String,
    },
}

/// One host.
#[derive(Debug, Clone)]
pub struct Host {
    /// What it has.
    pub info: HostInfo,
    /// Its standing.
    pub state: HostState,
    /// When the coordinator received the last heartbeat it granted (or, before any,
    /// when this coordinator started or the host registered: a lease granted by an
    /// earlier coordinator may still run).
    pub last_grant: Instant,
    /// Its connection, while it has one.
    pub conn: Option<u64>,
    /// The VMs it said it runs.
    pub vms: Vec<String>,
}

/// Why the table refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("host {host}: {why}")]
pub struct HostRefused {
    /// The host.
    pub host: String,
    /// Why.
    pub why: String,
}

/// The hosts, the lease and the margin.
#[derive(Debug, Clone)]
pub struct Leases {
    /// The hosts by name.
    pub hosts: BTreeMap<String, Host>,
    /// The lease a granted heartbeat buys.
    pub lease: Duration,
    /// Waited beyond the lease before a host counts as fenced.
    pub margin: Duration,
    /// When this coordinator started.
    pub started: Instant,
}

impl Leases {
    /// An empty table.
    pub fn new(lease: Duration, margin: Duration, now: Instant) -> Leases {
        Leases { hosts: BTreeMap::new(), lease, margin, started: now }
    }

    /// A host the membership names, not heard from by this coordinator yet: an earlier
    /// coordinator may have granted it a lease up to now, so it counts from now.
    pub fn expect(&mut self, name: &str, now: Instant) {
        self.hosts.entry(name.into()).or_insert_with(|| Host {
            info: HostInfo { address: String::new(), cores: 0, mem_total: 0, mem_available: 0, qemu: Vec::new() },
            state: HostState::Up,
            last_grant: now,
            conn: None,
            vms: Vec::new(),
        });
    }

    /// `name` registers on connection `conn`. A lost host comes back up, holding no VM
    /// until it is given some; a host whose live connection is another is refused.
    pub fn register(&mut self, name: &str, info: HostInfo, conn: u64, now: Instant) -> Result<(), HostRefused> {
        if let Some(h) = self.hosts.get(name)
            && h.conn.is_some_and(|c| c != conn)
            && h.state == HostState::Up
            && now.duration_since(h.last_grant) < self.lease
        {
            return Err(HostRefused {
                host: name.into(),
                why: "already registered by a live host agent: a second agent for one host is refused".into(),
            });
        }
        let last_grant = match self.hosts.get(name) {
            // Its running lease (granted earlier) still counts.
            Some(h) if h.state == HostState::Up => h.last_grant,
            _ => now,
        };
        self.hosts
            .insert(name.into(), Host { info, state: HostState::Up, last_grant, conn: Some(conn), vms: Vec::new() });
        Ok(())
    }

    /// A heartbeat from `name` on `conn` received at `now`: granted (the lease's ms) or
    /// refused. A lost host is refused: it has fenced and must register again.
    pub fn heartbeat(
        &mut self,
        name: &str,
        conn: u64,
        mem_available: u64,
        vms: Vec<String>,
        now: Instant,
    ) -> Result<u64, HostRefused> {
        let refuse = |why: &str| HostRefused { host: name.into(), why: why.into() };
        let h = self.hosts.get_mut(name).ok_or_else(|| refuse("not registered"))?;
        if let HostState::Lost { why } = &h.state {
            return Err(refuse(&format!("declared lost ({why}): fence and register again")));
        }
        if h.conn != Some(conn) {
            return Err(refuse("heartbeat on a connection that is not the host's"));
        }
        h.last_grant = now;
        h.info.mem_available = mem_available;
        h.vms = vms;
        Ok(self.lease.as_millis() as u64)
    }

    /// The connection `conn` closed; its host's lease keeps running out.
    pub fn closed(&mut self, conn: u64) -> Option<String> {
        let (name, h) = self.hosts.iter_mut().find(|(_, h)| h.conn == Some(conn))?;
        h.conn = None;
        Some(name.clone())
    }

    /// The host on connection `conn`.
    pub fn of_conn(&self, conn: u64) -> Option<&str> {
        self.hosts.iter().find(|(_, h)| h.conn == Some(conn)).map(|(n, _)| n.as_str())
    }

    /// When `name`'s VMs may start elsewhere: its last grant plus the lease and margin.
    pub fn fenced_by(&self, name: &str) -> Option<Instant> {
        self.hosts.get(name).map(|h| h.last_grant + self.lease + self.margin)
    }

    /// Declares lost every up host whose lease and margin have run out by `now`; returns
    /// them with why.
    pub fn expire(&mut self, now: Instant) -> Vec<(String, String)> {
        let (lease, margin) = (self.lease, self.margin);
        let mut lost = Vec::new();
        for (n, h) in &mut self.hosts {
            if h.state == HostState::Up && now >= h.last_grant + lease + margin {
                let why = format!(
                    "no granted heartbeat for {:.1} s (lease {:?} + margin {:?}): fenced by now",
                    now.duration_since(h.last_grant).as_secs_f64(),
                    lease,
                    margin
                );
                h.state = HostState::Lost { why: why.clone() };
                h.conn = None;
                lost.push((n.clone(), why));
            }
        }
        lost
    }

    /// Chooses a host for each VM of `vms` (name, RAM bytes): the standby host while it
    /// is up and fits, else the up, connected host with the most memory left after what
    /// this placement already put there; never a host of `avoid`.
    pub fn place(
        &self,
        vms: &[(String, u64)],
        standby: Option<&str>,
        avoid: &[String],
    ) -> Result<BTreeMap<String, String>, String> {
        let mut left: BTreeMap<&str, u64> = self
            .hosts
            .iter()
            .filter(|(n, h)| h.state == HostState::Up && h.conn.is_some() && !avoid.contains(n))
            .map(|(n, h)| (n.as_str(), h.info.mem_available))
            .collect();
        let mut out = BTreeMap::new();
        for (vm, ram) in vms {
            let need = ram + ram / 8;
            let pick = standby
                .filter(|s| left.get(s).is_some_and(|&m| m >= need))
                .or_else(|| left.iter().filter(|(_, m)| **m >= need).max_by_key(|(_, m)| **m).map(|(n, _)| *n));
            let Some(host) = pick else {
                return Err(format!(
                    "no surviving host has {} MiB free for {vm} (hosts up: {})",
                    need >> 20,
                    if left.is_empty() {
                        "none".to_owned()
                    } else {
                        left.iter().map(|(n, m)| format!("{n} {} MiB", m >> 20)).collect::<Vec<_>>().join(", ")
                    }
                ));
            };
            if let Some(m) = left.get_mut(host) {
                *m = m.saturating_sub(need);
            }
            out.insert(vm.clone(), host.to_owned());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(mem_mib: u64) -> HostInfo {
        HostInfo {
            address: "10.0.0.1".into(),
            cores: 2,
            mem_total: mem_mib << 20,
            mem_available: mem_mib << 20,
            qemu: vec!["qemu-system-x86_64".into()],
        }
    }

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn a_host_is_lost_only_after_its_lease_and_the_margin() {
        let t0 = Instant::now();
        let mut l = Leases::new(s(5), s(2), t0);
        l.register("a", info(1024), 1, t0).expect("register");
        assert_eq!(l.heartbeat("a", 1, 1 << 30, vec!["vm0".into()], t0 + s(1)).expect("granted"), 5000);
        assert!(l.expire(t0 + s(7)).is_empty(), "1 + 5 + 2 = 8 s");
        l.closed(1);
        let lost = l.expire(t0 + s(8));
        assert_eq!(lost.len(), 1);
        assert!(lost[0].1.contains("fenced by now"), "{lost:?}");
        let e = l.heartbeat("a", 1, 0, vec![], t0 + s(9)).expect_err("lost");
        assert!(e.why.contains("register again"), "{e}");
        // It registers again, fenced: up, holding nothing.
        l.register("a", info(1024), 2, t0 + s(10)).expect("again");
        assert_eq!(l.hosts["a"].state, HostState::Up);
        assert!(l.hosts["a"].vms.is_empty());
    }

    #[test]
    fn a_host_of_the_membership_never_heard_from_is_lost_a_lease_and_margin_after_the_start() {
        let t0 = Instant::now();
        let mut l = Leases::new(s(5), s(2), t0);
        l.expect("a", t0);
        assert!(l.expire(t0 + s(6)).is_empty());
        assert_eq!(l.expire(t0 + s(7)).len(), 1);
    }

    #[test]
    fn a_second_live_agent_for_one_host_is_refused() {
        let t0 = Instant::now();
        let mut l = Leases::new(s(5), s(2), t0);
        l.register("a", info(1024), 1, t0).expect("register");
        let e = l.register("a", info(1024), 2, t0 + s(1)).expect_err("second");
        assert!(e.why.contains("second agent"), "{e}");
        assert!(l.heartbeat("a", 2, 0, vec![], t0 + s(1)).is_err(), "not its connection");
    }

    #[test]
    fn a_reconnecting_host_keeps_the_lease_it_was_granted() {
        let t0 = Instant::now();
        let mut l = Leases::new(s(5), s(2), t0);
        l.register("a", info(1024), 1, t0).expect("register");
        l.heartbeat("a", 1, 0, vec![], t0 + s(3)).expect("granted");
        l.closed(1);
        l.register("a", info(1024), 2, t0 + s(4)).expect("reconnect");
        // Its last grant (t0+3) still bounds when it may be lost: not earlier, not later.
        assert_eq!(l.fenced_by("a"), Some(t0 + s(10)));
    }

    #[test]
    fn placement_prefers_the_standby_then_the_most_free_memory_and_says_when_nothing_fits() {
        let t0 = Instant::now();
        let mut l = Leases::new(s(5), s(2), t0);
        l.register("a", info(1024), 1, t0).expect("a");
        l.register("b", info(2048), 2, t0).expect("b");
        l.register("c", info(600), 3, t0).expect("c");
        let vms = vec![("vm0".to_owned(), 512 << 20), ("vm1".to_owned(), 512 << 20), ("vm2".to_owned(), 512 << 20)];
        let p = l.place(&vms, None, &[]).expect("fits");
        assert_eq!(p["vm0"], "b");
        assert_eq!(p["vm1"], "b");
        assert_eq!(p["vm2"], "a");
        let p = l.place(&vms[..1], Some("c"), &[]).expect("standby");
        assert_eq!(p["vm0"], "c");
        let e = l.place(&[("big".into(), 4 << 30)], None, &["b".into()]).expect_err("too big");
        assert!(e.contains("big") && e.contains("a 1024 MiB"), "{e}");
    }
}
