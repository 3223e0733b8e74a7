//! Content-addressed blocks: a block is stored once under the sha256 of its
//! uncompressed content, compressed with zstd only when that pays.
//!
//! On disk a block file is one codec byte (0 raw, 1 zstd) followed by the payload.
//! Blocks are written to a temp file and renamed into place; durability comes from
//! one `syncfs` before a manifest that references them is committed. A block file found
//! already there (a dedup hit) may be the torn leftover of a write a crash or power loss
//! cut short: it is read back and hashed once before it is trusted, and rewritten when
//! it is not whole.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::compress::Policy;
use super::private;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// Largest block accepted on read (the chunkers produce at most 1 MiB).
pub const MAX_BLOCK: usize = 16 << 20;

/// A sha256 as lowercase hex.
pub type Hash = String;

/// Errors of the block store.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Writing a block failed (e.g. the disk is full).
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
    /// Reading a block failed.
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
    /// A block's content does not hash to its name.
    #[error("block {hash} is damaged: {why}")]
    Damaged {
        /// The block.
        hash: Hash,
        /// What is wrong.
        why: String,
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

/// The block directory of a store.
#[derive(Debug, Clone)]
pub struct Blocks {
    dir: PathBuf,
    tmp: PathBuf,
    /// Blocks this process wrote or read back whole: a dedup hit on one is trusted.
    whole: Arc<Mutex<HashSet<[u8; 32]>>>,
}

/// The 32 bytes of a hex sha256 (`None` for anything else).
fn digest_bytes(hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if hash.len() != 64 {
        return None;
    }
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hash.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Blocks {
    /// Blocks under `dir`, temp files under `tmp` (same filesystem).
    pub fn new(dir: PathBuf, tmp: PathBuf) -> Blocks {
        Blocks { dir, tmp, whole: Arc::default() }
    }

    fn known_whole(&self, hash: &str) -> bool {
        let Some(d) = digest_bytes(hash) else { return false };
        self.whole.lock().is_ok_and(|w| w.contains(&d))
    }

    fn mark_whole(&self, hash: &str) {
        if let (Some(d), Ok(mut w)) = (digest_bytes(hash), self.whole.lock()) {
            w.insert(d);
        }
    }

    /// The file of block `hash` (a block name: see [`is_block_name`]).
    pub fn path(&self, hash: &str) -> PathBuf {
        self.dir.join(hash.get(..2).unwrap_or_default()).join(hash)
    }

    /// True when block `hash` is stored.
    pub fn contains(&self, hash: &str) -> bool {
        self.path(hash).exists()
    }

    /// Stores `data` unless a whole block with its hash exists; compresses by `policy`.
    pub fn put(&self, data: &[u8], policy: &mut Policy) -> Result<Put, BlockError> {
        let hash = sha256_hex(data);
        let path = self.path(&hash);
        if path.exists() {
            if self.known_whole(&hash) {
                return Ok(Put { hash, len: data.len() as u64, stored: 0 });
            }
            match self.get(&hash) {
                Ok(_) => return Ok(Put { hash, len: data.len() as u64, stored: 0 }),
                Err(e) => tracing::warn!("rewriting a block found damaged: {e}"),
            }
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
        let err = |source| BlockError::Write { hash: hash.clone(), path: path.clone(), source };
        // Unique per writer: several VMs of one process may store the same block at once.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.tmp.join(format!("block-{hash}-{}-{seq}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = private::create(&tmp)?;
            f.write_all(&[codec])?;
            f.write_all(payload)?;
            if let Some(parent) = path.parent() {
                private::create_dir_all(parent)?;
            }
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            // Another writer stored the same content meanwhile: that is the block.
            if path.exists() && self.get(&hash).is_ok() {
                return Ok(Put { hash, len: data.len() as u64, stored: 0 });
            }
            return Err(err(e));
        }
        self.mark_whole(&hash);
        Ok(Put { hash, len: data.len() as u64, stored: payload.len() as u64 + 1 })
    }

    /// Reads block `hash`, checking that its content hashes to its name.
    pub fn get(&self, hash: &str) -> Result<Vec<u8>, BlockError> {
        // A name from a manifest is a file name under the store: nothing else (`..`, `/`).
        if !is_block_name(hash) {
            return Err(BlockError::Damaged { hash: hash.to_owned(), why: "not a block name (a sha256)".into() });
        }
        let path = self.path(hash);
        let read_err = |source| BlockError::Read { hash: hash.to_owned(), path: path.clone(), source };
        let mut raw = Vec::new();
        File::open(&path).and_then(|f| f.take(MAX_BLOCK as u64 + 1).read_to_end(&mut raw)).map_err(read_err)?;
        let damaged = |why: String| BlockError::Damaged { hash: hash.to_owned(), why };
        let data = match raw.split_first() {
            Some((&CODEC_RAW, rest)) => rest.to_vec(),
            Some((&CODEC_ZSTD, rest)) => {
                zstd::bulk::decompress(rest, MAX_BLOCK).map_err(|e| damaged(format!("zstd: {e}")))?
            }
            Some((c, _)) => return Err(damaged(format!("unknown codec byte {c}"))),
            None => return Err(damaged("empty file".into())),
        };
        let actual = sha256_hex(&data);
        if actual != hash {
            return Err(damaged(format!("content hashes to {actual}")));
        }
        self.mark_whole(hash);
        Ok(data)
    }

    /// Every stored block name.
    pub fn list(&self) -> std::io::Result<Vec<Hash>> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(&self.dir) else { return Ok(out) };
        for d in dirs {
            let d = d?;
            if !d.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(d.path())? {
                let name = f?.file_name().to_string_lossy().into_owned();
                if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push(name);
                }
            }
        }
        Ok(out)
    }

    /// Removes block `hash` (missing is fine).
    pub fn remove(&self, hash: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.path(hash)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The block directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::compress::Estimates;

    fn blocks() -> (tempfile::TempDir, Blocks) {
        let d = tempfile::tempdir().expect("tempdir");
        let tmp = d.path().join("tmp");
        std::fs::create_dir_all(&tmp).expect("tmp");
        let b = Blocks::new(d.path().join("blocks"), tmp);
        (d, b)
    }

    #[test]
    fn stores_once_and_reads_back() {
        let (_d, b) = blocks();
        let mut p = Policy::new(Estimates { compress_bps: 500e6, write_bps: 100e6, ratio: 0.3 });
        let data = vec![7u8; 40_000];
        let first = b.put(&data, &mut p).expect("put");
        assert!(first.stored > 0 && first.stored < 1000, "compressible data is compressed: {first:?}");
        let again = b.put(&data, &mut p).expect("put");
        assert_eq!(again.stored, 0);
        assert_eq!(b.get(&first.hash).expect("get"), data);
        assert_eq!(b.list().expect("list"), vec![first.hash]);
    }

    #[test]
    fn random_data_is_stored_raw() {
        let (_d, b) = blocks();
        let mut p = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
        let data: Vec<u8> = (0..20_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let put = b.put(&data, &mut p).expect("put");
        assert_eq!(put.stored, data.len() as u64 + 1);
    }

    #[test]
    fn a_torn_block_found_on_dedup_is_rewritten_once() {
        let (_d, b) = blocks();
        let mut p = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
        let data = b"a block a crash left empty".to_vec();
        let hash = sha256_hex(&data);
        // What a power loss leaves of a write renamed into place before it reached the disk.
        std::fs::create_dir_all(b.path(&hash).parent().expect("parent")).expect("mkdir");
        std::fs::write(b.path(&hash), b"").expect("torn block");
        let put = b.put(&data, &mut p).expect("put");
        assert!(put.stored > 0, "the torn block is written again, not deduplicated: {put:?}");
        assert_eq!(b.get(&hash).expect("whole again"), data);
        // Read back whole once, the block is trusted from then on without reading it again.
        std::fs::write(b.path(&hash), b"").expect("torn again");
        assert_eq!(b.put(&data, &mut p).expect("put").stored, 0);
        // Another process (a fresh handle) checks it once more.
        let fresh = Blocks::new(b.dir.clone(), b.tmp.clone());
        assert!(fresh.put(&data, &mut p).expect("put").stored > 0);
    }

    #[test]
    fn block_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let (_d, b) = blocks();
        let mut p = Policy::new(Estimates::default());
        let put = b.put(b"private", &mut p).expect("put");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&b.path(&put.hash)), 0o600);
        assert_eq!(mode(b.path(&put.hash).parent().expect("fan-out dir")), 0o700);
    }

    #[test]
    fn names_that_are_not_sha256_are_refused_not_opened() {
        let (_d, b) = blocks();
        // A multibyte character at byte 1 used to panic on slicing the two-digit prefix.
        assert!(!b.path("é").as_os_str().is_empty());
        for bad in ["é", "../../etc/passwd", "/etc/passwd", "zero", "", &"A".repeat(64), &"a".repeat(63)] {
            assert!(matches!(b.get(bad), Err(BlockError::Damaged { .. })), "{bad:?}");
        }
        assert!(is_block_name(&sha256_hex(b"x")));
    }

    #[test]
    fn damage_is_detected() {
        let (_d, b) = blocks();
        let mut p = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
        let put = b.put(b"hello world, this is a block", &mut p).expect("put");
        let path = b.path(&put.hash);
        let mut raw = std::fs::read(&path).expect("read");
        raw[5] ^= 0xff;
        std::fs::write(&path, raw).expect("write");
        assert!(matches!(b.get(&put.hash), Err(BlockError::Damaged { .. })));
    }
}
