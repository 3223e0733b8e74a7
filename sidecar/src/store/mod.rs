//! The checkpoint store: the objects of a store (a local directory or an S3 bucket,
//! see `cutline-objects`) and a local work directory beside it.
//!
//! ```text
//! objects:
//!   packs/ab/NAME            blocks, packed (see `pack` and `blocks`)
//!   index/ab/NAME            each pack's index: its length and trailer
//!   vms/NAME/ID.json         manifests; a checkpoint exists once its manifest does
//!   vms/NAME/ID.hmac         the manifest's tag under the store's key (written first)
//!   vms/NAME/last-id         the highest checkpoint id handed out
//!   condemned/ab/NAME        packs a gc hid, deleted a safety window later (servers)
//!   key                      the store's signing key (a server's store; a local
//!                            store keeps it as the file ROOT/key, 0600)
//! work directory (the store's root when the store is local):
//!   tmp/                     work files (staged memory files, backup targets)
//!   lock                     shared by checkpoints and restores, exclusive for gc
//!   vms/NAME/lock, owner     one operation per VM; one sidecar per VM
//!   vms/NAME/cutting         a cut in progress (the guest may be stopped)
//! ```
//!
//! Everything the store creates is its owner's alone (directories 0700, files 0600), and
//! a store whose root others can write is refused.

pub mod bases;
pub mod blocks;
pub mod compress;
pub mod gc;
pub mod key;
pub mod manifest;
pub mod pack;
pub mod writer;
pub use cutline_objects::private;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cutline_objects::{Location, Objects, ObjectsError};
use nix::fcntl::{Flock, FlockArg};

pub use bases::Base;
pub use blocks::{BlockError, Blocks, Hash, Put};
pub use compress::{Estimates, Policy};
pub use gc::{Damage, GcReport};
pub use key::{Key, KeyError};
pub use manifest::{Manifest, ManifestError};
pub use writer::Writer;

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
    /// The object store failed.
    #[error("{what} in {store}")]
    Objects {
        /// What was being done.
        what: String,
        /// The store.
        store: String,
        /// The cause.
        #[source]
        source: ObjectsError,
    },
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
    /// The local work directory (the store itself when it is local).
    root: PathBuf,
    objects: Objects,
    blocks: Blocks,
    /// gc's safety window: how long a hidden pack waits before it is deleted. Zero on
    /// a local store, whose writers and gc exclude each other through `lock`.
    window: Duration,
}

