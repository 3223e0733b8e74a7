//! A point-in-time checkpoint of one running guest: memory, device state and every
//! writable disk at one instant, with the guest paused only for the cut.
//!
//! The cut: `stop`; one `transaction` that starts a backup job per writable disk
//! (incremental from the dirty bitmap of the checkpoint it builds on, full otherwise)
//! and adds the bitmap the next checkpoint will build on; `migrate` with
//! `background-snapshot` into a mapped-ram file, or a pipe without mapped-ram (QEMU saves
//! device state and write-protects RAM; see `checkpoint/sink.rs`); `cont` as soon as RAM pages flow,
//! which QEMU writes only once write tracking is on.
//! RAM is then saved while the guest runs. Without `background-snapshot` (old QEMU, no
//! userfaultfd write-protect, shared or hugepage memory) the whole migration runs while
//! paused (stop-and-copy), and the report says so in `mode`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qmp_client::{EventStream, Qmp, QmpError};
use serde::Serialize;
use serde_json::{Value, json};

use crate::attach::{self, AttachError, DiskInfo, VmIdentity};
use crate::disk::{self, CHUNK, DiskError};
use crate::mapped_ram::MappedRamError;
use crate::store::manifest::{Backing, Disk, FORMAT, Manifest, Timings, ZERO};
use crate::store::{Base, BlockError, Hash, Lock, Policy, Store, StoreError, Writer};

mod sink;
use sink::{FD_NAME, Sink};

/// Prefix of the dirty bitmaps cutline owns; the suffix is the checkpoint id.
pub const BITMAP_PREFIX: &str = "cutline-";
/// Room kept free beyond a staged mapped-ram file (twice the guest's RAM: the file, and
/// the blocks stored from it).
const STAGING_MARGIN: u64 = 64 << 20;

/// Errors of a checkpoint. After any of them the guest runs (unless QEMU itself is
/// gone) and every earlier checkpoint is intact.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Attaching failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// QEMU refused or failed a step.
    #[error("checkpoint step `{step}` failed")]
    Qemu {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// Saving memory failed (e.g. the store's disk is full).
    #[error("saving memory and device state failed")]
    Memory(#[source] BlockError),
    /// The mapped-ram file QEMU wrote could not be read or repaired.
    #[error("the mapped-ram file of the migration is unusable")]
    MemoryFile(#[source] MappedRamError),
    /// Migration failed inside QEMU.
    #[error("QEMU's migration failed: {0}")]
    Migration(String),
    /// A disk backup job failed.
    #[error("backing up disk {node} failed: {why}")]
    Backup {
        /// The node.
        node: String,
        /// QEMU's error.
        why: String,
    },
    /// Storing a disk failed.
    #[error("storing disk {node} failed")]
    Disk {
        /// The node.
        node: String,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// The guest ran between the disk cut and the memory cut.
    #[error("the cut was not atomic: {0}")]
    NotAtomic(String),
    /// QEMU exited during the checkpoint.
    #[error("QEMU exited during the checkpoint ({0}); nothing was committed")]
    QemuGone(String),
}

pub(crate) fn qemu(step: &'static str) -> impl FnOnce(QmpError) -> CheckpointError {
    move |source| {
        if source.is_disconnected() {
            CheckpointError::QemuGone(source.to_string())
        } else {
            CheckpointError::Qemu { step, source }
        }
    }
}

/// How to take the checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Copy every disk in full even when an incremental copy is possible.
    pub full: bool,
    /// Use stop-and-copy even when `background-snapshot` works.
    pub stop_and_copy: bool,
    /// Send memory as a sequential stream even when QEMU supports `mapped-ram`.
    pub stream_memory: bool,
}

/// What a checkpoint reports (the CLI's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Checkpoint id.
    pub id: u64,
    /// VM name.
    pub name: String,
    /// `background-snapshot` or `stop-and-copy`.
    pub mode: String,
    /// Why stop-and-copy, when it is the fallback.
    pub mode_reason: Option<String>,
    /// Guest pause from QEMU's STOP/RESUME timestamps.
    pub pause_ms: f64,
    /// Whole checkpoint.
    pub duration_ms: f64,
    /// Guest RAM.
    pub ram_bytes: u64,
    /// Migration stream length.
    pub memory_bytes: u64,
    /// Bytes added to the store.
    pub bytes_stored: u64,
    /// Bytes added for memory.
    pub memory_bytes_stored: u64,
    /// Per disk.
    pub disks: Vec<DiskReport>,
}

/// Per-disk part of the report.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    /// Node name.
    pub node: String,
    /// Guest device.
    pub device: String,
    /// Full copy or incremental.
    pub full: bool,
    /// Why full, when it was.
    pub full_reason: Option<String>,
    /// Bytes QEMU copied.
    pub bytes_copied: u64,
    /// Bytes added to the store.
    pub bytes_stored: u64,
}

impl Report {
    /// The report of a committed manifest.
    pub fn of(m: &Manifest) -> Report {
        Report {
            id: m.id,
            name: m.name.clone(),
            mode: m.mode.clone(),
            mode_reason: m.mode_reason.clone(),
            pause_ms: m.timings.pause_ms,
            duration_ms: m.timings.duration_ms,
            ram_bytes: m.ram_bytes,
            memory_bytes: m.memory.bytes,
            bytes_stored: m.bytes_stored,
            memory_bytes_stored: m.memory.bytes_stored,
            disks: m
                .disks
                .iter()
                .map(|d| DiskReport {
                    node: d.node.clone(),
                    device: d.device.clone(),
                    full: d.full,
                    full_reason: d.full_reason.clone(),
                    bytes_copied: d.bytes_copied,
                    bytes_stored: d.bytes_stored,
                })
                .collect(),
        }
    }
}

