//! `cutline-sidecar serve`: the per-VM agent of a cluster. It attaches to its guest,
//! registers with the coordinator, sends heartbeats, reports the VM's failure at once,
//! and carries out the protocol's steps: vote, cut with output held, release, store,
//! commit or abort, restore and resume.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use netfilter::{Bounds, FilterBufferConfig, Gate};
use qmp_client::Qmp;
use serde_json::json;
use tokio::io::BufReader;
use tokio::sync::mpsc;

use crate::checkpoint::{self, Durable, Options, Pending, Prepared};
use crate::proto::{self, Envelope, Msg, VectorClock};
use crate::store::Store;
use crate::{attach, restore};

/// Where the coordinator listens.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A unix socket.
    Unix(PathBuf),
    /// `HOST:PORT`, with the pre-shared token.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        match s.strip_prefix("tcp:") {
            Some(addr) => Ok(Endpoint::Tcp(addr.to_owned())),
            None => Ok(Endpoint::Unix(PathBuf::from(s.strip_prefix("unix:").unwrap_or(s)))),
        }
    }
}

/// How a sidecar agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The coordinator.
    pub coordinator: Endpoint,
    /// Pre-shared token (TCP).
    pub token: Option<String>,
    /// Cluster name.
    pub cluster: String,
    /// VM name.
    pub name: String,
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    /// The checkpoint store.
    pub store: PathBuf,
    /// Output gate bounds.
    pub bounds: Bounds,
}

/// Errors that stop an agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The store cannot be used.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Results of work the agent runs in the background, back into its loop.
enum Done {
    Prepared(u64, Result<Box<Prepared>, String>),
    Durable(u64, Result<Box<Durable>, String>),
    Restored(u64, Result<restore::Report, String>),
}

/// Checkpoint work in flight; it outlives a connection to the coordinator.
struct Work {
    prepared: Option<(u64, Prepared)>,
    pending: Option<(u64, Pending)>,
    durable: Option<(u64, Durable)>,
    finishing: Option<tokio::task::JoinHandle<()>>,
    aborted: std::collections::BTreeSet<u64>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
}

/// The agent's view of its VM.
struct Vm {
    qmp: Option<Qmp>,
    gate: Option<Gate>,
    failed: bool,
}

/// Runs the agent until `shutdown` resolves. Reconnects to the coordinator when the
/// connection drops; its VM keeps running meanwhile.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), AgentError> {
    let store = Store::open(&cfg.store)?;
    let mut vm = Vm { qmp: None, gate: None, failed: false };
    let mut clock = VectorClock::default();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Done>();
    let mut work = Work {
        prepared: None,
        pending: None,
        durable: None,
        finishing: None,
        aborted: Default::default(),
        done_tx,
        done_rx,
    };
    tokio::pin!(shutdown);
    loop {
        attach_vm(&cfg, &mut vm).await;
        tokio::select! {
            _ = &mut shutdown => break,
            r = session(&cfg, &store, &mut vm, &mut clock, &mut work) => {
                if let Err(e) = r {
                    tracing::warn!(vm = %cfg.name, "coordinator session ended: {e}");
                }
            }
        }
        // The epoch in flight died with the connection: give up what is armed, let the
        // output go (the coordinator that would release it is gone).
        if let Some((_, p)) = work.prepared.take() {
            p.abort().await;
        }
        if let Some(g) = &vm.gate {
            let _ = g.release().await;
        }
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
    // The gate's filters stay in QEMU (a restarted agent finds them); release a hold.
    if let Some(g) = &vm.gate {
        let _ = g.release().await;
    }
    Ok(())
}

