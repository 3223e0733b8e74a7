//! The RAM section of a QEMU `mapped-ram` migration file: where each RAMBlock's pages
//! and its bitmap of pages present sit, and the repair of those bitmaps.
//!
//! QEMU 10.0 writes a background snapshot's pages at their fixed offsets but never its
//! bitmaps (only `ram_save_complete()` writes them, and the background-snapshot thread
//! never calls it); the loader then loads no RAM at all. Such a snapshot saves each page
//! exactly once and skips zero pages, so the data extents of a block's page area are its
//! bitmap: [`repair`] writes it from `SEEK_DATA`/`SEEK_HOLE`. [`check`] refuses a file
//! whose bitmaps would load no RAM. See docs/QEMU-MAPPED-RAM-BUG.md.
//!
//! The file is untrusted input: every offset and length is checked, and a file that
//! departs from the layout QEMU writes (migration/ram.c, `ram_save_setup` and
//! `mapped_ram_setup_ramblock`) is refused rather than guessed at.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// `QEMU_VM_FILE_MAGIC`, "QEVM".
const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
const FILE_VERSION: u32 = 3;
/// How far into the file the RAM section may start (after the configuration section).
const SCAN: u64 = 64 << 10;
/// `QEMU_VM_SECTION_START`, then a 4-byte section id, then this: idstr "ram", instance 0,
/// version 4 (`ram_mig_init`).
const RAM_SECTION: [u8; 12] = [3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4];
const SECTION_START: u8 = 0x01;
/// `RAM_SAVE_FLAG_MEM_SIZE`: the setup record starts with the RAM total, flagged.
const FLAG_MEM_SIZE: u64 = 0x04;
/// `MAPPED_RAM_HDR_VERSION`.
const HEADER_VERSION: u32 = 1;
/// Size of the packed `MappedRamHeader` (be32 version, be64 page size, bitmap and pages offsets).
const HEADER_BYTES: u64 = 28;
/// At most this many RAMBlocks (a PC guest has about ten).
const MAX_BLOCKS: usize = 4096;
/// Largest bitmap read or written (8 TiB of RAM in 4 KiB pages).
const MAX_BITMAP: u64 = 256 << 20;

/// Errors reading or repairing a mapped-ram file.
#[derive(Debug, thiserror::Error)]
pub enum MappedRamError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No QEMU migration file header.
    #[error("{path} is not a QEMU migration file")]
    NotMigration {
        /// The file.
        path: PathBuf,
    },
    /// No RAM section with mapped-ram headers where QEMU puts it.
    #[error("{path} has no mapped-ram RAM section: {why}")]
    NoRamSection {
        /// The file.
        path: PathBuf,
        /// What was wrong with the best candidate.
        why: String,
    },
    /// A RAMBlock's record or header is inconsistent or truncated.
    #[error("{path}: RAMBlock {block}: {why}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// The block (or its position when its name was not read).
        block: String,
        /// What is wrong.
        why: String,
    },
    /// A bitmap marks no page present: QEMU would load none of the block.
    #[error("{path}: the bitmap of RAMBlock {block} marks no page present; QEMU would load no RAM from it")]
    EmptyBitmap {
        /// The file.
        path: PathBuf,
        /// The block.
        block: String,
    },
    /// Writing a repaired bitmap failed.
    #[error("cannot write the bitmap of RAMBlock {block} into {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The block.
        block: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A RAMBlock's `MappedRamHeader`, as QEMU writes it after the block's name and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (1).
    pub version: u32,
    /// Target page size: one bitmap bit per page.
    pub page_size: u64,
    /// File offset of the bitmap (little-endian `unsigned long` words).
    pub bitmap_offset: u64,
    /// File offset of page 0; page `i` is at `pages_offset + i * page_size`.
    pub pages_offset: u64,
}

/// One RAMBlock of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamBlock {
    /// QEMU's id string (`pc.ram`, `vga.vram`, ...).
    pub name: String,
    /// Used length in bytes, a whole number of pages.
    pub length: u64,
    /// Where its bitmap and pages are.
    pub header: Header,
}

