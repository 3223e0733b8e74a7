//! Commit records: the durable catalog of a cluster's committed epochs. Writing an
//! epoch's record (a create-only object write, durable before it returns) is its commit
//! point.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use cutline_objects::{Objects, ObjectsError};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sidecar::proto::VectorClock;

/// The record format this code writes and reads.
pub const FORMAT: u32 = 1;

/// One member's part of a committed epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// VM name.
    pub name: String,
    /// Its checkpoint id in its store.
    pub checkpoint: u64,
    /// sha256 of the checkpoint's manifest.
    pub manifest_digest: String,
    /// Its store.
    pub store: String,
    /// Its QMP socket.
    pub qmp: String,
    /// Guest pause for the cut.
    pub pause_ms: f64,
    /// How long its output was held.
    pub hold_ms: f64,
    /// Packets held.
    pub packets_held: u64,
    /// Bytes its checkpoint added to its store.
    pub bytes_stored: u64,
    /// Its vector timestamp on its durable message.
    pub vt: VectorClock,
}

/// Timings of an epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochTimings {
    /// Prepare sent to the last vote.
    pub prepare_ms: f64,
    /// Cut sent to the last cut done.
    pub cut_ms: f64,
    /// Cut sent to the last durable.
    pub durable_ms: f64,
    /// Whole epoch.
    pub total_ms: f64,
}

/// A committed epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Format version.
    pub format: u32,
    /// Cluster name.
    pub cluster: String,
    /// Epoch number.
    pub epoch: u64,
    /// Wall-clock commit time, ms since the Unix epoch.
    pub committed_unix_ms: u64,
    /// Output held until `release` or `strict` (commit).
    pub output_commit: String,
    /// The members and their checkpoints.
    pub members: Vec<MemberRecord>,
    /// The coordinator's vector timestamp at commit.
    pub coordinator_vt: VectorClock,
    /// Timings.
    pub timings: EpochTimings,
    /// sha256 of this record serialized with an empty checksum.
    pub checksum: String,
}

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] ObjectsError),
    /// A record of that epoch exists already: records are never overwritten.
    #[error("commit record {key} exists already: records are never overwritten")]
    Exists {
        /// The object.
        key: String,
    },
    /// Two records for one epoch: two coordinators committed on one store. Neither is
    /// trusted until an operator removes the wrong one.
    #[error(
        "epoch {epoch} has two commit records, {keys:?}: two coordinators committed on one store; \
         stop one and remove the record of the other"
    )]
    Duplicate {
        /// The epoch.
        epoch: u64,
        /// Its records.
        keys: Vec<String>,
    },
    /// No record of that epoch.
    #[error("no commit record of epoch {epoch}")]
    NotFound {
        /// The epoch.
        epoch: u64,
    },
    /// A record is damaged or of another format.
    #[error("commit record {key} is unusable: {why}")]
    Bad {
        /// The object.
        key: String,
        /// Why.
        why: String,
    },
}

/// Why bytes are not a usable record.
#[derive(Debug, thiserror::Error)]
pub enum RecordParseError {
    /// Not JSON of a record's shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Written by another format version.
    #[error("format {found} (this cutline reads {FORMAT})")]
    Format {
        /// The version found.
        found: u32,
    },
    /// The checksum does not match: the record is damaged.
    #[error("checksum mismatch")]
    Checksum,
}

impl Record {
    /// Fills in the checksum.
    pub fn seal(&mut self) {
        self.checksum.clear();
        let body = serde_json::to_vec(self).unwrap_or_default();
        self.checksum = sidecar::store::blocks::hex(&Sha256::digest(&body));
    }

    /// The record as written to its file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut data = serde_json::to_vec_pretty(self)?;
        data.push(b'\n');
        Ok(data)
    }

    /// Parses and checks a record file's content.
    pub fn from_bytes(data: &[u8]) -> Result<Record, RecordParseError> {
        let r: Record = serde_json::from_slice(data)?;
        if r.format != FORMAT {
            return Err(RecordParseError::Format { found: r.format });
        }
        let mut copy = r.clone();
        copy.seal();
        if copy.checksum != r.checksum {
            return Err(RecordParseError::Checksum);
        }
        Ok(r)
    }
}