/// (Re)attaches to the VM and its output gate, when it runs.
async fn attach_vm(cfg: &Config, vm: &mut Vm) {
    if vm.qmp.as_ref().is_some_and(|q| q.close_reason().is_none()) {
        return;
    }
    vm.gate = None;
    vm.qmp = None;
    match attach::connect(&cfg.qmp).await {
        Ok(q) => {
            let dir = gate_dir(&cfg.store);
            match Gate::attach_qemu(&cfg.name, q.clone(), &FilterBufferConfig::new(dir), cfg.bounds).await {
                Ok(g) => vm.gate = Some(g),
                Err(e) => tracing::warn!(vm = %cfg.name, "no output gate: {}", crate::store::error_chain(&e)),
            }
            vm.qmp = Some(q);
            vm.failed = false;
            tracing::info!(vm = %cfg.name, "attached");
        }
        Err(e) => tracing::warn!(vm = %cfg.name, "VM not reachable: {e}"),
    }
}

type Tx = mpsc::UnboundedSender<Envelope>;

fn send(tx: &Tx, clock: &mut VectorClock, me: &str, msg: Msg) {
    if msg.ticks() {
        clock.tick(me);
    }
    let _ = tx.send(Envelope { vt: clock.clone(), msg });
}

/// One connection to the coordinator.
async fn session(
    cfg: &Config,
    store: &Store,
    vm: &mut Vm,
    clock: &mut VectorClock,
    work: &mut Work,
) -> Result<(), String> {
    let (reader, mut writer): (
        Box<dyn tokio::io::AsyncRead + Send + Unpin>,
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    ) = match &cfg.coordinator {
        Endpoint::Unix(p) => {
            let s = tokio::net::UnixStream::connect(p).await.map_err(|e| format!("connect {}: {e}", p.display()))?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
        Endpoint::Tcp(a) => {
            let s = tokio::net::TcpStream::connect(a).await.map_err(|e| format!("connect {a}: {e}"))?;
            let (r, w) = s.into_split();
            (Box::new(r), Box::new(w))
        }
    };
    let mut reader = BufReader::new(reader);
    let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
    let writer_task = tokio::spawn(async move {
        while let Some(env) = rx.recv().await {
            if proto::write(&mut writer, &env).await.is_err() {
                break;
            }
        }
    });
    let me = cfg.name.clone();
    let pid = vm.qmp.as_ref().and_then(|q| q.peer_pid());
    send(
        &tx,
        clock,
        &me,
        Msg::Register {
            cluster: cfg.cluster.clone(),
            name: cfg.name.clone(),
            qmp: cfg.qmp.display().to_string(),
            store: cfg.store.display().to_string(),
            pid,
            token: cfg.token.clone(),
        },
    );
    let welcome = proto::read(&mut reader).await.map_err(|e| e.to_string())?;
    clock.merge(&welcome.vt);
    let heartbeat = match welcome.msg {
        Msg::Welcome { committed, heartbeat_ms } => {
            // A checkpoint made durable for an epoch whose fate we missed: committed only
            // if the coordinator says so.
            if let Some((_, d)) = work.durable.take() {
                if committed.contains(&d.manifest.id) {
                    if let Some(q) = &vm.qmp {
                        d.retire(q).await;
                    }
                } else if let Some(q) = &vm.qmp {
                    let _ = d.discard(q, store).await;
                }
            }
            discard_tentative(store, &cfg.name, &committed);
            Duration::from_millis(heartbeat_ms.max(50))
        }
        Msg::Error { what } => return Err(format!("coordinator refused: {what}")),
        other => return Err(format!("expected welcome, got {}", other.kind())),
    };
    tracing::info!(vm = %cfg.name, "registered with the coordinator");
    if vm.qmp.is_none() && !vm.failed {
        vm.failed = true;
        send(&tx, clock, &me, Msg::VmFailed { reason: "QEMU is not reachable".into() });
    }

    let Work { prepared, pending, durable, finishing, aborted, done_tx, done_rx } = work;
    let mut ticker = tokio::time::interval(heartbeat);
    // The epoch whose output is held or whose data is being stored (for gate breaches).
    let mut in_flight: Option<u64> = None;
    let mut breaches = vm.gate.as_ref().map(|g| g.breaches());
    let mut hold_started: Option<Instant> = None;
    loop {
        let vm_gone = async {
            match &vm.qmp {
                Some(q) if !vm.failed => q.closed().await.to_string(),
                _ => std::future::pending().await,
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
            _ = ticker.tick() => send(&tx, clock, &me, Msg::Heartbeat),
            b = breach => {
                // A bound let the held output go before the epoch committed: it cannot commit.
                if let (Some(b), Some(epoch)) = (b, in_flight) {
                    send(&tx, clock, &me, Msg::StepFailed { epoch, reason: format!("output gate released early: {b:?}") });
                }
            }
            reason = vm_gone => {
                vm.failed = true;
                tracing::warn!(vm = %me, %reason, "VM failed");
                send(&tx, clock, &me, Msg::VmFailed { reason: format!("QEMU exited: {reason}") });
            }
            done = done_rx.recv() => match done {
                Some(Done::Prepared(epoch, Ok(p))) => {
                    if aborted.contains(&epoch) {
                        p.abort().await;
                    } else {
                        if let Some((_, old)) = prepared.replace((epoch, *p)) { old.abort().await; }
                        send(&tx, clock, &me, Msg::Vote { epoch, yes: true, reason: None });
                    }
                }
                Some(Done::Prepared(epoch, Err(reason))) => send(&tx, clock, &me, Msg::Vote { epoch, yes: false, reason: Some(reason) }),
                Some(Done::Durable(epoch, Ok(d))) if aborted.contains(&epoch) => {
                    // Stored after its epoch aborted: it must not stay.
                    match &vm.qmp {
                        Some(q) => { let _ = d.discard(q, store).await; }
                        None => { let _ = store.discard(&me, d.manifest.id); }
                    }
                }
                Some(Done::Durable(epoch, Ok(d))) => {
                    let digest = store.manifest_digest(&me, d.manifest.id).unwrap_or_default();
                    clock.tick(&me); // seed 000: the checkpoint is stored
                    send(&tx, clock, &me, Msg::Durable { epoch, checkpoint: d.manifest.id, digest, bytes_stored: d.manifest.bytes_stored });
                    *durable = Some((epoch, *d));
                }
                Some(Done::Durable(epoch, Err(reason))) => send(&tx, clock, &me, Msg::StepFailed { epoch, reason }),
                Some(Done::Restored(epoch, Ok(r))) => {
                    attach_vm(cfg, vm).await;
                    breaches = vm.gate.as_ref().map(|g| g.breaches());
                    send(&tx, clock, &me, Msg::Restored { epoch, pid: r.pid, restore_ms: r.duration_ms });
                }
                Some(Done::Restored(epoch, Err(reason))) => send(&tx, clock, &me, Msg::StepFailed { epoch, reason }),
                None => {}
            },
            env = proto::read(&mut reader) => {
                let env = env.map_err(|e| e.to_string())?;
                if env.msg.ticks() { clock.receive(&me, &env.vt) } else { clock.merge(&env.vt) }
                match env.msg {
                    Msg::Prepare { epoch } => {
                        if let Some((_, p)) = prepared.take() { p.abort().await; }
                        // Without its output gate a member could let an orphan message out.
                        if vm.gate.is_none() && let Some(q) = vm.qmp.clone() {
                            let dir = gate_dir(&cfg.store);
                            match Gate::attach_qemu(&cfg.name, q, &FilterBufferConfig::new(dir), cfg.bounds).await {
                                Ok(g) => {
                                    breaches = Some(g.breaches());
                                    vm.gate = Some(g);
                                }
                                Err(e) => {
                                    let why = crate::store::error_chain(&e);
                                    send(&tx, clock, &me, Msg::Vote { epoch, yes: false, reason: Some(format!("no output gate: {why}")) });
                                    continue;
                                }
                            }
                        }
                        let (yes, reason) = vote(cfg, store, vm);
                        match (yes, vm.qmp.clone()) {
                            // Arm (targets, capabilities) so that the cut is short, once the
                            // previous checkpoint is stored; the vote follows as `Done`.
                            (true, Some(qmp)) => {
                                let (store, name, done, previous) = (store.clone(), me.clone(), done_tx.clone(), finishing.take());
                                tokio::spawn(async move {
                                    if let Some(h) = previous {
                                        let _ = h.await;
                                    }
                                    let r = checkpoint::prepare(&qmp, &store, &name, &Options::default(), &mut |_| {})
                                        .await
                                        .map(Box::new)
                                        .map_err(|e| crate::store::error_chain(&e));
                                    let _ = done.send(Done::Prepared(epoch, r));
                                });
                            }
                            _ => send(&tx, clock, &me, Msg::Vote { epoch, yes: false, reason }),
                        }
                    }
                    Msg::Cut { epoch } => {
                        let Some(armed) = prepared.take().filter(|(e, _)| *e == epoch).map(|(_, p)| p) else {
                            send(&tx, clock, &me, Msg::StepFailed { epoch, reason: "cut without a prepared checkpoint".into() });
                            continue;
                        };
                        if let Some(g) = &vm.gate {
                            if let Err(e) = g.hold().await {
                                armed.abort().await;
                                send(&tx, clock, &me, Msg::StepFailed { epoch, reason: format!("output gate: {e}") });
                                continue;
                            }
                            hold_started = Some(Instant::now());
                        }
                        match armed.cut(&mut |_| {}).await {
                            Ok(p) => {
                                in_flight = Some(epoch);
                                clock.tick(&me); // seed 000: the local checkpoint
                                send(&tx, clock, &me, Msg::CutDone { epoch, checkpoint: p.id(), pause_ms: p.pause_ms() });
                                *pending = Some((epoch, p));
                            }
                            Err(e) => {
                                if let Some(g) = &vm.gate { let _ = g.release().await; }
                                send(&tx, clock, &me, Msg::StepFailed { epoch, reason: crate::store::error_chain(&e) });
                            }
                        }
                        // Storing runs while the guest does; the result comes back as `Done`.
                        if let Some((e, p)) = pending.take() {
                            let done = done_tx.clone();
                            *finishing = Some(tokio::spawn(async move {
                                let r = p.finish(&mut |_| {}).await.map(Box::new).map_err(|e| crate::store::error_chain(&e));
                                let _ = done.send(Done::Durable(e, r));
                            }));
                        }
                    }
                    Msg::Release { epoch } => {
                        let (hold_ms, packets, breach) = match &vm.gate {
                            Some(g) => match g.release().await {
                                Ok(Some(r)) => (r.held_for.as_secs_f64() * 1000.0, r.packets, r.breach.map(|b| format!("{b:?}"))),
                                Ok(None) => (0.0, 0, None),
                                Err(e) => (0.0, 0, Some(e.to_string())),
                            },
                            None => (hold_started.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0), 0, None),
                        };
                        hold_started = None;
                        send(&tx, clock, &me, Msg::Released { epoch, hold_ms, packets, breach });
                    }
                    Msg::Commit { epoch, keep } => {
                        if let (Some((e, d)), Some(q)) = (durable.take(), &vm.qmp) && e == epoch {
                            d.retire(q).await;
                        }
                        // gc waits for other writers of the store: off the async threads.
                        let (s, name) = (store.clone(), me.clone());
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = s.gc_keep(&name, &keep) {
                                tracing::warn!(vm = %name, "pruning after commit failed: {e}");
                            }
                        });
                        in_flight = None;
                        tracing::info!(vm = %me, epoch, "epoch committed");
                    }
                    Msg::Abort { epoch, reason } => {
                        tracing::warn!(vm = %me, epoch, %reason, "epoch aborted");
                        aborted.insert(epoch);
                        in_flight = None;
                        if let Some(g) = &vm.gate { let _ = g.release().await; }
                        if let Some((_, p)) = prepared.take() { p.abort().await; }
                        if let Some((_, p)) = pending.take() { p.abort().await; }
                        if let Some((_, d)) = durable.take()
                            && let Some(q) = &vm.qmp
                        {
                            let _ = d.discard(q, store).await;
                        }
                    }
                    Msg::Restore { epoch, checkpoint } => {
                        // Our QMP connection would keep the restore from reaching QEMU.
                        vm.gate = None;
                        vm.qmp = None;
                        vm.failed = true;
                        if let Some((_, p)) = prepared.take() { p.abort().await; }
                        *pending = None;
                        *durable = None;
                        let (store, me2, done) = (store.clone(), me.clone(), done_tx.clone());
                        let previous = finishing.take();
                        tokio::spawn(async move {
                            // A checkpoint still being stored holds the VM's lock: let it end.
                            if let Some(h) = previous {
                                let _ = h.await;
                            }
                            let r = restore::restore(&store, &me2, Some(checkpoint), true, &mut |_| {})
                                .await
                                .map_err(|e| crate::store::error_chain(&e));
                            let _ = done.send(Done::Restored(epoch, r));
                        });
                    }
                    Msg::Resume => {
                        let r = match &vm.qmp {
                            Some(q) => q.execute_raw("cont", json!({})).await.map(|_| ()).map_err(|e| e.to_string()),
                            None => Err("VM not attached".into()),
                        };
                        match r {
                            Ok(()) => send(&tx, clock, &me, Msg::Resumed),
                            Err(reason) => send(&tx, clock, &me, Msg::StepFailed { epoch: 0, reason }),
                        }
                    }
                    Msg::Error { what } => tracing::warn!(vm = %me, "coordinator: {what}"),
                    other => tracing::warn!(vm = %me, "unexpected {} from the coordinator", other.kind()),
                }
            }
        }
        if writer_task.is_finished() {
            return Err("connection to the coordinator lost".into());
        }
    }
}