impl RamBlock {
    /// Number of pages.
    pub fn pages(&self) -> u64 {
        self.length / self.header.page_size
    }

    /// Bytes of its bitmap: whole 64-bit words, as QEMU sizes it on a 64-bit host.
    pub fn bitmap_bytes(&self) -> u64 {
        self.pages().div_ceil(64) * 8
    }
}

/// Random-access bytes: the file, or a buffer in tests.
pub trait Source {
    /// Total length.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl Source for File {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let eof = || std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        buf.copy_from_slice(self.get(start..end).ok_or_else(eof)?);
        Ok(())
    }
}

/// Finds the RAM section and reads every RAMBlock's record and header. `path` names the
/// source in errors.
pub fn parse(src: &(impl Source + ?Sized), path: &Path) -> Result<Vec<RamBlock>, MappedRamError> {
    let read_err = |source| MappedRamError::Read { path: path.to_owned(), source };
    let len = src.size().map_err(read_err)?;
    let mut head = [0u8; 8];
    if len < 8 || src.read_exact_at(&mut head, 0).is_err() {
        return Err(MappedRamError::NotMigration { path: path.to_owned() });
    }
    if be32(&head[..4]) != FILE_MAGIC || be32(&head[4..]) != FILE_VERSION {
        return Err(MappedRamError::NotMigration { path: path.to_owned() });
    }
    // The configuration section before it has no length field: look for the RAM
    // section's start and take the first candidate whose records all check out.
    let mut window = vec![0u8; usize::try_from(len.min(SCAN)).unwrap_or(0)];
    src.read_exact_at(&mut window, 0).map_err(read_err)?;
    let mut first_why = None;
    for at in 8..window.len() {
        let Some(rest) = window.get(at..) else { break };
        if rest.first() != Some(&SECTION_START) || rest.get(5..5 + RAM_SECTION.len()) != Some(&RAM_SECTION[..]) {
            continue;
        }
        let records = (at + 5 + RAM_SECTION.len()) as u64;
        match parse_blocks(src, len, records, path) {
            Ok(blocks) => return Ok(blocks),
            Err(e) => {
                first_why.get_or_insert(e);
            }
        }
    }
    Err(match first_why {
        Some(e @ MappedRamError::Malformed { .. }) => e,
        Some(e) => MappedRamError::NoRamSection { path: path.to_owned(), why: e.to_string() },
        None => MappedRamError::NoRamSection {
            path: path.to_owned(),
            why: format!("no `ram` section start in the first {SCAN} bytes"),
        },
    })
}

