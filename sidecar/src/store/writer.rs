//! Writing the blocks of one checkpoint into packs.
//!
//! A [`Writer`] is made at the start of a checkpoint, after the store's view was
//! refreshed. Its blocks are hashed (and compressed when that pays) on the caller's
//! thread, so several callers (memory, disks, base images, the threads of one memory
//! file) hash and compress on all cores at once; they are appended to one open pack,
//! and sealed packs are stored by an uploader thread while the callers go on. Each pack
//! is stored before its index object, and every pack is acknowledged before
//! [`Writer::finish`] returns, so a manifest written after it names only stored packs.
//!
//! A writer deduplicates against the view (packs listed when it started) and against
//! its own packs; its own packs join the shared view only once a manifest names them
//! ([`Writer::publish`]), so no other writer can come to depend on a pack an aborted
//! checkpoint deletes.

use std::collections::HashMap;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::blocks::{BlockError, Blocks, Hash, Put, digest_bytes, hex, index_bytes, index_key, pack_key};
use super::compress::Policy;
use super::manifest::ZERO;
use super::pack::{CODEC_RAW, CODEC_ZSTD, Entry, PackBuilder, Sealed};

/// Sealed packs waiting for the uploaders: bounds the memory a slow store costs.
const QUEUED_PACKS: usize = 2;
/// Packs stored at once (a server takes parallel uploads faster than one at a time).
const UPLOADERS: usize = 4;

/// The blocks of one checkpoint being written; cheap to clone, shared by its threads.
#[derive(Debug, Clone)]
pub struct Writer {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    blocks: Blocks,
    /// Deduplicate against the view (not when repacking blocks that are in it).
    view: bool,
    window: Duration,
    started: Instant,
    state: Mutex<State>,
    upload: Mutex<Option<Uploader>>,
    done: Arc<Mutex<Done>>,
}

#[derive(Debug, Default)]
struct State {
    open: PackBuilder,
    /// This writer's blocks: `None` while in the open pack, else the index of the sealed
    /// pack in `sealed`.
    own: HashMap<[u8; 32], Option<u32>>,
    sealed: Vec<(Hash, Vec<Entry>)>,
}

