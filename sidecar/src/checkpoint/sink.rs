//! Where QEMU writes a checkpoint's memory and device state, and storing it once the
//! migration completed: a mapped-ram file when QEMU supports it (pages at fixed
//! offsets, stored as fixed blocks that line up across checkpoints, whatever the order
//! the pages were saved in), else the sequential stream through a pipe, stored in
//! content-defined chunks as it comes.
//!
//! QEMU 10.0 leaves the page bitmaps of a background snapshot's mapped-ram file empty
//! (docs/QEMU-MAPPED-RAM-BUG.md); [`Sink::collect`] repairs them before storing.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qmp_client::{Qmp, QmpError};
use serde_json::json;
use tokio::sync::watch;

use super::{CheckpointError, qemu};
use crate::store::manifest::Stream;
use crate::store::{BlockError, Policy, Store, StoreError, Writer};
use crate::{mapped_ram, memory};

/// Stream bytes after which RAM pages flow. Before write tracking starts QEMU writes only
/// the stream header and setup sections (192 bytes for a plain PC guest, a few KiB with
/// many RAM blocks). Should a guest's setup ever exceed this, `cont` would come before
/// QEMU's own stop for the snapshot; the STOP that follows is caught and the checkpoint
/// aborted, never committed inconsistent.
const RAM_FLOWING: u64 = 16 << 10;
/// Name of the pipe's fd in QEMU.
pub(super) const FD_NAME: &str = "cutline-migration";
/// Pipe capacity for the migration stream (the default is 64 KiB).
const PIPE_BYTES: i32 = 1 << 20;
/// Longest wait for the first RAM page in a mapped-ram file.
const FLOWING_WAIT: Duration = Duration::from_secs(30);

/// Where QEMU writes the migration.
pub(super) enum Sink {
    /// A mapped-ram file in the store's work directory, passed to QEMU as an fd set.
    File { path: PathBuf, fdset: i64 },
    /// A pipe read by a task that stores content-defined chunks as they come.
    Pipe { saver: Option<tokio::task::JoinHandle<SaverOut>>, count: watch::Receiver<u64> },
}

/// What the task saving the migration hands back.
pub(super) struct SaverOut {
    pub result: Result<Stream, BlockError>,
    pub policy: Policy,
}

/// Sets the migration format (mapped-ram when `mapped_ram` and QEMU supports it) and
/// opens where it goes.
pub(super) async fn open(
    qmp: &Qmp,
    store: &Store,
    writer: &Writer,
    name: &str,
    id: u64,
    policy: &Policy,
    mapped_ram: bool,
) -> Result<Sink, CheckpointError> {
    let mapped = qmp
        .execute_raw(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "mapped-ram", "state": mapped_ram}]}),
        )
        .await
        .and_then(|v| {
            if mapped_ram {
                Ok(v)
            } else {
                Err(QmpError::Qemu { command: "mapped-ram".into(), class: "Unwanted".into(), desc: String::new() })
            }
        });
    match mapped {
        Ok(_) => {
            let path = store.tmp().join(format!("{name}-{id}.ram"));
            // A fresh, empty file: the bitmap repair reads holes as pages never written.
            let _ = std::fs::remove_file(&path);
            let file = crate::store::private::create(&path).map_err(|source| {
                CheckpointError::Store(StoreError::Io { what: "cannot create", path: path.clone(), source })
            })?;
            let info = qmp
                .add_fd(std::os::fd::AsFd::as_fd(&file), None, Some("cutline migration"))
                .await
                .map_err(qemu("pass the migration file"))?;
            let fdset = info["fdset-id"].as_i64().unwrap_or(0);
            Ok(Sink::File { path, fdset })
        }
        Err(QmpError::Qemu { .. }) => {
            tracing::debug!(mapped_ram, "streaming memory through a pipe");
            let (read_end, write_end) = nix::unistd::pipe().map_err(|e| {
                CheckpointError::Memory(BlockError::Write {
                    hash: "(pipe)".into(),
                    path: "pipe".into(),
                    source: e.into(),
                })
            })?;
            // A larger pipe lets QEMU run ahead of the store by more than 64 KiB.
            let _ = nix::fcntl::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&write_end),
                nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_BYTES),
            );
            qmp.getfd(FD_NAME, std::os::fd::AsFd::as_fd(&write_end)).await.map_err(qemu("pass the migration pipe"))?;
            drop(write_end);
            let (count_tx, count) = watch::channel(0u64);
            let writer = writer.clone();
            let mut saver_policy = policy.clone();
            let saver = tokio::task::spawn_blocking(move || {
                let r = memory::save_stream(read_end, &writer, &mut saver_policy, count_tx);
                SaverOut { result: r, policy: saver_policy }
            });
            Ok(Sink::Pipe { saver: Some(saver), count })
        }
        Err(e) => Err(qemu("enable mapped-ram")(e)),
    }
}

