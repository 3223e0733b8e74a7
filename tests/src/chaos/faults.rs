//! The faults the chaos runner injects, and how each is injected: SIGKILL to a QEMU, a
//! sidecar or the coordinator; a daemon restarted with a failpoint that kills it at a
//! named step of the protocol; a store filled up.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::Runner;
use super::procs;

/// A kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// SIGKILL a guest's QEMU: the cluster rolls back, the sidecar relaunches QEMU.
    Qemu,
    /// SIGKILL a sidecar, restarted after 0..2 s: no rollback, epochs commit again.
    Sidecar,
    /// SIGKILL the coordinator, restarted after 0..2 s with the same state.
    Coordinator,
    /// A daemon restarted with `CUTLINE_FAILPOINT`: it kills itself at that step.
    Failpoint,
    /// The store filled to a few MiB free for a while: epochs abort, guests run on.
    FullStore,
    /// A host lost as by power loss: its host agent, its sidecars and its VMs' QEMUs
    /// SIGKILLed; the host comes back (empty of VMs) after its lease and margin. Its VMs
    /// restart on the other hosts. Needs hosts.
    Host,
    /// The coordinator cut off from every host (SIGSTOP) for longer than the lease and
    /// margin: every host fences its VMs before the coordinator could place a copy; then
    /// the cluster comes back from its last epoch. Needs hosts.
    Partition,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 7] =
        [Kind::Qemu, Kind::Sidecar, Kind::Coordinator, Kind::Failpoint, Kind::FullStore, Kind::Host, Kind::Partition];
    /// The kinds that need no host agents (the default).
    pub const CLASSIC: [Kind; 5] = [Kind::Qemu, Kind::Sidecar, Kind::Coordinator, Kind::Failpoint, Kind::FullStore];

    /// Whether it needs host agents.
    pub fn needs_hosts(self) -> bool {
        matches!(self, Kind::Host | Kind::Partition)
    }

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Qemu => "qemu",
            Kind::Sidecar => "sidecar",
            Kind::Coordinator => "coordinator",
            Kind::Failpoint => "failpoint",
            Kind::FullStore => "full-store",
            Kind::Host => "host",
            Kind::Partition => "partition",
        }
    }

    /// The kind named `s`.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s.trim())
    }

    /// How many times it is in each shuffled round of draws: failpoints twice, so that
    /// a run of 40 faults reaches every failpoint of the table.
    pub fn weight(self) -> usize {
        if self == Kind::Failpoint { 2 } else { 1 }
    }
}

/// Which daemon a failpoint lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A sidecar (`cutline-sidecar serve`).
    Sidecar,
    /// The coordinator (`cutline serve`).
    Coordinator,
}

/// What the runner does so that the failpoint's step happens at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// Nothing: periodic epochs reach it.
    Epochs,
    /// SIGKILL a QEMU once the cluster is healthy, so that a recovery runs.
    KillQemu,
}

/// A named step at which a daemon started with `CUTLINE_FAILPOINT=name` kills itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failpoint {
    /// The value of `CUTLINE_FAILPOINT`.
    pub name: &'static str,
    /// The daemon it is in.
    pub side: Side,
    /// What makes it happen.
    pub trigger: Trigger,
}

const fn fp(name: &'static str, side: Side, trigger: Trigger) -> Failpoint {
    Failpoint { name, side, trigger }
}

/// The failpoints of the daemons.
pub const FAILPOINTS: &[Failpoint] = &[
    // after the sidecar has voted yes
    fp("sidecar-after-vote", Side::Sidecar, Trigger::Epochs),
    // guest stopped for the cut, before it resumes
    fp("sidecar-mid-cut", Side::Sidecar, Trigger::Epochs),
    // cut taken, before CutDone is sent
    fp("sidecar-after-cut", Side::Sidecar, Trigger::Epochs),
    // after Durable is sent, before the commit
    fp("sidecar-after-durable", Side::Sidecar, Trigger::Epochs),
    // after the commit arrived
    fp("sidecar-after-commit", Side::Sidecar, Trigger::Epochs),
    // old QEMU stopped, the new one not yet launched
    fp("sidecar-during-restore", Side::Sidecar, Trigger::KillQemu),
    // after Prepare was sent
    fp("coordinator-after-prepare", Side::Coordinator, Trigger::Epochs),
    // every member durable, before the record is written
    fp("coordinator-before-record", Side::Coordinator, Trigger::Epochs),
    // record durable, Commit not sent
    fp("coordinator-after-record", Side::Coordinator, Trigger::Epochs),
    // after Restore was sent
    fp("coordinator-during-recovery", Side::Coordinator, Trigger::KillQemu),
];

