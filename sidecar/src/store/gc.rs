//! gc and verify of a store of packs.
//!
//! gc removes the checkpoints not kept, then sweeps packs: it marks the packs every
//! remaining manifest names, and lists the manifests again just before it deletes.
//! - On a local store, writers and gc exclude each other (`lock`): an unmarked pack is
//!   deleted at once.
//! - On a server, writers on other hosts do not take that lock. An unmarked pack older
//!   than the safety window is first *hidden*: its index is deleted (writers that refresh
//!   their view no longer see it) and a marker `condemned/ab/NAME` records when. A later
//!   gc deletes it once the marker is a window old and no manifest names it; a writer
//!   that saw it before it was hidden has committed by then (writers refuse to finish
//!   after half a window). A hidden pack a manifest names after all gets its index back
//!   from its own trailer. Ages are measured against the server's clock (a probe object's
//!   time), never this host's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use cutline_objects::ObjectsError;

use super::blocks::{self, Hash, index_bytes, index_key, pack_key, pack_of_key};
use super::{ManifestError, Store, StoreError, error_chain, hash_file, pack};

/// A damaged block and the checkpoints it breaks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Damage {
    /// The block (or pack, manifest, base or backing file) at fault.
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
    /// Packs deleted.
    pub packs_removed: u64,
    /// Packs hidden, to be deleted a safety window later (a store on a server).
    pub packs_hidden: u64,
    /// Mostly-dead packs whose live blocks were rewritten into new packs.
    pub packs_repacked: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
}

impl Store {
    fn objects_failed(&self, what: &str) -> impl FnOnce(ObjectsError) -> StoreError + use<> {
        let (what, store) = (what.to_owned(), self.objects().describe());
        move |source| StoreError::Objects { what, store, source }
    }

    /// Every pack a manifest of the store names, and every block one names. A damaged
    /// manifest may name any pack: then nothing can be swept, and the error says which.
    fn marked(&self) -> Result<(BTreeSet<Hash>, BTreeSet<Hash>), StoreError> {
        let (mut packs, mut live) = (BTreeSet::new(), BTreeSet::new());
        for n in self.names()? {
            for id in self.ids(&n)? {
                let m = self.manifest(&n, id).map_err(|e| match e {
                    StoreError::Manifest { path, .. } => StoreError::Manifest { path, source: ManifestError::Checksum },
                    e => e,
                })?;
                live.extend(self.blocks_of(&m));
                packs.extend(m.packs);
            }
        }
        Ok((packs, live))
    }

    /// The forwards of repacked packs: each to the packs that took its live blocks.
    fn forwards(&self) -> Result<BTreeMap<Hash, Vec<Hash>>, StoreError> {
        let mut out = BTreeMap::new();
        for m in self.objects().list("moved/").map_err(self.objects_failed("cannot list the forwards"))? {
            let Some(p) = pack_of_key(&m.key) else { continue };
            if let Some(targets) = self.blocks().forward(p)? {
                out.insert(p.to_owned(), targets);
            }
        }
        Ok(out)
    }