/// Reads the setup record at `at`: the flagged RAM total, then per block its name,
/// length and mapped-ram header; the next block's record follows the block's pages.
fn parse_blocks(src: &(impl Source + ?Sized), len: u64, at: u64, path: &Path) -> Result<Vec<RamBlock>, MappedRamError> {
    let bad =
        |block: &str, why: String| MappedRamError::Malformed { path: path.to_owned(), block: block.to_owned(), why };
    let mut word = [0u8; 8];
    src.read_exact_at(&mut word, at).map_err(|_| bad("(setup)", "truncated RAM total".into()))?;
    let total = u64::from_be_bytes(word);
    if total & 0xfff != FLAG_MEM_SIZE {
        return Err(bad("(setup)", format!("record flags {:#x}, not a RAM total", total & 0xfff)));
    }
    let mut remaining = total & !0xfff;
    let mut pos = at + 8;
    let mut blocks = Vec::new();
    while remaining > 0 {
        let index = format!("#{}", blocks.len());
        if blocks.len() >= MAX_BLOCKS {
            return Err(bad(&index, format!("more than {MAX_BLOCKS} RAMBlocks")));
        }
        let mut n = [0u8; 1];
        src.read_exact_at(&mut n, pos).map_err(|_| bad(&index, "truncated name".into()))?;
        let mut name = vec![0u8; usize::from(n[0])];
        let name_at = pos.checked_add(1).ok_or_else(|| bad(&index, "offset overflows".into()))?;
        src.read_exact_at(&mut name, name_at).map_err(|_| bad(&index, "truncated name".into()))?;
        let name = String::from_utf8_lossy(&name).into_owned();
        if name.is_empty() {
            return Err(bad(&index, "empty name".into()));
        }
        let mut rec = [0u8; 8 + HEADER_BYTES as usize];
        let rec_at = name_at + u64::from(n[0]);
        src.read_exact_at(&mut rec, rec_at).map_err(|_| bad(&name, "truncated length or header".into()))?;
        let length = u64::from_be_bytes(rec[..8].try_into().unwrap_or_default());
        let header = Header {
            version: be32(&rec[8..12]),
            page_size: u64::from_be_bytes(rec[12..20].try_into().unwrap_or_default()),
            bitmap_offset: u64::from_be_bytes(rec[20..28].try_into().unwrap_or_default()),
            pages_offset: u64::from_be_bytes(rec[28..36].try_into().unwrap_or_default()),
        };
        let block = RamBlock { name, length, header };
        let after_header = rec_at + rec.len() as u64;
        let next = check_block(&block, after_header, remaining, len).map_err(|why| bad(&block.name, why))?;
        remaining -= block.length;
        pos = next;
        blocks.push(block);
    }
    Ok(blocks)
}

/// Checks one block's header against the layout QEMU writes; returns where the next
/// block's record starts.
fn check_block(b: &RamBlock, after_header: u64, remaining: u64, file_len: u64) -> Result<u64, String> {
    let h = &b.header;
    if h.version != HEADER_VERSION {
        return Err(format!("header version {} (this reads {HEADER_VERSION})", h.version));
    }
    if !h.page_size.is_power_of_two() || !(1 << 10..=1 << 16).contains(&h.page_size) {
        return Err(format!("page size {}", h.page_size));
    }
    if b.length == 0 || !b.length.is_multiple_of(h.page_size) || b.length > remaining {
        return Err(format!("length {} (page size {}, {remaining} bytes of RAM left)", b.length, h.page_size));
    }
    if h.bitmap_offset != after_header {
        return Err(format!("bitmap at {}, header ends at {after_header}", h.bitmap_offset));
    }
    if b.bitmap_bytes() > MAX_BITMAP {
        return Err(format!("bitmap of {} bytes", b.bitmap_bytes()));
    }
    let bitmap_end = h.bitmap_offset.checked_add(b.bitmap_bytes()).ok_or("bitmap end overflows")?;
    if h.pages_offset < bitmap_end || !h.pages_offset.is_multiple_of(h.page_size) {
        return Err(format!("pages at {} (bitmap ends at {bitmap_end})", h.pages_offset));
    }
    let end = h.pages_offset.checked_add(b.length).ok_or("pages end overflows")?;
    if end > file_len {
        return Err(format!("pages end at {end}, past the end of the file ({file_len})"));
    }
    Ok(end)
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap_or_default())
}

/// What [`repair`] did to one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repaired {
    /// The block.
    pub name: String,
    /// Its pages.
    pub pages: u64,
    /// Pages its bitmap marks present.
    pub present: u64,
    /// Whether the bitmap was written here (false: QEMU had written it).
    pub rewritten: bool,
}