/// A fault as injected.
#[derive(Debug, Clone)]
pub struct Injected {
    /// Its kind.
    pub kind: Kind,
    /// What was hit, for reports.
    pub target: String,
    /// The failpoint, for kind [`Kind::Failpoint`].
    pub failpoint: Option<&'static str>,
    /// The fault's moment: recovery is timed from it.
    pub at: Instant,
    /// False for a failpoint that was not reached (the daemon was restarted normally).
    pub reached: bool,
    /// The guests must keep running: no QEMU may be replaced.
    pub keep_vms: bool,
    /// A violation seen while injecting.
    pub violation: Option<String>,
}

impl Injected {
    fn new(kind: Kind, target: String) -> Injected {
        Injected { kind, target, failpoint: None, at: Instant::now(), reached: true, keep_vms: false, violation: None }
    }
}

/// Tag of the ballast file that fills the store.
const BALLAST: &str = "chaos-ballast";

impl Runner<'_> {
    /// Injects one fault of `kind`; returns once the fault has happened.
    pub(super) async fn inject(&mut self, kind: Kind) -> anyhow::Result<Injected> {
        match kind {
            Kind::Qemu => {
                let i = self.rng.index(self.c.guests.len());
                let target = self.kill_qemu(i).await?;
                Ok(Injected::new(kind, target))
            }
            Kind::Sidecar if self.opts.hosts > 0 => {
                // The host agent starts it again.
                let i = self.rng.index(self.c.names.len());
                let name = self.c.names[i].clone();
                let pids = self.c.sidecar_pids(&name);
                for p in &pids {
                    let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
                }
                Ok(Injected { keep_vms: true, ..Injected::new(kind, format!("sidecar of {name} (pids {pids:?})")) })
            }
            Kind::Sidecar => {
                let i = self.rng.index(self.c.sidecars.len());
                let delay = self.rng.duration(Duration::from_secs(2));
                let name = self.c.sidecars[i].name.clone();
                self.c.sidecars[i].kill();
                self.schedule(&name, delay);
                Ok(Injected { keep_vms: true, ..Injected::new(kind, format!("{name}, back after {delay:?}")) })
            }
            Kind::Coordinator => {
                let delay = self.rng.duration(Duration::from_secs(2));
                self.c.coordinator.kill();
                self.schedule("coordinator", delay);
                Ok(Injected::new(kind, format!("coordinator, back after {delay:?}")))
            }
            Kind::Failpoint => self.failpoint().await,
            Kind::FullStore => self.full_store().await,
            Kind::Host => self.lose_host().await,
            Kind::Partition => self.partition().await,
        }
    }

    /// A host lost as by power loss: its agent's process group (the agent and its
    /// sidecars) and the QEMUs of the VMs placed on it SIGKILLed; the host comes back
    /// after its lease, the margin and 0..2 s, as after a reboot (its files kept).
    async fn lose_host(&mut self) -> anyhow::Result<Injected> {
        let k = self.rng.index(self.c.sidecars.len());
        let name = self.c.sidecars[k].name.clone();
        let host = name.trim_start_matches("host ").to_owned();
        let s = self.c.cli(&["status"]).await?;
        let mut qemus = Vec::new();
        for m in s["members"].as_array().into_iter().flatten() {
            if m["host"] == host.as_str()
                && let Some(pid) = m["pid"].as_i64()
            {
                qemus.push(pid as i32);
            }
        }
        self.c.sidecars[k].kill();
        for p in &qemus {
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        let delay = self.opts.lease + self.opts.lease_margin + self.rng.duration(Duration::from_secs(2));
        self.schedule(&name, delay);
        Ok(Injected::new(Kind::Host, format!("{host} with QEMUs {qemus:?}, back after {delay:?}")))
    }

    /// The coordinator stopped (SIGSTOP) for the lease, the margin and 1 s: no host can
    /// renew, so every QEMU must be gone before the coordinator runs again (a copy could
    /// start from then on). Then it runs again and the cluster recovers.
    async fn partition(&mut self) -> anyhow::Result<Injected> {
        let pid = self.c.coordinator.pid().ok_or_else(|| anyhow::anyhow!("the coordinator does not run"))?;
        let hold = self.opts.lease + self.opts.lease_margin + Duration::from_secs(1);
        let mut inj = Injected::new(Kind::Partition, format!("coordinator cut off from every host for {hold:?}"));
        kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
        let fenced_by = Instant::now() + self.opts.lease + self.opts.lease_margin;
        let mut last = Vec::new();
        while Instant::now() < fenced_by {
            tokio::time::sleep(Duration::from_millis(50)).await;
            self.c.reap();
            last = procs::qemus_under(&self.c.dir);
            if last.is_empty() {
                break;
            }
        }
        if !last.is_empty() {
            inj.violation = Some(format!(
                "QEMUs still ran {:?} after the partition began, past the lease and margin: {:?}",
                self.opts.lease + self.opts.lease_margin,
                last.iter().map(|p| p.pid).collect::<Vec<_>>()
            ));
        }
        inj.target.push_str(&format!(", every VM fenced after {:.1} s", inj.at.elapsed().as_secs_f64()));
        tokio::time::sleep(fenced_by.saturating_duration_since(Instant::now()) + Duration::from_secs(1)).await;
        kill(Pid::from_raw(pid), Signal::SIGCONT)?;
        Ok(inj)
    }

    /// SIGKILLs guest `i`'s QEMU (the pid the coordinator knows).
    async fn kill_qemu(&mut self, i: usize) -> anyhow::Result<String> {
        let name = self.c.names[i].clone();
        let pid = self.c.status().await?.pid(&name).unwrap_or_else(|| self.c.guests[i].pid());
        kill(Pid::from_raw(pid), Signal::SIGKILL)?;
        Ok(format!("{name} QEMU pid {pid}"))
    }

    async fn failpoint(&mut self) -> anyhow::Result<Injected> {
        let fp = self.failpoints.draw(&mut self.rng).ok_or_else(|| anyhow::anyhow!("no failpoints"))?;
        let vm = self.rng.index(self.c.names.len());
        let daemon = match fp.side {
            Side::Sidecar => self.c.sidecars[vm].name.clone(),
            Side::Coordinator => self.c.coordinator.name.clone(),
        };
        let mut inj = Injected::new(Kind::Failpoint, format!("{daemon} at {}", fp.name));
        inj.failpoint = Some(fp.name);
        let d = self.c.daemon(&daemon).ok_or_else(|| anyhow::anyhow!("no daemon {daemon}"))?;
        d.stop(Duration::from_secs(5)).await;
        d.start(Some(fp.name))?;
        let deadline = Instant::now() + self.opts.reach;
        let mut triggered = fp.trigger == Trigger::Epochs;
        loop {
            if let Some(at) = self.supervise().remove(&daemon) {
                inj.at = at;
                return Ok(inj);
            }
            if Instant::now() > deadline {
                break;
            }
            if !triggered && self.c.status().await.is_ok_and(|s| s.healthy(&self.c.names)) {
                inj.target.push_str(&format!(" (after killing {})", self.kill_qemu(vm).await?));
                triggered = true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not reached: run it as usual again.
        inj.reached = false;
        if let Some(d) = self.c.daemon(&daemon) {
            d.stop(Duration::from_secs(5)).await;
            d.start(None)?;
        }
        inj.at = Instant::now();
        Ok(inj)
    }

    async fn full_store(&mut self) -> anyhow::Result<Injected> {
        let path = self.c.store.join(BALLAST);
        let free = procs::free_bytes(&self.c.store)?;
        let leave = (1 + self.rng.below(24)) << 20;
        let hold = self.opts.interval * 2 + Duration::from_secs(1);
        let mut inj = Injected {
            keep_vms: true,
            ..Injected::new(Kind::FullStore, format!("store filled to {} MiB free for {hold:?}", leave >> 20))
        };
        let before = self.c.status().await?;
        let committed = self.c.list().await.map(|l| super::status::epochs(&l)).unwrap_or_default();
        procs::ballast(&path, free.saturating_sub(leave))?;
        let now_free = procs::free_bytes(&self.c.store)?;
        inj.target = format!("store filled to {} MiB free for {hold:?}", now_free >> 20);
        let end = Instant::now() + hold;
        while Instant::now() < end {
            self.supervise();
            if let Ok(s) = self.c.status().await {
                let replaced: Vec<&str> =
                    self.c.names.iter().filter(|n| s.pid(n) != before.pid(n)).map(String::as_str).collect();
                if !replaced.is_empty() || s.recoveries > before.recoveries {
                    inj.violation = Some(format!(
                        "guests must keep running while the store is full: replaced {replaced:?}; {}",
                        s.summary()
                    ));
                    break;
                }
                self.note_commit(s.last_committed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Nothing committed is lost: the newest committed epoch is still listed and whole.
        if inj.violation.is_none() {
            inj.violation = self.committed_kept(&committed).await;
        }
        std::fs::remove_file(&path)?;
        inj.at = Instant::now();
        Ok(inj)
    }

    /// A violation if the newest of `committed` (epochs listed before the store filled
    /// up) is neither listed nor superseded, or no longer verifies.
    async fn committed_kept(&mut self, committed: &[u64]) -> Option<String> {
        let newest = committed.iter().max().copied()?;
        let list = match self.c.list().await {
            Ok(l) => l,
            Err(e) => return Some(format!("cannot list the epochs: {e:#}")),
        };
        let now = super::status::epochs(&list);
        if !now.iter().any(|e| *e >= newest) {
            return Some(format!("committed epoch {newest} lost while the store was full: listed {now:?}"));
        }
        match self.c.cli(&["verify"]).await {
            Ok(v) if v["ok"] == true => None,
            Ok(v) => Some(format!("the last committed epoch no longer verifies: {v}")),
            Err(e) => Some(format!("verify failed while the store was full: {e:#}")),
        }
    }
}
