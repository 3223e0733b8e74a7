//! A local checkpoint store: content-addressed blocks shared by every VM of the store,
//! and per VM the manifests of its checkpoints.
//!
//! ```text
//! STORE/blocks/ab/abcdef…   block files (sha256 of the uncompressed content)
//! STORE/vms/NAME/ID.json     manifests; a checkpoint exists once its manifest does
//! STORE/vms/NAME/ID.hmac     the manifest's tag under the store's key (written first)
//! STORE/bases/SHA256.json    read-only files (kernels, firmware, backing images) stored once
//! STORE/key                  the store's signing key
//! STORE/tmp/                 work files, on the same filesystem for renames
//! STORE/lock                 shared by writers of blocks and by restores' work files,
//!                            exclusive for gc
//! STORE/vms/NAME/lock        one operation per VM at a time
//! ```
//!
//! Everything the store creates is its owner's alone (directories 0700, files 0600), and
//! a store whose root others can write is refused.

pub mod bases;
pub mod blocks;
pub mod compress;
pub mod key;
pub mod manifest;
pub mod pack;
pub use cutline_objects::private;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

pub use bases::{Base, BaseIndex};
pub use blocks::{BlockError, Blocks, Hash, Put};
pub use compress::{Estimates, Policy};
pub use key::{Key, KeyError};
pub use manifest::{Manifest, ManifestError};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store directory cannot be created or written.
    #[error("store {path} is not writable")]
    NotWritable {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another operation holds the lock.
    #[error("{what} is busy: another cutline operation holds {path}")]
    Busy {
        /// What is locked.
        what: String,
        /// The lock file.
        path: PathBuf,
    },
    /// No such checkpoint.
    #[error("no checkpoint {id} of VM {name} in {store}")]
    NoCheckpoint {
        /// VM name.
        name: String,
        /// Checkpoint id (or "any").
        id: String,
        /// Store path.
        store: PathBuf,
    },
    /// A manifest is unreadable or damaged.
    #[error("checkpoint manifest {path} is unusable")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ManifestError,
    },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A block operation failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// Others than its owner can write the store's root: whoever can would choose what a
    /// restore runs and overwrites.
    #[error("store {path} is writable by others (mode {mode:o}): make it its owner's alone (chmod 0700)")]
    Exposed {
        /// The root.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The store's key is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A manifest is not the one the store signed (or a commit record names).
    #[error("checkpoint {id} of VM {name}: manifest {path} is not trusted: {why}")]
    Untrusted {
        /// VM name.
        name: String,
        /// Checkpoint id.
        id: u64,
        /// The manifest file.
        path: PathBuf,
        /// What does not match.
        why: String,
    },
}

/// What a manifest read for a restore must match.
#[derive(Debug, Clone, Copy)]
pub enum Trust<'a> {
    /// The sha256 of the manifest a cluster commit record holds.
    Committed(&'a str),
    /// The tag the store put beside it under its key (a single VM's own checkpoints).
    Signed,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { what, path: path.to_owned(), source }
}

/// An opened store.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    blocks: Blocks,
}

/// A held lock; released on drop.
pub struct Lock(#[allow(dead_code)] Flock<File>);

/// A damaged block and the checkpoints it breaks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Damage {
    /// The block (or manifest/backing file) at fault.
    pub item: String,
    /// What is wrong.
    pub why: String,
    /// Checkpoints that cannot be restored because of it: (name, id).
    pub breaks: Vec<(String, u64)>,
}

