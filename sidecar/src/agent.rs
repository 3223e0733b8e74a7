//! `cutline-sidecar serve`: the per-VM agent of a cluster. It owns its VM for its whole
//! life (a second agent for the same VM is refused), registers with the coordinator,
//! sends heartbeats from a task of their own, reports the VM's failure on evidence, and
//! carries out the protocol's steps. Its state is two pure machines, the epoch [`Slot`]
//! and the [`VmState`]; this module holds the resources they stand for and runs their
//! effects. Arming, storing, restoring and verifying run in the background.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use netfilter::{Bounds, FilterBufferConfig, Gate};
use qmp_client::Qmp;
use tokio::sync::mpsc;

use crate::checkpoint::{Durable, Pending, Prepared};
use crate::proto::{Envelope, FrameReader, Msg, PROTOCOL, VectorClock};
use crate::slot::{Slot, SlotEvent, Tag};
use crate::store::{Lock, Store, error_chain};
use crate::transport::{Dialer, Reader, Writer};
use crate::vm::{VmEvent, VmState};
use crate::{attach, failpoint, leftovers, restore};

/// How a sidecar agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the coordinator (over TCP: TLS and the token).
    pub coordinator: Dialer,
    /// Cluster name.
    pub cluster: String,
    /// VM name.
    pub name: String,
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    /// The checkpoint store, or with `objects` the local work directory beside it.
    pub store: PathBuf,
    /// An object store (`s3://…`) the checkpoints go to instead of `store`.
    pub objects: Option<cutline_objects::Location>,
    /// Output gate bounds.
    pub bounds: Bounds,
    /// The host agent's name for this host, when a host agent runs this sidecar.
    pub host: Option<String>,
    /// The host's lease file ([`crate::host::lease_file`]): when the lease it holds runs
    /// out, this sidecar kills its VM and stops (fencing).
    pub lease_file: Option<PathBuf>,
}

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store cannot be used.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The host's lease ran out: the VM was killed here.
    #[error("fenced: the host's lease ran out; VM {name} was stopped here (QEMU pids {killed:?})")]
    Fenced {
        /// VM name.
        name: String,
        /// The QEMUs killed.
        killed: Vec<i32>,
    },
    /// Another agent owns this VM.
    #[error("another cutline-sidecar already serves VM {name} (it holds {lock})")]
    Owned {
        /// VM name.
        name: String,
        /// The lock file.
        lock: PathBuf,
    },
}