/// Least free space in the store for a yes vote.
const MIN_FREE: u64 = 64 << 20;

/// The file that makes a sidecar refuse epochs (maintenance): `STORE/vms/NAME/no-checkpoints`.
pub fn refusal_file(store: &std::path::Path, name: &str) -> PathBuf {
    store.join("vms").join(name).join("no-checkpoints")
}

/// Ready for a cut? No when the VM is down, the store is short of room, or an operator
/// asked this VM to sit epochs out ([`refusal_file`]).
fn vote(cfg: &Config, store: &Store, vm: &Vm) -> (bool, Option<String>) {
    if vm.failed || vm.qmp.is_none() {
        return (false, Some("VM not running".into()));
    }
    let refusal = refusal_file(store.root(), &cfg.name);
    if refusal.exists() {
        return (false, Some(format!("checkpoints refused by {}", refusal.display())));
    }
    match nix::sys::statvfs::statvfs(store.root()) {
        Ok(s) => {
            let free = s.blocks_available() * s.fragment_size();
            let need = MIN_FREE;
            if free < need {
                return (
                    false,
                    Some(format!(
                        "store {} has {} MiB free, needs {} MiB",
                        cfg.store.display(),
                        free >> 20,
                        need >> 20
                    )),
                );
            }
        }
        Err(e) => return (false, Some(format!("store {}: {e}", cfg.store.display()))),
    }
    (true, None)
}

/// Removes checkpoints of `name` newer than every committed one: tentative data of an
/// epoch the coordinator never committed.
fn discard_tentative(store: &Store, name: &str, committed: &[u64]) {
    let newest = committed.iter().max().copied().unwrap_or(0);
    for id in store.ids(name).unwrap_or_default() {
        if id > newest {
            tracing::info!(vm = name, id, "discarding a tentative checkpoint the cluster did not commit");
            let _ = store.discard(name, id);
        }
    }
}

/// Where the output gate's mirror sockets live: beside the store's work files, but not
/// among them (gc empties `tmp/`).
fn gate_dir(store: &std::path::Path) -> PathBuf {
    let dir = store.join("run");
    let _ = std::fs::create_dir_all(&dir);
    dir
}
