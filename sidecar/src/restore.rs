//! Restoring a checkpoint: a new QEMU from the recorded argv, fed the saved state.
//!
//! Every block is verified before the running guest is touched; the disks are rebuilt
//! next to the originals and swapped in by rename once the old QEMU is gone; the new
//! QEMU starts with `-incoming defer -S`, gets the stream through a pipe (each block's
//! sha256 checked again on the way), gets fresh dirty bitmaps so the next checkpoint can
//! be incremental, and is resumed unless asked to stay paused. It outlives the sidecar.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qmp_client::{Qmp, QmpError};
use serde::Serialize;
use serde_json::json;

mod place;
mod trust;

use crate::checkpoint::BITMAP_PREFIX;
use crate::disk::{self, CHUNK, DiskError};
use crate::memory;
use crate::store::{BlockError, Manifest, Store, StoreError, Trust, hash_file};

const FD_NAME: &str = "cutline-incoming";

/// Errors of a restore. Before `Relaunch` nothing was changed; the store is never changed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A block of the checkpoint is damaged or missing: nothing was touched.
    #[error("checkpoint {id} of {name} is damaged, refusing to restore")]
    Damaged {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// The first damaged block.
        #[source]
        source: BlockError,
    },
    /// The rebuilt mapped-ram file would load no RAM (or not all of it).
    #[error("checkpoint {id} of {name}: its memory file cannot be loaded")]
    MemoryFile {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// What is wrong with it.
        #[source]
        source: crate::mapped_ram::MappedRamError,
    },
    /// The backing image changed since the checkpoint.
    #[error("backing image {file} changed since the checkpoint (sha256 {actual}, recorded {recorded})")]
    BackingChanged {
        /// The file.
        file: String,
        /// Its hash now.
        actual: String,
        /// The recorded hash.
        recorded: String,
    },
    /// Rebuilding a disk failed.
    #[error("cannot rebuild disk {node}")]
    Disk {
        /// The node.
        node: String,
        /// The cause.
        #[source]
        source: DiskError,
    },
    /// The running guest could not be stopped.
    #[error("cannot stop the running guest (pid {pid})")]
    Stop {
        /// Its pid.
        pid: i32,
    },
    /// QEMU could not be relaunched.
    #[error("cannot relaunch QEMU: {0}")]
    Relaunch(String),
    /// A QMP step on the relaunched QEMU failed.
    #[error("restore step `{step}` failed")]
    Qemu {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// The incoming migration failed.
    #[error("loading the saved state failed: {0}")]
    Incoming(String),
    /// The manifest's program is not a QEMU system emulator.
    #[error("checkpoint {id} of {name}: refusing to run {program}: {why}")]
    NotQemu {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// argv[0].
        program: String,
        /// Why it is refused.
        why: String,
    },
    /// The manifest would have restore write a file that is not one of the VM's disks.
    #[error("checkpoint {id} of {name}: refusing to write {path}: {why}")]
    NotADisk {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// The file.
        path: String,
        /// Why it is refused.
        why: String,
    },
    /// A path the checkpoint's relaunch needs cannot exist on this host.
    #[error("checkpoint {id} of {name} cannot be relaunched here: {path}: {why}")]
    Path {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
    /// A QEMU of this VM still runs after it was stopped: relaunching would run it twice.
    #[error("QEMU of {qmp} still runs (pid {pids:?}): not relaunching a second instance")]
    StillRuns {
        /// The VM's QMP socket.
        qmp: String,
        /// The processes.
        pids: Vec<i32>,
    },
}

/// How to restore.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The checkpoint (the newest when `None`).
    pub id: Option<u64>,
    /// Leave the guest paused.
    pub paused: bool,
    /// The manifest digest a commit record holds: restore refuses any other manifest.
    pub digest: Option<String>,
    /// The QEMU the caller knows runs this VM now: (pid, start time).
    pub running: Option<(i32, Option<u64>)>,
}

fn qemu(step: &'static str) -> impl FnOnce(QmpError) -> RestoreError {
    move |source| RestoreError::Qemu { step, source }
}

/// What a restore reports (the CLI's JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Checkpoint id.
    pub id: u64,
    /// VM name.
    pub name: String,
    /// Whole restore.
    pub duration_ms: f64,
    /// From the old QEMU's end to the new one's resume (or readiness when paused).
    pub downtime_ms: f64,
    /// Reading the checkpoint and rebuilding its files (disks, memory file, bases), before
    /// the old QEMU was stopped.
    pub fetch_ms: f64,
    /// pid of the new QEMU.
    pub pid: i32,
    /// Left paused.
    pub paused: bool,
    /// The QMP socket of the new QEMU.
    pub qmp: String,
}