/// A held lock; released on drop.
pub struct Lock(#[allow(dead_code)] Flock<File>);

/// The default gc safety window of a store on a server (`CUTLINE_GC_WINDOW`, seconds).
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(3600);

impl Store {
    /// Opens (creating if needed) the local store at `root`, checking that it is
    /// writable by its owner alone; a new store gets its key.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        Self::prepare_work(root)?;
        Key::open_or_create(&root.join("key"))?;
        let objects = Objects::Local(cutline_objects::Local::open(root).map_err(|source| StoreError::Objects {
            what: "cannot open".into(),
            store: root.display().to_string(),
            source,
        })?);
        let v1 = Some(root.join("blocks")).filter(|d| d.is_dir());
        Ok(Store { blocks: Blocks::new(objects.clone(), v1), objects, root: root.to_owned(), window: Duration::ZERO })
    }

    /// Opens the store at `location` with `work` as its local work directory (ignored for
    /// a local store, which is its own). A store on a server gets the gc safety window
    /// `CUTLINE_GC_WINDOW` (seconds; default [`DEFAULT_WINDOW`]).
    pub fn open_at(location: &Location, work: &Path) -> Result<Store, StoreError> {
        match location {
            Location::Local(root) => Store::open(root),
            Location::S3(_) => {
                Self::prepare_work(work)?;
                let objects = Objects::open(location).map_err(|source| StoreError::Objects {
                    what: "cannot open".into(),
                    store: format!("{location:?}"),
                    source,
                })?;
                Key::open_or_create_object(&objects)?;
                let window = std::env::var("CUTLINE_GC_WINDOW")
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .map_or(DEFAULT_WINDOW, Duration::from_secs);
                Ok(Store { blocks: Blocks::new(objects.clone(), None), objects, root: work.to_owned(), window })
            }
        }
    }

    /// Makes the work directory: private, writable.
    fn prepare_work(root: &Path) -> Result<(), StoreError> {
        let not_writable = |source| StoreError::NotWritable { path: root.to_owned(), source };
        private::create_dir_all(root).map_err(not_writable)?;
        check_root(root)?;
        for d in ["vms", "tmp"] {
            private::create_dir_all(&root.join(d)).map_err(not_writable)?;
        }
        let probe = root.join("tmp").join(format!(".probe-{}", std::process::id()));
        private::create(&probe).and_then(|mut f| f.write_all(b"x")).map_err(not_writable)?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// Opens an existing local store for reading; errors if `root` is not a store.
    pub fn open_existing(root: &Path) -> Result<Store, StoreError> {
        if !root.join("vms").is_dir() || !root.join("key").is_file() {
            return Err(StoreError::Io {
                what: "not a cutline store (no vms/ and key):",
                path: root.to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        check_root(root)?;
        Store::open(root)
    }

    /// The store's local work directory (the store itself when local).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store's objects.
    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// The store's blocks.
    pub fn blocks(&self) -> &Blocks {
        &self.blocks
    }

    /// The gc safety window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// A writer for the blocks of one checkpoint, after refreshing the view it
    /// deduplicates against. Hold [`Store::lock_shared`] from before this call until the
    /// manifest is committed.
    pub fn writer(&self) -> Result<Writer, StoreError> {
        self.blocks.refresh()?;
        Ok(Writer::new(self.blocks.clone(), self.window))
    }

    /// Where key `key` is, for messages: a path, or the bucket and key.
    pub fn at(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("{}/{key}", self.objects.describe()))
    }

    fn objects_err<'a>(&'a self, what: &'a str) -> impl FnOnce(ObjectsError) -> StoreError + 'a {
        move |source| StoreError::Objects { what: what.to_owned(), store: self.objects.describe(), source }
    }

    /// The store's signing key.
    pub fn key(&self) -> Result<Key, StoreError> {
        Ok(match &self.objects {
            Objects::Local(_) => Key::open_or_create(&self.root.join("key"))?,
            Objects::S3(_) => Key::open_or_create_object(&self.objects)?,
        })
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
        let listed = self.objects.list("vms/").map_err(self.objects_err("cannot list the VMs"))?;
        let mut out: Vec<String> = listed
            .iter()
            .filter_map(|m| {
                let mut parts = m.key.split('/').skip(1);
                let (name, file) = (parts.next()?, parts.next()?);
                parse_id(file).map(|_| name.to_owned())
            })
            .collect();
        out.dedup();
        Ok(out)
    }

    /// Checkpoint ids of VM `name`, oldest first.
    pub fn ids(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        let listed = match self.objects.list(&format!("vms/{name}/")) {
            Ok(l) => l,
            // A name no key can hold has no checkpoint.
            Err(ObjectsError::BadKey { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(self.objects_err("cannot list the checkpoints")(e)),
        };
        let mut ids: Vec<u64> = listed.iter().filter_map(|m| m.key.rsplit('/').next().and_then(parse_id)).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    fn manifest_key(name: &str, id: u64) -> String {
        format!("vms/{name}/{id:010}.json")
    }

    fn tag_key(name: &str, id: u64) -> String {
        format!("vms/{name}/{id:010}.hmac")
    }

    fn read_manifest(&self, name: &str, id: u64) -> Result<(PathBuf, Vec<u8>), StoreError> {
        let key = Self::manifest_key(name, id);
        let no = || StoreError::NoCheckpoint { name: name.to_owned(), id: id.to_string(), store: self.at("") };
        let data = match self.objects.get(&key) {
            Ok(d) => d,
            Err(ObjectsError::NotFound { .. } | ObjectsError::BadKey { .. }) => return Err(no()),
            Err(e) => return Err(self.objects_err("cannot read a manifest")(e)),
        };
        Ok((self.at(&key), data))
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
                let tag_key = Self::tag_key(name, id);
                let tag = self
                    .objects
                    .get(&tag_key)
                    .ok()
                    .and_then(|t| String::from_utf8(t).ok())
                    .ok_or_else(|| untrusted(format!("no signature {}", self.at(&tag_key).display())))?;
                let key = match &self.objects {
                    Objects::Local(_) => Key::open(&self.root.join("key"))?,
                    Objects::S3(_) => self.key()?,
                };
                if !key.verify(name, id, &digest, &tag) {
                    return Err(untrusted(format!("its signature {} does not match", self.at(&tag_key).display())));
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
        let (_, data) = self.read_manifest(name, id)?;
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
        let issued = match self.objects.get(&format!("vms/{name}/last-id")) {
            Ok(d) => String::from_utf8_lossy(&d).trim().parse::<u64>().unwrap_or(0),
            Err(ObjectsError::NotFound { .. }) => 0,
            Err(e) => return Err(self.objects_err("cannot read the last checkpoint id")(e)),
        };
        Ok(manifests.max(issued) + 1)
    }

    /// Hands out the next checkpoint id of `name`, above `above` too (the ids of QEMU
    /// bitmaps): ids are never reused, whatever a crash left. Durable before it returns.
    pub fn reserve_id(&self, name: &str, above: u64) -> Result<u64, StoreError> {
        let id = self.next_id(name)?.max(above + 1);
        self.objects
            .put(&format!("vms/{name}/last-id"), id.to_string().as_bytes())
            .map_err(self.objects_err("cannot record the checkpoint id"))?;
        Ok(id)
    }

    /// Waits for every block `writer` wrote to be stored, names the packs the manifest
    /// needs, signs the manifest, then writes it. The checkpoint exists from here; its
    /// packs join the view other checkpoints deduplicate against. Returns the sha256 of
    /// the manifest as written.
    pub fn commit(&self, manifest: &mut Manifest, writer: &Writer) -> Result<Hash, StoreError> {
        writer.finish()?;
        let needed = self.blocks_of(manifest);
        manifest.packs = writer.packs_of(needed.iter().map(String::as_str))?;
        manifest.seal();
        let bytes = manifest.to_bytes();
        let digest = blocks::sha256_hex(&bytes);
        let tag = self.key()?.tag(&manifest.name, manifest.id, &digest);
        let (name, id) = (&manifest.name, manifest.id);
        self.objects
            .put(&Self::tag_key(name, id), tag.as_bytes())
            .map_err(self.objects_err("cannot sign a manifest"))?;
        let key = Self::manifest_key(name, id);
        self.objects.put(&key, &bytes).map_err(self.objects_err("cannot write a manifest"))?;
        writer.publish();
        Ok(digest)
    }

    /// Every block checkpoint `m` needs: its memory, disks and bases.
    pub fn blocks_of(&self, m: &Manifest) -> Vec<String> {
        let mut out: Vec<String> = m.blocks().map(str::to_owned).collect();
        for b in &m.bases {
            out.extend(b.blocks.iter().map(|(h, _)| h).filter(|h| *h != manifest::ZERO).cloned());
        }
        out
    }

    /// [`Store::discard`] off the async threads (on a server it is two requests).
    pub async fn discard_async(&self, name: &str, id: u64) -> Result<(), StoreError> {
        let (s, n) = (self.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || s.discard(&n, id)).await.unwrap_or_else(|e| {
            Err(StoreError::Io {
                what: "discard task failed for",
                path: self.at(name),
                source: std::io::Error::other(e),
            })
        })
    }

    /// [`Store::ids`] off the async threads (on a server it is a listing).
    pub async fn ids_async(&self, name: &str) -> Result<Vec<u64>, StoreError> {
        let (s, n) = (self.clone(), name.to_owned());
        tokio::task::spawn_blocking(move || s.ids(&n)).await.unwrap_or_else(|e| {
            Err(StoreError::Io {
                what: "listing task failed for",
                path: self.at(name),
                source: std::io::Error::other(e),
            })
        })
    }

    /// Removes checkpoint `id` of `name` (a checkpoint its cluster did not commit); its
    /// packs go at the next gc.
    pub fn discard(&self, name: &str, id: u64) -> Result<(), StoreError> {
        for key in [Self::manifest_key(name, id), Self::tag_key(name, id)] {
            self.objects.delete(&key).map_err(self.objects_err("cannot remove a checkpoint"))?;
        }
        Ok(())
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

/// The checkpoint id of a manifest's file name (`0000000007.json`).
fn parse_id(file: &str) -> Option<u64> {
    file.strip_suffix(".json")?.parse().ok()
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
