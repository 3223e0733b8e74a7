//! Commit records: the durable catalog of a cluster's committed epochs. Writing an
//! epoch's record (temp file, fsync, rename, fsync of the directory) is its commit point.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

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
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A record of that epoch exists already: records are never overwritten.
    #[error("commit record {path} exists already: records are never overwritten")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// A record is damaged or of another format.
    #[error("commit record {path} is unusable: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
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

/// The records of one cluster, in `DIR/epochs/`.
#[derive(Debug, Clone)]
pub struct Catalog {
    dir: PathBuf,
}

impl Catalog {
    /// The catalog under `dir`, created if needed.
    pub fn open(dir: &Path) -> Result<Catalog, RecordError> {
        let epochs = dir.join("epochs");
        sidecar::store::private::create_dir_all(&epochs).map_err(|source| RecordError::Io {
            what: "cannot create",
            path: epochs.clone(),
            source,
        })?;
        Ok(Catalog { dir: epochs })
    }

    fn path(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("{epoch:010}.json"))
    }

    /// Committed epoch numbers, oldest first. Temp files of an interrupted commit are not records.
    pub fn epochs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).and_then(|n| n.parse().ok()))
            .collect();
        v.sort_unstable();
        v
    }

    /// Reads and checks a record.
    pub fn read(&self, epoch: u64) -> Result<Record, RecordError> {
        let path = self.path(epoch);
        let data = std::fs::read(&path).map_err(|source| RecordError::Io {
            what: "cannot read",
            path: path.clone(),
            source,
        })?;
        Record::from_bytes(&data).map_err(|e| RecordError::Bad { path, why: e.to_string() })
    }

    /// The newest committed records, newest last, at most `n`.
    pub fn newest(&self, n: usize) -> Vec<Record> {
        let epochs = self.epochs();
        epochs.iter().rev().take(n).rev().filter_map(|e| self.read(*e).ok()).collect()
    }

    /// Commits `record`: temp file, fsync, link into place (which fails if a record of
    /// that epoch exists: never overwritten), fsync of the directory.
    pub fn commit(&self, record: &mut Record) -> Result<(), RecordError> {
        record.seal();
        let path = self.path(record.epoch);
        let tmp = self.dir.join(format!(".{}-{}.tmp", record.epoch, std::process::id()));
        let io = |what: &'static str, p: &Path| {
            let p = p.to_owned();
            move |source| RecordError::Io { what, path: p, source }
        };
        let mut f = sidecar::store::private::create(&tmp).map_err(io("cannot create", &tmp))?;
        let data = record.to_bytes().map_err(|e| RecordError::Bad { path: path.clone(), why: e.to_string() })?;
        f.write_all(&data).map_err(io("cannot write", &tmp))?;
        f.sync_all().map_err(io("cannot sync", &tmp))?;
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(RecordError::Exists { path }),
            r => r.map_err(io("cannot link into place", &path))?,
        }
        // A record that may not be durable must not outlive the abort its failure causes.
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|source| {
            let _ = std::fs::remove_file(&path);
            RecordError::Io { what: "cannot sync", path: self.dir.clone(), source }
        })
    }

    /// Removes records beyond the newest `keep`, and leftover temp files.
    pub fn prune(&self, keep: usize) {
        let epochs = self.epochs();
        for e in epochs.iter().take(epochs.len().saturating_sub(keep)) {
            let _ = std::fs::remove_file(self.path(*e));
        }
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
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
        let c = Catalog::open(d.path()).expect("open");
        for e in 1..=4 {
            c.commit(&mut record(e)).expect("commit");
        }
        // A crash mid-commit leaves a temp file: not a record.
        std::fs::write(d.path().join("epochs/.5.tmp"), b"{\"format\":1").expect("write");
        assert_eq!(c.epochs(), vec![1, 2, 3, 4]);
        assert_eq!(c.read(3).expect("read").epoch, 3);
        c.prune(2);
        assert_eq!(c.epochs(), vec![3, 4]);
        assert_eq!(c.newest(5).len(), 2);
        let p = d.path().join("epochs/0000000004.json");
        let text = std::fs::read_to_string(&p).expect("read").replace("\"epoch\": 4", "\"epoch\": 9");
        std::fs::write(&p, text).expect("write");
        assert!(matches!(c.read(4), Err(RecordError::Bad { .. })));
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
        let c = Catalog::open(d.path()).expect("open");
        c.commit(&mut record(7)).expect("commit");
        let mut other = record(7);
        other.output_commit = "strict".into();
        assert!(matches!(c.commit(&mut other), Err(RecordError::Exists { .. })));
        assert_eq!(c.read(7).expect("read").output_commit, "release");
        assert_eq!(std::fs::read_dir(d.path().join("epochs")).expect("ls").count(), 1, "no temp file left");
    }
}
