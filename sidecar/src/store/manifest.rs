//! The manifest of one checkpoint: every block and artifact with its hash and size,
//! and what is needed to relaunch the VM. It carries a format version and a checksum.

use serde::{Deserialize, Serialize};

use super::blocks::{Hash, MAX_BLOCK, is_block_name, sha256_hex};
use crate::disk::CHUNK;

/// The manifest format this code writes and reads.
pub const FORMAT: u32 = 1;

/// A checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Format version ([`FORMAT`]).
    pub format: u32,
    /// Checkpoint id, increasing per VM.
    pub id: u64,
    /// VM name.
    pub name: String,
    /// The checkpoint whose disk bitmaps this one's incremental disk copies start from.
    pub parent: Option<u64>,
    /// Wall-clock creation time, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// `background-snapshot` or `stop-and-copy`.
    pub mode: String,
    /// Why the mode is what it is, when it is the fallback.
    pub mode_reason: Option<String>,
    /// QEMU version, e.g. `10.0.2`.
    pub qemu_version: String,
    /// QEMU's package string.
    pub qemu_package: String,
    /// Machine type QEMU reports (e.g. `pc-q35-10.0`).
    pub machine: String,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// QEMU's launch argv.
    pub argv: Vec<String>,
    /// QEMU's working directory.
    pub cwd: Option<String>,
    /// The QMP socket cutline attaches through.
    pub qmp: String,
    /// The `-pidfile` QEMU writes, if any.
    pub pidfile: Option<String>,
    /// Memory and device state: the migration stream as content-defined blocks.
    pub memory: Stream,
    /// Writable disks.
    pub disks: Vec<Disk>,
    /// The read-only files a relaunch reads (kernel, initrd, firmware, backing images),
    /// stored once by hash (`STORE/bases/`).
    #[serde(default)]
    pub bases: Vec<super::bases::Base>,
    /// The packs that hold every block named here (a manifest written before packs
    /// names none: its blocks are files).
    #[serde(default)]
    pub packs: Vec<Hash>,
    /// Timings.
    pub timings: Timings,
    /// Bytes this checkpoint added to the store.
    pub bytes_stored: u64,
    /// sha256 of this manifest serialized with an empty checksum.
    pub checksum: String,
}

/// A byte stream stored as blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stream {
    /// `mapped-ram`: QEMU's file format with every RAM page at a fixed offset, stored as
    /// fixed-size blocks ([`ZERO`] for holes); `stream`: the sequential migration stream,
    /// stored as content-defined blocks.
    #[serde(default = "stream_layout")]
    pub layout: String,
    /// Total length.
    pub bytes: u64,
    /// Blocks in order: (hash, length).
    pub blocks: Vec<(Hash, u64)>,
    /// Bytes newly stored for this stream.
    pub bytes_stored: u64,
}

/// One writable disk's content at the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The block node (format layer) in QEMU.
    pub node: String,
    /// The guest device (qdev id or path) it is attached to.
    pub device: String,
    /// The image file.
    pub filename: String,
    /// Image format (`qcow2`, `raw`).
    pub format: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// qcow2 cluster size, to recreate the image alike.
    pub cluster_size: Option<u64>,
    /// Chunk size of `chunks`.
    pub chunk_size: u64,
    /// The read-only backing image, recorded by content hash and never copied.
    pub backing: Option<Backing>,
    /// Chunks present in the writable layer: (chunk index, hash); [`ZERO`] for zeros.
    /// Absent chunks read through to the backing image (or are zero without one).
    pub chunks: Vec<(u64, Hash)>,
    /// True when this checkpoint copied the whole disk, false when only what changed.
    pub full: bool,
    /// Why a full copy was taken, when one was.
    pub full_reason: Option<String>,
    /// Bytes newly stored for this disk.
    pub bytes_stored: u64,
    /// Bytes QEMU copied for this disk (the dirty clusters, or everything when full).
    pub bytes_copied: u64,
}