/// The records of one cluster: objects `epochs/EPOCH-INCARNATION.json` in a store (the
/// state directory's, or the object store the sidecars use). The record's write is the
/// epoch's commit point; its key names the incarnation that wrote it, so that two
/// coordinators on a store whose server ignores create-only writes never overwrite each
/// other's record: a writer that lists two withdraws its own (see [`Catalog::commit`]).
///
/// The records of the kept epochs are cached: the coordinator's actor reads them without
/// touching the store.
#[derive(Debug, Clone)]
pub struct Catalog {
    objects: Objects,
    incarnation: u64,
    cache: Arc<Mutex<BTreeMap<u64, (String, Record)>>>,
    /// Records whose write failed but may have landed (a server that stored it on fewer
    /// replicas than it promised, and heals later): deleted, again until it works, so an
    /// aborted epoch never surfaces as committed.
    doubtful: Arc<Mutex<Vec<String>>>,
}

const PREFIX: &str = "epochs/";

/// `epochs/0000000007-0000000003.json`, or the first format's `epochs/0000000007.json`
/// (incarnation 0): the epoch and incarnation.
fn parse_key(key: &str) -> Option<(u64, u64)> {
    let name = key.strip_prefix(PREFIX)?.strip_suffix(".json")?;
    match name.split_once('-') {
        Some((e, i)) => Some((e.parse().ok()?, i.parse().ok()?)),
        None => Some((name.parse().ok()?, 0)),
    }
}

impl Catalog {
    /// The catalog in `objects`, for incarnation `incarnation`: reads every record, and
    /// refuses a store where an epoch has two.
    pub fn open(objects: Objects, incarnation: u64) -> Result<Catalog, RecordError> {
        let mut by_epoch: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for m in objects.list(PREFIX)? {
            if let Some((epoch, _)) = parse_key(&m.key) {
                by_epoch.entry(epoch).or_default().push(m.key);
            }
        }
        let mut cache = BTreeMap::new();
        let newest = by_epoch.keys().max().copied();
        for (epoch, keys) in by_epoch {
            if keys.len() > 1 {
                return Err(RecordError::Duplicate { epoch, keys });
            }
            let key = keys.into_iter().next().unwrap_or_default();
            // An older record listed, then gone: pruned meanwhile by a coordinator that had
            // not stopped yet, or a listing that still showed a deleted object. The newest
            // one is never skipped: that would roll the cluster's history back.
            let record = match read_record(&objects, &key) {
                Err(RecordError::Store(ObjectsError::NotFound { .. })) if Some(epoch) != newest => {
                    tracing::warn!(epoch, "record {key} was listed but is gone: skipped");
                    continue;
                }
                r => r?,
            };
            cache.insert(epoch, (key, record));
        }
        Ok(Catalog { objects, incarnation, cache: Arc::new(Mutex::new(cache)), doubtful: Arc::default() })
    }

