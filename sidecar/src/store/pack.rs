//! The pack format of store v2: chunks grouped into objects of several MiB, as restic,
//! kopia and borg do, so that a checkpoint writes a few large objects instead of one file
//! per 16-64 KiB block, and a restore reads only the byte ranges it needs.
//!
//! ```text
//! pack    := chunk* entries tail
//! chunk   := codec (1 byte: 0 raw, 1 zstd) payload
//! entries := entry*            entry := sha256 (32) offset (u64 LE) stored (u32 LE) raw (u32 LE)
//! tail    := count (u32 LE) sha256-of-entries (32) magic "CUTPACK1"
//! ```
//!
//! A pack is named by the sha256 of its bytes. Its trailer (entries and tail) is also
//! kept as a small index object, so that opening a checkpoint reads the indexes of its
//! packs, never the packs' tails. Everything read here comes from storage others may have
//! written: every count, offset and length is checked before use.

use sha2::{Digest, Sha256};

use super::blocks::{Hash, MAX_BLOCK, hex};

/// Packs are sealed once they hold this much.
pub const PACK_TARGET: usize = 8 << 20;
/// The pack format's magic, last in every pack.
pub const MAGIC: &[u8; 8] = b"CUTPACK1";
/// Bytes of one entry.
pub const ENTRY: usize = 32 + 8 + 4 + 4;
/// Bytes of the tail.
pub const TAIL: usize = 4 + 32 + 8;
/// Most entries a pack may hold (a pack of 16-byte chunks at 4x the target).
pub const MAX_ENTRIES: u32 = (4 * PACK_TARGET / 16) as u32;

/// Codec byte of a chunk stored as is.
pub const CODEC_RAW: u8 = 0;
/// Codec byte of a zstd-compressed chunk.
pub const CODEC_ZSTD: u8 = 1;

/// Why bytes are not a usable pack, trailer or chunk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// Shorter than its own structure says.
    #[error("truncated: {0}")]
    Truncated(&'static str),
    /// Not a pack of this format.
    #[error("no pack magic at its end")]
    Magic,
    /// The entries do not hash to what the tail says.
    #[error("its index does not match its checksum")]
    Checksum,
    /// An entry that cannot describe a chunk of this pack.
    #[error("entry {index}: {why}")]
    Entry {
        /// Which entry.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A chunk's content is not what its entry names.
    #[error("chunk {hash}: {why}")]
    Chunk {
        /// The chunk.
        hash: Hash,
        /// What is wrong.
        why: String,
    },
}

/// Where one chunk lies in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// sha256 of the chunk's uncompressed content.
    pub hash: [u8; 32],
    /// Offset of its codec byte in the pack.
    pub offset: u64,
    /// Stored bytes: codec byte and payload.
    pub stored: u32,
    /// Uncompressed length.
    pub raw: u32,
}

impl Entry {
    /// The byte range of the chunk in its pack.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.offset..self.offset + u64::from(self.stored)
    }
}

/// A pack being filled.
#[derive(Debug, Default)]
pub struct PackBuilder {
    buf: Vec<u8>,
    entries: Vec<Entry>,
}

/// A finished pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Its name: the sha256 of `bytes`.
    pub name: Hash,
    /// The whole pack.
    pub bytes: Vec<u8>,
    /// Its entries, in offset order.
    pub entries: Vec<Entry>,
}

impl Sealed {
    /// The trailer (entries and tail): what the pack's index object holds.
    pub fn trailer(&self) -> &[u8] {
        let n = self.entries.len() * ENTRY + TAIL;
        &self.bytes[self.bytes.len() - n..]
    }
}

impl PackBuilder {
    /// An empty pack.
    pub fn new() -> PackBuilder {
        PackBuilder::default()
    }

    /// Appends a chunk (`codec` and `payload` as stored), returns its entry.
    pub fn push(&mut self, hash: [u8; 32], codec: u8, payload: &[u8], raw: u32) -> Entry {
        let entry = Entry {
            hash,
            offset: self.buf.len() as u64,
            stored: u32::try_from(payload.len() + 1).unwrap_or(u32::MAX),
            raw,
        };
        self.buf.push(codec);
        self.buf.extend_from_slice(payload);
        self.entries.push(entry);
        entry
    }