fn stream_layout() -> String {
    "stream".to_owned()
}

/// The hash recorded for an all-zero chunk (never stored as a block).
pub const ZERO: &str = "zero";

/// A read-only backing image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backing {
    /// Its file.
    pub filename: String,
    /// Its format.
    pub format: String,
    /// sha256 of the file.
    pub sha256: Hash,
    /// File size.
    pub size: u64,
}

/// Timings of a checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    /// Guest pause, from QEMU's STOP/RESUME timestamps.
    pub pause_ms: f64,
    /// From start to commit.
    pub duration_ms: f64,
    /// Saving memory and device state.
    pub memory_ms: f64,
    /// Copying and storing disks.
    pub disks_ms: f64,
    /// Making everything durable (syncfs + manifest).
    pub sync_ms: f64,
}

/// Errors of reading a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid JSON of the expected shape.
    #[error("manifest is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// Written by another format version.
    #[error("manifest format {found} is not supported (this cutline reads format {FORMAT})")]
    Format {
        /// The version found.
        found: u32,
    },
    /// The checksum does not match.
    #[error("manifest checksum mismatch: the file is damaged")]
    Checksum,
    /// The content is inconsistent: a block name, length, offset or layout no checkpoint has.
    #[error("manifest is inconsistent: {0}")]
    Invalid(String),
}

impl Stream {
    /// Checks what a rebuild relies on: a known layout, block names that are sha256s
    /// ([`ZERO`] only in `mapped-ram`), lengths a block can have, and lengths that add up
    /// to `bytes` without overflow.
    pub fn check(&self) -> Result<(), ManifestError> {
        let invalid = |what: String| Err(ManifestError::Invalid(what));
        let zero_ok = match self.layout.as_str() {
            "stream" => false,
            "mapped-ram" => true,
            other => return invalid(format!("unknown stream layout {other:?}")),
        };
        let mut total = 0u64;
        for (i, (hash, len)) in self.blocks.iter().enumerate() {
            if !(is_block_name(hash) || zero_ok && hash == ZERO) {
                return invalid(format!("block {i} of the {} stream is named {hash:?}", self.layout));
            }
            if *len > MAX_BLOCK as u64 {
                return invalid(format!("block {i} of the stream has {len} bytes (at most {MAX_BLOCK})"));
            }
            total = total.checked_add(*len).ok_or_else(|| ManifestError::Invalid("stream length overflows".into()))?;
        }
        if total != self.bytes {
            return invalid(format!("stream blocks add up to {total} bytes, recorded {}", self.bytes));
        }
        Ok(())
    }
}

impl Disk {
    /// Guest offset and length of chunk `idx`, when it lies inside the disk.
    pub fn chunk_extent(&self, idx: u64) -> Option<(u64, u64)> {
        let start = idx.checked_mul(CHUNK).filter(|s| *s < self.virtual_size)?;
        Some((start, CHUNK.min(self.virtual_size - start)))
    }

    /// Checks what a rebuild relies on: chunks of [`CHUNK`] bytes inside the disk, in
    /// increasing order, named by sha256 or [`ZERO`].
    pub fn check(&self) -> Result<(), ManifestError> {
        let invalid = |what: String| Err(ManifestError::Invalid(format!("disk {}: {what}", self.node)));
        if self.chunk_size != CHUNK {
            return invalid(format!("chunk size {} (cutline's is {CHUNK})", self.chunk_size));
        }
        let mut last = None;
        for (idx, hash) in &self.chunks {
            if !(is_block_name(hash) || hash == ZERO) {
                return invalid(format!("chunk {idx} is named {hash:?}"));
            }
            if self.chunk_extent(*idx).is_none() {
                return invalid(format!("chunk {idx} lies past the disk's {} bytes", self.virtual_size));
            }
            if last.is_some_and(|l| l >= *idx) {
                return invalid(format!("chunk {idx} is out of order"));
            }
            last = Some(*idx);
        }
        if let Some(b) = &self.backing
            && !is_block_name(&b.sha256)
        {
            return invalid(format!("backing image sha256 {:?}", b.sha256));
        }
        Ok(())
    }
}