/// Errors that end one session with the coordinator (the agent reconnects).
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] crate::transport::ConnectError),
    #[error("connection to the coordinator: {0}")]
    Frame(#[from] crate::proto::FrameError),
    #[error(
        "the coordinator refused this sidecar's TLS certificate (is --tls-cert signed by the coordinator's --tls-client-ca, for client authentication?)"
    )]
    CertificateRefused(#[source] crate::proto::FrameError),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("expected welcome, got {0}")]
    NoWelcome(&'static str),
    #[error("the coordinator speaks protocol {theirs}, this sidecar {PROTOCOL}")]
    Version { theirs: u32 },
    #[error("connection to the coordinator lost")]
    Lost,
}

/// Results of background work, back into the loop.
enum Done {
    Armed(Tag, Result<Box<Prepared>, String>),
    Stored(Tag, Result<Box<Durable>, String>),
    Restored(Tag, Result<restore::Report, String>),
    Verified(u64, Vec<String>),
}

/// The connection to the coordinator of one session.
struct Session {
    tx: mpsc::UnboundedSender<Envelope>,
    inc: u64,
}

/// The agent: its machines and the resources they stand for.
struct Agent {
    cfg: Config,
    store: Store,
    vm: VmState,
    slot: Slot,
    qmp: Option<Qmp>,
    gate: Option<Gate>,
    pid_start: Option<u64>,
    prepared: Option<Prepared>,
    pending: Option<Pending>,
    durable: Option<Durable>,
    /// The store (or restore) task in flight: the next one waits for it.
    busy: Option<tokio::task::JoinHandle<()>>,
    /// Stores whose epoch ended while they ran: discarded when they arrive.
    abandoned: BTreeSet<(u64, u64)>,
    clock: VectorClock,
    session: Option<Session>,
    done_tx: mpsc::UnboundedSender<Done>,
    hold_started: Option<Instant>,
    /// The checkpoint and committed digest the coordinator asked to restore.
    restore_for: Option<(u64, String)>,
    /// When a short store last had its unreferenced blocks swept.
    last_sweep: Option<Instant>,
    /// The checkpoints the coordinator last said to keep (its committed, retained ones).
    keep: Option<Vec<u64>>,
    /// The VM's RAM, read at attach.
    ram_bytes: Option<u64>,
    /// The last restore's (whole, fetch) times, ms, for its `Restored`.
    restore_times: Option<(f64, f64)>,
}

/// Runs the agent until `shutdown` resolves. Reconnects to the coordinator when the
/// connection drops; its VM keeps running meanwhile.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let (objects, work) = (cfg.objects.clone(), cfg.store.clone());
    let store = tokio::task::spawn_blocking(move || match objects {
        Some(l) => Store::open_at(&l, &work),
        None => Store::open(&work),
    })
    .await
    .map_err(|e| {
        AgentError::Store(crate::store::StoreError::NotWritable {
            path: cfg.store.clone(),
            source: std::io::Error::other(e.to_string()),
        })
    })??;
    let _owner: Lock = store.lock_owner(&cfg.name).map_err(|_| AgentError::Owned {
        name: cfg.name.clone(),
        lock: cfg.store.join("vms").join(&cfg.name).join("owner"),
    })?;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut a = Agent {
        cfg,
        store,
        vm: VmState::Detached,
        slot: Slot::Free,
        qmp: None,
        gate: None,
        pid_start: None,
        prepared: None,
        pending: None,
        durable: None,
        busy: None,
        abandoned: BTreeSet::new(),
        clock: VectorClock::default(),
        session: None,
        done_tx,
        hold_started: None,
        restore_for: None,
        last_sweep: None,
        keep: None,
        ram_bytes: None,
        restore_times: None,
    };
    tokio::pin!(shutdown);
    let fenced = fence_watch(a.cfg.lease_file.clone());
    tokio::pin!(fenced);
    loop {
        a.attach().await;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut fenced => return Err(a.fence()),
            r = a.session(&mut done_rx) => {
                if let Err(e) = r {
                    tracing::warn!(vm = %a.cfg.name, "coordinator session ended: {}", error_chain(&e));
                }
            }
        }
        a.session = None;
        a.slot_event(SlotEvent::SessionLost).await;
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut fenced => return Err(a.fence()),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    // The gate's filters stay in QEMU (a restarted agent finds them); release a hold.
    if let Some(g) = &a.gate {
        let _ = g.release().await;
    }
    Ok(())
}

