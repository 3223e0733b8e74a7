//! Content-addressed blocks in packs: a block is named by the sha256 of its uncompressed
//! content and lives, compressed when that pays, in a pack object of several MiB
//! (`packs/ab/NAME`, see [`super::pack`]). Beside each pack its index object
//! (`index/ab/NAME`: the pack's length, then its trailer) says which blocks it holds.
//!
//! [`Blocks`] reads blocks and keeps the store's *view*: the blocks of the packs whose
//! index was listed at the last [`Blocks::refresh`]. A writer (see [`super::writer`])
//! deduplicates only against that view, refreshed when it starts; gc hides a pack (deletes
//! its index) at least a safety window before it deletes it, so a writer that saw a pack
//! commits before the pack can go (see docs/STORE-V2.md).
//!
//! A local store made by cutline before packs (one file per block under `blocks/`) is
//! still read: a block found in no pack is looked for there.

use std::collections::{HashMap, VecDeque};
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use cutline_objects::{Objects, ObjectsError};
use sha2::{Digest, Sha256};

use super::pack::{self, Entry, PackError};

/// Largest block accepted on read (the chunkers produce at most 1 MiB).
pub const MAX_BLOCK: usize = 16 << 20;
/// Whole packs kept in memory for reads: restores read blocks mostly in pack order.
const CACHED_PACKS: usize = 6;

/// A sha256 as lowercase hex.
pub type Hash = String;

/// Errors of the block store.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Writing a block failed locally (e.g. a pipe).
    #[error("cannot write block {hash} to {path}")]
    Write {
        /// The block.
        hash: Hash,
        /// The file being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading input failed.
    #[error("cannot read block {hash} from {path}")]
    Read {
        /// The block.
        hash: Hash,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A block's content does not hash to its name, or its pack is damaged.
    #[error("block {hash} is damaged: {why}")]
    Damaged {
        /// The block.
        hash: Hash,
        /// What is wrong.
        why: String,
    },
    /// No known pack holds the block.
    #[error("block {hash} is in no pack of {store}")]
    Missing {
        /// The block.
        hash: Hash,
        /// The store.
        store: String,
    },
    /// The object store failed.
    #[error("{what}")]
    Objects {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: Box<ObjectsError>,
    },
    /// A pack or its index is malformed.
    #[error("pack {pack} is unusable")]
    Pack {
        /// The pack.
        pack: Hash,
        /// The cause.
        #[source]
        source: PackError,
    },
    /// An earlier pack of this writer could not be stored.
    #[error("an earlier pack could not be stored: {why}")]
    Upload {
        /// The error that stopped the uploads.
        why: String,
    },
    /// A writer took longer than half the gc safety window: the packs it deduplicated
    /// against may have been hidden meanwhile, so it does not commit.
    #[error("the checkpoint took {took_s} s, over half the store's gc safety window ({window_s} s)")]
    TooSlow {
        /// Seconds taken.
        took_s: u64,
        /// The window.
        window_s: u64,
    },
}

/// sha256 of `data` as hex.
pub fn sha256_hex(data: &[u8]) -> Hash {
    hex(&Sha256::digest(data))
}

/// True when `name` can name a block: a sha256 as 64 lowercase hex digits.
pub fn is_block_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The 32 bytes of a hex sha256 (`None` for anything else).
pub fn digest_bytes(hash: &str) -> Option<[u8; 32]> {
    if !is_block_name(hash) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hash.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The key of pack `name`.
pub fn pack_key(name: &str) -> String {
    format!("packs/{}/{name}", name.get(..2).unwrap_or_default())
}

/// The key of pack `name`'s index object.
pub fn index_key(name: &str) -> String {
    format!("index/{}/{name}", name.get(..2).unwrap_or_default())
}

/// The pack named by a key under `packs/` or `index/`, if it is one.
pub fn pack_of_key(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?;
    is_block_name(name).then_some(name)
}

/// An index object: the pack's length, then its trailer.
pub fn index_bytes(pack_len: u64, trailer: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + trailer.len());
    out.extend_from_slice(&pack_len.to_le_bytes());
    out.extend_from_slice(trailer);
    out
}

/// Parses an index object of pack `name`.
pub fn parse_index(name: &str, data: &[u8]) -> Result<Vec<Entry>, BlockError> {
    let bad = |source| BlockError::Pack { pack: name.to_owned(), source };
    let (len, trailer) = data.split_at_checked(8).ok_or(bad(PackError::Truncated("index")))?;
    let pack_len = u64::from_le_bytes(len.try_into().map_err(|_| bad(PackError::Truncated("index")))?);
    pack::parse_trailer(trailer, pack_len).map_err(bad)
}

/// What putting a block did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Put {
    /// The block's name.
    pub hash: Hash,
    /// Uncompressed length.
    pub len: u64,
    /// Bytes newly written to the store (0 when the block was already there).
    pub stored: u64,
}