/// Writes the bitmap of every block whose bitmap is empty from the data extents of its
/// page area: a page holding data is present, a hole stays absent (the loader leaves it
/// as the incoming QEMU allocated it, zero, exactly as for the zero pages QEMU itself
/// leaves out of mapped-ram files). Bitmaps QEMU wrote are left as they are. The file
/// must be fresh and written by one pass over RAM (a background snapshot, or
/// stop-and-copy of a paused guest): in a live precopy a page saved and later found zero
/// keeps its stale data in the file with its bit cleared.
pub fn repair(path: &Path) -> Result<Vec<Repaired>, MappedRamError> {
    let read_err = |source| MappedRamError::Read { path: path.to_owned(), source };
    let f = File::options().read(true).write(true).open(path).map_err(read_err)?;
    let mut out = Vec::new();
    for b in parse(&f, path)? {
        let mut bitmap = read_bitmap(&f, &b).map_err(read_err)?;
        let present = count(&bitmap);
        if present > 0 {
            out.push(Repaired { pages: b.pages(), present, name: b.name, rewritten: false });
            continue;
        }
        for (start, end) in data_extents(&f, b.header.pages_offset, b.length).map_err(read_err)? {
            let ps = b.header.page_size;
            let first = (start - b.header.pages_offset) / ps;
            let last = (end - b.header.pages_offset).div_ceil(ps).min(b.pages());
            for page in first..last {
                // page < pages, so the byte index is within the bitmap.
                if let Some(byte) = bitmap.get_mut((page / 8) as usize) {
                    *byte |= 1 << (page % 8);
                }
            }
        }
        f.write_all_at(&bitmap, b.header.bitmap_offset).map_err(|source| MappedRamError::Write {
            path: path.to_owned(),
            block: b.name.clone(),
            source,
        })?;
        out.push(Repaired { pages: b.pages(), present: count(&bitmap), name: b.name, rewritten: true });
    }
    Ok(out)
}

/// Refuses a file QEMU would load no RAM from, or only part of it: one whose bitmaps are
/// all empty, or a block whose bitmap is empty while its page area holds data. Returns
/// the blocks.
pub fn check(path: &Path) -> Result<Vec<RamBlock>, MappedRamError> {
    let read_err = |source| MappedRamError::Read { path: path.to_owned(), source };
    let f = File::open(path).map_err(read_err)?;
    let blocks = parse(&f, path)?;
    let mut any = false;
    for b in &blocks {
        if count(&read_bitmap(&f, b).map_err(read_err)?) > 0 {
            any = true;
        } else if !data_extents(&f, b.header.pages_offset, b.length).map_err(read_err)?.is_empty() {
            return Err(MappedRamError::EmptyBitmap { path: path.to_owned(), block: b.name.clone() });
        }
    }
    match blocks.iter().max_by_key(|b| b.length) {
        Some(largest) if !any => {
            Err(MappedRamError::EmptyBitmap { path: path.to_owned(), block: largest.name.clone() })
        }
        _ => Ok(blocks),
    }
}

/// Whether any block's page area holds data yet: QEMU saves pages only once RAM is
/// write-protected, after the device state.
pub fn any_page_written(f: &File, blocks: &[RamBlock]) -> std::io::Result<bool> {
    for b in blocks {
        if !data_extents(f, b.header.pages_offset, b.length)?.is_empty() {
            return Ok(true);
        }
    }
    Ok(false)
}

fn read_bitmap(f: &File, b: &RamBlock) -> std::io::Result<Vec<u8>> {
    // bitmap_bytes() <= MAX_BITMAP (checked when parsed) fits in memory.
    let mut bitmap = vec![0u8; usize::try_from(b.bitmap_bytes()).map_err(std::io::Error::other)?];
    FileExt::read_exact_at(f, &mut bitmap, b.header.bitmap_offset)?;
    Ok(bitmap)
}

fn count(bitmap: &[u8]) -> u64 {
    bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
}

