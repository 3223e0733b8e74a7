//! Journal mode: sequential 4 KiB records on a raw block device with O_DIRECT | O_DSYNC.
//!
//! Layout (all integers little-endian, every block 4096 bytes):
//! - block 0, header: `CUTJHDR1`, nonce u64, zeros, crc32 of bytes 0..4092 at 4092..4096;
//! - block k >= 1, record k: `CUTJREC1`, nonce u64, seq=k u64, payload (fastrand seeded with
//!   seq ^ nonce) up to 4092, crc32 of bytes 0..4092 at 4092..4096.

use crate::pacer::Pacer;
use crate::status::{Event, StatusWriter, fatal_forever, lock, sleep_forever};
use serde_json::Value;
use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::ops::{Deref, DerefMut};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Block (= record) size and O_DIRECT alignment.
pub const BLOCK: usize = 4096;
/// Header magic.
pub const HEADER_MAGIC: &[u8; 8] = b"CUTJHDR1";
/// Record magic.
pub const RECORD_MAGIC: &[u8; 8] = b"CUTJREC1";
/// Offset of the crc32 in every block.
const CRC_OFF: usize = BLOCK - 4;
/// Payload start in a record.
const PAYLOAD_OFF: usize = 24;
/// Bytes read per scan I/O.
const SCAN_CHUNK: usize = 1 << 20;

/// A zeroed heap buffer aligned to [`BLOCK`] (for O_DIRECT).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len` zeroed bytes (rounded up to a whole block) aligned to [`BLOCK`].
    pub fn new(len: usize) -> io::Result<Self> {
        let size = len.max(1).div_ceil(BLOCK) * BLOCK;
        let layout =
            Layout::from_size_align(size, BLOCK).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or(io::ErrorKind::OutOfMemory)?;
        Ok(AlignedBuf { ptr, layout })
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

fn seal(block: &mut [u8]) {
    let crc = crc32fast::hash(&block[..CRC_OFF]);
    block[CRC_OFF..BLOCK].copy_from_slice(&crc.to_le_bytes());
}

fn crc_ok(block: &[u8]) -> bool {
    block.len() >= BLOCK && crc32fast::hash(&block[..CRC_OFF]).to_le_bytes() == block[CRC_OFF..BLOCK]
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Writes the header block for `nonce` into `block` (first [`BLOCK`] bytes).
pub fn encode_header(block: &mut [u8], nonce: u64) {
    let block = &mut block[..BLOCK];
    block.fill(0);
    block[..8].copy_from_slice(HEADER_MAGIC);
    block[8..16].copy_from_slice(&nonce.to_le_bytes());
    seal(block);
}

/// The nonce of a valid header block, if it is one.
pub fn decode_header(block: &[u8]) -> Option<u64> {
    (block.len() >= BLOCK && &block[..8] == HEADER_MAGIC && crc_ok(block)).then(|| le_u64(&block[8..16]))
}

/// Writes record `seq` of run `nonce` into `block` (first [`BLOCK`] bytes).
pub fn encode_record(block: &mut [u8], nonce: u64, seq: u64) {
    let block = &mut block[..BLOCK];
    block[..8].copy_from_slice(RECORD_MAGIC);
    block[8..16].copy_from_slice(&nonce.to_le_bytes());
    block[16..24].copy_from_slice(&seq.to_le_bytes());
    fastrand::Rng::with_seed(seq ^ nonce).fill(&mut block[PAYLOAD_OFF..CRC_OFF]);
    seal(block);
}

/// Whether `block` is record `seq` of run `nonce` with a correct crc.
pub fn record_valid(block: &[u8], nonce: u64, seq: u64) -> bool {
    block.len() >= BLOCK
        && &block[..8] == RECORD_MAGIC
        && le_u64(&block[8..16]) == nonce
        && le_u64(&block[16..24]) == seq
        && crc_ok(block)
}

/// Whether the disk agrees with memory: the last record on disk is the last counted one,
/// or the one after it (the write that may have been in flight).
pub fn consistent(count: u64, disk_last: u64) -> bool {
    disk_last == count || disk_last == count + 1
}

/// Reads as much of `buf` as the file has at `off` (short only at end of file).
fn read_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Result of a disk scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanResult {
    /// Nonce of the on-disk header, if the header is valid.
    pub header_nonce: Option<u64>,
    /// Last record 1..=n such that all records 1..=n are valid for the run nonce (0 if none).
    pub last: u64,
}

/// Scans header and records 1..=capacity, stopping at the first block that is not the
/// expected record of run `nonce`. `chunk` (a whole number of blocks, aligned for O_DIRECT)
/// is the read buffer.
pub fn scan(file: &File, nonce: u64, capacity: u64, chunk: &mut [u8]) -> io::Result<ScanResult> {
    let chunk_blocks = chunk.len() / BLOCK;
    if chunk_blocks == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "scan buffer too small"));
    }
    let n = read_full(file, &mut chunk[..BLOCK], 0)?;
    let header_nonce = if n == BLOCK { decode_header(&chunk[..BLOCK]) } else { None };
    let mut last = 0;
    while last < capacity {
        let want = usize::try_from(capacity - last).unwrap_or(usize::MAX).min(chunk_blocks);
        let off = (last + 1) * BLOCK as u64;
        let got = read_full(file, &mut chunk[..want * BLOCK], off)? / BLOCK;
        for b in 0..got {
            let block = &chunk[b * BLOCK..(b + 1) * BLOCK];
            if !record_valid(block, nonce, last + 1) {
                return Ok(ScanResult { header_nonce, last });
            }
            last += 1;
        }
        if got < want {
            break;
        }
    }
    Ok(ScanResult { header_nonce, last })
}

