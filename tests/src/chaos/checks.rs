//! What must hold after each fault, within the deadline: the cluster is healthy and
//! commits a newer epoch than the last one committed before the fault; the ledger total
//! is conserved and every journal holds; exactly one QEMU per guest runs; no committed
//! record misses a member.

use std::time::{Duration, Instant};

use super::Runner;
use super::cluster::BALANCE;
use super::faults::Injected;
use super::procs;
use super::status::{self, Phase, Status};
use crate::oracle;

/// A fault the cluster survived.
#[derive(Debug, Clone)]
pub struct Recovered {
    /// From the fault to healthy with a newer committed epoch.
    pub took: Duration,
    /// The guests whose QEMU was replaced (a rollback relaunched them).
    pub adopted: Vec<String>,
    /// The newer committed epoch.
    pub epoch: u64,
    /// How long the checks after the recovery took.
    pub checks: Duration,
}

impl Runner<'_> {
    /// Waits for the cluster to recover from `inj` and checks every invariant; `Err`
    /// holds the violation.
    pub(super) async fn recover(&mut self, inj: &Injected) -> Result<Recovered, String> {
        if let Some(v) = &inj.violation {
            return Err(v.clone());
        }
        let (s, took) = self.healthy_and_newer(inj.at).await?;
        let checks = Instant::now();
        let epoch = s.last_committed.unwrap_or(0);
        if inj.keep_vms {
            let replaced: Vec<String> = self
                .c
                .guests
                .iter()
                .filter(|g| s.pid(&g.name) != Some(g.pid()))
                .map(|g| format!("{} pid {} -> {:?}", g.name, g.pid(), s.pid(&g.name)))
                .collect();
            if !replaced.is_empty() {
                return Err(format!("a rollback where the VMs must keep running: {}", replaced.join(", ")));
            }
        }
        let adopted = self.c.adopt(&s).await.map_err(|e| format!("cannot reach a relaunched guest: {e:#}"))?;
        match oracle::check(&self.c.guests, BALANCE).await {
            Ok(inv) if inv.ok() => {}
            Ok(inv) => return Err(format!("invariants broken after recovery to epoch {epoch}: {}", inv.detail)),
            Err(e) => return Err(format!("the oracle could not run on the guests: {e:#}")),
        }
        self.one_qemu_per_guest().await?;
        let list = self.c.list().await.map_err(|e| format!("cutline list failed: {e:#}"))?;
        let partial = status::partial_records(&list, &self.c.names);
        if !partial.is_empty() {
            return Err(format!("half-committed epochs (epoch, members): {partial:?}"));
        }
        self.check_exits()?;
        Ok(Recovered { took, adopted, epoch, checks: checks.elapsed() })
    }

    /// Waits until the cluster is healthy and has committed an epoch newer than the last
    /// one committed at the fault (`at`); the status then, and the time it took.
    pub(super) async fn healthy_and_newer(&mut self, at: Instant) -> Result<(Status, Duration), String> {
        let deadline = at + self.opts.deadline;
        // The last commit before the fault, as far as the runner can know: what it saw
        // before, or what the first answer after the fault says (a commit may have
        // landed just before the fault).
        let mut before = self.committed;
        let mut first = true;
        let mut last;
        loop {
            self.supervise();
            self.check_exits()?;
            match self.c.status().await {
                Ok(s) => {
                    if first {
                        before = before.max(s.last_committed);
                        first = false;
                    }
                    self.note_commit(s.last_committed);
                    if s.phase == Phase::Halted {
                        return Err(format!("the coordinator halted: {}", s.summary()));
                    }
                    if s.healthy(&self.c.names) && s.last_committed > before {
                        return Ok((s, at.elapsed()));
                    }
                    last = s.summary();
                }
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not healthy with an epoch newer than {} within {:?}; last status: {last}",
                    before.map_or("none".into(), |e| e.to_string()),
                    self.opts.deadline
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Exactly one live QEMU per guest in the run's directory, each the one the
    /// coordinator reports (a stopped QEMU may take a moment to exit).
    async fn one_qemu_per_guest(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.c.reap();
            let qemus = procs::qemus_under(&self.c.dir);
            let pids: Vec<i32> = qemus.iter().map(|p| p.pid).collect();
            let lost: Vec<String> = self
                .c
                .guests
                .iter()
                .filter(|g| !pids.contains(&g.pid()) || sidecar::process::is_gone(g.pid()))
                .map(|g| format!("{} (pid {})", g.name, g.pid()))
                .collect();
            if qemus.len() == self.c.guests.len() && lost.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let seen: Vec<String> = qemus.iter().map(|p| format!("{} (parent {})", p.pid, p.ppid)).collect();
                return Err(format!(
                    "{} QEMU processes of this run alive, expected {}: {}; guests without their QEMU: {lost:?}",
                    qemus.len(),
                    self.c.guests.len(),
                    seen.join(", ")
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A violation for every daemon that exited on its own.
    pub(super) fn check_exits(&mut self) -> Result<(), String> {
        if self.unexpected.is_empty() {
            return Ok(());
        }
        Err(std::mem::take(&mut self.unexpected).join("; "))
    }

    /// After a violation: waits until the cluster is healthy and commits again, and
    /// takes charge of relaunched QEMUs; `Err` when it does not come back.
    pub(super) async fn resettle(&mut self) -> Result<(), String> {
        let (s, _) = self.healthy_and_newer(Instant::now()).await?;
        self.c.adopt(&s).await.map_err(|e| format!("{e:#}"))?;
        Ok(())
    }

    /// Waits until the cluster is healthy and has committed an epoch (the start of a run).
    pub(super) async fn first_commit(&mut self) -> Result<Status, String> {
        let deadline = Instant::now() + self.opts.deadline;
        let mut last;
        loop {
            self.supervise();
            self.check_exits()?;
            match self.c.status().await {
                Ok(s) if s.healthy(&self.c.names) && s.last_committed.is_some() => {
                    self.note_commit(s.last_committed);
                    return Ok(s);
                }
                Ok(s) => last = s.summary(),
                Err(e) => last = format!("{e:#}"),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no healthy cluster with a committed epoch after {:?}: {last}",
                    self.opts.deadline
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}
