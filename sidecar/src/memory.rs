//! Saving and feeding the migration stream: content-defined chunks of the stream go to
//! the block store as QEMU writes them into a pipe, and come back out of it at restore.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use std::path::Path;

use crate::store::manifest::{Stream, ZERO};
use crate::store::{BlockError, Blocks, Policy, Writer};

/// Content-defined chunk sizes for the stream. Small chunks matter: while the guest runs
/// during a background snapshot, every page it writes is saved out of order, and each
/// such insertion breaks the chunks around it; with 64 KiB chunks a guest rewriting 8 MiB
/// stored 35 MiB, with 16 KiB chunks 13 MiB. The price is more block files (creating them,
/// not hashing or compressing, dominates the store's cost).
const MIN_CHUNK: usize = 4 << 10;
const AVG_CHUNK: usize = 16 << 10;
const MAX_CHUNK: usize = 64 << 10;

/// Counts the bytes read and publishes the count.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
    tx: watch::Sender<u64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let total = self.count.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        self.tx.send_replace(total);
        Ok(n)
    }
}

/// Reads the migration stream from `pipe` to its end, storing content-defined chunks.
/// `progress` sees the byte count as it grows. On a store error the pipe is closed, so
/// QEMU's migration fails rather than blocks.
pub fn save_stream(
    pipe: OwnedFd,
    writer: &Writer,
    policy: &mut Policy,
    progress: watch::Sender<u64>,
) -> Result<Stream, BlockError> {
    save_stream_from(File::from(pipe), writer, policy, progress)
}