/// The argv to relaunch with: the recorded one without `-incoming`/`-S`, plus
/// `-incoming defer -S`.
pub fn relaunch_argv(argv: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len() + 3);
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-incoming" | "--incoming" => {
                it.next();
            }
            "-S" => {}
            _ => out.push(a.clone()),
        }
    }
    out.extend(["-incoming".to_owned(), "defer".to_owned(), "-S".to_owned()]);
    out
}

/// Restores checkpoint `id` (newest when `None`) of `name`; leaves the guest paused if `paused`.
pub async fn restore(
    store: &Store,
    name: &str,
    id: Option<u64>,
    paused: bool,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Report, RestoreError> {
    restore_with(store, name, &Options { id, paused, ..Options::default() }, progress).await
}

/// Restores a checkpoint of `name` as `opts` says.
pub async fn restore_with(
    store: &Store,
    name: &str,
    opts: &Options,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Report, RestoreError> {
    let (id, paused) = (opts.id, opts.paused);
    let started = Instant::now();
    // A checkpoint being armed or stored holds the VM for a moment: wait for it.
    let _vm = store.lock_vm_within(name, Duration::from_secs(30)).await?;
    // Reading the store may be a network request: off the async threads, so that the
    // sidecar's heartbeats go on while a slow store answers.
    let (s, n, digest) = (store.clone(), name.to_owned(), opts.digest.clone());
    let m = tokio::task::spawn_blocking(move || {
        let id = match id {
            Some(id) => id,
            None => *s.ids(&n)?.last().ok_or_else(|| StoreError::NoCheckpoint {
                name: n.clone(),
                id: "any".into(),
                store: s.root().to_owned(),
            })?,
        };
        // Only a manifest a commit record names, or the store signed, is trusted; and
        // even then only to run QEMU and to write the VM's own disks.
        let trust = match &digest {
            Some(d) => Trust::Committed(d),
            None => Trust::Signed,
        };
        s.trusted_manifest(&n, id, trust)
    })
    .await
    .map_err(|e| RestoreError::Relaunch(format!("manifest task: {e}")))??;
    let id = m.id;
    trust::check_program(&m)?;
    trust::check_disks(&m, store)?;
    progress(&format!("verifying checkpoint {id} of {name}"));
    let blocks = store.blocks().clone();
    let hashes: Vec<String> = m.blocks().map(str::to_owned).collect();
    let packs = m.packs.clone();
    let check = tokio::task::spawn_blocking(move || {
        // The packs the manifest names: a restore reads their indexes, then the blocks.
        blocks.load(&packs)?;
        let mut seen = std::collections::BTreeSet::new();
        for h in hashes {
            if seen.insert(h.clone()) {
                blocks.get(&h)?;
            }
        }
        Ok::<_, BlockError>(())
    })
    .await
    .map_err(|e| RestoreError::Relaunch(format!("verify task: {e}")))?;
    check.map_err(|source| RestoreError::Damaged { name: name.to_owned(), id, source })?;
    // On a host the VM never ran on (or one that lost its files): directories, then bases.
    place::make_dirs(&m)?;
    let (mm, s) = (m.clone(), store.clone());
    let fetched = tokio::task::spawn_blocking(move || place::fetch_bases(&mm, &s))
        .await
        .map_err(|e| RestoreError::Relaunch(format!("base task: {e}")))??;
    if !fetched.is_empty() {
        progress(&format!("fetched {} base image(s) from the store", fetched.len()));
        tracing::info!(vm = name, id, ?fetched, "base images fetched from the store");
    }
    for d in &m.disks {
        if let Some(b) = &d.backing {
            let actual = hash_file(Path::new(&b.filename)).map_err(|source| StoreError::Io {
                what: "cannot read backing image",
                path: b.filename.clone().into(),
                source,
            })?;
            if actual != b.sha256 {
                return Err(RestoreError::BackingChanged {
                    file: b.filename.clone(),
                    actual,
                    recorded: b.sha256.clone(),
                });
            }
        }
    }

    // Rebuild disks beside the originals while the old guest still runs. Every work file
    // goes on any way out; those renamed into place are no longer there to go. The store
    // is held shared meanwhile, so a gc does not take the work files in tmp/.
    let s = store.clone();
    let held = tokio::task::spawn_blocking(move || s.lock_shared())
        .await
        .map_err(|e| RestoreError::Relaunch(format!("lock task: {e}")))??;
    let mut work = WorkFiles { files: Vec::new(), _store: Some(held) };
    let mut staged = Vec::new();
    for d in &m.disks {
        progress(&format!("rebuilding disk {} ({} chunks)", d.node, d.chunks.len()));
        let original = resolve(&m, &d.filename);
        let tmp = original.with_file_name(format!(
            ".{}.cutline-restore",
            original.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
        ));
        work.files.push(tmp.clone());
        let (disk, blocks, t, o) = (d.clone(), store.blocks().clone(), tmp.clone(), original.clone());
        let r = tokio::task::spawn_blocking(move || {
            disk::write_image(&disk, &blocks, &t)?;
            disk::take_identity(&o, &t)
        })
        .await
        .map_err(|e| RestoreError::Relaunch(format!("disk task: {e}")))?;
        r.map_err(|source| RestoreError::Disk { node: d.node.clone(), source })?;
        staged.push((tmp, original));
    }

    // A mapped-ram checkpoint is loaded from a file: rebuild it now, before the old guest goes.
    let ram_file = if m.memory.layout == "mapped-ram" {
        let path = store.tmp().join(format!("restore-{name}-{id}.ram"));
        progress(&format!("rebuilding the {} MiB memory file", m.memory.bytes >> 20));
        work.files.push(path.clone());
        let (p, blocks, stream) = (path.clone(), store.blocks().clone(), m.memory.clone());
        let r = tokio::task::spawn_blocking(move || {
            memory::restore_file(&p, &blocks, &stream)?;
            // QEMU 10.0 loads no RAM from a file whose page bitmaps are empty, and says nothing.
            Ok(crate::mapped_ram::check(&p).map(|_| ()))
        })
        .await
        .map_err(|e| RestoreError::Relaunch(format!("memory task: {e}")))?;
        r.map_err(|source| RestoreError::Damaged { name: name.to_owned(), id, source })?
            .map_err(|source| RestoreError::MemoryFile { name: name.to_owned(), id, source })?;
        Some(path)
    } else {
        None
    };

    // From here the old guest goes away.
    let qmp_path = resolve(&m, &m.qmp);
    let down_at = Instant::now();
    let fetch_ms = started.elapsed().as_secs_f64() * 1000.0;
    stop_running(&qmp_path, m.pidfile.as_deref().map(|p| resolve(&m, p)), opts.running).await?;
    // Relaunch only when no QEMU of this VM is left: never two instances on one disk.
    let left = qemus_serving(&qmp_path);
    if !left.is_empty() {
        return Err(RestoreError::StillRuns { qmp: qmp_path.display().to_string(), pids: left });
    }
    crate::failpoint::hit("sidecar-during-restore");
    for (tmp, original) in &staged {
        std::fs::rename(tmp, original)
            .map_err(|e| RestoreError::Relaunch(format!("cannot put {} in place: {e}", original.display())))?;
        if let Some(dir) = original.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
    progress("relaunching QEMU");
    let log = store.root().join("vms").join(name).join("qemu.log");
    let pid = launch(&m, &log)?;
    let started_at = crate::process::start_time(pid);
    // Until it runs the restored guest, the new QEMU is ours: a failure kills it.
    let loaded = load(&m, store, &qmp_path, pid, &log, paused, ram_file.as_deref(), progress).await;
    drop(work);
    match loaded {
        Ok(pid) => {
            let downtime_ms = down_at.elapsed().as_secs_f64() * 1000.0;
            tracing::info!(vm = name, id, pid, "restored");
            Ok(Report {
                id,
                name: name.to_owned(),
                duration_ms: started.elapsed().as_secs_f64() * 1000.0,
                downtime_ms,
                fetch_ms,
                pid,
                paused,
                qmp: qmp_path.display().to_string(),
            })
        }
        Err(e) => {
            if let Some(start) = started_at {
                let _ = crate::process::kill_checked(pid, start);
            }
            Err(e)
        }
    }
}

/// Loads the saved state into the relaunched QEMU, adds bitmaps, resumes; returns its pid.
#[allow(clippy::too_many_arguments)]
async fn load(
    m: &Manifest,
    store: &Store,
    qmp_path: &Path,
    pid: i32,
    log: &Path,
    paused: bool,
    ram_file: Option<&Path>,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<i32, RestoreError> {
    let (name, id) = (m.name.as_str(), m.id);
    let qmp = connect_new(qmp_path, pid, log).await?;
    let pid = qmp.peer_pid().unwrap_or(pid);

    qmp.execute_raw("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}))
        .await
        .map_err(qemu("enable migration events"))?;
    let mut events = qmp.subscribe();
    progress(&format!("loading {} MiB of saved state", m.memory.bytes >> 20));
    let feeder = match ram_file {
        Some(path) => {
            qmp.execute_raw(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "mapped-ram", "state": true}]}),
            )
            .await
            .map_err(qemu("enable mapped-ram"))?;
            let file = std::fs::File::open(path)
                .map_err(|e| RestoreError::Relaunch(format!("cannot open {}: {e}", path.display())))?;
            let info = qmp
                .add_fd(std::os::fd::AsFd::as_fd(&file), None, Some("cutline restore"))
                .await
                .map_err(qemu("pass the memory file"))?;
            let fdset = info["fdset-id"].as_i64().unwrap_or(0);
            qmp.execute_raw("migrate-incoming", json!({"uri": format!("file:/dev/fdset/{fdset}")}))
                .await
                .map_err(qemu("migrate-incoming"))?;
            None
        }
        None => {
            let (read_end, write_end) =
                nix::unistd::pipe().map_err(|e| RestoreError::Relaunch(format!("pipe: {e}")))?;
            qmp.getfd(FD_NAME, std::os::fd::AsFd::as_fd(&read_end)).await.map_err(qemu("pass the state pipe"))?;
            drop(read_end);
            qmp.execute_raw("migrate-incoming", json!({"uri": format!("fd:{FD_NAME}")}))
                .await
                .map_err(qemu("migrate-incoming"))?;
            let (blocks, stream) = (store.blocks().clone(), m.memory.clone());
            Some(tokio::task::spawn_blocking(move || memory::feed_stream(write_end, &blocks, &stream)))
        }
    };
    let done = events
        .wait_for(
            "MIGRATION",
            |e| matches!(e.data["status"].as_str(), Some("completed" | "failed" | "cancelled")),
            Duration::from_secs(600),
        )
        .await
        .map_err(qemu("wait for the incoming migration"))?;
    let fed = match feeder {
        Some(f) => f.await.map_err(|e| RestoreError::Incoming(format!("feeder task: {e}")))?.map(|_| ()),
        None => Ok(()),
    };
    if done.data["status"] != "completed" {
        let why = qmp
            .execute_raw("query-migrate", json!({}))
            .await
            .ok()
            .and_then(|v| v["error-desc"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "no error description".into());
        return Err(RestoreError::Incoming(why));
    }
    fed.map_err(|source| RestoreError::Damaged { name: name.to_owned(), id, source })?;

    // Fresh bitmaps at the restored instant: the next checkpoint is incremental from here.
    for d in &m.disks {
        let bitmap = format!("{BITMAP_PREFIX}{id}");
        let _ = qmp.execute_raw("block-dirty-bitmap-remove", json!({"node": d.node, "name": bitmap})).await;
        qmp.execute_raw(
            "block-dirty-bitmap-add",
            json!({"node": d.node, "name": bitmap, "persistent": d.format == "qcow2", "granularity": CHUNK}),
        )
        .await
        .map_err(qemu("add dirty bitmap"))?;
    }
    if !paused {
        crate::checkpoint::cont_after_migration(&qmp)
            .await
            .map_err(|e| RestoreError::Incoming(crate::store::error_chain(&e)))?;
    }
    Ok(pid)
}

/// Work files of a restore, removed when it ends, however it ends; the store stays held
/// shared until they are gone.
struct WorkFiles {
    files: Vec<PathBuf>,
    _store: Option<crate::store::Lock>,
}

impl Drop for WorkFiles {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// `p` of the manifest, relative to QEMU's recorded working directory.
pub(crate) fn resolve(m: &Manifest, p: &str) -> PathBuf {
    match &m.cwd {
        Some(cwd) if Path::new(p).is_relative() => Path::new(cwd).join(p),
        _ => PathBuf::from(p),
    }
}

/// QEMU processes (by argv[0]) whose command line names `qmp_path`: the instances of this
/// VM, found without its QMP socket (which may be busy or gone).
pub fn qemus_serving(qmp_path: &Path) -> Vec<i32> {
    let needle = qmp_path.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let mut args = cmdline.split(|&b| b == 0).map(String::from_utf8_lossy);
        let is_qemu = args.next().is_some_and(|a0| {
            Path::new(a0.as_ref()).file_name().is_some_and(|f| f.to_string_lossy().starts_with("qemu-system"))
        });
        if is_qemu && args.any(|a| a.contains(&needle)) && !crate::process::is_gone(pid) {
            out.push(pid);
        }
    }
    out
}

/// Stops the guest that runs on `qmp_path` now, if any: `quit`, then SIGKILL after 10 s.
/// Its pid comes from QMP, else from what the caller knows (checked by start time), else
/// the pidfile, else the process table.
async fn stop_running(
    qmp_path: &Path,
    pidfile: Option<PathBuf>,
    known: Option<(i32, Option<u64>)>,
) -> Result<(), RestoreError> {
    let connected = tokio::time::timeout(Duration::from_secs(3), Qmp::connect(qmp_path)).await;
    let (pid, asked) = match connected {
        Ok(Ok(qmp)) => {
            let pid = qmp.peer_pid();
            let asked = qmp.execute_raw("quit", json!({})).await.is_ok();
            (pid, asked)
        }
        _ => (
            known
                .filter(|(p, start)| crate::process::runs(*p, *start))
                .map(|(p, _)| p)
                .or_else(|| {
                    pidfile
                        .and_then(|p| std::fs::read_to_string(p).ok())
                        .and_then(|s| s.trim().parse().ok())
                        .filter(|p| qemus_serving(qmp_path).contains(p))
                })
                .or_else(|| qemus_serving(qmp_path).first().copied()),
            false,
        ),
    };
    let Some(pid) = pid else { return Ok(()) };
    // The process found now, named by its start time: a pid reused while we wait is not it.
    let Some(start) = crate::process::start_time(pid) else { return Ok(()) };
    let alive = || crate::process::runs(pid, Some(start));
    // A QEMU that took `quit` gets 10 s to exit cleanly; one that could not be asked
    // (its QMP socket busy or gone) is killed at once.
    let first = if asked { 0 } else { 499 };
    for i in first..500 {
        if !alive() {
            return Ok(());
        }
        if i == 499 {
            let _ = crate::process::kill_checked(pid, start);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..100 {
        if !alive() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(RestoreError::Stop { pid })
}

/// Starts QEMU detached from the sidecar (own session, output to `log`); returns its pid.
fn launch(m: &Manifest, log: &Path) -> Result<i32, RestoreError> {
    let argv = relaunch_argv(&m.argv);
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| RestoreError::Relaunch(format!("cannot open {}: {e}", log.display())))?;
    let err = out.try_clone().map_err(|e| RestoreError::Relaunch(e.to_string()))?;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(out).stderr(err);
    if let Some(cwd) = &m.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: setsid is async-signal-safe; the new QEMU leaves our session and process
    // group so that it outlives the sidecar and its terminal.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
    let mut child = cmd.spawn().map_err(|e| RestoreError::Relaunch(format!("cannot run {}: {e}", argv[0])))?;
    let pid = child.id() as i32;
    if m.argv.iter().any(|a| a == "-daemonize" || a == "--daemonize") {
        // The parent exits once the daemon is up; the daemon's pid is in the pidfile.
        let _ = child.wait();
        let pidfile = m.pidfile.as_deref().map(|p| resolve(m, p));
        if let Some(pid) = pidfile.and_then(|p| std::fs::read_to_string(p).ok()).and_then(|s| s.trim().parse().ok()) {
            return Ok(pid);
        }
    } else {
        // Reap it if it exits while we run; it is not ours to kill.
        std::thread::spawn(move || {
            let _ = child.wait();
        });
    }
    Ok(pid)
}

/// Connects to the relaunched QEMU's QMP socket, or reports why QEMU did not come up.
async fn connect_new(qmp_path: &Path, pid: i32, log: &Path) -> Result<Qmp, RestoreError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(q) = Qmp::connect(qmp_path).await {
            return Ok(q);
        }
        let gone = crate::process::is_gone(pid);
        if gone || Instant::now() > deadline {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(RestoreError::Relaunch(format!(
                "QEMU did not open {} ({}): {}",
                qmp_path.display(),
                if gone { "it exited" } else { "timed out" },
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relaunch_argv_replaces_incoming_and_pauses() {
        let argv: Vec<String> =
            ["qemu", "-m", "128", "-incoming", "tcp:0:4444", "-S", "-name", "x"].map(String::from).into();
        assert_eq!(relaunch_argv(&argv), ["qemu", "-m", "128", "-name", "x", "-incoming", "defer", "-S"]);
    }
}