/// The data extents within `[start, start + len)`, clipped to it. A file system without
/// hole reporting reports all data, which marks every page present: slower, still right.
fn data_extents(f: &File, start: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let end = start.saturating_add(len);
    let off = |v: u64| i64::try_from(v).map_err(std::io::Error::other);
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let data = match lseek(f.as_raw_fd(), off(pos)?, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = match lseek(f.as_raw_fd(), off(data)?, Whence::SeekHole) {
            Ok(h) => (h as u64).min(end),
            Err(nix::errno::Errno::ENXIO) => end,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            break;
        }
        out.push((data.max(start), hole));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PS: u64 = 4096;

    /// A file as QEMU lays it out: header, a configuration section, the RAM section with
    /// the given blocks (name, pages); each block's pages follow its header at the next
    /// page boundary. Returns the bytes and each block's (bitmap offset, pages offset).
    fn synthetic(blocks: &[(&str, u64)]) -> (Vec<u8>, Vec<(u64, u64)>) {
        let mut v = Vec::new();
        v.extend(FILE_MAGIC.to_be_bytes());
        v.extend(FILE_VERSION.to_be_bytes());
        // QEMU_VM_CONFIGURATION and a machine name that contains "ram".
        v.push(0x07);
        v.extend(13u32.to_be_bytes());
        v.extend(b"pc-i440fx-ram");
        v.push(SECTION_START);
        v.extend(2u32.to_be_bytes());
        v.extend(RAM_SECTION);
        let total: u64 = blocks.iter().map(|(_, p)| p * PS).sum();
        v.extend((total | FLAG_MEM_SIZE).to_be_bytes());
        let mut offsets = Vec::new();
        for (name, pages) in blocks {
            v.push(name.len() as u8);
            v.extend(name.as_bytes());
            v.extend((pages * PS).to_be_bytes());
            let bitmap = v.len() as u64 + HEADER_BYTES;
            let pages_at = (bitmap + pages.div_ceil(64) * 8).next_multiple_of(PS);
            v.extend(HEADER_VERSION.to_be_bytes());
            v.extend(PS.to_be_bytes());
            v.extend(bitmap.to_be_bytes());
            v.extend(pages_at.to_be_bytes());
            v.resize((pages_at + pages * PS) as usize, 0);
            offsets.push((bitmap, pages_at));
        }
        v.extend(0x10u64.to_be_bytes()); // RAM_SAVE_FLAG_EOS
        (v, offsets)
    }

    fn p() -> &'static Path {
        Path::new("(test)")
    }

    #[test]
    fn blocks_and_headers_are_found() {
        let (bytes, offsets) = synthetic(&[("pc.ram", 100), ("vga.vram", 3)]);
        let blocks = parse(&bytes[..], p()).expect("parse");
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].name, "pc.ram");
        assert_eq!(blocks[0].length, 100 * PS);
        assert_eq!(blocks[0].bitmap_bytes(), 16);
        assert_eq!((blocks[0].header.bitmap_offset, blocks[0].header.pages_offset), offsets[0]);
        assert_eq!(blocks[1].name, "vga.vram");
        assert_eq!((blocks[1].header.bitmap_offset, blocks[1].header.pages_offset), offsets[1]);
        assert_eq!(blocks[1].header.version, 1);
        assert_eq!(blocks[1].header.page_size, PS);
    }

    #[test]
    fn truncated_input_is_refused_at_every_length() {
        let (bytes, _) = synthetic(&[("pc.ram", 4), ("pc.rom", 2)]);
        // Every cut through the records, then a stride through the pages.
        let records = 300;
        for cut in (0..records).chain((records..bytes.len() - 8).step_by(509)) {
            assert!(parse(&bytes[..cut], p()).is_err(), "accepted {cut} of {} bytes", bytes.len());
        }
    }

    #[test]
    fn malformed_headers_are_refused() {
        let (good, offsets) = synthetic(&[("pc.ram", 4)]);
        let header = offsets[0].0 as usize - HEADER_BYTES as usize;
        let total_at = header - 8 - 1 - 6 - 8;
        let patch = |at: usize, val: &[u8]| {
            let mut b = good.clone();
            b[at..at + val.len()].copy_from_slice(val);
            b
        };
        let cases = [
            ("magic", patch(0, b"QEVN")),
            ("version", patch(header, &2u32.to_be_bytes())),
            ("page size", patch(header + 4, &3000u64.to_be_bytes())),
            ("huge page size", patch(header + 4, &(1u64 << 40).to_be_bytes())),
            ("bitmap offset", patch(header + 12, &0u64.to_be_bytes())),
            ("pages overlap bitmap", patch(header + 20, &(offsets[0].0).to_be_bytes())),
            ("pages past the end", patch(header + 20, &(1u64 << 30).to_be_bytes())),
            ("pages offset overflows", patch(header + 20, &(u64::MAX - 4095).to_be_bytes())),
            ("length not whole pages", patch(header - 8, &(4 * PS + 1).to_be_bytes())),
            ("length beyond total", patch(header - 8, &(8 * PS).to_be_bytes())),
            ("total flags", patch(total_at, &((4 * PS) | 0x10).to_be_bytes())),
            ("total beyond blocks", patch(total_at, &((5 * PS) | FLAG_MEM_SIZE).to_be_bytes())),
        ];
        for (what, bytes) in cases {
            assert!(parse(&bytes[..], p()).is_err(), "{what} accepted");
        }
        assert!(parse(&good[..], p()).is_ok());
    }

    #[test]
    fn a_total_far_beyond_the_file_is_refused_without_looping() {
        let (bytes, offsets) = synthetic(&[("pc.ram", 1)]);
        let total_at = offsets[0].0 as usize - HEADER_BYTES as usize - 8 - 1 - 6 - 8;
        let mut b = bytes.clone();
        b[total_at..total_at + 8].copy_from_slice(&(!0xfff | FLAG_MEM_SIZE).to_be_bytes());
        assert!(parse(&b[..], p()).is_err());
    }

    /// Writes `bytes` sparsely (zero pages stay holes), as QEMU writes a fresh file.
    fn sparse(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("ram");
        let f = File::create(&path).expect("create");
        for (i, page) in bytes.chunks(PS as usize).enumerate() {
            if page.iter().any(|b| *b != 0) {
                f.write_all_at(page, i as u64 * PS).expect("write");
            }
        }
        f.set_len(bytes.len() as u64).expect("len");
        (d, path)
    }

    #[test]
    fn repair_marks_the_pages_written_and_check_then_passes() {
        let (mut bytes, offsets) = synthetic(&[("pc.ram", 70), ("vga.vram", 2)]);
        let pages_at = offsets[0].1 as usize;
        for page in [0usize, 5, 6, 69] {
            bytes[pages_at + page * PS as usize + 100] = 0xab;
        }
        let (_d, path) = sparse(&bytes);
        assert!(matches!(check(&path), Err(MappedRamError::EmptyBitmap { ref block, .. }) if block == "pc.ram"));
        let err = check(&path).expect_err("empty").to_string();
        assert!(err.contains(&path.display().to_string()) && err.contains("pc.ram"), "{err}");
        let fixed = repair(&path).expect("repair");
        // Holes are found at the file system's granularity: at least the pages written.
        assert!(fixed[0].rewritten && fixed[0].present >= 4 && fixed[0].present < 70, "{fixed:?}");
        assert_eq!((fixed[1].present, fixed[1].rewritten), (0, true));
        let f = File::open(&path).expect("open");
        let blocks = check(&path).expect("repaired file passes");
        let bitmap = read_bitmap(&f, &blocks[0]).expect("bitmap");
        for page in [0usize, 5, 6, 69] {
            assert_ne!(bitmap[page / 8] & (1 << (page % 8)), 0, "page {page} not marked");
        }
        // A second repair leaves the written bitmap alone.
        let again = repair(&path).expect("again");
        assert!(!again[0].rewritten && again[0].present == fixed[0].present);
    }

    #[test]
    fn check_refuses_a_block_with_data_but_no_bits() {
        let (mut bytes, offsets) = synthetic(&[("pc.ram", 8), ("pc.rom", 4)]);
        bytes[offsets[0].1 as usize] = 1;
        bytes[offsets[1].1 as usize] = 1;
        bytes[offsets[0].0 as usize] = 1; // pc.ram's page 0 marked, pc.rom's not
        let (_d, path) = sparse(&bytes);
        let err = check(&path).expect_err("pc.rom unmarked");
        assert!(matches!(&err, MappedRamError::EmptyBitmap { block, .. } if block == "pc.rom"), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}