#[derive(Debug)]
struct Uploader {
    tx: SyncSender<Sealed>,
    threads: Vec<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Done {
    /// Packs stored (their index may not be).
    stored: Vec<Hash>,
    error: Option<BlockError>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Writer {
    /// A writer into `blocks`, whose view the caller has just refreshed. With a gc
    /// safety window, it refuses to finish after half of it.
    pub fn new(blocks: Blocks, window: Duration) -> Writer {
        Self::make(blocks, window, true)
    }

    /// A writer that stores every block once, whether the view holds it or not: gc's,
    /// moving live blocks out of mostly-dead packs.
    pub fn isolated(blocks: Blocks) -> Writer {
        Self::make(blocks, Duration::ZERO, false)
    }

    fn make(blocks: Blocks, window: Duration, view: bool) -> Writer {
        let done = Arc::new(Mutex::new(Done::default()));
        let (tx, rx) = sync_channel::<Sealed>(QUEUED_PACKS);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..UPLOADERS)
            .map(|_| {
                let (objects, d, rx) = (blocks.objects().clone(), done.clone(), rx.clone());
                std::thread::spawn(move || {
                    loop {
                        let Ok(pack) = lock(&rx).recv() else { return };
                        if lock(&d).error.is_some() {
                            continue;
                        }
                        let what = format!("cannot store pack {}", pack.name);
                        let r = objects.put(&pack_key(&pack.name), &pack.bytes).and_then(|()| {
                            lock(&d).stored.push(pack.name.clone());
                            let index = index_bytes(pack.bytes.len() as u64, pack.trailer());
                            objects.put(&index_key(&pack.name), &index)
                        });
                        if let Err(source) = r {
                            lock(&d).error = Some(BlockError::Objects { what, source: Box::new(source) });
                        }
                    }
                })
            })
            .collect();
        Writer {
            inner: Arc::new(Inner {
                blocks,
                view,
                window,
                started: Instant::now(),
                state: Mutex::default(),
                upload: Mutex::new(Some(Uploader { tx, threads })),
                done,
            }),
        }
    }

    /// The blocks this writer writes into.
    pub fn blocks(&self) -> &Blocks {
        &self.inner.blocks
    }

    /// Stores `data` unless the view or this writer already holds it; compresses it by
    /// `policy`.
    pub fn put(&self, data: &[u8], policy: &mut Policy) -> Result<Put, BlockError> {
        if let Some(e) = &lock(&self.inner.done).error {
            return Err(BlockError::Upload { why: super::error_chain(e) });
        }
        let digest: [u8; 32] = Sha256::digest(data).into();
        let (hash, len) = (hex(&digest), data.len() as u64);
        let known = Put { hash: hash.clone(), len, stored: 0 };
        if (self.inner.view && self.inner.blocks.listed(&digest)) || lock(&self.inner.state).own.contains_key(&digest) {
            return Ok(known);
        }
        let mut compressed = None;
        if policy.should_try() {
            let t = Instant::now();
            if let Ok(c) = zstd::bulk::compress(data, 1) {
                policy.observe_compression(data.len(), c.len(), t.elapsed());
                // The compression is paid for now: keep it whenever it is smaller.
                if c.len() < data.len() {
                    compressed = Some(c);
                }
            }
        }
        let (codec, payload) = match &compressed {
            Some(c) => (CODEC_ZSTD, c.as_slice()),
            None => (CODEC_RAW, data),
        };
        let sealed = {
            let mut st = lock(&self.inner.state);
            if st.own.contains_key(&digest) {
                return Ok(known);
            }
            st.open.push(digest, codec, payload, data.len() as u32);
            st.own.insert(digest, None);
            if st.open.full() { Some(seal(&mut st)) } else { None }
        };
        if let Some(pack) = sealed {
            self.send(pack)?;
        }
        Ok(Put { hash, len, stored: payload.len() as u64 + 1 })
    }

    fn send(&self, pack: Sealed) -> Result<(), BlockError> {
        let up = lock(&self.inner.upload);
        let gone = || BlockError::Damaged { hash: pack.name.clone(), why: "the writer is finished".into() };
        let tx = up.as_ref().map(|u| u.tx.clone()).ok_or_else(gone)?;
        drop(up);
        let name = pack.name.clone();
        tx.send(pack).map_err(|_| BlockError::Damaged { hash: name, why: "the uploader stopped".into() })
    }

    /// Seals the open pack and waits until every pack is stored. Errors if a pack could
    /// not be stored, or (with a safety window) the checkpoint took over half of it.
    pub fn finish(&self) -> Result<(), BlockError> {
        let last = {
            let mut st = lock(&self.inner.state);
            if st.open.is_empty() { None } else { Some(seal(&mut st)) }
        };
        if let Some(pack) = last {
            self.send(pack)?;
        }
        self.stop();
        if let Some(e) = lock(&self.inner.done).error.take() {
            return Err(e);
        }
        let took = self.inner.started.elapsed();
        if !self.inner.window.is_zero() && took > self.inner.window / 2 {
            return Err(BlockError::TooSlow { took_s: took.as_secs(), window_s: self.inner.window.as_secs() });
        }
        Ok(())
    }

    fn stop(&self) {
        if let Some(Uploader { tx, threads }) = lock(&self.inner.upload).take() {
            drop(tx);
            for t in threads {
                let _ = t.join();
            }
        }
    }

    /// The packs that hold `hashes` (after [`Writer::finish`]): this writer's, or the
    /// view's. Zero blocks need none.
    pub fn packs_of<'a>(&self, hashes: impl IntoIterator<Item = &'a str>) -> Result<Vec<Hash>, BlockError> {
        let st = lock(&self.inner.state);
        let mut out = std::collections::BTreeSet::new();
        for h in hashes {
            if h == ZERO {
                continue;
            }
            let missing = || BlockError::Missing { hash: h.to_owned(), store: self.inner.blocks.objects().describe() };
            let d = digest_bytes(h).ok_or_else(missing)?;
            match st.own.get(&d) {
                Some(Some(i)) => {
                    out.insert(st.sealed[*i as usize].0.clone());
                }
                Some(None) => return Err(missing()),
                None => match self.inner.blocks.pack_of(h) {
                    Some(p) => {
                        out.insert(p);
                    }
                    // A block of the parent a store written before packs holds as a file.
                    None if self.inner.blocks.in_v1(h) => {}
                    None => return Err(missing()),
                },
            }
        }
        Ok(out.into_iter().collect())
    }

    /// The packs this writer stored.
    pub fn stored(&self) -> Vec<Hash> {
        lock(&self.inner.done).stored.clone()
    }

    /// Makes this writer's packs part of the view, once a manifest names them.
    pub fn publish(&self) {
        self.inner.blocks.publish(&lock(&self.inner.state).sealed);
    }

    /// Gives the checkpoint up: stops the uploader; returns the packs it stored, for the
    /// caller to delete those no manifest names.
    pub fn abort(&self) -> Vec<Hash> {
        self.stop();
        self.stored()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(Uploader { tx, threads }) = lock(&self.upload).take() {
            drop(tx);
            for t in threads {
                let _ = t.join();
            }
        }
    }
}

/// Seals the open pack, recording where its blocks went.
fn seal(st: &mut State) -> Sealed {
    let sealed = std::mem::take(&mut st.open).finish();
    let i = st.sealed.len() as u32;
    for e in &sealed.entries {
        st.own.insert(e.hash, Some(i));
    }
    st.sealed.push((sealed.name.clone(), sealed.entries.clone()));
    sealed
}