    /// The catalog of a local state directory (`DIR/epochs/`).
    pub fn open_dir(dir: &Path, incarnation: u64) -> Result<Catalog, RecordError> {
        Catalog::open(Objects::Local(cutline_objects::Local::open(dir)?), incarnation)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (String, Record)>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Committed epoch numbers, oldest first.
    pub fn epochs(&self) -> Vec<u64> {
        self.cache().keys().copied().collect()
    }

    /// The record of `epoch`.
    pub fn read(&self, epoch: u64) -> Result<Record, RecordError> {
        self.cache().get(&epoch).map(|(_, r)| r.clone()).ok_or(RecordError::NotFound { epoch })
    }

    /// Reads the record of `epoch` from the store again, checking it.
    pub fn reread(&self, epoch: u64) -> Result<Record, RecordError> {
        let key = self.cache().get(&epoch).map(|(k, _)| k.clone()).ok_or(RecordError::NotFound { epoch })?;
        read_record(&self.objects, &key)
    }

    /// The newest committed records, newest last, at most `n`.
    pub fn newest(&self, n: usize) -> Vec<Record> {
        let cache = self.cache();
        let mut v: Vec<Record> = cache.values().rev().take(n).map(|(_, r)| r.clone()).collect();
        v.reverse();
        v
    }

    /// The store, for messages.
    pub fn describe(&self) -> String {
        self.objects.describe()
    }

    /// Commits `record`: a create-only write (never an overwrite), durable when it
    /// returns; then a listing of the epoch's records, refusing a second one.
    pub fn commit(&self, record: &mut Record) -> Result<(), RecordError> {
        record.seal();
        let key = format!("{PREFIX}{:010}-{:010}.json", record.epoch, self.incarnation);
        if self.cache().contains_key(&record.epoch) {
            return Err(RecordError::Exists { key });
        }
        let data = record.to_bytes().map_err(|e| RecordError::Bad { key: key.clone(), why: e.to_string() })?;
        self.retry_doubtful();
        match self.objects.put_new(&key, &data) {
            Ok(_) => {}
            Err(ObjectsError::Exists { .. }) => return Err(RecordError::Exists { key }),
            Err(e) => {
                self.doubtful.lock().unwrap_or_else(|e| e.into_inner()).push(key);
                self.retry_doubtful();
                return Err(e.into());
            }
        }
        let keys: Vec<String> = self
            .objects
            .list(&format!("{PREFIX}{:010}", record.epoch))?
            .into_iter()
            .filter(|m| parse_key(&m.key).is_some_and(|(e, _)| e == record.epoch))
            .map(|m| m.key)
            .collect();
        if keys.len() > 1 {
            tracing::error!(
                epoch = record.epoch,
                ?keys,
                "two commit records for one epoch: two coordinators on one store"
            );
            // Withdrawn: a record is acted on only by a writer whose listing found it
            // alone, and then the other writer lists after both writes and withdraws its
            // own; when both find two, neither commits and the epoch vanishes.
            self.doubtful.lock().unwrap_or_else(|e| e.into_inner()).push(key);
            self.retry_doubtful();
            return Err(RecordError::Duplicate { epoch: record.epoch, keys });
        }
        self.cache().insert(record.epoch, (key, record.clone()));
        Ok(())
    }

    /// Deletes the records whose write failed; those that cannot be deleted yet stay
    /// doubtful. Returns how many remain.
    pub fn retry_doubtful(&self) -> usize {
        let keys = std::mem::take(&mut *self.doubtful.lock().unwrap_or_else(|e| e.into_inner()));
        let mut left = Vec::new();
        for key in keys {
            if let Err(e) = self.objects.delete(&key) {
                tracing::warn!("a record whose write failed cannot be deleted yet: {key}: {e}");
                left.push(key);
            }
        }
        let n = left.len();
        self.doubtful.lock().unwrap_or_else(|e| e.into_inner()).extend(left);
        n
    }

    /// Removes records beyond the newest `keep`.
    pub fn prune(&self, keep: usize) {
        self.retry_doubtful();
        let gone: Vec<(u64, String)> = {
            let cache = self.cache();
            cache.iter().take(cache.len().saturating_sub(keep)).map(|(e, (k, _))| (*e, k.clone())).collect()
        };
        for (epoch, key) in gone {
            match self.objects.delete(&key) {
                Ok(()) => {
                    self.cache().remove(&epoch);
                }
                Err(e) => tracing::warn!(epoch, "cannot prune record {key}: {e}"),
            }
        }
    }
}

fn read_record(objects: &Objects, key: &str) -> Result<Record, RecordError> {
    let data = objects.get(key)?;
    Record::from_bytes(&data).map_err(|e| RecordError::Bad { key: key.to_owned(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(epoch: u64) -> Record {
        Record {
            format: FORMAT,
            cluster: "default".into(),
            epoch,
            committed_unix_ms: 1,
            output_commit: "release".into(),
            members: vec![],
            coordinator_vt: VectorClock::default(),
            timings: EpochTimings { durable_ms: 0.123456789, ..EpochTimings::default() },
            checksum: String::new(),
        }
    }

    #[test]
    fn commit_read_prune_and_ignore_half_written() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open_dir(d.path(), 1).expect("open");
        for e in 1..=4 {
            c.commit(&mut record(e)).expect("commit");
        }
        // A crash mid-commit leaves a temp file: not a record. The first format's names
        // (no incarnation) still read.
        std::fs::write(d.path().join("epochs/.5.tmp"), b"{\"format\":1").expect("write");
        let mut old = record(5);
        old.seal();
        std::fs::write(d.path().join("epochs/0000000005.json"), old.to_bytes().expect("bytes")).expect("write");
        let c = Catalog::open_dir(d.path(), 2).expect("reopen");
        assert_eq!(c.epochs(), vec![1, 2, 3, 4, 5]);
        assert_eq!(c.read(3).expect("read").epoch, 3);
        c.prune(2);
        assert_eq!(c.epochs(), vec![4, 5]);
        assert_eq!(c.newest(5).len(), 2);
        assert_eq!(Catalog::open_dir(d.path(), 3).expect("reopen").epochs(), vec![4, 5], "pruned in the store too");
        let p = d.path().join("epochs/0000000004-0000000001.json");
        let text = std::fs::read_to_string(&p).expect("read").replace("\"epoch\": 4", "\"epoch\": 9");
        std::fs::write(&p, text).expect("write");
        assert!(matches!(c.reread(4), Err(RecordError::Bad { .. })));
        let err = Catalog::open_dir(d.path(), 4).expect_err("a damaged record");
        assert!(err.to_string().contains("0000000004-0000000001.json"), "{err}");
    }

    #[test]
    fn two_records_for_one_epoch_are_refused_loudly() {
        let d = tempfile::tempdir().expect("tempdir");
        let first = Catalog::open_dir(d.path(), 1).expect("open");
        // A second coordinator (incarnation 2) opened the store before the first committed.
        let second = Catalog::open_dir(d.path(), 2).expect("open");
        first.commit(&mut record(7)).expect("commit");
        let err = second.commit(&mut record(7)).expect_err("a second record for epoch 7");
        assert!(matches!(&err, RecordError::Duplicate { epoch: 7, keys } if keys.len() == 2), "{err}");
        assert!(err.to_string().contains("two coordinators"), "{err}");
        // The second withdrew its record: the first's, which it acted on, stands alone.
        let third = Catalog::open_dir(d.path(), 3).expect("one record per epoch");
        assert_eq!(third.epochs(), vec![7]);
        // A store that holds two anyway (written by an older cutline) is refused loudly.
        std::fs::write(d.path().join("epochs/0000000007-0000000009.json"), b"{}").expect("write");
        let err = Catalog::open_dir(d.path(), 4).expect_err("the store holds two");
        assert!(matches!(err, RecordError::Duplicate { epoch: 7, .. }), "{err}");
    }

    #[test]
    fn records_parse_from_bytes_and_refuse_damage() {
        let mut r = record(3);
        r.seal();
        let bytes = r.to_bytes().expect("bytes");
        assert_eq!(Record::from_bytes(&bytes).expect("parse"), r);
        let other = String::from_utf8(bytes.clone()).expect("utf8").replace("\"epoch\": 3", "\"epoch\": 4");
        assert!(matches!(Record::from_bytes(other.as_bytes()), Err(RecordParseError::Checksum)));
        let mut future = record(3);
        future.format = 2;
        future.seal();
        let err = Record::from_bytes(&future.to_bytes().expect("bytes")).expect_err("format");
        assert_eq!(err.to_string(), "format 2 (this cutline reads 1)");
        assert!(matches!(Record::from_bytes(b"{\"format\":1,"), Err(RecordParseError::Json(_))));
        assert!(matches!(Record::from_bytes(&bytes[..bytes.len() / 2]), Err(RecordParseError::Json(_))));
    }

    #[test]
    fn a_record_is_never_overwritten() {
        let d = tempfile::tempdir().expect("tempdir");
        let c = Catalog::open_dir(d.path(), 1).expect("open");
        c.commit(&mut record(7)).expect("commit");
        let mut other = record(7);
        other.output_commit = "strict".into();
        assert!(matches!(c.commit(&mut other), Err(RecordError::Exists { .. })));
        // Nor by the store itself, for a writer whose cache did not know the record.
        let same_inc = Catalog::open_dir(d.path(), 1).expect("open");
        let (cache, objects) = (same_inc.cache.clone(), same_inc.objects.clone());
        cache.lock().expect("lock").clear();
        let blind = Catalog { objects, incarnation: 1, cache, doubtful: Arc::default() };
        assert!(matches!(blind.commit(&mut other), Err(RecordError::Exists { .. })), "create-only in the store");
        assert_eq!(c.reread(7).expect("read").output_commit, "release");
        assert_eq!(std::fs::read_dir(d.path().join("epochs")).expect("ls").count(), 1, "no temp file left");
    }
}