    /// Bytes of chunks so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True with no chunk.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True once the pack should be sealed.
    pub fn full(&self) -> bool {
        self.buf.len() >= PACK_TARGET
    }

    /// The chunk of `entry` while the pack is open (a read of what this writer just put).
    pub fn stored(&self, entry: &Entry) -> Option<&[u8]> {
        let start = usize::try_from(entry.offset).ok()?;
        self.buf.get(start..start.checked_add(entry.stored as usize)?)
    }

    /// Appends the trailer and names the pack.
    pub fn finish(mut self) -> Sealed {
        let mut entries = Vec::with_capacity(self.entries.len() * ENTRY);
        for e in &self.entries {
            entries.extend_from_slice(&e.hash);
            entries.extend_from_slice(&e.offset.to_le_bytes());
            entries.extend_from_slice(&e.stored.to_le_bytes());
            entries.extend_from_slice(&e.raw.to_le_bytes());
        }
        let digest = Sha256::digest(&entries);
        self.buf.extend_from_slice(&entries);
        self.buf.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(&digest);
        self.buf.extend_from_slice(MAGIC);
        let name = hex(&Sha256::digest(&self.buf));
        Sealed { name, bytes: self.buf, entries: self.entries }
    }
}

/// How many entries the tail of a pack announces, after checking its magic: the trailer
/// is then the last `count * ENTRY + TAIL` bytes.
pub fn entry_count(tail: &[u8]) -> Result<u32, PackError> {
    let tail = tail.get(tail.len().checked_sub(TAIL).ok_or(PackError::Truncated("tail"))?..).unwrap_or_default();
    if &tail[TAIL - 8..] != MAGIC {
        return Err(PackError::Magic);
    }
    let count = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
    if count > MAX_ENTRIES {
        return Err(PackError::Entry { index: 0, why: format!("{count} entries announced, at most {MAX_ENTRIES}") });
    }
    Ok(count)
}

/// Parses a trailer (a pack's last bytes, or its index object) of a pack of `pack_len`
/// bytes: every entry must lie, whole and in order, in the chunk area.
pub fn parse_trailer(trailer: &[u8], pack_len: u64) -> Result<Vec<Entry>, PackError> {
    let count = entry_count(trailer)? as usize;
    let n = count * ENTRY + TAIL;
    if trailer.len() < n {
        return Err(PackError::Truncated("entries"));
    }
    let trailer = &trailer[trailer.len() - n..];
    let (entries, tail) = trailer.split_at(count * ENTRY);
    if Sha256::digest(entries).as_slice() != &tail[4..36] {
        return Err(PackError::Checksum);
    }
    let chunk_area = pack_len.checked_sub(n as u64).ok_or(PackError::Truncated("pack shorter than its index"))?;
    let mut out = Vec::with_capacity(count);
    let mut next = 0u64;
    for (index, raw) in entries.chunks_exact(ENTRY).enumerate() {
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&raw[..32]);
        let le64 = |b: &[u8]| u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let e = Entry { hash, offset: le64(&raw[32..40]), stored: le32(&raw[40..44]), raw: le32(&raw[44..48]) };
        let bad = |why: String| PackError::Entry { index, why };
        if e.offset != next {
            return Err(bad(format!("at offset {}, the previous chunk ends at {next}", e.offset)));
        }
        if e.stored == 0 || e.stored as usize > MAX_BLOCK + 1 || e.raw as usize > MAX_BLOCK {
            return Err(bad(format!("{} bytes stored, {} raw", e.stored, e.raw)));
        }
        next = e.offset + u64::from(e.stored);
        if next > chunk_area {
            return Err(bad(format!("ends at {next}, past the chunks ({chunk_area} bytes)")));
        }
        out.push(e);
    }
    if next != chunk_area {
        return Err(PackError::Entry { index: count, why: format!("chunks end at {next}, the index at {chunk_area}") });
    }
    Ok(out)
}