/// The open journal device.
struct Dev {
    file: File,
    nonce: u64,
    capacity: u64,
    count: u64,
    buf: AlignedBuf,
}

/// A running journal.
pub struct Journal {
    status: Arc<StatusWriter>,
    disk: String,
    jrate: u32,
    count: AtomicU64,
    capacity: AtomicU64,
    full: AtomicBool,
    pausers: AtomicUsize,
    dev: Mutex<Option<Dev>>,
}

impl Journal {
    /// Starts the writer thread on device `disk` at `jrate` records/s (0 = unpaced).
    pub fn start(disk: String, jrate: u32, status: Arc<StatusWriter>) -> Arc<Journal> {
        let j = Arc::new(Journal {
            status,
            disk,
            jrate,
            count: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            full: AtomicBool::new(false),
            pausers: AtomicUsize::new(0),
            dev: Mutex::new(None),
        });
        let j2 = Arc::clone(&j);
        crate::spawn(&j.status, "journal", move || j2.run());
        j
    }

    /// Counters for ticks and status replies.
    pub fn fields(&self) -> Vec<(String, Value)> {
        vec![
            ("count".into(), self.count.load(Ordering::Relaxed).into()),
            ("capacity".into(), self.capacity.load(Ordering::Relaxed).into()),
            ("full".into(), self.full.load(Ordering::Relaxed).into()),
        ]
    }

    fn fatal(&self, what: &str, e: &io::Error) -> ! {
        fatal_forever(
            &self.status,
            Event::new("fatal").with("what", what).with("disk", self.disk.as_str()).with("error", e.to_string()),
        )
    }

    fn open(&self) -> Dev {
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT | libc::O_DSYNC)
            .open(&self.disk)
        {
            Ok(f) => f,
            Err(e) => self.fatal("journal open failed", &e),
        };
        let size = match file.seek(SeekFrom::End(0)) {
            Ok(s) => s,
            Err(e) => self.fatal("journal size failed", &e),
        };
        let blocks = size / BLOCK as u64;
        if blocks < 2 {
            fatal_forever(
                &self.status,
                Event::new("fatal")
                    .with("what", "journal device too small")
                    .with("disk", self.disk.as_str())
                    .with("bytes", size),
            );
        }
        let mut buf = match AlignedBuf::new(BLOCK) {
            Ok(b) => b,
            Err(e) => self.fatal("journal buffer allocation failed", &e),
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let nonce = fastrand::u64(..) ^ now.rotate_left(17);
        encode_header(&mut buf, nonce);
        if let Err(e) = file.write_all_at(&buf, 0) {
            self.fatal("journal header write failed", &e);
        }
        Dev { file, nonce, capacity: blocks - 1, count: 0, buf }
    }