impl Manifest {
    /// Fills in the checksum.
    pub fn seal(&mut self) {
        self.checksum = String::new();
        let body = serde_json::to_vec(self).unwrap_or_default();
        self.checksum = sha256_hex(&body);
    }

    /// Serializes a sealed manifest.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parses and checks a manifest.
    pub fn from_bytes(data: &[u8]) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_slice(data)?;
        if m.format != FORMAT {
            return Err(ManifestError::Format { found: m.format });
        }
        let mut copy = m.clone();
        copy.seal();
        if copy.checksum != m.checksum {
            return Err(ManifestError::Checksum);
        }
        m.check()?;
        Ok(m)
    }

    /// Checks the memory stream and every disk (see [`Stream::check`], [`Disk::check`]).
    pub fn check(&self) -> Result<(), ManifestError> {
        self.memory.check()?;
        self.disks.iter().try_for_each(Disk::check)?;
        if let Some(p) = self.packs.iter().find(|p| !is_block_name(p)) {
            return Err(ManifestError::Invalid(format!("pack named {p:?}")));
        }
        for b in &self.bases {
            let mut total = 0u64;
            for (h, len) in &b.blocks {
                if !(is_block_name(h) || h == ZERO) || *len > MAX_BLOCK as u64 {
                    return Err(ManifestError::Invalid(format!("base {}: block {h:?} of {len} bytes", b.path)));
                }
                total = total.saturating_add(*len);
            }
            if !b.blocks.is_empty() && total != b.size {
                return Err(ManifestError::Invalid(format!(
                    "base {}: blocks add up to {total}, size {}",
                    b.path, b.size
                )));
            }
        }
        Ok(())
    }

    /// A manifest of checkpoint `id` of `name` with no memory, disk or base yet (for
    /// tools, tests and benchmarks that fill in the rest).
    pub fn empty(name: &str, id: u64) -> Manifest {
        Manifest {
            format: FORMAT,
            id,
            name: name.to_owned(),
            parent: None,
            created_unix_ms: 1,
            mode: "background-snapshot".into(),
            mode_reason: None,
            qemu_version: "10.0.2".into(),
            qemu_package: String::new(),
            machine: "pc-q35-10.0".into(),
            ram_bytes: 1 << 27,
            argv: vec!["qemu-system-x86_64".into()],
            cwd: None,
            qmp: "/tmp/q.sock".into(),
            pidfile: None,
            memory: Stream { layout: "stream".into(), bytes: 0, blocks: vec![], bytes_stored: 0 },
            disks: vec![],
            bases: vec![],
            packs: vec![],
            timings: Timings::default(),
            bytes_stored: 0,
            checksum: String::new(),
        }
    }

    /// Every block this checkpoint references.
    pub fn blocks(&self) -> impl Iterator<Item = &str> {
        self.memory
            .blocks
            .iter()
            .map(|(h, _)| h.as_str())
            .chain(self.disks.iter().flat_map(|d| d.chunks.iter().map(|(_, h)| h.as_str())))
            .filter(|h| *h != ZERO)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample(id: u64) -> Manifest {
        let mut m = Manifest {
            memory: Stream { layout: "stream".into(), bytes: 3, blocks: vec![("a".repeat(64), 3)], bytes_stored: 3 },
            bytes_stored: 3,
            ..Manifest::empty("vm", id)
        };
        m.seal();
        m
    }

    #[test]
    fn round_trips_and_detects_tampering() {
        let m = sample(1);
        let bytes = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&bytes).expect("parse"), m);
        let tampered = String::from_utf8(bytes).expect("utf8").replace("\"ram_bytes\": 134217728", "\"ram_bytes\": 1");
        assert!(matches!(Manifest::from_bytes(tampered.as_bytes()), Err(ManifestError::Checksum)));
    }

    #[test]
    fn floats_round_trip_exactly() {
        let mut m = sample(2);
        for (i, x) in [0.1, 13.000000000000002, 2.448241, 1e-7, 123456.789012345].iter().enumerate() {
            m.timings.pause_ms = *x * (i as f64 + 1.0) / 3.0;
            m.seal();
            assert_eq!(Manifest::from_bytes(&m.to_bytes()).expect("round trip"), m);
        }
    }

    fn disk(virtual_size: u64, chunks: Vec<(u64, Hash)>) -> Disk {
        Disk {
            node: "n".into(),
            device: "d".into(),
            filename: "f".into(),
            format: "qcow2".into(),
            virtual_size,
            cluster_size: None,
            chunk_size: CHUNK,
            backing: None,
            chunks,
            full: true,
            full_reason: None,
            bytes_stored: 0,
            bytes_copied: 0,
        }
    }

    fn refused(m: &mut Manifest) -> String {
        m.seal();
        match Manifest::from_bytes(&m.to_bytes()) {
            Err(ManifestError::Invalid(why)) => why,
            other => panic!("accepted or refused otherwise: {other:?}"),
        }
    }

    #[test]
    fn refuses_lengths_names_and_offsets_no_checkpoint_has() {
        let h = "b".repeat(64);
        let mut m = sample(1);
        // Lengths that overflow u64 when added (a restore would have added them unchecked).
        m.memory.layout = "mapped-ram".into();
        m.memory.blocks = vec![(ZERO.into(), u64::MAX), (ZERO.into(), 2)];
        m.memory.bytes = 1;
        assert!(refused(&mut m).contains("bytes"), "a block over MAX_BLOCK");
        m.memory.blocks = vec![(ZERO.into(), 1 << 20); 3];
        assert!(refused(&mut m).contains("add up"));
        m.memory.bytes = 3 << 20;
        m.seal();
        assert!(Manifest::from_bytes(&m.to_bytes()).is_ok(), "holes of mapped-ram are fine");
        m.memory.layout = "stream".into();
        assert!(refused(&mut m).contains("named \"zero\""), "a stream has no holes");
        m.memory.blocks = vec![("../../../etc/passwd".into(), 3)];
        m.memory.bytes = 3;
        assert!(refused(&mut m).contains("passwd"));
        m.memory.layout = "tape".into();
        assert!(refused(&mut m).contains("tape"));

        let mut m = sample(1);
        m.disks = vec![disk(3 * CHUNK + 1, vec![(0, h.clone()), (3, ZERO.into())])];
        m.seal();
        assert!(Manifest::from_bytes(&m.to_bytes()).is_ok());
        assert_eq!(m.disks[0].chunk_extent(3), Some((3 * CHUNK, 1)));
        assert_eq!(m.disks[0].chunk_extent(4), None);
        assert_eq!(m.disks[0].chunk_extent(u64::MAX / 2), None, "no overflow of idx * CHUNK");
        m.disks = vec![disk(CHUNK, vec![(1, h.clone())])];
        assert!(refused(&mut m).contains("past the disk"));
        m.disks = vec![disk(4 * CHUNK, vec![(2, h.clone()), (1, h.clone())])];
        assert!(refused(&mut m).contains("order"));
        m.disks = vec![disk(CHUNK, vec![(0, "é".into())])];
        assert!(refused(&mut m).contains("named"));
        m.disks = vec![Disk { chunk_size: 512, ..disk(CHUNK, vec![]) }];
        assert!(refused(&mut m).contains("chunk size"));
    }

    #[test]
    fn refuses_other_formats() {
        let mut m = sample(1);
        m.format = 99;
        m.seal();
        assert!(matches!(Manifest::from_bytes(&m.to_bytes()), Err(ManifestError::Format { found: 99 })));
    }
}