/// [`save_stream`] from any reader (the pipe in production; bytes in tests and fuzzing).
pub fn save_stream_from(
    input: impl Read,
    writer: &Writer,
    policy: &mut Policy,
    progress: watch::Sender<u64>,
) -> Result<Stream, BlockError> {
    let reader = Counting { inner: input, count: Arc::new(AtomicU64::new(0)), tx: progress };
    let chunker = fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    let mut stream = Stream { layout: "stream".into(), bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
    for chunk in chunker {
        let chunk = chunk.map_err(|e| BlockError::Read {
            hash: "(migration stream)".into(),
            path: "pipe".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let put = writer.put(&chunk.data, policy)?;
        stream.bytes += put.len;
        stream.bytes_stored += put.stored;
        stream.blocks.push((put.hash, put.len));
    }
    Ok(stream)
}

/// Block size of a mapped-ram file: RAM pages sit at fixed offsets, so fixed blocks
/// line up across checkpoints and a page rewritten costs one block, whatever the order
/// QEMU saved it in.
pub const MAPPED_BLOCK: usize = 64 << 10;

/// Stores a mapped-ram migration file as fixed-size blocks; holes and zero blocks are
/// recorded as [`ZERO`] and not stored. The file is cut into one run of blocks per core,
/// each hashed and compressed on its own thread.
pub fn save_file(path: &Path, writer: &Writer, policy: &mut Policy) -> Result<Stream, BlockError> {
    let read_err = |source| BlockError::Read { hash: "(migration file)".into(), path: path.to_owned(), source };
    let f = File::open(path).map_err(read_err)?;
    let len = f.metadata().map_err(read_err)?.len();
    let blocks_total = len.div_ceil(MAPPED_BLOCK as u64);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let per = blocks_total.div_ceil(threads.max(1)).max(1);
    let runs: Vec<(u64, u64)> =
        (0..blocks_total).step_by(per as usize).map(|first| (first, (first + per).min(blocks_total))).collect();
    let results: Vec<Result<(Stream, Policy), BlockError>> = std::thread::scope(|s| {
        let handles: Vec<_> = runs
            .iter()
            .map(|&(first, end)| {
                let (f, mut policy) = (&f, policy.clone());
                s.spawn(move || save_run(f, path, len, first, end, writer, &mut policy).map(|st| (st, policy)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(BlockError::Damaged {
                        hash: "(migration file)".into(),
                        why: "a storing thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut stream = Stream { layout: "mapped-ram".into(), bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
    for (i, r) in results.into_iter().enumerate() {
        let (part, p) = r?;
        if i == 0 {
            *policy = p;
        }
        stream.bytes += part.bytes;
        stream.bytes_stored += part.bytes_stored;
        stream.blocks.extend(part.blocks);
    }
    Ok(stream)
}

/// Stores blocks `first..end` of a mapped-ram file of `len` bytes.
fn save_run(
    f: &File,
    path: &Path,
    len: u64,
    first: u64,
    end: u64,
    writer: &Writer,
    policy: &mut Policy,
) -> Result<Stream, BlockError> {
    let mut stream = Stream { layout: "mapped-ram".into(), bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
    let mut buf = vec![0u8; MAPPED_BLOCK];
    for b in first..end {
        let off = b * MAPPED_BLOCK as u64;
        let n = (len - off).min(MAPPED_BLOCK as u64) as usize;
        let data = &mut buf[..n];
        std::os::unix::fs::FileExt::read_exact_at(f, data, off).map_err(|source| BlockError::Read {
            hash: "(migration file)".into(),
            path: path.to_owned(),
            source,
        })?;
        stream.bytes += n as u64;
        if data.iter().all(|b| *b == 0) {
            stream.blocks.push((ZERO.to_owned(), n as u64));
            continue;
        }
        let put = writer.put(data, policy)?;
        stream.bytes_stored += put.stored;
        stream.blocks.push((put.hash, put.len));
    }
    Ok(stream)
}

/// Reads until `buf` is full or the file ends; the bytes read.
pub(crate) fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Writes a stored mapped-ram file back to `path` (sparse where it was zero), checking
/// every block's hash.
pub fn restore_file(path: &Path, blocks: &Blocks, stream: &Stream) -> Result<(), BlockError> {
    let write_err = |source| BlockError::Write { hash: "(migration file)".into(), path: path.to_owned(), source };
    if stream.layout != "mapped-ram" {
        return Err(invalid(format!("a {} stream is not a mapped-ram file", stream.layout)));
    }
    // Lengths add up to `bytes` without overflow, each at most a block: offsets below hold.
    stream.check().map_err(|e| invalid(e.to_string()))?;
    let f = crate::store::private::create(path).map_err(write_err)?;
    let mut off = 0u64;
    for (hash, len) in &stream.blocks {
        if hash != ZERO {
            let data = blocks.get(hash)?;
            if data.len() as u64 != *len {
                return Err(BlockError::Damaged {
                    hash: hash.clone(),
                    why: format!("{} bytes, recorded {len}", data.len()),
                });
            }
            std::os::unix::fs::FileExt::write_all_at(&f, &data, off).map_err(write_err)?;
        }
        off = off.checked_add(*len).ok_or_else(|| invalid("offsets overflow".into()))?;
    }
    f.set_len(off).map_err(write_err)?;
    Ok(())
}

/// Writes the stored stream into `pipe`, checking every block's hash on the way.
pub fn feed_stream(pipe: OwnedFd, blocks: &Blocks, stream: &Stream) -> Result<u64, BlockError> {
    feed_stream_to(File::from(pipe), blocks, stream)
}

/// [`feed_stream`] into any writer (the pipe in production; memory in tests and fuzzing).
pub fn feed_stream_to(mut out: impl Write, blocks: &Blocks, stream: &Stream) -> Result<u64, BlockError> {
    if stream.layout != "stream" {
        return Err(invalid(format!("a {} file is not a sequential stream", stream.layout)));
    }
    stream.check().map_err(|e| invalid(e.to_string()))?;
    let mut total = 0u64;
    for (hash, len) in &stream.blocks {
        let data = blocks.get(hash)?;
        if data.len() as u64 != *len {
            return Err(BlockError::Damaged {
                hash: hash.clone(),
                why: format!("{} bytes, recorded {len}", data.len()),
            });
        }
        out.write_all(&data).map_err(|source| BlockError::Read {
            hash: hash.clone(),
            path: "migration pipe to QEMU".into(),
            source,
        })?;
        total = total.checked_add(*len).ok_or_else(|| invalid("length overflows".into()))?;
    }
    out.flush().map_err(|source| BlockError::Read {
        hash: "(end of stream)".into(),
        path: "migration pipe to QEMU".into(),
        source,
    })?;
    Ok(total)
}

/// A stream description no checkpoint has (see [`Stream::check`]).
fn invalid(why: String) -> BlockError {
    BlockError::Damaged { hash: "(stream description)".into(), why }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Estimates;

    fn blocks() -> (tempfile::TempDir, Blocks) {
        crate::store::blocks::tests::temp_blocks()
    }

    #[test]
    fn a_stream_saved_in_chunks_feeds_back_the_same_bytes() {
        let (_d, b) = blocks();
        let mut policy = Policy::new(Estimates::default());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        let (tx, _rx) = watch::channel(0);
        let w = Writer::new(b.clone(), std::time::Duration::ZERO);
        let stream = save_stream_from(&data[..], &w, &mut policy, tx).expect("save");
        w.finish().expect("stored");
        w.publish();
        assert_eq!(stream.bytes, data.len() as u64);
        assert!(stream.blocks.len() > 2 && stream.blocks.iter().all(|(_, l)| *l <= MAX_CHUNK as u64));
        let mut out = Vec::new();
        assert_eq!(feed_stream_to(&mut out, &b, &stream).expect("feed"), data.len() as u64);
        assert_eq!(out, data);
    }

    #[test]
    fn descriptions_whose_lengths_overflow_are_refused_before_any_write() {
        let (d, b) = blocks();
        // Two holes whose lengths overflow u64 when added: the offset used to overflow.
        let holes = Stream {
            layout: "mapped-ram".into(),
            bytes: 1,
            blocks: vec![(ZERO.into(), u64::MAX), (ZERO.into(), 2)],
            bytes_stored: 0,
        };
        let path = d.path().join("ram");
        assert!(matches!(restore_file(&path, &b, &holes), Err(BlockError::Damaged { .. })));
        assert!(!path.exists(), "nothing written");
        let named = Stream { layout: "stream".into(), bytes: 3, blocks: vec![("é".into(), 3)], bytes_stored: 0 };
        assert!(matches!(feed_stream_to(Vec::new(), &b, &named), Err(BlockError::Damaged { .. })));
        let zeros = Stream { layout: "mapped-ram".into(), bytes: 5, blocks: vec![(ZERO.into(), 5)], bytes_stored: 0 };
        restore_file(&path, &b, &zeros).expect("a hole only");
        assert_eq!(std::fs::read(&path).expect("read"), [0; 5]);
        assert!(feed_stream_to(Vec::new(), &b, &zeros).is_err(), "a mapped-ram file is no stream");
    }
}