    fn run(self: Arc<Self>) {
        let dev = self.open();
        let capacity = dev.capacity;
        self.capacity.store(capacity, Ordering::Relaxed);
        *lock(&self.dev) = Some(dev);
        self.status.emit(Event::new("ready").with("mode", "journal").with("capacity", capacity));
        let mut pacer = Pacer::per_second(u64::from(self.jrate));
        loop {
            pacer.wait();
            while self.pausers.load(Ordering::Acquire) > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut guard = lock(&self.dev);
            let Some(dev) = guard.as_mut() else {
                continue;
            };
            if dev.count >= dev.capacity {
                drop(guard);
                self.full.store(true, Ordering::Relaxed);
                self.status.emit(Event::new("error").with("what", "journal full").with("capacity", capacity));
                sleep_forever();
            }
            let seq = dev.count + 1;
            encode_record(&mut dev.buf, dev.nonce, seq);
            match dev.file.write_all_at(&dev.buf[..BLOCK], seq * BLOCK as u64) {
                Ok(()) => {
                    dev.count = seq;
                    self.count.store(seq, Ordering::Relaxed);
                }
                Err(e) => {
                    drop(guard);
                    self.status.emit(
                        Event::new("error")
                            .with("what", "journal write failed")
                            .with("seq", seq)
                            .with("error", e.to_string()),
                    );
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// Handles `check` on a separate thread: pause the writer, scan the disk, reply, resume.
    pub fn check(self: &Arc<Self>, req: Option<String>) {
        let j = Arc::clone(self);
        crate::spawn(&self.status, "journal-check", move || {
            let ev = j.do_check();
            j.status.emit(ev.req(req.as_deref()));
        });
    }

    fn do_check(&self) -> Event {
        self.pausers.fetch_add(1, Ordering::AcqRel);
        let guard = lock(&self.dev);
        self.pausers.fetch_sub(1, Ordering::AcqRel);
        let Some(dev) = guard.as_ref() else {
            return Event::new("error").with("what", "journal not ready");
        };
        let mut chunk = match AlignedBuf::new(SCAN_CHUNK) {
            Ok(c) => c,
            Err(e) => {
                return Event::new("error").with("what", "journal scan failed").with("error", e.to_string());
            }
        };
        match scan(&dev.file, dev.nonce, dev.capacity, &mut chunk) {
            Ok(r) => {
                let header_ok = r.header_nonce == Some(dev.nonce);
                Event::new("journal_check")
                    .with("count", dev.count)
                    .with("disk_last", r.last)
                    .with("ok", header_ok && consistent(dev.count, r.last))
                    .with("header_ok", header_ok)
                    .with("capacity", dev.capacity)
            }
            Err(e) => Event::new("error").with("what", "journal scan failed").with("error", e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(name: &str, blocks: u64) -> (TempFile, File) {
            let p = std::env::temp_dir().join(format!("cutline-journal-{}-{name}", std::process::id()));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&p)
                .expect("create temp file");
            f.set_len(blocks * BLOCK as u64).expect("set_len");
            (TempFile(p), f)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn put_record(f: &File, nonce: u64, seq: u64) {
        let mut b = AlignedBuf::new(BLOCK).expect("buf");
        encode_record(&mut b, nonce, seq);
        f.write_all_at(&b, seq * BLOCK as u64).expect("write");
    }

    fn put_header(f: &File, nonce: u64) {
        let mut b = AlignedBuf::new(BLOCK).expect("buf");
        encode_header(&mut b, nonce);
        f.write_all_at(&b, 0).expect("write");
    }

    #[test]
    fn aligned_buf_is_aligned_and_zeroed() {
        let b = AlignedBuf::new(5000).expect("buf");
        assert_eq!(b.len(), 2 * BLOCK);
        assert_eq!(b.as_ptr() as usize % BLOCK, 0);
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn header_roundtrip() {
        let mut b = vec![0u8; BLOCK];
        encode_header(&mut b, 0xdead_beef);
        assert_eq!(decode_header(&b), Some(0xdead_beef));
        b[100] ^= 1;
        assert_eq!(decode_header(&b), None);
        let mut r = vec![0u8; BLOCK];
        encode_record(&mut r, 1, 1);
        assert_eq!(decode_header(&r), None);
    }

    #[test]
    fn record_validation() {
        let mut b = vec![0u8; BLOCK];
        encode_record(&mut b, 42, 7);
        assert!(record_valid(&b, 42, 7));
        assert!(!record_valid(&b, 43, 7), "wrong nonce");
        assert!(!record_valid(&b, 42, 8), "wrong seq");
        let mut c = b.clone();
        c[2000] ^= 0x80;
        assert!(!record_valid(&c, 42, 7), "payload corruption");
        let mut c = b.clone();
        c[CRC_OFF] ^= 1;
        assert!(!record_valid(&c, 42, 7), "crc corruption");
        // Same seq, other nonce: different payload.
        let mut d = vec![0u8; BLOCK];
        encode_record(&mut d, 43, 7);
        assert_ne!(b[PAYLOAD_OFF..CRC_OFF], d[PAYLOAD_OFF..CRC_OFF]);
        assert!(!record_valid(&vec![0u8; BLOCK], 0, 0));
    }

    #[test]
    fn scan_stops_at_first_invalid_block() {
        let (_t, f) = TempFile::new("scan", 64);
        let nonce = 99;
        put_header(&f, nonce);
        for s in 1..=20 {
            put_record(&f, nonce, s);
        }
        // Stale records of an earlier run right after the valid ones.
        for s in 21..=30 {
            put_record(&f, 98, s);
        }
        let mut chunk = AlignedBuf::new(8 * BLOCK).expect("chunk");
        let r = scan(&f, nonce, 63, &mut chunk).expect("scan");
        assert_eq!(r, ScanResult { header_nonce: Some(nonce), last: 20 });
        // A record in the right place with the wrong seq does not count.
        put_record(&f, nonce, 22);
        let mut b = AlignedBuf::new(BLOCK).expect("buf");
        encode_record(&mut b, nonce, 23);
        f.write_all_at(&b, 21 * BLOCK as u64).expect("write");
        assert_eq!(scan(&f, nonce, 63, &mut chunk).expect("scan").last, 20);
        // Corrupt record 5.
        let mut b = vec![0u8; BLOCK];
        f.read_at(&mut b, 5 * BLOCK as u64).expect("read");
        b[500] ^= 1;
        f.write_all_at(&b, 5 * BLOCK as u64).expect("write");
        assert_eq!(scan(&f, nonce, 63, &mut chunk).expect("scan").last, 4);
    }

    #[test]
    fn scan_empty_and_full_disk() {
        let (_t, f) = TempFile::new("full", 11);
        let mut chunk = AlignedBuf::new(4 * BLOCK).expect("chunk");
        let r = scan(&f, 5, 10, &mut chunk).expect("scan");
        assert_eq!(r, ScanResult { header_nonce: None, last: 0 });
        put_header(&f, 5);
        for s in 1..=10 {
            put_record(&f, 5, s);
        }
        let r = scan(&f, 5, 10, &mut chunk).expect("scan");
        assert_eq!(r, ScanResult { header_nonce: Some(5), last: 10 });
        // Capacity bound is respected even if the file is longer.
        assert_eq!(scan(&f, 5, 7, &mut chunk).expect("scan").last, 7);
        // A capacity beyond the end of the file stops at EOF.
        assert_eq!(scan(&f, 5, 100, &mut chunk).expect("scan").last, 10);
    }

    #[test]
    fn consistency_rule() {
        assert!(consistent(10, 10));
        assert!(consistent(10, 11));
        assert!(!consistent(10, 9));
        assert!(!consistent(10, 12));
        assert!(consistent(0, 0));
    }
}