/// A disk's plan: where its copy starts from.
struct DiskPlan {
    info: DiskInfo,
    /// (bitmap, chunk map) of the checkpoint this copy builds on; `None` for a full copy.
    base: Option<(String, BTreeMap<u64, Hash>)>,
    full_reason: Option<String>,
    target: PathBuf,
    target_node: String,
    job: String,
    new_bitmap: String,
    backing: Option<Backing>,
}

/// What to undo if the checkpoint fails.
#[derive(Default)]
struct Undo {
    /// The mapped-ram file and its fd set.
    file: Option<(i64, PathBuf)>,
    /// The pipe passed with `getfd` (closed in QEMU so the reader ends).
    pipe: bool,
    stopped: bool,
    migrating: bool,
    jobs: Vec<String>,
    targets: Vec<(String, PathBuf)>,
    bitmaps: Vec<(String, String)>,
    /// The writer of the checkpoint's blocks: its packs go unless a manifest names them.
    writer: Option<Writer>,
    /// The cut marker, removed once the guest runs again.
    cut_marker: Option<PathBuf>,
}

impl Undo {
    /// Puts the guest back as it was, best effort: every step runs even if one fails.
    async fn run(self, qmp: &Qmp, store: &Store) {
        if self.migrating {
            let _ = qmp.execute_raw("migrate_cancel", json!({})).await;
        }
        for job in &self.jobs {
            let _ = qmp.execute_raw("block-job-cancel", json!({"device": job, "force": true})).await;
        }
        if !self.jobs.is_empty() {
            // Jobs finish cancelling asynchronously; targets can only go once they have.
            for _ in 0..100 {
                let running = qmp.execute_raw("query-block-jobs", json!({})).await.ok();
                let busy = running
                    .as_ref()
                    .and_then(Value::as_array)
                    .is_some_and(|js| js.iter().any(|j| self.jobs.iter().any(|id| j["device"] == id.as_str())));
                if !busy {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for (node, name) in &self.bitmaps {
            let _ = qmp.execute_raw("block-dirty-bitmap-remove", json!({"node": node, "name": name})).await;
        }
        for (node, file) in &self.targets {
            let _ = qmp.execute_raw("blockdev-del", json!({"node-name": node})).await;
            let _ = std::fs::remove_file(file);
        }
        if self.pipe {
            let _ = qmp.execute_raw("closefd", json!({"fdname": FD_NAME})).await;
        }
        if let Some((fdset, path)) = &self.file {
            let _ = qmp.execute_raw("remove-fd", json!({"fdset-id": fdset})).await;
            let _ = std::fs::remove_file(path);
        }
        if self.stopped {
            let _ = qmp.execute_raw("cont", json!({})).await;
        }
        if let Some(m) = &self.cut_marker {
            let _ = std::fs::remove_file(m);
        }
        if let Some(w) = self.writer {
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.drop_packs(&w.abort())).await;
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Takes one checkpoint of the guest behind `qmp` into `store` under `name`: the cut,
/// then storing, then committing; the bitmaps of earlier checkpoints are retired.
pub async fn checkpoint(
    qmp: &Qmp,
    store: &Store,
    name: &str,
    opts: &Options,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Manifest, CheckpointError> {
    let pending = begin(qmp, store, name, opts, progress).await?;
    let durable = pending.finish(progress).await?;
    durable.retire(qmp).await;
    Ok(durable.manifest)
}

/// A checkpoint whose cut is taken (the guest runs again) and whose data is being stored.
/// Finish it with [`Pending::finish`] or give it up with [`Pending::abort`].
pub struct Pending {
    qmp: Qmp,
    store: Store,
    name: String,
    id: u64,
    ident: VmIdentity,
    cut: Cut,
    undo: Undo,
    _vm: Lock,
    shared: Lock,
}

/// A checkpoint stored durably in the store. Until [`Durable::retire`] the bitmaps of the
/// checkpoint it builds on stay, so that [`Durable::discard`] can give it up (a cluster
/// epoch that aborts after this VM's data is durable) without losing incremental copies.
pub struct Durable {
    /// The committed manifest.
    pub manifest: Manifest,
    /// The sha256 of the manifest as stored: what a cluster commit record names.
    pub digest: Hash,
    old_bitmaps: Vec<(String, String)>,
    new_bitmaps: Vec<(String, String)>,
}

/// A checkpoint armed and ready for its cut: targets created, capabilities set. Holding
/// it holds the VM's lock. Cut it with [`Prepared::cut`] or give it up with [`Prepared::abort`].
pub struct Prepared {
    qmp: Qmp,
    store: Store,
    name: String,
    id: u64,
    ident: VmIdentity,
    opts: Options,
    armed: Armed,
    undo: Undo,
    started: Instant,
    vm: Lock,
    shared: Lock,
}

/// Arms a checkpoint of the guest behind `qmp` without pausing it: what a cluster member
/// does when it votes, so that the cut itself (and the time output is held) is short.
pub async fn prepare(
    qmp: &Qmp,
    store: &Store,
    name: &str,
    opts: &Options,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Prepared, CheckpointError> {
    let started = Instant::now();
    // Another operation on this VM (the previous checkpoint finishing, a restore) may
    // hold it for a moment: wait a little before calling it busy.
    let vm = store.lock_vm_within(name, Duration::from_secs(10)).await?;
    // Waits while a gc holds the store: off the async threads.
    let s = store.clone();
    let shared = tokio::task::spawn_blocking(move || s.lock_shared())
        .await
        .map_err(|e| CheckpointError::Migration(format!("lock task: {e}")))??;
    // A crash of an earlier attempt must not wedge this one: resume a guest its cut left
    // stopped, drop bitmaps without a manifest; ids stay above every bitmap's.
    let cleaned = crate::leftovers::clean(qmp, store, name).await?;
    let ident = attach::identify(qmp, std::path::Path::new(qmp.target())).await?;
    let id = store.reserve_id(name, cleaned.highest_bitmap)?;
    progress(&format!(
        "checkpoint {id} of {name}: {} MiB RAM, {} writable disk(s)",
        ident.ram_bytes >> 20,
        ident.disks.len()
    ));
    let mut undo = Undo::default();
    match arm(qmp, store, name, id, &ident, opts, None, &mut undo).await {
        Ok(armed) => Ok(Prepared {
            qmp: qmp.clone(),
            store: store.clone(),
            name: name.to_owned(),
            id,
            ident,
            opts: opts.clone(),
            armed,
            undo,
            started,
            vm,
            shared,
        }),
        Err(e) => {
            drop(shared);
            undo.run(qmp, store).await;
            Err(e)
        }
    }
}

/// Takes the cut of a checkpoint of the guest behind `qmp`: returns once the guest runs
/// again, with memory and disks still being saved.
pub async fn begin(
    qmp: &Qmp,
    store: &Store,
    name: &str,
    opts: &Options,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Pending, CheckpointError> {
    prepare(qmp, store, name, opts, progress).await?.cut(progress).await
}

impl Prepared {
    /// The id the checkpoint will have.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Pauses the guest for the cut and resumes it; returns with memory and disks still
    /// being saved.
    pub async fn cut(self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<Pending, CheckpointError> {
        let Prepared { qmp, store, name, id, ident, opts, armed, mut undo, started, vm, shared } = self;
        let background = armed.background;
        // Marked before `stop`: if this process dies with the guest stopped, the next
        // attach resumes it.
        if let Err(e) = crate::leftovers::mark_cut(&store, &name, qmp.peer_pid()) {
            drop(shared);
            undo.run(&qmp, &store).await;
            return Err(e.into());
        }
        undo.cut_marker = Some(store.cut_marker(&name));
        let mut result = fire(&qmp, &ident, armed, started, &mut undo, progress).await;
        // Some refusals of background-snapshot come only at `migrate` (memory backends
        // without userfaultfd write-protect): undo, and cut again by stop-and-copy.
        if let Err(CheckpointError::Qemu { step: "migrate", source: source @ QmpError::Qemu { .. } }) = &result
            && background
        {
            let reason = format!("background-snapshot refused: {source}");
            tracing::warn!(vm = %name, %reason, "falling back to stop-and-copy");
            progress(&format!("{reason}; falling back to stop-and-copy"));
            std::mem::take(&mut undo).run(&qmp, &store).await;
            let _ = crate::leftovers::mark_cut(&store, &name, qmp.peer_pid());
            undo.cut_marker = Some(store.cut_marker(&name));
            let fallback = Options { stop_and_copy: true, ..opts.clone() };
            result = match arm(&qmp, &store, &name, id, &ident, &fallback, Some(reason), &mut undo).await {
                Ok(armed) => fire(&qmp, &ident, armed, started, &mut undo, progress).await,
                Err(e) => Err(e),
            };
        }
        match result {
            Ok(cut) => {
                crate::leftovers::unmark_cut(&store, &name);
                undo.cut_marker = None;
                Ok(Pending { qmp, store, name, id, ident, cut, undo, _vm: vm, shared })
            }
            Err(e) => {
                tracing::warn!(vm = %name, id, error = %e, "checkpoint aborted at the cut");
                drop(shared);
                undo.run(&qmp, &store).await;
                Err(e)
            }
        }
    }

    /// Gives the armed checkpoint up: targets and capabilities undone, the guest untouched.
    pub async fn abort(self) {
        let Prepared { qmp, store, undo, shared, armed, .. } = self;
        let mut sink = armed.sink;
        if let Some(saver) = sink.take_saver() {
            saver.abort();
        }
        drop(shared);
        undo.run(&qmp, &store).await;
    }
}

impl Pending {
    /// The id the checkpoint will have.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// How long the guest was paused for the cut.
    pub fn pause_ms(&self) -> f64 {
        self.cut.pause_ms
    }

    /// Stores the rest and commits the manifest to the store.
    pub async fn finish(self, progress: &mut (dyn FnMut(&str) + Send)) -> Result<Durable, CheckpointError> {
        let Pending { qmp, store, name, id, ident, cut, mut undo, _vm, shared } = self;
        let new_bitmaps: Vec<(String, String)> =
            cut.plans.iter().map(|p| (p.info.node.clone(), p.new_bitmap.clone())).collect();
        let result = take_rest(&qmp, &store, &name, id, &ident, cut, &mut undo, progress).await;
        let committed = match result {
            Ok(mut manifest) => {
                let t = Instant::now();
                let (s, w) = (store.clone(), undo.writer.clone());
                let committed = tokio::task::spawn_blocking(move || {
                    let w = w.ok_or_else(|| CheckpointError::Migration("no block writer".into()))?;
                    s.commit(&mut manifest, &w).map(|digest| (manifest, digest)).map_err(CheckpointError::Store)
                })
                .await
                .unwrap_or_else(|e| Err(CheckpointError::Migration(format!("commit task: {e}"))));
                match committed {
                    Ok((mut manifest, digest)) => {
                        undo.writer = None;
                        manifest.timings.sync_ms = ms(t.elapsed());
                        Ok((manifest, digest))
                    }
                    Err(e) => {
                        undo.bitmaps = new_bitmaps.clone();
                        Err(e)
                    }
                }
            }
            Err(e) => Err(e),
        };
        drop(shared);
        match committed {
            Ok((manifest, digest)) => {
                tracing::info!(vm = %name, id, pause_ms = manifest.timings.pause_ms, "checkpoint stored");
                let old_bitmaps = ident
                    .disks
                    .iter()
                    .flat_map(|d| {
                        d.bitmaps
                            .iter()
                            .filter(|b| b.name.starts_with(BITMAP_PREFIX))
                            .map(move |b| (d.node.clone(), b.name.clone()))
                    })
                    .collect();
                Ok(Durable { manifest, digest, old_bitmaps, new_bitmaps })
            }
            Err(e) => {
                tracing::warn!(vm = %name, id, error = %e, "checkpoint aborted");
                undo.run(&qmp, &store).await;
                Err(e)
            }
        }
    }

    /// Gives the checkpoint up: QEMU's jobs are cancelled, its new bitmaps removed, the
    /// blocks it stored deleted when nothing else uses them.
    pub async fn abort(self) {
        let Pending { qmp, store, cut, mut undo, shared, .. } = self;
        let mut sink = cut.sink;
        if let Some(saver) = sink.take_saver() {
            undo.migrating = true;
            saver.abort();
        }
        drop(shared);
        undo.run(&qmp, &store).await;
    }
}

impl Durable {
    /// The checkpoint is final: the bitmaps of the checkpoints before it go; the next
    /// checkpoint builds on this one's.
    pub async fn retire(&self, qmp: &Qmp) {
        for (node, name) in &self.old_bitmaps {
            let _ = qmp.execute_raw("block-dirty-bitmap-remove", json!({"node": node, "name": name})).await;
        }
    }

    /// The checkpoint is given up after all: its manifest and new bitmaps go, the bitmaps
    /// of the checkpoint it built on stay, so the next copy is incremental from there.
    pub async fn discard(&self, qmp: &Qmp, store: &Store) -> Result<(), StoreError> {
        for (node, name) in &self.new_bitmaps {
            let _ = qmp.execute_raw("block-dirty-bitmap-remove", json!({"node": node, "name": name})).await;
        }
        store.discard_async(&self.manifest.name, self.manifest.id).await
    }
}

/// What the cut leaves for the rest of the checkpoint to finish.
struct Cut {
    plans: Vec<DiskPlan>,
    sink: Sink,
    policy: Policy,
    writer: Writer,
    events: Events,
    background: bool,
    mode_reason: Option<String>,
    pause_ms: f64,
    started: Instant,
}

/// What is set up before the cut: backup targets, migration capabilities, the sink.
struct Armed {
    plans: Vec<DiskPlan>,
    sink: Sink,
    background: bool,
    mode_reason: Option<String>,
    policy: Policy,
    writer: Writer,
}

/// Arms a checkpoint: everything that can happen before the guest is paused.
#[allow(clippy::too_many_arguments)]
async fn arm(
    qmp: &Qmp,
    store: &Store,
    name: &str,
    id: u64,
    ident: &VmIdentity,
    opts: &Options,
    fallback_reason: Option<String>,
    undo: &mut Undo,
) -> Result<Armed, CheckpointError> {
    let policy = Policy::new(store.estimates());
    // The view the writer deduplicates against is listed now, under the shared lock.
    let s = store.clone();
    let writer = tokio::task::spawn_blocking(move || s.writer())
        .await
        .map_err(|e| CheckpointError::Migration(format!("writer task: {e}")))??;
    undo.writer = Some(writer.clone());
    clear_leftovers(qmp).await?;
    let plans = plan_disks(store, name, id, ident, opts)?;
    for p in &plans {
        disk::create_target(&p.target, p.info.virtual_size)
            .map_err(|source| CheckpointError::Disk { node: p.info.node.clone(), source })?;
        undo.targets.push((p.target_node.clone(), p.target.clone()));
        qmp.execute_raw(
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": p.target_node, "backing": null,
                   "file": {"driver": "file", "filename": p.target}}),
        )
        .await
        .map_err(qemu("add backup target"))?;
    }

    // Mode: background-snapshot when QEMU accepts it.
    let mut mode_reason = None;
    let mut caps = vec![json!({"capability": "events", "state": true})];
    let background = if opts.stop_and_copy {
        mode_reason = Some(fallback_reason.unwrap_or_else(|| "stop-and-copy requested".to_owned()));
        caps.push(json!({"capability": "background-snapshot", "state": false}));
        false
    } else {
        match qmp
            .execute_raw(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "background-snapshot", "state": true}]}),
            )
            .await
        {
            Ok(_) => true,
            Err(e @ QmpError::Qemu { .. }) => {
                mode_reason = Some(format!("background-snapshot unavailable: {e}"));
                false
            }
            Err(e) => return Err(qemu("enable background-snapshot")(e)),
        }
    };
    qmp.execute_raw("migrate-set-capabilities", json!({"capabilities": caps}))
        .await
        .map_err(qemu("set migration capabilities"))?;

    // Where QEMU writes memory and device state: a mapped-ram file when QEMU supports it
    // (pages at fixed offsets, so blocks line up across checkpoints), else the
    // sequential stream through a pipe.
    // The mapped-ram file is staged whole before it is stored: it needs room for the
    // guest's RAM beside the blocks. Short of that, the stream needs none.
    let staging_free = nix::sys::statvfs::statvfs(&store.tmp())
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
        .unwrap_or(u64::MAX);
    let room = staging_free >= ident.ram_bytes.saturating_mul(2).saturating_add(STAGING_MARGIN);
    if !room && !opts.stream_memory {
        tracing::info!(
            free_mib = staging_free >> 20,
            ram_mib = ident.ram_bytes >> 20,
            "too little room to stage a mapped-ram file: streaming memory"
        );
    }
    let sink = sink::open(qmp, store, &writer, name, id, &policy, !opts.stream_memory && room).await?;
    match &sink {
        Sink::File { path, fdset } => undo.file = Some((*fdset, path.clone())),
        Sink::Pipe { .. } => undo.pipe = true,
    }

    Ok(Armed { plans, sink, background, mode_reason, policy, writer })
}

/// The cut: from pausing the guest to it running again.
async fn fire(
    qmp: &Qmp,
    ident: &VmIdentity,
    armed: Armed,
    started: Instant,
    undo: &mut Undo,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Cut, CheckpointError> {
    let Armed { plans, mut sink, background, mode_reason, policy, writer } = armed;
    // The cut.
    let mut events = Events { stream: qmp.subscribe(), seen: Vec::new() };
    let was_running = ident.status == "running";
    progress("cut: stopping the guest");
    // One write, three commands, run by QEMU in order: `stop` (its STOP event is read
    // later, for its timestamp), the disk cut, and the memory cut. Pipelining spares the
    // paused guest two round trips.
    let mut actions = Vec::new();
    for p in &plans {
        let persistent = p.info.format == "qcow2";
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": p.info.node, "name": p.new_bitmap, "persistent": persistent, "granularity": CHUNK}}));
        let mut backup = json!({"job-id": p.job, "device": p.info.node, "target": p.target_node, "auto-dismiss": true});
        match &p.base {
            Some((bitmap, _)) => {
                backup["sync"] = json!("bitmap");
                backup["bitmap"] = json!(bitmap);
                backup["bitmap-mode"] = json!("never");
            }
            None if p.info.backing.is_some() => backup["sync"] = json!("top"),
            None => backup["sync"] = json!("full"),
        }
        actions.push(json!({"type": "blockdev-backup", "data": backup}));
    }
    let mut cmds = vec![("stop", json!({}))];
    if !plans.is_empty() {
        cmds.push(("transaction", json!({"actions": actions})));
    }
    cmds.push(("migrate", json!({"uri": sink.uri()})));
    let cut_at = Instant::now();
    let mut results = qmp.execute_raw_pipelined(&cmds).await.into_iter();
    let stopped = results.next().unwrap_or(Ok(Value::Null));
    undo.stopped = was_running && stopped.is_ok();
    let disk_cut = if plans.is_empty() { Ok(Value::Null) } else { results.next().unwrap_or(Ok(Value::Null)) };
    if disk_cut.is_ok() {
        for p in &plans {
            undo.bitmaps.push((p.info.node.clone(), p.new_bitmap.clone()));
            undo.jobs.push(p.job.clone());
        }
    }
    let migrating = results.next().unwrap_or(Ok(Value::Null));
    undo.migrating = migrating.is_ok();
    crate::failpoint::hit("sidecar-mid-cut");
    stopped.map_err(qemu("stop"))?;
    disk_cut.map_err(qemu("disk cut (transaction)"))?;
    migrating.map_err(qemu("migrate"))?;
    tracing::debug!(after_ms = ms(cut_at.elapsed()), "stop, disk cut and migrate done");
    if background {
        // RAM pages flow only after device state is saved and write tracking is on.
        let flowing = sink.ram_flowing();
        tokio::select! {
            _ = flowing => {}
            r = events.wait("MIGRATION", |e| matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled"))) => {
                let e = r?;
                if e.data["status"] != "completed" {
                    return Err(migration_failed(qmp, &mut sink).await);
                }
            }
        }
    } else {
        let e = events
            .wait("MIGRATION", |e| matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled")))
            .await?;
        if e.data["status"] != "completed" {
            return Err(migration_failed(qmp, &mut sink).await);
        }
    }
    let mut pause_ms = ms(cut_at.elapsed());
    tracing::debug!(after_ms = pause_ms, "memory cut done");
    if was_running {
        cont_after_migration(qmp).await?;
        undo.stopped = false;
        let stop = events.wait("STOP", |_| true).await?;
        let resume = events.wait("RESUME", |_| true).await?;
        pause_ms = (resume.timestamp_us - stop.timestamp_us) as f64 / 1000.0;
    }
    progress(&format!("cut done: guest paused {pause_ms:.1} ms; saving memory while it runs"));
    Ok(Cut { plans, sink, events, background, mode_reason, pause_ms, started, policy, writer })
}

/// The rest: memory and disks stored while the guest runs; returns the manifest to commit.
#[allow(clippy::too_many_arguments)]
async fn take_rest(
    qmp: &Qmp,
    store: &Store,
    name: &str,
    id: u64,
    ident: &VmIdentity,
    cut: Cut,
    undo: &mut Undo,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Manifest, CheckpointError> {
    let Cut { plans, mut sink, mut events, background, mode_reason, pause_ms, started, policy, writer } = cut;
    // Memory: the rest of the stream, while the guest runs.
    let mem_started = Instant::now();
    if background {
        loop {
            let e = events.wait("", |e| e.name == "MIGRATION" || e.name == "STOP").await?;
            if e.name == "STOP" {
                return Err(CheckpointError::NotAtomic("QEMU stopped the guest again after the cut".into()));
            }
            match e.data["status"].as_str() {
                Some("completed") => break,
                Some("failed" | "cancelled") => return Err(migration_failed(qmp, &mut sink).await),
                _ => {}
            }
        }
    }
    undo.migrating = false;
    let out = sink.collect(qmp, &writer, policy).await?;
    undo.file = None;
    let stream = out.result.map_err(CheckpointError::Memory)?;
    let mut policy = out.policy;
    let memory_ms = ms(mem_started.elapsed());
    progress(&format!("memory saved: {} MiB stream, {} KiB new", stream.bytes >> 20, stream.bytes_stored >> 10));

    // Disks: wait for each job, then fold what it copied into the base map.
    let disks_started = Instant::now();
    let mut disks = Vec::new();
    let mut pending: Vec<&DiskPlan> = plans.iter().collect();
    let mut finished: BTreeMap<String, Option<String>> = BTreeMap::new();
    // Jobs that ended before we subscribed show up as absent from query-block-jobs.
    while !pending.is_empty() {
        let jobs = qmp.execute_raw("query-block-jobs", json!({})).await.map_err(qemu("query-block-jobs"))?;
        for p in &pending {
            let running = jobs.as_array().is_some_and(|js| js.iter().any(|j| j["device"] == p.job.as_str()));
            if !running && !finished.contains_key(&p.job) {
                finished.insert(p.job.clone(), None);
            }
        }
        pending.retain(|p| !finished.contains_key(&p.job));
        if pending.is_empty() {
            break;
        }
        let e = events.wait("", |e| matches!(e.name.as_str(), "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")).await?;
        let dev = e.data["device"].as_str().unwrap_or("").to_owned();
        let err = if e.name == "BLOCK_JOB_CANCELLED" {
            Some("cancelled".to_owned())
        } else {
            e.data["error"].as_str().map(str::to_owned)
        };
        finished.insert(dev, err);
    }
    for p in &plans {
        if let Some(Some(why)) = finished.get(&p.job) {
            return Err(CheckpointError::Backup { node: p.info.node.clone(), why: why.clone() });
        }
    }
    undo.jobs.clear();
    for p in &plans {
        qmp.execute_raw("blockdev-del", json!({"node-name": p.target_node}))
            .await
            .map_err(qemu("remove backup target"))?;
        let base = p.base.as_ref().map(|(_, m)| m.clone()).unwrap_or_default();
        let node = p.info.node.clone();
        let target = p.target.clone();
        let size = p.info.virtual_size;
        let w = writer.clone();
        let mut pol = policy.clone();
        let folded = tokio::task::spawn_blocking(move || {
            let r = disk::fold(&node, &target, &base, size, &w, &mut pol);
            (r, pol)
        })
        .await
        .map_err(|e| CheckpointError::Migration(format!("disk task: {e}")))?;
        policy = folded.1;
        let disk::Folded { map, stored, copied } =
            folded.0.map_err(|source| CheckpointError::Disk { node: p.info.node.clone(), source })?;
        let _ = std::fs::remove_file(&p.target);
        progress(&format!("disk {}: {} KiB copied, {} KiB new", p.info.node, copied >> 10, stored >> 10));
        disks.push(Disk {
            node: p.info.node.clone(),
            device: p.info.device.clone(),
            filename: p.info.filename.clone(),
            format: p.info.format.clone(),
            virtual_size: p.info.virtual_size,
            cluster_size: p.info.cluster_size,
            chunk_size: CHUNK,
            backing: p.backing.clone(),
            chunks: map.into_iter().collect(),
            full: p.base.is_none(),
            full_reason: p.full_reason.clone(),
            bytes_stored: stored,
            bytes_copied: copied,
        });
    }
    undo.targets.clear();
    let disks_ms = ms(disks_started.elapsed());

    // The read-only files a relaunch reads, stored once by hash. Their blocks belong to
    // the durable base index, not to this checkpoint: no undo removes them.
    let mut wanted = crate::store::bases::named_in_argv(&ident.argv, ident.cwd.as_deref());
    wanted.extend(
        plans.iter().filter_map(|p| p.backing.as_ref()).map(|b| ("backing".to_owned(), b.filename.clone().into())),
    );
    let (s, mut pol, w) = (store.clone(), policy.clone(), writer.clone());
    let stored_bases = tokio::task::spawn_blocking(move || {
        let mut out: Vec<Base> = Vec::new();
        let mut stored = 0;
        for (role, path) in wanted {
            let path_text = path.display().to_string();
            if out.iter().any(|b| b.path == path_text) {
                continue;
            }
            // A file gone since QEMU opened it (a kernel in a temp dir) does not fail the
            // checkpoint: the guest runs from memory; only a relaunch elsewhere needs it.
            match s.put_base(&role, &path, &w, &mut pol) {
                Ok((base, new)) => {
                    stored += new;
                    out.push(base);
                }
                Err(StoreError::Io { what: crate::store::bases::UNREADABLE, path, source }) => {
                    tracing::warn!(path = %path.display(), "{role} not stored: {source}");
                }
                Err(e) => return Err(e),
            }
        }
        Ok::<_, StoreError>((out, pol, stored))
    })
    .await
    .map_err(|e| CheckpointError::Migration(format!("base image task: {e}")))??;
    let (bases, bases_policy, bases_stored) = stored_bases;
    policy = bases_policy;
    if bases_stored > 0 {
        progress(&format!("base images: {} stored once, {} KiB new", bases.len(), bases_stored >> 10));
    }
    store.save_estimates(&policy.estimates());

    let bytes_stored = stream.bytes_stored + disks.iter().map(|d| d.bytes_stored).sum::<u64>() + bases_stored;
    let parent =
        plans.iter().find_map(|p| p.base.as_ref()).and_then(|(b, _)| b.strip_prefix(BITMAP_PREFIX)?.parse().ok());
    // From the commit on, the new bitmaps belong to the checkpoint: no undo removes them.
    undo.bitmaps.clear();
    Ok(Manifest {
        format: FORMAT,
        id,
        name: name.to_owned(),
        parent,
        created_unix_ms: now_ms(),
        mode: if background { "background-snapshot" } else { "stop-and-copy" }.to_owned(),
        mode_reason,
        qemu_version: ident.qemu_version.clone(),
        qemu_package: ident.qemu_package.clone(),
        machine: ident.machine.clone(),
        ram_bytes: ident.ram_bytes,
        argv: ident.argv.clone(),
        cwd: ident.cwd.as_ref().map(|c| c.display().to_string()),
        qmp: ident.qmp_path.display().to_string(),
        pidfile: ident.pidfile.clone(),
        memory: stream,
        disks,
        bases,
        packs: Vec::new(),
        timings: Timings { pause_ms, duration_ms: ms(started.elapsed()), memory_ms, disks_ms, sync_ms: 0.0 },
        bytes_stored,
        checksum: String::new(),
    })
}

/// `cont` once QEMU lets the guest run: right after a completed migration it may still
/// be finalizing ("Migration is not finalized yet") for a moment.
pub(crate) async fn cont_after_migration(qmp: &Qmp) -> Result<(), CheckpointError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match qmp.execute_raw("cont", json!({})).await {
            Ok(_) => return Ok(()),
            Err(QmpError::Qemu { desc, .. }) if desc.contains("not finalized") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(qemu("cont")(e)),
        }
    }
}

/// A suffix no other attempt of this or another process uses.
fn unique() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{}-{}-{nanos}", std::process::id(), SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
}

/// Removes what an attempt whose sidecar died left in QEMU: backup jobs, targets, a
/// migration in progress. Their names are cutline's own.
pub(crate) async fn clear_leftovers(qmp: &Qmp) -> Result<(), CheckpointError> {
    let jobs = qmp.execute_raw("query-block-jobs", json!({})).await.map_err(qemu("query-block-jobs"))?;
    let ours: Vec<String> = jobs
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["device"].as_str().filter(|d| d.starts_with("cutline-backup-")).map(str::to_owned))
        .collect();
    for j in &ours {
        tracing::warn!(job = %j, "cancelling a backup job left by an earlier attempt");
        let _ = qmp.execute_raw("block-job-cancel", json!({"device": j, "force": true})).await;
    }
    let migration = qmp.execute_raw("query-migrate", json!({})).await.map_err(qemu("query-migrate"))?;
    if matches!(migration["status"].as_str(), Some("setup" | "active" | "device" | "pre-switchover")) {
        tracing::warn!("cancelling a migration left by an earlier attempt");
        let _ = qmp.execute_raw("migrate_cancel", json!({})).await;
    }
    for _ in 0..250 {
        let jobs = qmp.execute_raw("query-block-jobs", json!({})).await.map_err(qemu("query-block-jobs"))?;
        let busy = jobs.as_array().is_some_and(|js| {
            js.iter().any(|j| j["device"].as_str().is_some_and(|d| d.starts_with("cutline-backup-")))
        });
        let m = qmp.execute_raw("query-migrate", json!({})).await.map_err(qemu("query-migrate"))?;
        let migrating =
            matches!(m["status"].as_str(), Some("setup" | "active" | "device" | "pre-switchover" | "cancelling"));
        if !busy && !migrating {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let nodes = qmp
        .execute_raw("query-named-block-nodes", json!({"flat": true}))
        .await
        .map_err(qemu("query-named-block-nodes"))?;
    for n in nodes.as_array().into_iter().flatten() {
        if let Some(name) = n["node-name"].as_str().filter(|n| n.starts_with("cutline-target-")) {
            tracing::warn!(node = name, "removing a backup target left by an earlier attempt");
            let _ = qmp.execute_raw("blockdev-del", json!({"node-name": name})).await;
        }
    }
    Ok(())
}

/// Decides per disk whether the copy can be incremental, and names its work files.
fn plan_disks(
    store: &Store,
    name: &str,
    id: u64,
    ident: &VmIdentity,
    opts: &Options,
) -> Result<Vec<DiskPlan>, CheckpointError> {
    let mut plans = Vec::new();
    for d in &ident.disks {
        let mut full_reason = None;
        let mut base = None;
        // The newest of our bitmaps on the node names the checkpoint the copy builds on.
        let ours: Vec<_> = d
            .bitmaps
            .iter()
            .filter_map(|b| Some((b.name.strip_prefix(BITMAP_PREFIX)?.parse::<u64>().ok()?, b)))
            .collect();
        // Bitmaps of attempts that never became checkpoints (a sidecar died mid-epoch) do
        // not count: the newest bitmap whose checkpoint exists is the base.
        let newest =
            ours.iter().filter(|(k, _)| store.ids(name).is_ok_and(|ids| ids.contains(k))).max_by_key(|(k, _)| *k);
        let newest = newest.or_else(|| ours.iter().max_by_key(|(k, _)| *k));
        match newest {
            _ if opts.full => full_reason = Some("full copy requested".to_owned()),
            None => full_reason = Some("first checkpoint of this disk (no cutline bitmap)".to_owned()),
            Some((_, b)) if b.inconsistent => {
                full_reason = Some(format!("bitmap {} is inconsistent (QEMU exited uncleanly)", b.name));
            }
            Some((k, b)) => match store.manifest(name, *k) {
                Ok(m) => match m.disks.iter().find(|x| x.node == d.node && x.virtual_size == d.virtual_size) {
                    Some(prev) => base = Some((b.name.clone(), prev.chunks.iter().cloned().collect())),
                    None => full_reason = Some(format!("checkpoint {k} has no disk {} of this size", d.node)),
                },
                Err(_) => full_reason = Some(format!("checkpoint {k} of bitmap {} is not in the store", b.name)),
            },
        }
        let backing = match &d.backing {
            Some((file, format)) => {
                let path = std::path::Path::new(file);
                let sha256 = crate::store::bases::hash_cached(path).map_err(|source| StoreError::Io {
                    what: "cannot hash backing image",
                    path: path.to_owned(),
                    source,
                })?;
                let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
                Some(Backing { filename: file.clone(), format: format.clone(), sha256, size })
            }
            None => None,
        };
        let safe = d.node.replace(|c: char| !c.is_ascii_alphanumeric(), "_");
        plans.push(DiskPlan {
            info: d.clone(),
            base,
            full_reason,
            target: store.tmp().join(format!("{name}-{id}-{safe}-{}.qcow2", unique())),
            target_node: format!("cutline-target-{safe}"),
            job: format!("cutline-backup-{safe}"),
            new_bitmap: format!("{BITMAP_PREFIX}{id}"),
            backing,
        });
    }
    let _ = ZERO;
    Ok(plans)
}

/// QMP events with a backlog: a wait takes the first matching event, seen before or
/// arriving now, and keeps the others for later waits. Cancel-safe (usable in `select!`).
struct Events {
    stream: EventStream,
    seen: Vec<qmp_client::Event>,
}

impl Events {
    /// Waits for an event named `name` (any name if empty) satisfying `pred`.
    async fn wait(
        &mut self,
        name: &str,
        mut pred: impl FnMut(&qmp_client::Event) -> bool,
    ) -> Result<qmp_client::Event, CheckpointError> {
        let mut matches = |e: &qmp_client::Event| (name.is_empty() || e.name == name) && pred(e);
        if let Some(i) = self.seen.iter().position(&mut matches) {
            return Ok(self.seen.remove(i));
        }
        let timeout = Duration::from_secs(600);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Ok(Some(e)) if matches(&e) => return Ok(e),
                Ok(Some(e)) => self.seen.push(e),
                Ok(None) => {
                    return Err(CheckpointError::QemuGone(format!(
                        "QMP closed while waiting for {}",
                        if name.is_empty() { "an event" } else { name }
                    )));
                }
                Err(_) => {
                    return Err(qemu("wait for QEMU")(QmpError::Timeout { what: name.to_owned(), after: timeout }));
                }
            }
        }
    }
}

/// Why the migration failed: the saver's own error when it stopped reading (the store
/// failed, e.g. its disk is full), else QEMU's description.
async fn migration_failed(qmp: &Qmp, sink: &mut Sink) -> CheckpointError {
    if let Some(task) = sink.take_saver()
        && let Ok(Ok(out)) = tokio::time::timeout(Duration::from_secs(5), task).await
        && let Err(e) = out.result
    {
        return CheckpointError::Memory(e);
    }
    CheckpointError::Migration(migration_error(qmp).await)
}

async fn migration_error(qmp: &Qmp) -> String {
    match qmp.execute_raw("query-migrate", json!({})).await {
        Ok(v) => v["error-desc"].as_str().unwrap_or("no error description").to_owned(),
        Err(e) => e.to_string(),
    }
}