/// Where a block lives.
#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    /// Index into the view's pack table.
    pub pack: u32,
    /// Its entry in that pack.
    pub entry: Entry,
}

#[derive(Debug, Default)]
pub(super) struct View {
    /// Pack names by table index.
    names: Vec<Hash>,
    ids: HashMap<Hash, u32>,
    /// Parsed indexes of the packs seen.
    indexes: HashMap<Hash, Arc<Vec<Entry>>>,
    /// Blocks of the packs listed at the last refresh (and of packs this process
    /// committed since): a writer may deduplicate against these.
    listed: HashMap<[u8; 32], Loc>,
    /// Blocks of packs a manifest named (loaded for a restore or verify): readable only.
    loaded: HashMap<[u8; 32], Loc>,
    loaded_packs: std::collections::HashSet<Hash>,
}

impl View {
    fn id(&mut self, name: &str) -> u32 {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(name.to_owned());
        self.ids.insert(name.to_owned(), id);
        id
    }

    fn add(&mut self, name: &str, entries: &[Entry], listed: bool) {
        let pack = self.id(name);
        if !listed {
            self.loaded_packs.insert(name.to_owned());
        }
        let map = if listed { &mut self.listed } else { &mut self.loaded };
        for e in entries {
            map.insert(e.hash, Loc { pack, entry: *e });
        }
    }
}

/// The blocks of a store: reads, and the view writers deduplicate against.
#[derive(Debug, Clone)]
pub struct Blocks {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    objects: Objects,
    /// `ROOT/blocks` of a local store written before packs.
    v1: Option<PathBuf>,
    view: RwLock<View>,
    cache: Mutex<VecDeque<(Hash, Arc<Vec<u8>>)>>,
}

impl Blocks {
    /// The blocks of the store in `objects`; `v1` is the block directory of a local store
    /// written before packs, if there is one.
    pub fn new(objects: Objects, v1: Option<PathBuf>) -> Blocks {
        Blocks { inner: Arc::new(Inner { objects, v1, view: RwLock::default(), cache: Mutex::default() }) }
    }

    /// The objects the blocks live in.
    pub fn objects(&self) -> &Objects {
        &self.inner.objects
    }

    fn objects_err(&self, what: String) -> impl FnOnce(ObjectsError) -> BlockError {
        move |source| BlockError::Objects { what, source: Box::new(source) }
    }