/// Resolves when the lease in `path` runs out (never without a lease file). Polled: the
/// file is written by the host agent, and a dead host agent writes nothing.
async fn fence_watch(path: Option<PathBuf>) {
    let Some(path) = path else { return std::future::pending().await };
    loop {
        let p = path.clone();
        let fence = tokio::task::spawn_blocking(move || crate::host::lease_file::FileLease::read(&p).must_fence())
            .await
            .unwrap_or(true);
        if fence {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Agent {
    /// Kills this VM's QEMU (every instance serving its QMP socket): the lease ran out.
    fn fence(&mut self) -> AgentError {
        self.qmp = None;
        self.gate = None;
        let killed = crate::host::kill_qemus(&self.cfg.qmp);
        tracing::error!(vm = %self.cfg.name, ?killed, "fenced: the host's lease ran out");
        AgentError::Fenced { name: self.cfg.name.clone(), killed }
    }

    /// Sends `msg` in the current session; seed messages advance the clock.
    fn send(&mut self, msg: Msg) {
        if msg.ticks() {
            self.clock.tick(&self.cfg.name);
        }
        if let Some(s) = &self.session {
            let _ = s.tx.send(Envelope { inc: s.inc, vt: self.clock.clone(), msg });
        }
    }

    /// Sends `msg` for `at`, only if `at` belongs to the current incarnation.
    fn send_for(&mut self, at: Tag, msg: Msg) {
        match &self.session {
            Some(s) if s.inc == at.inc => self.send(msg),
            _ => {
                tracing::info!(vm = %self.cfg.name, epoch = at.epoch, inc = at.inc, "not sent ({}): its incarnation is over", msg.kind())
            }
        }
    }

    /// (Re)attaches to the VM and its output gate, when it runs; cleans what a dead
    /// sidecar left.
    async fn attach(&mut self) {
        if self.qmp.as_ref().is_some_and(|q| q.close_reason().is_none()) || matches!(self.vm, VmState::Restoring(_)) {
            return;
        }
        self.gate = None;
        self.qmp = None;
        match attach::connect(&self.cfg.qmp).await {
            Ok(q) => {
                let pid = q.peer_pid();
                self.pid_start = pid.and_then(crate::process::start_time);
                match leftovers::clean(&q, &self.store, &self.cfg.name).await {
                    Ok(c) if c.resumed || !c.bitmaps.is_empty() => {
                        tracing::warn!(vm = %self.cfg.name, resumed = c.resumed, bitmaps = ?c.bitmaps, "cleaned up after a dead sidecar");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(vm = %self.cfg.name, "cleaning leftovers failed: {}", error_chain(&e)),
                }
                let dir = gate_dir(&self.cfg.store);
                match Gate::attach_qemu(&self.cfg.name, q.clone(), &FilterBufferConfig::new(dir), self.cfg.bounds).await
                {
                    Ok(g) => self.gate = Some(g),
                    Err(e) => tracing::warn!(vm = %self.cfg.name, "no output gate: {}", error_chain(&e)),
                }
                self.ram_bytes = q
                    .execute_raw("query-memory-size-summary", serde_json::json!({}))
                    .await
                    .ok()
                    .and_then(|v| v["base-memory"].as_u64());
                self.qmp = Some(q);
                let _ = self.vm.step(VmEvent::Attached { pid });
                tracing::info!(vm = %self.cfg.name, ?pid, "attached");
            }
            Err(e) => {
                tracing::warn!(vm = %self.cfg.name, "VM not reachable: {e}");
                // Failed only on evidence: no QEMU process serves this VM's QMP socket.
                if restore::qemus_serving(&self.cfg.qmp).is_empty() {
                    let reason = format!("no QEMU process serves {}", self.cfg.qmp.display());
                    self.vm_event(VmEvent::Exited { reason }).await;
                }
            }
        }
    }

    /// Connects to the coordinator.
    async fn connect(&self) -> Result<(FrameReader<Reader>, Writer), SessionError> {
        let (r, w) = self.cfg.coordinator.connect().await?;
        Ok((FrameReader::new(r), w))
    }

    /// One connection to the coordinator.
    async fn session(&mut self, done_rx: &mut mpsc::UnboundedReceiver<Done>) -> Result<(), SessionError> {
        let (mut reader, mut writer) = self.connect().await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
        let writer_task = tokio::spawn(async move {
            while let Some(env) = rx.recv().await {
                if crate::proto::write(&mut writer, &env).await.is_err() {
                    break;
                }
            }
        });
        let pid = self.qmp.as_ref().and_then(|q| q.peer_pid());
        let register = Msg::Register {
            version: PROTOCOL,
            cluster: self.cfg.cluster.clone(),
            name: self.cfg.name.clone(),
            qmp: self.cfg.qmp.display().to_string(),
            store: self.cfg.store.display().to_string(),
            pid,
            pid_start: self.pid_start,
            checkpoints: self.store.ids_async(&self.cfg.name).await.unwrap_or_default(),
            token: self.cfg.coordinator.token().map(|t| t.expose().to_owned()),
            host: self.cfg.host.clone(),
            ram_bytes: self.ram_bytes,
        };
        let _ = tx.send(Envelope { inc: 0, vt: self.clock.clone(), msg: register });
        let welcome = reader.next().await.map_err(|e| match e {
            crate::proto::FrameError::Io(io) if crate::transport::dial::is_alert(&io) => {
                SessionError::CertificateRefused(crate::proto::FrameError::Io(io))
            }
            e => SessionError::Frame(e),
        })?;
        self.clock.merge(&welcome.vt);
        let (inc, heartbeat) = match welcome.msg {
            Msg::Welcome { version, .. } if version != PROTOCOL => {
                return Err(SessionError::Version { theirs: version });
            }
            Msg::Welcome { incarnation, heartbeat_ms, committed, aborted, .. } => {
                self.session = Some(Session { tx: tx.clone(), inc: incarnation });
                self.welcome(&committed, &aborted).await;
                (incarnation, Duration::from_millis(heartbeat_ms.max(50)))
            }
            Msg::Error { what } => return Err(SessionError::Refused(what)),
            other => return Err(SessionError::NoWelcome(other.kind())),
        };
        tracing::info!(vm = %self.cfg.name, incarnation = inc, "registered with the coordinator");
        if let VmState::Failed { reason } = &self.vm {
            let reason = reason.clone();
            self.send(Msg::VmFailed { reason });
        }
        // A rollback of an earlier incarnation is unfinished (the guest is paused or being
        // restored): this coordinator must roll the cluster back itself.
        if let Some(t) = self.vm.rollback().filter(|t| t.inc != inc) {
            let reason = format!("{}; the coordinator that started that rollback is gone", self.vm.name());
            tracing::warn!(vm = %self.cfg.name, epoch = t.epoch, "{reason}");
            self.send(Msg::VmFailed { reason });
        }
        // Heartbeats never wait behind the loop's work.
        let beat_tx = tx.clone();
        let beats = tokio::spawn(async move {
            let mut t = tokio::time::interval(heartbeat);
            loop {
                t.tick().await;
                let env = Envelope { inc, vt: VectorClock::default(), msg: Msg::Heartbeat };
                if beat_tx.send(env).is_err() {
                    break;
                }
            }
        });
        let _guard = AbortOnDrop(vec![beats, writer_task]);
        let mut breaches = self.gate.as_ref().map(|g| g.breaches());
        let mut reattach = tokio::time::interval(Duration::from_secs(2));
        loop {
            let vm_gone = {
                let qmp = self
                    .qmp
                    .clone()
                    .filter(|_| matches!(self.vm, VmState::Running { .. } | VmState::RestoredPaused { .. }));
                async move {
                    match qmp {
                        Some(q) => q.closed().await.to_string(),
                        None => std::future::pending().await,
                    }
                }
            };
            let breach = async {
                match breaches.as_mut() {
                    Some(b) => {
                        if b.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                        *b.borrow()
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = reattach.tick() => {
                    if self.qmp.is_none() && matches!(self.vm, VmState::Detached | VmState::Failed { .. }) {
                        self.attach().await;
                        breaches = self.gate.as_ref().map(|g| g.breaches());
                    }
                }
                b = breach => {
                    // A bound let held output go before the epoch committed: it cannot commit.
                    if let (Some(b), Some(at)) = (b, self.slot.tag()) {
                        self.send_for(at, Msg::StepFailed { epoch: at.epoch, reason: format!("output gate released early: {b:?}") });
                    }
                }
                reason = vm_gone => {
                    self.qmp = None;
                    self.gate = None;
                    tracing::warn!(vm = %self.cfg.name, %reason, "VM failed");
                    self.vm_event(VmEvent::Exited { reason: format!("QEMU exited: {reason}") }).await;
                }
                done = done_rx.recv() => {
                    if let Some(d) = done {
                        self.on_done(d).await;
                        breaches = self.gate.as_ref().map(|g| g.breaches());
                    }
                }
                env = reader.next() => {
                    let env = env?;
                    if env.inc != inc {
                        tracing::info!(vm = %self.cfg.name, "discarded {} of incarnation {} (session is {inc})", env.msg.kind(), env.inc);
                        continue;
                    }
                    if env.msg.ticks() { self.clock.receive(&self.cfg.name, &env.vt) } else { self.clock.merge(&env.vt) }
                    self.on_msg(inc, env.msg).await;
                    breaches = self.gate.as_ref().map(|g| g.breaches());
                }
            }
            if _guard.0.iter().any(|h| h.is_finished()) {
                return Err(SessionError::Lost);
            }
        }
    }

    /// The coordinator says which checkpoints were committed and which aborted: the slot
    /// settles, and exactly the aborted ones are discarded.
    async fn welcome(&mut self, committed: &[u64], aborted: &[u64]) {
        self.keep = Some(committed.to_vec());
        self.slot_event(SlotEvent::Welcome { committed: committed.to_vec(), aborted: aborted.to_vec() }).await;
        let name = self.cfg.name.clone();
        for id in aborted {
            tracing::info!(vm = %name, id, "discarding a checkpoint the coordinator names aborted");
            if let Err(e) = self.store.discard_async(&name, *id).await {
                tracing::warn!(vm = %name, id, "cannot discard: {e}");
            }
        }
    }

    /// Why this VM cannot take part in an epoch now, if it cannot.
    /// A store short of room also gets its unreferenced blocks swept ([`Agent::sweep`]).
    fn refusal(&mut self) -> Option<String> {
        if !self.vm.can_checkpoint() || self.qmp.is_none() {
            return Some(format!("VM {}", self.vm.name()));
        }
        let refusal = refusal_file(self.store.root(), &self.cfg.name);
        if refusal.exists() {
            return Some(format!("checkpoints refused by {}", refusal.display()));
        }
        match nix::sys::statvfs::statvfs(self.store.root()) {
            Ok(s) => {
                let free = s.blocks_available() * s.fragment_size();
                if free < NEAR_FULL {
                    self.sweep();
                }
                (free < MIN_FREE).then(|| {
                    format!(
                        "store {} has {} MiB free, needs {} MiB",
                        self.cfg.store.display(),
                        free >> 20,
                        MIN_FREE >> 20
                    )
                })
            }
            Err(e) => Some(format!("store {}: {e}", self.cfg.store.display())),
        }
    }

    /// A store near full: gc as after a commit (keeping what the coordinator last said to
    /// keep, and anything newer), or, before any word from it, sweep only the blocks no
    /// manifest references; at most once a minute. gc otherwise runs only after a commit,
    /// which a full store never reaches.
    fn sweep(&mut self) {
        if self.last_sweep.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let (s, name, keep) = (self.store.clone(), self.cfg.name.clone(), self.keep.clone());
        tokio::task::spawn_blocking(move || {
            let keep = keep.unwrap_or_else(|| s.ids(&name).unwrap_or_default());
            match s.gc_keep(&name, &keep) {
                Ok(r) => {
                    tracing::warn!(vm = %name, freed_mib = r.bytes_freed >> 20, "store short of room: swept unreferenced blocks")
                }
                Err(e) => tracing::warn!(vm = %name, "sweeping a short store failed: {e}"),
            }
        });
    }

    async fn on_msg(&mut self, inc: u64, msg: Msg) {
        let tag = |epoch| Tag { inc, epoch };
        match msg {
            Msg::Prepare { epoch } => {
                if let Some(reason) = self.refusal() {
                    return self.send(Msg::Vote { epoch, yes: false, reason: Some(reason) });
                }
                // Without its output gate a member could let an orphan message out.
                if self.gate.is_none()
                    && let Some(q) = self.qmp.clone()
                {
                    let dir = gate_dir(&self.cfg.store);
                    match Gate::attach_qemu(&self.cfg.name, q, &FilterBufferConfig::new(dir), self.cfg.bounds).await {
                        Ok(g) => self.gate = Some(g),
                        Err(e) => {
                            let reason = Some(format!("no output gate: {}", error_chain(&e)));
                            return self.send(Msg::Vote { epoch, yes: false, reason });
                        }
                    }
                }
                self.slot_event(SlotEvent::Prepare(tag(epoch))).await;
            }
            Msg::Cut { epoch } => self.slot_event(SlotEvent::Cut(tag(epoch))).await,
            Msg::Release { epoch } => {
                let (hold_ms, packets, breach) = match &self.gate {
                    Some(g) => match g.release().await {
                        Ok(Some(r)) => {
                            (r.held_for.as_secs_f64() * 1000.0, r.packets, r.breach.map(|b| format!("{b:?}")))
                        }
                        Ok(None) => (0.0, 0, None),
                        Err(e) => (0.0, 0, Some(e.to_string())),
                    },
                    None => (self.hold_started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0), 0, None),
                };
                self.hold_started = None;
                self.send(Msg::Released { epoch, hold_ms, packets, breach });
            }
            Msg::Commit { epoch, keep } => {
                self.slot_event(SlotEvent::Commit(tag(epoch))).await;
                if !keep.is_empty() {
                    self.keep = Some(keep.clone());
                }
                failpoint::hit("sidecar-after-commit");
                if !keep.is_empty() {
                    // gc waits for other writers of the store: off the async threads.
                    let (s, name) = (self.store.clone(), self.cfg.name.clone());
                    tokio::task::spawn_blocking(move || {
                        if let Err(e) = s.gc_keep(&name, &keep) {
                            tracing::warn!(vm = %name, "pruning after commit failed: {e}");
                        }
                    });
                }
                tracing::info!(vm = %self.cfg.name, epoch, "epoch committed");
            }
            Msg::Abort { epoch, reason } => {
                tracing::warn!(vm = %self.cfg.name, epoch, %reason, "epoch aborted");
                self.slot_event(SlotEvent::Abort(tag(epoch))).await;
            }
            Msg::Restore { epoch, checkpoint, digest } => {
                self.restore_for = Some((checkpoint, digest));
                self.vm_event(VmEvent::Restore(tag(epoch))).await;
            }
            Msg::Resume { epoch } => self.vm_event(VmEvent::Resume(tag(epoch))).await,
            Msg::Verify { epoch, checkpoint, digest } => {
                let (store, name, done) = (self.store.clone(), self.cfg.name.clone(), self.done_tx.clone());
                tokio::task::spawn_blocking(move || {
                    let damage = verify(&store, &name, checkpoint, &digest);
                    let _ = done.send(Done::Verified(epoch, damage));
                });
            }
            Msg::Error { what } => tracing::warn!(vm = %self.cfg.name, "coordinator: {what}"),
            other => tracing::warn!(vm = %self.cfg.name, "unexpected {} from the coordinator", other.kind()),
        }
    }
}

/// Aborts tasks when a session ends.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Re-hashes checkpoint `id` of `name`: the manifest against the committed digest, then
/// every block it needs. Each problem names the item.
fn verify(store: &Store, name: &str, id: u64, digest: &str) -> Vec<String> {
    let mut damage = Vec::new();
    match store.manifest_digest(name, id) {
        Ok(d) if d == digest => {}
        Ok(d) => damage.push(format!("manifest of checkpoint {id}: digest {d}, recorded {digest}")),
        Err(e) => damage.push(format!("manifest of checkpoint {id}: {e}")),
    }
    match store.verify(Some(name), |_, _| {}) {
        Ok(found) => damage.extend(
            found
                .into_iter()
                .filter(|d| d.breaks.iter().any(|(n, i)| n == name && *i == id))
                .map(|d| format!("{}: {}", d.item, d.why)),
        ),
        Err(e) => damage.push(format!("store: {e}")),
    }
    damage
}

/// Least free space in the store for a yes vote.
const MIN_FREE: u64 = 64 << 20;
/// Free space below which the store is swept before it is full.
const NEAR_FULL: u64 = 2 * MIN_FREE;

/// The file that makes a sidecar refuse epochs (maintenance): `STORE/vms/NAME/no-checkpoints`.
pub fn refusal_file(store: &std::path::Path, name: &str) -> PathBuf {
    store.join("vms").join(name).join("no-checkpoints")
}

/// Where the output gate's mirror sockets live: beside the store's work files, but not
/// among them (gc empties `tmp/`).
fn gate_dir(store: &std::path::Path) -> PathBuf {
    let dir = store.join("run");
    let _ = crate::store::private::create_dir_all(&dir);
    dir
}

#[path = "agent_effects.rs"]
mod effects;