/// What gc did.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct GcReport {
    /// Checkpoint ids removed.
    pub removed: Vec<u64>,
    /// Checkpoint ids kept.
    pub kept: Vec<u64>,
    /// Blocks deleted.
    pub blocks_removed: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, checking that it is writable by its
    /// owner alone; a new store gets its key.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        let not_writable = |source| StoreError::NotWritable { path: root.to_owned(), source };
        private::create_dir_all(root).map_err(not_writable)?;
        check_root(root)?;
        for d in ["blocks", "vms", "tmp"] {
            private::create_dir_all(&root.join(d)).map_err(not_writable)?;
        }
        let probe = root.join("tmp").join(format!(".probe-{}", std::process::id()));
        private::create(&probe).and_then(|mut f| f.write_all(b"x")).map_err(not_writable)?;
        let _ = std::fs::remove_file(&probe);
        Key::open_or_create(&root.join("key"))?;
        Ok(Store { blocks: Blocks::new(root.join("blocks"), root.join("tmp")), root: root.to_owned() })
    }

    /// Opens an existing store for reading; errors if `root` is not a store.
    pub fn open_existing(root: &Path) -> Result<Store, StoreError> {
        if !root.join("vms").is_dir() || !root.join("blocks").is_dir() {
            return Err(StoreError::Io {
                what: "not a cutline store (no vms/ and blocks/):",
                path: root.to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        check_root(root)?;
        Ok(Store { blocks: Blocks::new(root.join("blocks"), root.join("tmp")), root: root.to_owned() })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The block directory.
    pub fn blocks(&self) -> &Blocks {
        &self.blocks
    }

    /// The work directory.
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.root.join("vms").join(name)
    }

    fn lock(&self, path: PathBuf, what: String, arg: FlockArg) -> Result<Lock, StoreError> {
        if let Some(p) = path.parent() {
            private::create_dir_all(p).map_err(io("cannot create", p))?;
        }
        let f = private::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        Flock::lock(f, arg).map(Lock).map_err(|_| StoreError::Busy { what, path })
    }

    /// Locks VM `name` for one operation (checkpoint, restore, gc) without waiting.
    pub fn lock_vm(&self, name: &str) -> Result<Lock, StoreError> {
        self.lock(self.vm_dir(name).join("lock"), format!("VM {name}"), FlockArg::LockExclusiveNonblock)
    }

    /// Locks VM `name` for one operation, waiting up to `within` while another operation
    /// (a checkpoint finishing, a restore) holds it for a moment; then `Busy`.
    pub async fn lock_vm_within(&self, name: &str, within: std::time::Duration) -> Result<Lock, StoreError> {
        let deadline = std::time::Instant::now() + within;
        loop {
            match self.lock_vm(name) {
                Err(StoreError::Busy { .. }) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await
                }
                r => return r,
            }
        }
    }

    /// Locks VM `name` for the lifetime of its sidecar agent, without waiting: a second
    /// agent for the same VM gets `Busy`.
    pub fn lock_owner(&self, name: &str) -> Result<Lock, StoreError> {
        self.lock(self.vm_dir(name).join("owner"), format!("VM {name}'s sidecar"), FlockArg::LockExclusiveNonblock)
    }

    /// The marker a cut leaves while it has the guest stopped: `vms/NAME/cutting`.
    pub fn cut_marker(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("cutting")
    }

    /// Shared store lock, held while blocks are written that no manifest references yet.
    pub fn lock_shared(&self) -> Result<Lock, StoreError> {
        self.lock(self.root.join("lock"), "the store".into(), FlockArg::LockShared)
    }

    /// Exclusive store lock, for gc.
    pub fn lock_exclusive(&self) -> Result<Lock, StoreError> {
        self.lock(self.root.join("lock"), "the store".into(), FlockArg::LockExclusive)
    }

    /// Exclusive store lock without waiting: `Err` when another writer is active.
    pub fn lock_exclusive_nonblocking(&self) -> Result<Lock, StoreError> {
        self.lock(self.root.join("lock"), "the store".into(), FlockArg::LockExclusiveNonblock)
    }

    /// Names of the VMs with checkpoints.
    pub fn names(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("vms");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io("cannot list", &dir))? {
            let e = e.map_err(io("cannot list", &dir))?;
            if e.path().is_dir() {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
        out.sort();
        Ok(out)
    }

    /// Checkpoint ids of VM `name`, oldest first.
    pub fn ids(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        let dir = self.vm_dir(name);
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut ids: Vec<u64> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()))
            .collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn manifest_path(&self, name: &str, id: u64) -> PathBuf {
        self.vm_dir(name).join(format!("{id:010}.json"))
    }

    fn tag_path(&self, name: &str, id: u64) -> PathBuf {
        self.vm_dir(name).join(format!("{id:010}.hmac"))
    }

    fn read_manifest(&self, name: &str, id: u64) -> Result<(PathBuf, Vec<u8>), StoreError> {
        let path = self.manifest_path(name, id);
        let data = std::fs::read(&path).map_err(|_| StoreError::NoCheckpoint {
            name: name.to_owned(),
            id: id.to_string(),
            store: self.root.clone(),
        })?;
        Ok((path, data))
    }

    /// Reads and checks checkpoint `id` of VM `name`.
    pub fn manifest(&self, name: &str, id: u64) -> Result<Manifest, StoreError> {
        let (path, data) = self.read_manifest(name, id)?;
        Manifest::from_bytes(&data).map_err(|source| StoreError::Manifest { path, source })
    }

    /// Reads checkpoint `id` of VM `name` for a restore: the very bytes parsed are the ones
    /// checked against `trust`, and the manifest must name this VM and this checkpoint.
    pub fn trusted_manifest(&self, name: &str, id: u64, trust: Trust<'_>) -> Result<Manifest, StoreError> {
        let (path, data) = self.read_manifest(name, id)?;
        let untrusted = |why: String| StoreError::Untrusted { name: name.to_owned(), id, path: path.clone(), why };
        let digest = blocks::sha256_hex(&data);
        match trust {
            Trust::Committed(expected) => {
                if digest != expected {
                    return Err(untrusted(format!("its sha256 is {digest}, the commit record names {expected}")));
                }
            }
            Trust::Signed => {
                let tag_path = self.tag_path(name, id);
                let tag = std::fs::read_to_string(&tag_path)
                    .map_err(|e| untrusted(format!("no signature {}: {e}", tag_path.display())))?;
                let key = Key::open(&self.root.join("key"))?;
                if !key.verify(name, id, &digest, &tag) {
                    return Err(untrusted(format!("its signature {} does not match", tag_path.display())));
                }
            }
        }
        let m = Manifest::from_bytes(&data).map_err(|source| StoreError::Manifest { path: path.clone(), source })?;
        if m.name != name || m.id != id {
            return Err(untrusted(format!("it describes checkpoint {} of VM {}", m.id, m.name)));
        }
        Ok(m)
    }

    /// sha256 of a manifest file: what a cluster commit record names.
    pub fn manifest_digest(&self, name: &str, id: u64) -> Result<Hash, StoreError> {
        let path = self.manifest_path(name, id);
        let data = std::fs::read(&path).map_err(io("cannot read", &path))?;
        Ok(blocks::sha256_hex(&data))
    }

    /// The newest checkpoint of `name`, if any.
    pub fn latest(&self, name: &str) -> Result<Option<Manifest>, StoreError> {
        match self.ids(name)?.last() {
            Some(&id) => self.manifest(name, id).map(Some),
            None => Ok(None),
        }
    }

    /// The id the next checkpoint of `name` would get: above every manifest and every id
    /// handed out before (`vms/NAME/last-id`).
    pub fn next_id(&self, name: &str) -> Result<u64, StoreError> {
        let manifests = self.ids(name)?.last().copied().unwrap_or(0);
        let issued = std::fs::read_to_string(self.vm_dir(name).join("last-id"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        Ok(manifests.max(issued) + 1)
    }

    /// Hands out the next checkpoint id of `name`, above `above` too (the ids of QEMU
    /// bitmaps): ids are never reused, whatever a crash left. Durable before it returns.
    pub fn reserve_id(&self, name: &str, above: u64) -> Result<u64, StoreError> {
        let id = self.next_id(name)?.max(above + 1);
        let dir = self.vm_dir(name);
        private::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        write_atomically(&dir.join("last-id"), id.to_string().as_bytes())?;
        Ok(id)
    }

    /// Makes every block written so far durable, signs the manifest, then writes it
    /// atomically: temp file, fsync, rename, fsync of the directory. The checkpoint exists
    /// from here.
    pub fn commit(&self, manifest: &mut Manifest) -> Result<PathBuf, StoreError> {
        self.sync()?;
        manifest.seal();
        let dir = self.vm_dir(&manifest.name);
        private::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
        let bytes = manifest.to_bytes();
        let key = Key::open_or_create(&self.root.join("key"))?;
        let tag = key.tag(&manifest.name, manifest.id, &blocks::sha256_hex(&bytes));
        write_atomically(&self.tag_path(&manifest.name, manifest.id), tag.as_bytes())?;
        let path = self.manifest_path(&manifest.name, manifest.id);
        let tmp = self.tmp().join(format!("manifest-{}-{}.json", manifest.name, manifest.id));
        write_durably(&tmp, &bytes)?;
        std::fs::rename(&tmp, &path).map_err(io("cannot rename into place", &path))?;
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", &dir))?;
        Ok(path)
    }

    /// Makes everything written to the store's filesystem so far durable (one `syncfs`).
    pub fn sync(&self) -> Result<(), StoreError> {
        let root = File::open(&self.root).map_err(io("cannot open", &self.root))?;
        nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)).map_err(|e| StoreError::Io {
            what: "cannot sync the filesystem of",
            path: self.root.clone(),
            source: e.into(),
        })
    }

    /// Every block checkpoint `m` needs: its memory and disks, and its stored bases.
    /// A base whose index cannot be read contributes nothing (verify reports it).
    pub fn blocks_of(&self, m: &Manifest) -> Vec<String> {
        let mut out: Vec<String> = m.blocks().map(str::to_owned).collect();
        for b in &m.bases {
            if let Ok(index) = self.base_index(&b.sha256) {
                out.extend(index.blocks.into_iter().map(|(h, _)| h).filter(|h| h != manifest::ZERO));
            }
        }
        out
    }

    /// Removes checkpoint `id` of `name` (a checkpoint its cluster did not commit); its
    /// blocks go at the next gc.
    pub fn discard(&self, name: &str, id: u64) -> Result<(), StoreError> {
        for path in [self.manifest_path(name, id), self.tag_path(name, id)] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StoreError::Io { what: "cannot remove", path, source: e });
                }
                _ => {}
            }
        }
        let dir = self.vm_dir(name);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", &dir))
    }

    /// Compression estimates kept across runs (defaults when none are saved).
    pub fn estimates(&self) -> Estimates {
        std::fs::read(self.root.join("estimates.json"))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    /// Saves compression estimates (best effort: they are only a hint).
    pub fn save_estimates(&self, est: &Estimates) {
        let tmp = self.tmp().join("estimates.json");
        if let Ok(d) = serde_json::to_vec(est)
            && private::create(&tmp).and_then(|mut f| f.write_all(&d)).is_ok()
        {
            let _ = std::fs::rename(&tmp, self.root.join("estimates.json"));
        }
    }

    /// Re-hashes every block of the checkpoints of `name` (or of all VMs), names each
    /// damaged block and the checkpoints it breaks. Also checks manifests and backing files.
    pub fn verify(&self, name: Option<&str>, mut progress: impl FnMut(u64, u64)) -> Result<Vec<Damage>, StoreError> {
        let names = match name {
            Some(n) => vec![n.to_owned()],
            None => self.names()?,
        };
        let mut damage = Vec::new();
        let mut users: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut backings: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
        for n in &names {
            for id in self.ids(n)? {
                match self.manifest(n, id) {
                    Ok(m) => {
                        for b in &m.bases {
                            if let Err(e) = self.base_index(&b.sha256) {
                                damage.push(Damage {
                                    item: format!("base image {} ({})", b.path, b.sha256),
                                    why: error_chain(&e),
                                    breaks: vec![(n.clone(), id)],
                                });
                            }
                        }
                        for h in self.blocks_of(&m) {
                            users.entry(h).or_default().push((n.clone(), id));
                        }
                        for d in &m.disks {
                            if let Some(b) = &d.backing {
                                backings
                                    .entry((b.filename.clone(), b.sha256.clone()))
                                    .or_default()
                                    .push((n.clone(), id));
                            }
                        }
                    }
                    Err(e) => damage.push(Damage {
                        item: self.manifest_path(n, id).display().to_string(),
                        why: error_chain(&e),
                        breaks: vec![(n.clone(), id)],
                    }),
                }
            }
        }
        let total = users.len() as u64;
        for (i, (hash, breaks)) in users.into_iter().enumerate() {
            if let Err(e) = self.blocks.get(&hash) {
                let mut breaks = breaks;
                breaks.dedup();
                damage.push(Damage { item: format!("block {hash}"), why: error_chain(&e), breaks });
            }
            progress(i as u64 + 1, total);
        }
        for ((file, sha), breaks) in backings {
            match hash_file(Path::new(&file)) {
                Ok(actual) if actual == sha => {}
                Ok(actual) => damage.push(Damage {
                    item: format!("backing image {file}"),
                    why: format!("content changed: sha256 {actual}, recorded {sha}"),
                    breaks,
                }),
                Err(e) => damage.push(Damage { item: format!("backing image {file}"), why: e.to_string(), breaks }),
            }
        }
        Ok(damage)
    }

    /// Removes the checkpoints of `name` beyond the newest `keep`, then every block no
    /// remaining checkpoint of any VM uses. Crash-safe: manifests go first, so a block is
    /// deleted only once nothing that is kept references it.
    pub fn gc(&self, name: &str, keep: usize) -> Result<GcReport, StoreError> {
        let _vm = self.lock_vm(name)?;
        let ids = self.ids(name)?;
        let cut = ids.len().saturating_sub(keep);
        let (removed, kept) = ids.split_at(cut);
        self.remove_checkpoints(name, removed, kept)
    }

    /// Like [`Store::gc`], keeping exactly the checkpoints `keep` of `name` (a cluster's
    /// retained epochs) and any newer than all of them (one being taken now).
    pub fn gc_keep(&self, name: &str, keep: &[u64]) -> Result<GcReport, StoreError> {
        let ids = self.ids(name)?;
        let newest_kept = keep.iter().max().copied().unwrap_or(0);
        let (kept, removed): (Vec<u64>, Vec<u64>) = ids.iter().partition(|id| keep.contains(id) || **id > newest_kept);
        self.remove_checkpoints(name, &removed, &kept)
    }

    fn remove_checkpoints(&self, name: &str, removed: &[u64], kept: &[u64]) -> Result<GcReport, StoreError> {
        let _store = self.lock_exclusive()?;
        let dir = self.vm_dir(name);
        for &id in removed {
            let p = self.manifest_path(name, id);
            std::fs::remove_file(&p).map_err(io("cannot remove", &p))?;
            let _ = std::fs::remove_file(self.tag_path(name, id));
        }
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", &dir))?;
        let mut referenced = BTreeSet::new();
        let mut bases = BTreeSet::new();
        for n in self.names()? {
            for id in self.ids(&n)? {
                // A damaged manifest still protects the blocks it may name: keep them all
                // rather than guess, and let verify report it.
                let path = self.manifest_path(&n, id);
                let data = std::fs::read(&path).map_err(io("cannot read", &path))?;
                match Manifest::from_bytes(&data) {
                    Ok(m) => {
                        bases.extend(m.bases.iter().map(|b| b.sha256.clone()));
                        referenced.extend(self.blocks_of(&m));
                    }
                    Err(_) => return Err(StoreError::Manifest { path, source: ManifestError::Checksum }),
                }
            }
        }
        // Bases no kept checkpoint names go first, then every block nothing references.
        for sha in self.base_hashes().into_iter().filter(|h| !bases.contains(h)) {
            self.remove_base(&sha)?;
        }
        let mut report = GcReport { removed: removed.to_vec(), kept: kept.to_vec(), ..GcReport::default() };
        let all = self.blocks.list().map_err(io("cannot list", self.blocks.dir()))?;
        for h in all.into_iter().filter(|h| !referenced.contains(h)) {
            let size = std::fs::metadata(self.blocks.path(&h)).map(|m| m.len()).unwrap_or(0);
            self.blocks.remove(&h).map_err(io("cannot remove block", &self.blocks.path(&h)))?;
            report.blocks_removed += 1;
            report.bytes_freed += size;
        }
        // Every writer of work files (checkpoints, restores) holds the store shared: with it
        // held exclusively, what is left in tmp/ belongs to no one.
        if let Ok(entries) = std::fs::read_dir(self.tmp()) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
        Ok(report)
    }
}

/// Replaces `path` with `data` atomically and durably: a temp file beside it, fsync,
/// rename, fsync of the directory.
pub fn write_atomically(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // Unique per write: several writers (VMs of one process) may replace one file at once.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}-{seq}.tmp", std::process::id()));
    write_durably(&tmp, data)?;
    std::fs::rename(&tmp, path).map_err(io("cannot rename into place", path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", dir))
}

/// Writes `data` to `path` (0600) and fsyncs it.
pub fn write_durably(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut f = private::create(path).map_err(io("cannot create", path))?;
    f.write_all(data).map_err(io("cannot write", path))?;
    f.sync_all().map_err(io("cannot sync", path))
}

/// Refuses a store root that group or others can write.
fn check_root(root: &Path) -> Result<(), StoreError> {
    match private::writable_by_others(root) {
        Ok(None) => Ok(()),
        Ok(Some(mode)) => Err(StoreError::Exposed { path: root.to_owned(), mode }),
        Err(source) => Err(StoreError::Io { what: "cannot inspect", path: root.to_owned(), source }),
    }
}

/// sha256 of a whole file.
pub fn hash_file(path: &Path) -> std::io::Result<Hash> {
    use sha2::Digest;
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(blocks::hex(&h.finalize()))
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