impl Sink {
    /// The migration URI.
    pub(super) fn uri(&self) -> String {
        match self {
            Sink::File { fdset, .. } => format!("file:/dev/fdset/{fdset}"),
            Sink::Pipe { .. } => format!("fd:{FD_NAME}"),
        }
    }

    /// Resolves once RAM pages are being written, which QEMU does only after the device
    /// state is saved and RAM is write-protected (or after [`FLOWING_WAIT`]).
    pub(super) async fn ram_flowing(&mut self) {
        match self {
            Sink::Pipe { count, .. } => {
                let _ = count.wait_for(|n| *n >= RAM_FLOWING).await;
            }
            Sink::File { path, .. } => {
                let path = path.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    // The setup records (block headers) come first; then any data in a
                    // block's page area is a page saved with write tracking on.
                    let start = Instant::now();
                    let mut blocks = None;
                    while start.elapsed() < FLOWING_WAIT {
                        if let Ok(f) = std::fs::File::open(&path) {
                            if blocks.is_none() {
                                blocks = mapped_ram::parse(&f, &path).ok();
                            }
                            if let Some(b) = &blocks
                                && mapped_ram::any_page_written(&f, b).unwrap_or(false)
                            {
                                return;
                            }
                        }
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    tracing::warn!(path = %path.display(), "no RAM page in the mapped-ram file after 30 s");
                })
                .await;
            }
        }
    }

    /// The saver task of a pipe, to abort it.
    pub(super) fn take_saver(&mut self) -> Option<tokio::task::JoinHandle<SaverOut>> {
        match self {
            Sink::Pipe { saver, .. } => saver.take(),
            Sink::File { .. } => None,
        }
    }

    /// After the migration completed: the stored stream. A mapped-ram file has its page
    /// bitmaps repaired first, and is removed.
    pub(super) async fn collect(
        &mut self,
        qmp: &Qmp,
        writer: &Writer,
        policy: Policy,
    ) -> Result<SaverOut, CheckpointError> {
        match self {
            Sink::Pipe { saver, .. } => {
                let task =
                    saver.take().ok_or_else(|| CheckpointError::Migration("saver task already consumed".into()))?;
                task.await.map_err(|e| CheckpointError::Migration(format!("saver task: {e}")))
            }
            Sink::File { path, fdset } => {
                let _ = qmp.execute_raw("remove-fd", json!({"fdset-id": fdset})).await;
                let (path, writer) = (path.clone(), writer.clone());
                let mut policy = policy;
                tokio::task::spawn_blocking(move || {
                    let out = mapped_ram::repair(&path).map(|fixed| {
                        for b in fixed.iter().filter(|b| b.rewritten) {
                            tracing::debug!(block = %b.name, pages = b.pages, present = b.present, "bitmap written");
                        }
                        let r = memory::save_file(&path, &writer, &mut policy);
                        SaverOut { result: r, policy }
                    });
                    let _ = std::fs::remove_file(&path);
                    out
                })
                .await
                .map_err(|e| CheckpointError::Migration(format!("saver task: {e}")))?
                .map_err(CheckpointError::MemoryFile)
            }
        }
    }
}
