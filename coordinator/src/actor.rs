//! The coordinator's actor: membership, failure detection on evidence, and the effects of
//! the [`Phase`] machine. Nothing here blocks: records and state are written on the
//! blocking pool, verification runs in the sidecars, liveness is read from /proc.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sidecar::proto::{COORDINATOR, Envelope, Msg, PROTOCOL, Request, VectorClock};
use tokio::sync::{mpsc, oneshot};

use crate::figures::Figures;
use crate::hosts::{HostState, Leases};
use crate::phase::{Effect, Event, Phase, RecoveryPlan, Settings};
use crate::record::{Catalog, EpochTimings, MemberRecord, Record};
use crate::server::{Config, Rollback};
use crate::state::{self, MemberInfo, StateDir};

mod ask;
pub mod hosts;
mod status;
mod verify;

/// Messages to one connection.
pub type Tx = mpsc::UnboundedSender<Envelope>;
/// An answer to the CLI.
pub type Reply = oneshot::Sender<Result<Value, String>>;

/// Inputs of the actor.
pub enum Input {
    /// A sidecar's first message.
    Register {
        /// Connection id.
        conn: u64,
        /// Its writer.
        tx: Tx,
        /// Over the unix socket (same host: its pids mean something here).
        local: bool,
        /// The message.
        env: Envelope,
    },
    /// A later message of a sidecar.
    Msg {
        /// Connection id.
        conn: u64,
        /// The message.
        env: Envelope,
    },
    /// A sidecar's connection closed.
    Closed {
        /// Connection id.
        conn: u64,
    },
    /// The CLI asks.
    Ask {
        /// What.
        request: Request,
        /// Where the answer goes.
        reply: Reply,
    },
    /// The shared store holds a claim of a later incarnation than this one's.
    Superseded {
        /// The later incarnation.
        by: u64,
    },
    /// A record write finished.
    RecordDone {
        /// The epoch.
        epoch: u64,
        /// Its outcome.
        result: Result<(), String>,
        /// How long writing it took.
        commit_ms: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Health {
    /// No sidecar since this coordinator started.
    Unknown,
    Up,
    VmFailed(String),
    SidecarLost(String),
}

struct Conn {
    id: u64,
    tx: Tx,
}

struct Member {
    info: MemberInfo,
    pid: Option<i32>,
    pid_start: Option<u64>,
    conn: Option<Conn>,
    /// Its sidecar last registered over the unix socket, so its pids are this host's:
    /// kept when the connection goes, since the pid is evidence only then.
    local: bool,
    last_seen: Instant,
    health: Health,
}

impl Member {
    /// A member known from the membership, not heard from yet.
    fn new(info: MemberInfo) -> Member {
        Member {
            info,
            pid: None,
            pid_start: None,
            conn: None,
            local: false,
            last_seen: Instant::now(),
            health: Health::Unknown,
        }
    }
}

struct PendingVerify {
    epoch: u64,
    waiting: BTreeSet<String>,
    damage: Vec<Value>,
    reply: Reply,
    deadline: Instant,
}

/// The coordinator's actor.
pub struct Actor {
    cfg: Config,
    cluster: String,
    catalog: Catalog,
    dir: Arc<StateDir>,
    durable: state::Durable,
    members: BTreeMap<String, Member>,
    clock: VectorClock,
    phase: Phase,
    settings: Settings,
    last_interval: Instant,
    last_recovery: Option<Instant>,
    figures: Figures,
    epoch_waiters: BTreeMap<u64, Vec<Reply>>,
    recovery_waiters: Vec<Reply>,
    verifies: Vec<PendingVerify>,
    inputs: mpsc::UnboundedSender<Input>,
    /// The hosts and their leases: shared with the connections, which grant heartbeats
    /// themselves, so that no slow step of this loop (a state write to a store that
    /// hangs) starves the hosts of their leases and makes them all fence.
    leases: Arc<Mutex<Leases>>,
    /// Each connected host agent's writer.
    host_tx: BTreeMap<String, Tx>,
    /// VMs of lost hosts not placed on a surviving host yet (none had room or was up).
    unplaced: BTreeSet<String>,
    /// Why they wait, as last logged.
    placement_wait: Option<String>,
    /// When the shared store was last checked for a later coordinator.
    last_claim_check: Instant,
    /// Why this coordinator must stop: another took over its store.
    superseded: Option<String>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl Actor {
    /// A new incarnation over `dir` (locked) and `catalog`; its state is already saved.
    pub fn new(
        cfg: Config,
        cluster: String,
        catalog: Catalog,
        dir: StateDir,
        durable: state::Durable,
        inputs: mpsc::UnboundedSender<Input>,
        leases: Arc<Mutex<Leases>>,
    ) -> Actor {
        let members = durable.members.iter().map(|(n, info)| (n.clone(), Member::new(info.clone()))).collect();
        {
            let mut l = leases.lock().unwrap_or_else(|e| e.into_inner());
            for h in durable.members.values().filter_map(|m| m.host.as_deref()) {
                l.expect(h, Instant::now());
            }
        }
        let settings = Settings {
            step_timeout: cfg.step_timeout,
            output_commit: cfg.output_commit,
            recovery_attempts: cfg.recovery_attempts,
        };
        Actor {
            last_interval: Instant::now(),
            cfg,
            cluster,
            catalog,
            dir: Arc::new(dir),
            durable,
            members,
            clock: VectorClock::default(),
            phase: Phase::Idle,
            settings,
            last_recovery: None,
            figures: Figures::default(),
            epoch_waiters: BTreeMap::new(),
            recovery_waiters: Vec::new(),
            verifies: Vec::new(),
            inputs,
            leases,
            host_tx: BTreeMap::new(),
            unplaced: BTreeSet::new(),
            placement_wait: None,
            last_claim_check: Instant::now(),
            superseded: None,
        }
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why this coordinator must stop, once another has taken over its store.
    pub fn superseded(&self) -> Option<String> {
        self.superseded.clone()
    }

    fn incarnation(&self) -> u64 {
        self.durable.incarnation
    }

    fn send_one(&self, name: &str, msg: Msg) {
        if let Some(Member { conn: Some(c), .. }) = self.members.get(name) {
            let _ = c.tx.send(Envelope { inc: self.incarnation(), vt: self.clock.clone(), msg });
        } else {
            tracing::debug!(vm = %name, msg = msg.kind(), "not sent: no sidecar connected");
        }
    }

    /// Applies `event` to the phase and carries out its effects; a refusal is logged.
    fn step(&mut self, event: Event) {
        let what = format!("{event:?}").chars().take(120).collect::<String>();
        match self.phase.step(event, Instant::now(), &self.settings) {
            Ok(effects) => {
                for e in effects {
                    self.effect(e);
                }
            }
            Err(refused) => {
                self.figures.discarded += 1;
                tracing::info!(state = %refused.state, "discarded: {} ({what})", refused.why);
            }
        }
    }

    fn effect(&mut self, effect: Effect) {
        match effect {
            Effect::Send { to, msg } => {
                if msg.ticks() {
                    self.clock.tick(COORDINATOR);
                }
                let (prepare, restore) = (matches!(msg, Msg::Prepare { .. }), matches!(msg, Msg::Restore { .. }));
                for n in &to {
                    self.send_one(n, msg.clone());
                }
                if prepare {
                    sidecar::failpoint::hit("coordinator-after-prepare");
                }
                if restore {
                    sidecar::failpoint::hit("coordinator-during-recovery");
                }
            }
            Effect::WriteRecord { epoch, members, timings } => self.write_record(epoch, members, timings),
            Effect::Committed { epoch, members } => self.committed(epoch, &members),
            Effect::Aborted { epoch, reason } => {
                tracing::warn!(epoch, "epoch aborted: {reason}");
                self.figures.aborted.push(json!({"epoch": epoch, "reason": reason, "at_unix_ms": now_ms()}));
                self.figures.aborted_in_a_row += 1;
                for w in self.epoch_waiters.remove(&epoch).unwrap_or_default() {
                    let _ = w.send(Err(format!("epoch {epoch} aborted: {reason}")));
                }
            }
            Effect::Recovered { epoch, recovery_ms, members, reason, attempts } => {
                tracing::info!(epoch, recovery_ms, attempts, "cluster recovered");
                for n in &members {
                    if let Some(m) = self.members.get_mut(n) {
                        m.health = Health::Up;
                    }
                }
                self.figures.recovery_ms.push(recovery_ms);
                let entry = json!({"epoch": epoch, "recovery_ms": recovery_ms, "reason": reason,
                    "members": members, "attempts": attempts});
                self.figures.recoveries.push(entry.clone());
                for w in self.recovery_waiters.drain(..) {
                    let _ = w.send(Ok(entry.clone()));
                }
                self.last_interval = Instant::now();
            }
            Effect::Halted { reason } => {
                tracing::error!("cluster halted: {reason}");
                self.figures.halts.push(json!({"reason": reason, "at_unix_ms": now_ms()}));
                for w in self.recovery_waiters.drain(..) {
                    let _ = w.send(Err(format!("halted: {reason}")));
                }
            }
        }
    }

    fn write_record(&mut self, epoch: u64, members: Vec<crate::phase::Commitment>, timings: [f64; 4]) {
        let members = members
            .into_iter()
            .map(|c| {
                let info = self.members.get(&c.name).map(|m| m.info.clone());
                MemberRecord {
                    store: info.as_ref().map(|i| i.store.clone()).unwrap_or_default(),
                    qmp: info.map(|i| i.qmp).unwrap_or_default(),
                    name: c.name,
                    checkpoint: c.checkpoint,
                    manifest_digest: c.digest,
                    pause_ms: c.pause_ms,
                    hold_ms: c.released.0,
                    packets_held: c.released.1,
                    bytes_stored: c.bytes_stored,
                    vt: c.vt,
                }
            })
            .collect();
        let [prepare_ms, cut_ms, durable_ms, total_ms] = timings;
        let mut record = Record {
            format: crate::record::FORMAT,
            cluster: self.cluster.clone(),
            epoch,
            committed_unix_ms: now_ms(),
            output_commit: format!("{:?}", self.cfg.output_commit).to_lowercase(),
            members,
            coordinator_vt: self.clock.clone(),
            timings: EpochTimings { prepare_ms, cut_ms, durable_ms, total_ms },
            checksum: String::new(),
        };
        sidecar::failpoint::hit("coordinator-before-record");
        let (catalog, inputs) = (self.catalog.clone(), self.inputs.clone());
        let started = Instant::now();
        tokio::task::spawn_blocking(move || {
            let result = catalog.commit(&mut record).map_err(|e| e.to_string());
            if result.is_ok() {
                sidecar::failpoint::hit("coordinator-after-record");
            }
            let commit_ms = ms(started.elapsed());
            tracing::debug!(epoch, commit_ms, "record written");
            let _ = inputs.send(Input::RecordDone { epoch, result, commit_ms });
        });
    }

    fn committed(&mut self, epoch: u64, members: &[String]) {
        // Deleting old records talks to the store: off the actor loop.
        let (catalog, keep) = (self.catalog.clone(), self.cfg.keep.max(1));
        tokio::task::spawn_blocking(move || catalog.prune(keep));
        for n in members {
            let keep = self.committed_ids(n);
            self.send_one(n, Msg::Commit { epoch, keep });
        }
        let record = self.catalog.read(epoch).ok();
        if let Some(r) = &record {
            for m in &r.members {
                self.figures.pause_ms.push(m.pause_ms);
                if self.cfg.output_commit == crate::phase::OutputCommit::Release {
                    self.figures.hold_ms.push(m.hold_ms);
                }
            }
            self.figures.epoch_ms.push(r.timings.total_ms);
        }
        self.figures.aborted_in_a_row = 0;
        self.figures.committed.push(json!({"epoch": epoch, "members": members, "at_unix_ms": now_ms()}));
        tracing::info!(epoch, members = members.len(), "epoch committed");
        let summary = match record {
            Some(r) => json!({"epoch": epoch, "members": r.members, "timings": r.timings}),
            None => json!({"epoch": epoch}),
        };
        for w in self.epoch_waiters.remove(&epoch).unwrap_or_default() {
            let _ = w.send(Ok(summary.clone()));
        }
    }

    fn committed_ids(&self, name: &str) -> Vec<u64> {
        self.catalog
            .newest(self.cfg.keep.max(1))
            .iter()
            .filter_map(|r| r.members.iter().find(|m| m.name == name).map(|m| m.checkpoint))
            .collect()
    }

    fn member_of_conn(&self, conn: u64) -> Option<String> {
        self.members.iter().find(|(_, m)| m.conn.as_ref().is_some_and(|c| c.id == conn)).map(|(n, _)| n.clone())
    }

    /// Handles one input.
    pub async fn on_input(&mut self, input: Input) {
        match input {
            Input::Register { conn, tx, env, .. } if matches!(env.msg, Msg::HostRegister { .. }) => {
                self.on_host_register(conn, tx, env)
            }
            Input::Register { conn, tx, local, env } => self.on_register(conn, tx, local, env).await,
            Input::Msg { conn, env } if self.leases().of_conn(conn).is_some() => self.on_host_msg(conn, env),
            Input::Msg { conn, env } => {
                let Some(name) = self.member_of_conn(conn) else { return };
                if env.inc != self.incarnation() {
                    self.figures.discarded += 1;
                    tracing::info!(vm = %name, "discarded {} of incarnation {} (this is {})", env.msg.kind(), env.inc, self.incarnation());
                    return;
                }
                if env.msg.ticks() {
                    self.clock.receive(COORDINATOR, &env.vt);
                } else {
                    self.clock.merge(&env.vt);
                }
                if let Some(m) = self.members.get_mut(&name) {
                    m.last_seen = Instant::now();
                }
                self.on_member_msg(&name, env);
            }
            Input::Closed { conn } if self.leases().of_conn(conn).is_some() => {
                let closed = self.leases().closed(conn);
                if let Some(host) = closed {
                    tracing::warn!(host = %host, "host agent disconnected: its lease runs out unless it comes back");
                    self.host_tx.remove(&host);
                }
            }
            Input::Closed { conn } => {
                if let Some(name) = self.member_of_conn(conn) {
                    tracing::warn!(vm = %name, "sidecar disconnected");
                    if let Some(m) = self.members.get_mut(&name) {
                        m.conn = None;
                        if m.health == Health::Up {
                            m.health = Health::SidecarLost("its sidecar disconnected".into());
                        }
                    }
                    self.step(Event::Disconnected { name });
                }
            }
            Input::Ask { request, reply } => self.on_ask(request, reply).await,
            Input::Superseded { by } => {
                self.superseded = Some(format!(
                    "coordinator incarnation {by} started on the same store; this one ({}) stops",
                    self.incarnation()
                ));
            }
            Input::RecordDone { epoch, result, commit_ms } => match result {
                Ok(()) => {
                    self.figures.commit_ms.push(commit_ms);
                    self.step(Event::RecordWritten { epoch })
                }
                Err(reason) => {
                    tracing::error!(epoch, "cannot write the commit record: {reason}");
                    self.step(Event::RecordFailed { epoch, reason })
                }
            },
        }
    }

    /// Why a peer (`who`: a VM's name, or `host NAME`) of protocol `version` asking for
    /// `cluster` is refused, if it is.
    fn admit(&self, who: &str, version: u32, cluster: &str) -> Result<(), String> {
        if version != PROTOCOL {
            return Err(format!("{who} speaks protocol version {version}; this coordinator speaks {PROTOCOL}"));
        }
        if cluster != self.cluster {
            return Err(format!("no cluster {cluster} here (serving {})", self.cluster));
        }
        Ok(())
    }

    async fn on_register(&mut self, conn: u64, tx: Tx, local: bool, env: Envelope) {
        let Msg::Register { version, cluster, name, qmp, store, pid, pid_start, checkpoints, host, ram_bytes, .. } =
            env.msg
        else {
            return;
        };
        let refuse = |what: String| {
            tracing::warn!("registration refused: {what}");
            let _ = tx.send(Envelope::plain(Msg::Error { what }));
        };
        if let Err(e) = self.admit(&name, version, &cluster) {
            return refuse(e);
        }
        if let Err(e) = sidecar::VmName::new(&name) {
            return refuse(e);
        }
        if let Some(m) = self.members.get(&name)
            && m.conn.is_some()
            && m.last_seen.elapsed() < self.cfg.failure_timeout
        {
            return refuse(format!(
                "{name} is already registered by a live sidecar: a second sidecar for one VM is refused"
            ));
        }
        let placed = self.durable.members.get(&name).and_then(|m| m.host.clone());
        if let (Some(placed), Some(here)) = (&placed, &host)
            && placed != here
        {
            return refuse(format!(
                "{name} runs on host {placed} now: its sidecar on host {here} is refused (that host must fence it)"
            ));
        }
        if let Some(h) = &host
            && matches!(self.leases().hosts.get(h).map(|x| &x.state), Some(HostState::Lost { .. }))
        {
            return refuse(format!("host {h} was declared lost: its sidecars are refused until it registers again"));
        }
        let ram_bytes = ram_bytes.or_else(|| self.durable.members.get(&name).and_then(|m| m.ram_bytes));
        let info = MemberInfo { qmp, store, host: host.or(placed), ram_bytes };
        let known = self.durable.members.contains_key(&name);
        if self.durable.members.get(&name) != Some(&info) {
            let mut next = self.durable.clone();
            next.members.insert(name.clone(), info.clone());
            if let Err(e) = self.save(next).await {
                return refuse(format!("cannot record {name} in the membership: {e}"));
            }
        }
        self.clock.merge(&env.vt);
        let committed = self.committed_ids(&name);
        // Only a coordinator that knows this member can say what of its history no epoch
        // committed; the checkpoint of an epoch whose record is being written is not one.
        let in_flight = match &self.phase {
            Phase::Epoch(run) => run.members.get(&name).and_then(|p| match p.stage {
                crate::phase::Stage::Cut { checkpoint, .. } | crate::phase::Stage::Durable { checkpoint, .. } => {
                    Some(checkpoint)
                }
                _ => None,
            }),
            _ => None,
        };
        let newest = committed.iter().max().copied().unwrap_or(0);
        let aborted: Vec<u64> = if known {
            checkpoints.iter().copied().filter(|&id| id > newest && Some(id) != in_flight).collect()
        } else {
            if !checkpoints.is_empty() {
                tracing::warn!(vm = %name, "this coordinator's state knows nothing of {name}: its {} checkpoint(s) are kept", checkpoints.len());
            }
            Vec::new()
        };
        let _ = tx.send(Envelope {
            inc: self.incarnation(),
            vt: self.clock.clone(),
            msg: Msg::Welcome {
                version: PROTOCOL,
                incarnation: self.incarnation(),
                heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
                committed,
                aborted,
            },
        });
        let m = self.members.entry(name.clone()).or_insert_with(|| Member::new(info.clone()));
        m.info = info;
        if pid.is_some() {
            (m.pid, m.pid_start) = (pid, pid_start);
        }
        m.conn = Some(Conn { id: conn, tx });
        m.local = local;
        m.last_seen = Instant::now();
        if matches!(m.health, Health::Unknown | Health::SidecarLost(_)) {
            m.health = Health::Up;
        }
        tracing::info!(vm = %name, members = self.members.len(), "member registered");
        if matches!(self.phase, Phase::Recovery(_)) {
            self.step(Event::Registered { name });
        }
    }

    async fn save(&mut self, next: state::Durable) -> Result<(), String> {
        let (dir, copy) = (self.dir.clone(), next.clone());
        tokio::task::spawn_blocking(move || dir.save(&copy))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| sidecar::store::error_chain(&e))?;
        self.durable = next;
        Ok(())
    }

    fn on_member_msg(&mut self, name: &str, env: Envelope) {
        match env.msg {
            Msg::Heartbeat => {}
            Msg::VmFailed { reason } => {
                tracing::warn!(vm = %name, %reason, "VM failure reported");
                self.vm_failed(name, reason.clone());
                self.step(Event::Member { name: name.to_owned(), msg: Msg::VmFailed { reason }, vt: env.vt });
            }
            Msg::Verified { epoch, damage } => {
                for v in self.verifies.iter_mut().filter(|v| v.epoch == epoch) {
                    if v.waiting.remove(name) {
                        v.damage.extend(damage.iter().map(|d| json!({"member": name, "why": d})));
                    }
                }
                self.finish_verifies();
            }
            // With strict output commit the gates open after the commit: the epoch is over.
            Msg::Released { epoch, hold_ms, breach, .. } if !matches!(&self.phase, Phase::Epoch(r) if r.epoch == epoch) =>
            {
                self.figures.hold_ms.push(hold_ms);
                if let Some(b) = breach {
                    tracing::warn!(vm = %name, epoch, "output released early after the commit: {b}");
                }
            }
            msg => {
                if let Msg::Restored { pid, pid_start, epoch, restore_ms, fetch_ms } = &msg
                    && let Some(m) = self.members.get_mut(name)
                {
                    (m.pid, m.pid_start) = (Some(*pid), *pid_start);
                    self.figures.restores.push(json!({"vm": name, "epoch": epoch, "host": m.info.host,
                        "restore_ms": restore_ms, "fetch_ms": fetch_ms, "at_unix_ms": now_ms()}));
                }
                if let Msg::StepFailed { epoch, reason } = &msg {
                    tracing::warn!(vm = %name, epoch, "step failed: {reason}");
                }
                self.step(Event::Member { name: name.to_owned(), msg, vt: env.vt });
            }
        }
    }

    fn vm_failed(&mut self, name: &str, reason: String) {
        let Some(m) = self.members.get_mut(name) else { return };
        if matches!(m.health, Health::VmFailed(_)) {
            return;
        }
        let restoring = matches!(&self.phase, Phase::Recovery(r) if r.targets.contains_key(name));
        if restoring {
            return;
        }
        m.health = Health::VmFailed(reason.clone());
        self.figures.detections.push(json!({"vm": name, "reason": reason, "at_unix_ms": now_ms()}));
    }

    /// What to roll back to: `epoch`, or the last committed one (one further back when
    /// the last recovery failed again within the latent window).
    fn plan(&self, epoch: Option<u64>, reason: String) -> Result<RecoveryPlan, String> {
        let epochs = self.catalog.epochs();
        let latent = epoch.is_none() && self.last_recovery.is_some_and(|at| at.elapsed() < self.cfg.latent_window);
        let target = match epoch {
            Some(e) => e,
            None if latent && epochs.len() >= 2 => {
                tracing::warn!("failed again soon after a recovery: rolling back one epoch further (latent error)");
                epochs[epochs.len() - 2]
            }
            None => *epochs.last().ok_or("no committed epoch to recover to")?,
        };
        let record = self.catalog.read(target).map_err(|e| e.to_string())?;
        let failed: BTreeSet<&String> =
            self.members.iter().filter(|(_, m)| matches!(m.health, Health::VmFailed(_))).map(|(n, _)| n).collect();
        let targets = record
            .members
            .iter()
            .filter(|m| self.cfg.rollback == Rollback::Cluster || epoch.is_some() || failed.contains(&m.name))
            .map(|m| (m.name.clone(), (m.checkpoint, m.manifest_digest.clone())))
            .collect();
        Ok(RecoveryPlan { epoch: target, targets, reason, detected_at: Instant::now() })
    }

    fn recover(&mut self, epoch: Option<u64>, reason: String) -> Result<(), String> {
        let plan = self.plan(epoch, reason)?;
        tracing::warn!(epoch = plan.epoch, targets = ?plan.targets.keys().collect::<Vec<_>>(), reason = %plan.reason, "recovery: rolling back");
        if self.cfg.rollback == Rollback::Vm {
            tracing::warn!("rolling back only the failed VM: safe only if the VMs do not talk to each other");
        }
        self.last_recovery = Some(Instant::now());
        let before = self.phase.name();
        self.step(Event::Recover(plan));
        if matches!(self.phase, Phase::Recovery(_)) { Ok(()) } else { Err(format!("not now: {before}")) }
    }

    /// Periodic work: failure evidence, deadlines, recovery, periodic epochs.
    pub async fn on_tick(&mut self) {
        if self.last_claim_check.elapsed() >= Duration::from_secs(2) {
            self.last_claim_check = Instant::now();
            let (dir, inc, inputs, who) =
                (self.dir.clone(), self.incarnation(), self.inputs.clone(), self.cfg.who.clone());
            tokio::task::spawn_blocking(move || match dir.superseded(inc, &who) {
                Ok(Some(by)) => {
                    let _ = inputs.send(Input::Superseded { by });
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("cannot check the store for another coordinator: {e}"),
            });
        }
        let lost = self.leases().expire(Instant::now());
        for (host, why) in lost {
            self.host_lost(&host, &why).await;
        }
        self.place_pending().await;
        self.detect();
        self.step(Event::Tick);
        let failed: Vec<String> = self
            .members
            .iter()
            .filter_map(|(n, m)| match &m.health {
                Health::VmFailed(r) => Some(format!("{n}: {r}")),
                _ => None,
            })
            .collect();
        if !failed.is_empty()
            && matches!(self.phase, Phase::Idle | Phase::Epoch(_))
            && let Err(e) = self.recover(None, failed.join("; "))
        {
            tracing::debug!("recovery waits: {e}");
        }
        if let Some(every) = self.cfg.interval
            && matches!(self.phase, Phase::Idle)
            && self.last_interval.elapsed() >= every
        {
            self.last_interval = Instant::now();
            if let Err(e) = self.start_epoch().await {
                tracing::debug!("no periodic epoch: {e}");
            }
        }
        self.finish_verifies();
    }

    /// Failure detection on evidence: a VM has failed when its QEMU process (pid and start
    /// time, on this host) is gone; a silent sidecar whose QEMU lives, or any silent
    /// sidecar over TCP (whose pids mean nothing here), is only "sidecar lost".
    fn detect(&mut self) {
        let timeout = self.cfg.failure_timeout;
        let mut failed = Vec::new();
        let mut lost = Vec::new();
        for (n, m) in &self.members {
            // A pid is evidence only on the host it lives on: a sidecar over TCP (now or
            // when last connected) runs elsewhere; its host's lease speaks for it.
            let qemu_gone = m.local && m.pid.is_some_and(|p| !sidecar::process::runs(p, m.pid_start));
            let silent = m.conn.is_some() && m.last_seen.elapsed() > timeout;
            match &m.health {
                Health::Up | Health::SidecarLost(_) | Health::Unknown if qemu_gone && (silent || m.conn.is_none()) => {
                    failed.push((
                        n.clone(),
                        format!("QEMU (pid {}) is gone and its sidecar is silent", m.pid.unwrap_or(0)),
                    ));
                }
                Health::Up if silent => lost.push(n.clone()),
                _ => {}
            }
        }
        for n in lost {
            tracing::warn!(vm = %n, "no heartbeat for {timeout:?}: sidecar lost; its VM is not declared failed without evidence");
            if let Some(m) = self.members.get_mut(&n) {
                m.health = Health::SidecarLost(format!("no heartbeat for {timeout:?}"));
                m.conn = None;
            }
            self.step(Event::Disconnected { name: n });
        }
        for (n, reason) in failed {
            if !matches!(&self.phase, Phase::Recovery(r) if r.targets.contains_key(&n)) {
                tracing::warn!(vm = %n, %reason, "VM failed");
                self.vm_failed(&n, reason);
            }
        }
    }

    /// Starts an epoch when every member is connected and up; `Err` says why not.
    async fn start_epoch(&mut self) -> Result<u64, String> {
        if !matches!(self.phase, Phase::Idle) {
            return Err(format!("the cluster is busy: {}", self.phase.name()));
        }
        if self.members.is_empty() {
            return Err("no members registered".into());
        }
        let not_ready: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.conn.is_none() || m.health != Health::Up)
            .map(|(n, m)| format!("{n} ({})", health_str(&m.health, m.conn.is_some())))
            .collect();
        if !not_ready.is_empty() {
            return Err(format!("waiting for members: {}", not_ready.join(", ")));
        }
        let epoch = self.durable.next_epoch.max(self.catalog.epochs().last().map_or(1, |l| l + 1));
        let mut next = self.durable.clone();
        next.next_epoch = epoch + 1;
        self.save(next).await.map_err(|e| format!("cannot persist the epoch counter: {e}"))?;
        let members = self.members.keys().cloned().collect();
        tracing::debug!(epoch, "epoch starts");
        match self.phase.step(Event::Start { epoch, members }, Instant::now(), &self.settings) {
            Ok(effects) => {
                for e in effects {
                    self.effect(e);
                }
                Ok(epoch)
            }
            Err(r) => Err(r.to_string()),
        }
    }
}

fn health_str(h: &Health, connected: bool) -> String {
    match h {
        Health::Unknown => "no sidecar since the coordinator started".into(),
        Health::Up if !connected => "sidecar lost (VM alive)".into(),
        Health::Up => "up".into(),
        Health::VmFailed(r) => format!("vm failed: {r}"),
        Health::SidecarLost(r) => format!("sidecar lost: {r}"),
    }
}