    /// The packs reachable from `named` through forwards.
    fn reach(named: &BTreeSet<Hash>, fwd: &BTreeMap<Hash, Vec<Hash>>) -> BTreeSet<Hash> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<Hash> = named.iter().cloned().collect();
        while let Some(p) = todo.pop() {
            if out.insert(p.clone())
                && let Some(t) = fwd.get(&p)
            {
                todo.extend(t.iter().cloned());
            }
        }
        out
    }

    /// Re-reads every pack the checkpoints of `name` (or of all VMs) name once, checks
    /// every block against its hash, and names each damaged block and the checkpoints it
    /// breaks. Also checks manifests and backing files.
    pub fn verify(&self, name: Option<&str>, mut progress: impl FnMut(u64, u64)) -> Result<Vec<Damage>, StoreError> {
        // No gc of this host's processes deletes or repacks a pack while it is read (on a
        // server, a pack gc hides stays readable for a window).
        let _shared = self.lock_shared()?;
        let names = match name {
            Some(n) => vec![n.to_owned()],
            None => self.names()?,
        };
        let mut damage = Vec::new();
        let mut users: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
        let mut packs: BTreeMap<Hash, Vec<(String, u64)>> = BTreeMap::new();
        let mut backings: BTreeMap<(String, String), Vec<(String, u64)>> = BTreeMap::new();
        for n in &names {
            for id in self.ids(n)? {
                let m = match self.manifest(n, id) {
                    Ok(m) => m,
                    Err(e) => {
                        let item = self.at(&format!("vms/{n}/{id:010}.json")).display().to_string();
                        damage.push(Damage { item, why: error_chain(&e), breaks: vec![(n.clone(), id)] });
                        continue;
                    }
                };
                for h in self.blocks_of(&m) {
                    users.entry(h).or_default().push((n.clone(), id));
                }
                for p in &m.packs {
                    packs.entry(p.clone()).or_default().push((n.clone(), id));
                }
                for d in &m.disks {
                    if let Some(b) = &d.backing {
                        backings.entry((b.filename.clone(), b.sha256.clone())).or_default().push((n.clone(), id));
                    }
                }
            }
        }
        // A pack gc repacked is checked through the packs that took its blocks.
        let fwd = self.forwards()?;
        let existing: BTreeSet<Hash> = self
            .objects()
            .list("packs/")
            .map_err(self.objects_failed("cannot list the packs"))?
            .iter()
            .filter_map(|m| pack_of_key(&m.key).map(str::to_owned))
            .collect();
        let mut resolved: BTreeMap<Hash, Vec<(String, u64)>> = BTreeMap::new();
        for (p, breaks) in packs {
            let mut todo = vec![(p, 0)];
            while let Some((q, depth)) = todo.pop() {
                match fwd.get(&q) {
                    Some(t) if !existing.contains(&q) && depth < 8 => {
                        todo.extend(t.iter().map(|t| (t.clone(), depth + 1)))
                    }
                    _ => resolved.entry(q).or_default().extend(breaks.iter().cloned()),
                }
            }
        }
        let packs = resolved;
        // Each pack once: its index and every block in it.
        let mut whole: BTreeSet<Hash> = BTreeSet::new();
        let mut bad: BTreeMap<Hash, String> = BTreeMap::new();
        let total = packs.len() as u64 + 1;
        for (i, (p, breaks)) in packs.iter().enumerate() {
            let checked = self.blocks().entries(p).and_then(|entries| {
                let bytes = self.blocks().read_pack(p)?;
                for e in entries.iter() {
                    let h = blocks::hex(&e.hash);
                    let stored = usize::try_from(e.offset)
                        .ok()
                        .and_then(|s| bytes.get(s..s.checked_add(e.stored as usize)?))
                        .ok_or_else(|| blocks::BlockError::Damaged {
                            hash: h.clone(),
                            why: format!("pack {p} is short"),
                        });
                    match stored.and_then(|s| {
                        pack::decode(e, s)
                            .map_err(|x| blocks::BlockError::Damaged { hash: h.clone(), why: x.to_string() })
                    }) {
                        Ok(_) => {
                            whole.insert(h);
                        }
                        Err(x) => {
                            bad.insert(h, error_chain(&x));
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = checked {
                let mut breaks = breaks.clone();
                breaks.dedup();
                damage.push(Damage { item: format!("pack {p}"), why: error_chain(&e), breaks });
            }
            progress(i as u64 + 1, total);
        }
        for (hash, mut breaks) in users {
            if whole.contains(&hash) {
                continue;
            }
            breaks.dedup();
            let why = match bad.get(&hash) {
                Some(why) => why.clone(),
                // A manifest written before packs: its blocks are files.
                None => match self.blocks().get(&hash) {
                    Ok(_) => continue,
                    Err(e) => error_chain(&e),
                },
            };
            damage.push(Damage { item: format!("block {hash}"), why, breaks });
        }
        progress(total, total);
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

    /// Removes the checkpoints of `name` beyond the newest `keep`, then sweeps the packs
    /// no remaining checkpoint of any VM names. Crash-safe: manifests go first.
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
        for &id in removed {
            self.discard(name, id)?;
        }
        let mut report = GcReport { removed: removed.to_vec(), kept: kept.to_vec(), ..GcReport::default() };
        self.sweep(&mut report)?;
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

    /// Deletes (or, on a server, hides and later deletes) the packs no manifest names,
    /// then repacks the mostly-dead ones.
    fn sweep(&self, report: &mut GcReport) -> Result<(), StoreError> {
        let objects = self.objects();
        let list = |prefix: &str| -> Result<BTreeMap<Hash, (u64, SystemTime)>, StoreError> {
            Ok(objects
                .list(prefix)
                .map_err(self.objects_failed("cannot list"))?
                .into_iter()
                .filter_map(|m| Some((pack_of_key(&m.key)?.to_owned(), (m.size, m.modified))))
                .collect())
        };
        let packs = list("packs/")?;
        let indexes = list("index/")?;
        if self.window().is_zero() {
            let (named, live) = self.marked()?;
            let fwd = self.forwards()?;
            let reach = Self::reach(&named, &fwd);
            // Unreachable packs, and repacked ones (their live blocks are in their targets).
            for (p, (size, _)) in packs.iter().filter(|(p, _)| !reach.contains(*p) || fwd.contains_key(*p)) {
                self.delete_pack(p)?;
                report.packs_removed += 1;
                report.bytes_freed += size;
            }
            for p in fwd.keys().filter(|p| !reach.contains(*p)) {
                objects.delete(&moved_key(p)).map_err(self.objects_failed("cannot delete a forward"))?;
            }
            // Indexes whose pack is gone (a crash between the two deletes).
            for p in indexes.keys().filter(|p| !packs.contains_key(*p)) {
                objects.delete(&index_key(p)).map_err(self.objects_failed("cannot delete an index"))?;
            }
            self.sweep_v1()?;
            let kept: Vec<Hash> =
                packs.keys().filter(|p| reach.contains(*p) && !fwd.contains_key(*p)).cloned().collect();
            return self.repack(&kept, &live, report);
        }
        let now = self.server_now()?;
        let age = |t: SystemTime| now.duration_since(t).unwrap_or(Duration::ZERO);
        let condemned = list("condemned/")?;
        // Listed last, just before anything is deleted.
        let (named, live) = self.marked()?;
        let fwd = self.forwards()?;
        let reach = Self::reach(&named, &fwd);
        for (p, (size, modified)) in &packs {
            let hidden = condemned.get(p);
            let forwarded = fwd.get(p);
            if reach.contains(p) && forwarded.is_none() {
                if hidden.is_some() {
                    self.unhide(p)?;
                }
                continue;
            }
            match hidden {
                Some((_, when)) if age(*when) >= self.window() => {
                    // A repacked pack a writer deduplicated against before it was hidden:
                    // keep it unless its targets hold every block manifests need of it.
                    if let Some(targets) = forwarded
                        && reach.contains(p)
                        && !self.covered(p, targets, &live)?
                    {
                        self.unhide(p)?;
                        objects.delete(&moved_key(p)).map_err(self.objects_failed("cannot delete a forward"))?;
                        continue;
                    }
                    self.delete_pack(p)?;
                    objects.delete(&condemned_key(p)).map_err(self.objects_failed("cannot delete a marker"))?;
                    report.packs_removed += 1;
                    report.bytes_freed += size;
                }
                Some(_) => {}
                None if forwarded.is_some() || age(*modified) >= self.window() => {
                    self.hide(p)?;
                    report.packs_hidden += 1;
                }
                None => {}
            }
        }
        for p in condemned.keys().filter(|p| !packs.contains_key(*p)) {
            objects.delete(&condemned_key(p)).map_err(self.objects_failed("cannot delete a marker"))?;
        }
        for p in fwd.keys().filter(|p| !reach.contains(*p) && !packs.contains_key(*p)) {
            objects.delete(&moved_key(p)).map_err(self.objects_failed("cannot delete a forward"))?;
        }
        let kept: Vec<Hash> = packs
            .keys()
            .filter(|p| reach.contains(*p) && !fwd.contains_key(*p) && !condemned.contains_key(*p))
            .cloned()
            .collect();
        self.repack(&kept, &live, report)
    }

    /// Hides pack `p` (a server store): its marker first, then its index goes.
    fn hide(&self, p: &str) -> Result<(), StoreError> {
        self.objects().put(&condemned_key(p), b"").map_err(self.objects_failed("cannot hide a pack"))?;
        self.objects().delete(&index_key(p)).map_err(self.objects_failed("cannot hide a pack"))
    }

    /// True when the packs `targets` hold every block of pack `p` that `live` holds.
    fn covered(&self, p: &str, targets: &[Hash], live: &BTreeSet<Hash>) -> Result<bool, StoreError> {
        let mut have = BTreeSet::new();
        for t in targets {
            match self.blocks().entries(t) {
                Ok(e) => have.extend(e.iter().map(|e| e.hash)),
                Err(_) => return Ok(false),
            }
        }
        let needed = self.blocks().entries(p)?;
        Ok(needed.iter().filter(|e| live.contains(&blocks::hex(&e.hash))).all(|e| have.contains(&e.hash)))
    }

    /// Packs of `kept` whose live blocks are under half their bytes are rewritten: the
    /// live blocks go to new packs, a forward `moved/ab/NAME` names them, and the old
    /// pack goes (at once on a local store; hidden first on a server). Manifests are
    /// never rewritten: they are signed and committed by digest, and a restore follows
    /// the forward of a pack it does not find.
    fn repack(&self, kept: &[Hash], live: &BTreeSet<Hash>, report: &mut GcReport) -> Result<(), StoreError> {
        let mut todo: Vec<(Hash, Vec<Vec<u8>>, Vec<Hash>)> = Vec::new();
        for p in kept {
            let Ok(entries) = self.blocks().entries(p) else { continue };
            let total: u64 = entries.iter().map(|e| u64::from(e.stored)).sum();
            let alive: Vec<&pack::Entry> = entries.iter().filter(|e| live.contains(&blocks::hex(&e.hash))).collect();
            let alive_bytes: u64 = alive.iter().map(|e| u64::from(e.stored)).sum();
            if total == 0 || alive_bytes * 2 >= total {
                continue;
            }
            // A pack that does not read back whole is left for verify to report.
            let Ok(bytes) = self.blocks().read_pack(p) else { continue };
            let decoded: Option<Vec<Vec<u8>>> = alive
                .iter()
                .map(|e| {
                    let s = usize::try_from(e.offset).ok()?;
                    pack::decode(e, bytes.get(s..s.checked_add(e.stored as usize)?)?).ok()
                })
                .collect();
            if let Some(d) = decoded {
                todo.push((p.clone(), d, alive.iter().map(|e| blocks::hex(&e.hash)).collect()));
            }
        }
        if todo.is_empty() {
            return Ok(());
        }
        let w = super::Writer::isolated(self.blocks().clone());
        let mut policy = super::Policy::new(self.estimates());
        for (_, data, _) in &todo {
            for d in data {
                w.put(d, &mut policy)?;
            }
        }
        w.finish()?;
        for (p, _, hashes) in &todo {
            let targets = w.packs_of(hashes.iter().map(String::as_str))?;
            tracing::info!(pack = %p, ?targets, "repacked");
            self.objects()
                .put(&moved_key(p), targets.join("\n").as_bytes())
                .map_err(self.objects_failed("cannot write a forward"))?;
        }
        w.publish();
        for (p, _, _) in &todo {
            if self.window().is_zero() {
                let size = self.objects().head(&pack_key(p)).ok().flatten().map_or(0, |m| m.size);
                self.delete_pack(p)?;
                report.bytes_freed += size;
            } else {
                self.hide(p)?;
            }
            report.packs_repacked += 1;
        }
        Ok(())
    }

    /// The server's time now: the modification time of an object written now.
    fn server_now(&self) -> Result<SystemTime, StoreError> {
        let objects = self.objects();
        objects.put("gc/clock", b"").map_err(self.objects_failed("cannot read the server's clock"))?;
        match objects.head("gc/clock") {
            Ok(Some(m)) => Ok(m.modified),
            Ok(None) => Ok(SystemTime::now()),
            Err(e) => Err(self.objects_failed("cannot read the server's clock")(e)),
        }
    }

    /// Gives hidden pack `p` its index back from its own trailer.
    fn unhide(&self, p: &str) -> Result<(), StoreError> {
        let entries = self.blocks().trailer(p)?;
        let size = self.blocks().objects().head(&pack_key(p)).ok().flatten().map_or(0, |m| m.size);
        let n = entries.len() * pack::ENTRY + pack::TAIL;
        let trailer = self
            .objects()
            .get_range(&pack_key(p), size.saturating_sub(n as u64)..size)
            .map_err(self.objects_failed("cannot read a pack's trailer"))?;
        self.objects()
            .put(&index_key(p), &index_bytes(size, &trailer))
            .map_err(self.objects_failed("cannot restore an index"))?;
        self.objects().delete(&condemned_key(p)).map_err(self.objects_failed("cannot delete a marker"))
    }

    /// Deletes pack `p`: its index first, so no writer that refreshes sees a pack that is
    /// going.
    fn delete_pack(&self, p: &str) -> Result<(), StoreError> {
        tracing::debug!(pack = p, "deleting pack");
        self.blocks().forget(p);
        self.objects().delete(&index_key(p)).map_err(self.objects_failed("cannot delete an index"))?;
        self.objects().delete(&pack_key(p)).map_err(self.objects_failed("cannot delete a pack"))
    }

    /// Deletes the packs an aborted checkpoint stored that no manifest names, when no
    /// other writer is active on this host; otherwise they are left to gc.
    pub fn drop_packs(&self, stored: &[Hash]) {
        if stored.is_empty() {
            return;
        }
        let Ok(_excl) = self.lock_exclusive_nonblocking() else { return };
        let (Ok((named, _)), Ok(fwd)) = (self.marked(), self.forwards()) else { return };
        let marked = Self::reach(&named, &fwd);
        for p in stored.iter().filter(|p| !marked.contains(*p)) {
            let _ = self.delete_pack(p);
        }
    }

    /// The block files of a local store written before packs that no manifest needs.
    fn sweep_v1(&self) -> Result<(), StoreError> {
        let dir = self.root().join("blocks");
        if !dir.is_dir() {
            return Ok(());
        }
        let mut needed = BTreeSet::new();
        for n in self.names()? {
            for id in self.ids(&n)? {
                needed.extend(self.blocks_of(&self.manifest(&n, id)?));
            }
        }
        for sub in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if blocks::is_block_name(&name) && !needed.contains(&name) {
                    let _ = std::fs::remove_file(f.path());
                }
            }
        }
        Ok(())
    }
}

/// The key of repacked pack `p`'s forward.
pub fn moved_key(p: &str) -> String {
    format!("moved/{}/{p}", p.get(..2).unwrap_or_default())
}

/// The key of hidden pack `p`'s marker.
fn condemned_key(p: &str) -> String {
    format!("condemned/{}/{p}", p.get(..2).unwrap_or_default())
}