    fn view(&self) -> std::sync::RwLockReadGuard<'_, View> {
        self.inner.view.read().unwrap_or_else(|p| p.into_inner())
    }

    fn view_mut(&self) -> std::sync::RwLockWriteGuard<'_, View> {
        self.inner.view.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Lists the packs' indexes and makes exactly their blocks the view writers
    /// deduplicate against. Indexes already read are not read again.
    pub fn refresh(&self) -> Result<(), BlockError> {
        let listed =
            self.inner.objects.list("index/").map_err(self.objects_err("cannot list the pack indexes".into()))?;
        let names: Vec<Hash> = listed.iter().filter_map(|m| pack_of_key(&m.key)).map(str::to_owned).collect();
        let known: Vec<Hash> = {
            let v = self.view();
            names.iter().filter(|n| !v.indexes.contains_key(*n)).cloned().collect()
        };
        let mut fresh = Vec::new();
        for name in known {
            match self.inner.objects.get(&index_key(&name)) {
                Ok(data) => fresh.push((name.clone(), Arc::new(parse_index(&name, &data)?))),
                // Hidden by a gc since the listing: not part of the view.
                Err(ObjectsError::NotFound { .. }) => {}
                Err(e) => return Err(self.objects_err(format!("cannot read the index of pack {name}"))(e)),
            }
        }
        let mut v = self.view_mut();
        for (name, entries) in fresh {
            v.indexes.insert(name, entries);
        }
        let wanted: std::collections::HashSet<&Hash> = names.iter().collect();
        v.indexes.retain(|n, _| wanted.contains(n));
        v.listed.clear();
        let packs: Vec<(Hash, Arc<Vec<Entry>>)> = v.indexes.iter().map(|(n, e)| (n.clone(), e.clone())).collect();
        for (name, entries) in packs {
            v.add(&name, &entries, true);
        }
        Ok(())
    }

    /// Adds packs this process wrote and a manifest now names to the view.
    pub(super) fn publish(&self, packs: &[(Hash, Vec<Entry>)]) {
        let mut v = self.view_mut();
        for (name, entries) in packs {
            v.indexes.insert(name.clone(), Arc::new(entries.clone()));
            v.add(name, entries, true);
        }
    }

    /// True when a writer may deduplicate against block `digest`: a pack of the view
    /// holds it.
    pub(super) fn listed(&self, digest: &[u8; 32]) -> bool {
        self.view().listed.contains_key(digest)
    }

    /// True when a writer may deduplicate against block `hash` (see [`Blocks::listed`]).
    pub fn dedupable(&self, hash: &str) -> bool {
        digest_bytes(hash).is_some_and(|d| self.listed(&d))
    }

    /// The pack that holds block `hash`, in the view or among the loaded packs.
    pub fn pack_of(&self, hash: &str) -> Option<Hash> {
        let d = digest_bytes(hash)?;
        let v = self.view();
        v.listed.get(&d).or_else(|| v.loaded.get(&d)).map(|l| v.names[l.pack as usize].clone())
    }

    /// The entries of pack `name`: its index object, or its own trailer when the index is
    /// gone (a gc hid a pack that a manifest still names).
    pub fn entries(&self, name: &str) -> Result<Arc<Vec<Entry>>, BlockError> {
        if let Some(e) = self.view().indexes.get(name) {
            return Ok(e.clone());
        }
        let entries = match self.inner.objects.get(&index_key(name)) {
            Ok(data) => parse_index(name, &data)?,
            Err(ObjectsError::NotFound { .. }) => self.trailer(name)?,
            Err(e) => return Err(self.objects_err(format!("cannot read the index of pack {name}"))(e)),
        };
        Ok(Arc::new(entries))
    }

    /// The entries in pack `name`'s own trailer.
    pub fn trailer(&self, name: &str) -> Result<Vec<Entry>, BlockError> {
        let key = pack_key(name);
        let err = self.objects_err(format!("cannot read pack {name}"));
        let meta = match self.inner.objects.head(&key) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(err(ObjectsError::NotFound { key, store: self.inner.objects.describe() })),
            Err(e) => return Err(err(e)),
        };
        let bad = |source| BlockError::Pack { pack: name.to_owned(), source };
        let tail_at = meta.size.checked_sub(pack::TAIL as u64).ok_or(bad(PackError::Truncated("tail")))?;
        let tail = self.inner.objects.get_range(&key, tail_at..meta.size).map_err(err)?;
        let count = pack::entry_count(&tail).map_err(bad)? as u64;
        let n = count * pack::ENTRY as u64 + pack::TAIL as u64;
        let start = meta.size.checked_sub(n).ok_or(bad(PackError::Truncated("entries")))?;
        let trailer = self
            .inner
            .objects
            .get_range(&key, start..meta.size)
            .map_err(self.objects_err(format!("cannot read pack {name}")))?;
        pack::parse_trailer(&trailer, meta.size).map_err(bad)
    }

    /// The packs that took the live blocks of pack `name` when gc repacked it, if it did
    /// (`moved/ab/NAME`: their names, one per line).
    pub fn forward(&self, name: &str) -> Result<Option<Vec<Hash>>, BlockError> {
        let key = format!("moved/{}/{name}", name.get(..2).unwrap_or_default());
        let data = match self.inner.objects.get(&key) {
            Ok(d) => d,
            Err(ObjectsError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.objects_err(format!("cannot read the forward of pack {name}"))(e)),
        };
        let text = String::from_utf8_lossy(&data);
        let targets: Vec<Hash> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect();
        if let Some(bad) = targets.iter().find(|t| !is_block_name(t)) {
            return Err(BlockError::Damaged { hash: name.to_owned(), why: format!("its forward names {bad:?}") });
        }
        Ok(Some(targets))
    }

    /// Makes the blocks of `packs` (the packs a manifest names) readable; a pack gc
    /// repacked is read through the packs its forward names.
    pub fn load(&self, packs: &[Hash]) -> Result<(), BlockError> {
        self.load_depth(packs, 0)
    }

    fn load_depth(&self, packs: &[Hash], depth: u32) -> Result<(), BlockError> {
        for name in packs {
            if !is_block_name(name) {
                return Err(BlockError::Damaged { hash: name.clone(), why: "not a pack name (a sha256)".into() });
            }
            let loaded = {
                let v = self.view();
                v.indexes.contains_key(name) || v.loaded_packs.contains(name)
            };
            if loaded {
                continue;
            }
            match self.entries(name) {
                Ok(entries) => self.view_mut().add(name, &entries, false),
                Err(e) => match self.forward(name)? {
                    Some(targets) if depth < 8 => self.load_depth(&targets, depth + 1)?,
                    _ => return Err(e),
                },
            }
        }
        Ok(())
    }

    /// The whole pack `name`, read from the store (not the cache: what verify checks).
    pub fn read_pack(&self, name: &str) -> Result<Vec<u8>, BlockError> {
        self.inner.objects.get(&pack_key(name)).map_err(self.objects_err(format!("cannot read pack {name}")))
    }

    /// The whole pack `name`, from the cache or the store.
    pub fn pack_bytes(&self, name: &str) -> Result<Arc<Vec<u8>>, BlockError> {
        if let Ok(c) = self.inner.cache.lock()
            && let Some((_, bytes)) = c.iter().find(|(n, _)| n == name)
        {
            return Ok(bytes.clone());
        }
        let bytes = Arc::new(
            self.inner.objects.get(&pack_key(name)).map_err(self.objects_err(format!("cannot read pack {name}")))?,
        );
        if let Ok(mut c) = self.inner.cache.lock() {
            if c.len() >= CACHED_PACKS {
                c.pop_front();
            }
            c.push_back((name.to_owned(), bytes.clone()));
        }
        Ok(bytes)
    }

    /// Drops pack `name` from the view (gc deleted it).
    pub fn forget(&self, name: &str) {
        let mut v = self.view_mut();
        v.indexes.remove(name);
        v.loaded_packs.remove(name);
        if let Some(id) = v.ids.get(name).copied() {
            v.listed.retain(|_, l| l.pack != id);
            v.loaded.retain(|_, l| l.pack != id);
        }
        drop(v);
        if let Ok(mut c) = self.inner.cache.lock() {
            c.retain(|(n, _)| n != name);
        }
    }

    /// Reads block `hash`, checking that its content hashes to its name. A pack gone
    /// since it was listed (gc repacked it) is followed to the packs its forward names.
    pub fn get(&self, hash: &str) -> Result<Vec<u8>, BlockError> {
        self.get_once(hash, false)
    }

    fn get_once(&self, hash: &str, retried: bool) -> Result<Vec<u8>, BlockError> {
        // A name from a manifest: nothing else (`..`, `/`) reaches the store.
        let Some(digest) = digest_bytes(hash) else {
            return Err(BlockError::Damaged { hash: hash.to_owned(), why: "not a block name (a sha256)".into() });
        };
        let found = {
            let v = self.view();
            v.listed.get(&digest).or_else(|| v.loaded.get(&digest)).map(|l| (v.names[l.pack as usize].clone(), *l))
        };
        let Some((name, loc)) = found else { return self.get_v1(hash) };
        let bytes = match self.pack_bytes(&name) {
            Ok(b) => b,
            Err(BlockError::Objects { source, .. }) if matches!(*source, ObjectsError::NotFound { .. }) && !retried => {
                self.forget(&name);
                if let Some(targets) = self.forward(&name)? {
                    self.load(&targets)?;
                }
                return self.get_once(hash, true);
            }
            Err(e) => return Err(e),
        };
        let stored = usize::try_from(loc.entry.offset)
            .ok()
            .and_then(|start| bytes.get(start..start.checked_add(loc.entry.stored as usize)?))
            .ok_or_else(|| BlockError::Damaged { hash: hash.to_owned(), why: format!("pack {name} is too short") })?;
        pack::decode(&loc.entry, stored).map_err(|e| BlockError::Damaged { hash: hash.to_owned(), why: e.to_string() })
    }

    /// True when block `hash` is a file of a store written before packs.
    pub fn in_v1(&self, hash: &str) -> bool {
        is_block_name(hash) && self.inner.v1.as_ref().is_some_and(|d| d.join(&hash[..2]).join(hash).is_file())
    }

    /// A block of a store written before packs: `blocks/ab/HASH`, a codec byte and the
    /// payload.
    fn get_v1(&self, hash: &str) -> Result<Vec<u8>, BlockError> {
        let missing = || BlockError::Missing { hash: hash.to_owned(), store: self.inner.objects.describe() };
        let Some(dir) = &self.inner.v1 else { return Err(missing()) };
        let path = dir.join(&hash[..2]).join(hash);
        let mut raw = Vec::new();
        match std::fs::File::open(&path) {
            Ok(f) => f.take(MAX_BLOCK as u64 + 1).read_to_end(&mut raw),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => Err(e),
        }
        .map_err(|source| BlockError::Read { hash: hash.to_owned(), path: path.clone(), source })?;
        let damaged = |why: String| BlockError::Damaged { hash: hash.to_owned(), why };
        let data = match raw.split_first() {
            Some((&pack::CODEC_RAW, rest)) => rest.to_vec(),
            Some((&pack::CODEC_ZSTD, rest)) => {
                zstd::bulk::decompress(rest, MAX_BLOCK).map_err(|e| damaged(format!("zstd: {e}")))?
            }
            Some((c, _)) => return Err(damaged(format!("unknown codec byte {c}"))),
            None => return Err(damaged("empty file".into())),
        };
        if sha256_hex(&data) != hash {
            return Err(damaged("content does not hash to its name".into()));
        }
        Ok(data)
    }
}

#[cfg(test)]
#[path = "blocks_tests.rs"]
pub(crate) mod tests;