/// The content of the chunk `stored` (codec byte and payload) that `entry` describes,
/// checked against its hash and length.
pub fn decode(entry: &Entry, stored: &[u8]) -> Result<Vec<u8>, PackError> {
    let bad = |why: String| PackError::Chunk { hash: hex(&entry.hash), why };
    let (&codec, payload) = stored.split_first().ok_or_else(|| bad("empty".into()))?;
    let data = match codec {
        CODEC_RAW => payload.to_vec(),
        CODEC_ZSTD => zstd::bulk::decompress(payload, entry.raw as usize).map_err(|e| bad(format!("zstd: {e}")))?,
        c => return Err(bad(format!("unknown codec {c}"))),
    };
    if data.len() != entry.raw as usize {
        return Err(bad(format!("{} bytes, its entry says {}", data.len(), entry.raw)));
    }
    if Sha256::digest(&data).as_slice() != entry.hash {
        return Err(bad("content does not hash to its name".into()));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(chunks: &[&[u8]]) -> Sealed {
        let mut b = PackBuilder::new();
        for c in chunks {
            let hash: [u8; 32] = Sha256::digest(c).into();
            let z = zstd::bulk::compress(c, 1).expect("zstd");
            let e = if z.len() < c.len() {
                b.push(hash, CODEC_ZSTD, &z, c.len() as u32)
            } else {
                b.push(hash, CODEC_RAW, c, c.len() as u32)
            };
            assert_eq!(b.stored(&e).map(<[u8]>::len), Some(e.stored as usize));
        }
        b.finish()
    }

    #[test]
    fn a_pack_reads_back_from_its_trailer_or_its_index_object() {
        let a = vec![7u8; 40_000];
        let b: Vec<u8> = (0..30_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let p = pack(&[&a, &b, b"tiny"]);
        assert_eq!(p.name, hex(&Sha256::digest(&p.bytes)));
        let len = p.bytes.len() as u64;
        // From the whole pack, from its trailer alone (the index object), from its tail.
        assert_eq!(parse_trailer(&p.bytes, len).expect("pack"), p.entries);
        assert_eq!(parse_trailer(p.trailer(), len).expect("index"), p.entries);
        assert_eq!(entry_count(&p.bytes[p.bytes.len() - TAIL..]).expect("tail"), 3);
        for (e, want) in p.entries.iter().zip([&a[..], &b[..], b"tiny"]) {
            let r = e.range();
            let got = decode(e, &p.bytes[r.start as usize..r.end as usize]).expect("decode");
            assert_eq!(got, want);
        }
        assert!(p.entries[0].stored < 1000, "a compressible chunk is stored compressed");
    }

    #[test]
    fn damaged_packs_and_chunks_are_named_not_trusted() {
        let p = pack(&[b"hello world, hello world", b"second"]);
        let len = p.bytes.len() as u64;
        let mut bad = p.bytes.clone();
        *bad.last_mut().expect("byte") ^= 1;
        assert_eq!(parse_trailer(&bad, len), Err(PackError::Magic));
        let mut bad = p.bytes.clone();
        let at = bad.len() - TAIL - 1;
        bad[at] ^= 1;
        assert_eq!(parse_trailer(&bad, len), Err(PackError::Checksum));
        assert!(matches!(parse_trailer(p.trailer(), len - 1), Err(PackError::Entry { .. })), "pack length off");
        assert!(parse_trailer(&p.bytes[p.bytes.len() - 10..], len).is_err());
        for cut in 0..p.trailer().len() {
            assert!(parse_trailer(&p.trailer()[cut..], len).is_err() || cut == 0, "cut at {cut}");
        }
        let e = p.entries[1];
        let r = e.range();
        let mut chunk = p.bytes[r.start as usize..r.end as usize].to_vec();
        *chunk.last_mut().expect("byte") ^= 1;
        assert!(matches!(decode(&e, &chunk), Err(PackError::Chunk { .. })));
        assert!(decode(&e, &[]).is_err());
        assert!(decode(&e, &[9, 1, 2]).is_err(), "unknown codec");
    }

    #[test]
    fn an_index_announcing_absurd_counts_is_refused_before_any_allocation() {
        let mut tail = vec![0u8; TAIL];
        tail[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        tail[TAIL - 8..].copy_from_slice(MAGIC);
        assert!(matches!(entry_count(&tail), Err(PackError::Entry { .. })));
        assert!(matches!(parse_trailer(&tail, 1 << 40), Err(PackError::Entry { .. })));
        let empty = PackBuilder::new().finish();
        assert_eq!(parse_trailer(&empty.bytes, empty.bytes.len() as u64).expect("empty pack"), vec![]);
    }
}
