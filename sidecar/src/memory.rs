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
use crate::store::{BlockError, Blocks, Policy};

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
/// `progress` sees the byte count as it grows; `created` gets every block this save
/// adds, even when it fails, for cleanup. On a store error the pipe is closed, so QEMU's
/// migration fails rather than blocks.
pub fn save_stream(
    pipe: OwnedFd,
    blocks: &Blocks,
    policy: &mut Policy,
    progress: watch::Sender<u64>,
    created: &mut Vec<String>,
) -> Result<Stream, BlockError> {
    let reader = Counting { inner: File::from(pipe), count: Arc::new(AtomicU64::new(0)), tx: progress };
    let chunker = fastcdc::v2020::StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    let mut stream = Stream { layout: "stream".into(), bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
    for chunk in chunker {
        let chunk = chunk.map_err(|e| BlockError::Read {
            hash: "(migration stream)".into(),
            path: "pipe".into(),
            source: std::io::Error::other(e.to_string()),
        })?;
        let put = blocks.put(&chunk.data, policy)?;
        stream.bytes += put.len;
        stream.bytes_stored += put.stored;
        if put.stored > 0 {
            created.push(put.hash.clone());
        }
        stream.blocks.push((put.hash, put.len));
    }
    Ok(stream)
}

/// Block size of a mapped-ram file: RAM pages sit at fixed offsets, so fixed blocks
/// line up across checkpoints and a page rewritten costs one block, whatever the order
/// QEMU saved it in.
pub const MAPPED_BLOCK: usize = 64 << 10;

/// Stores a mapped-ram migration file as fixed-size blocks; holes and zero blocks are
/// recorded as [`ZERO`] and not stored. `created` gets every block added.
pub fn save_file(
    path: &Path,
    blocks: &Blocks,
    policy: &mut Policy,
    created: &mut Vec<String>,
) -> Result<Stream, BlockError> {
    let read_err = |source| BlockError::Read { hash: "(migration file)".into(), path: path.to_owned(), source };
    let mut f = File::open(path).map_err(read_err)?;
    let mut stream = Stream { layout: "mapped-ram".into(), bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
    let mut buf = vec![0u8; MAPPED_BLOCK];
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|source| BlockError::Read {
            hash: "(migration file)".into(),
            path: path.to_owned(),
            source,
        })?;
        if n == 0 {
            break;
        }
        let data = &buf[..n];
        stream.bytes += n as u64;
        if data.iter().all(|b| *b == 0) {
            stream.blocks.push((ZERO.to_owned(), n as u64));
            continue;
        }
        let put = blocks.put(data, policy)?;
        stream.bytes_stored += put.stored;
        if put.stored > 0 {
            created.push(put.hash.clone());
        }
        stream.blocks.push((put.hash, put.len));
    }
    Ok(stream)
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
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
    let f = crate::store::private::create(path).map_err(write_err)?;
    let mut off = 0u64;
    for (hash, len) in &stream.blocks {
        // Every length comes from the manifest: the blocks must add up to its total.
        let end = off.checked_add(*len).filter(|e| *e <= stream.bytes).ok_or_else(|| BlockError::Damaged {
            hash: hash.clone(),
            why: format!("a block of {len} bytes at {off} runs past the recorded {} bytes", stream.bytes),
        })?;
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
        off = end;
    }
    if off != stream.bytes {
        return Err(BlockError::Damaged {
            hash: "(migration file)".into(),
            why: format!("blocks add up to {off} bytes, recorded {}", stream.bytes),
        });
    }
    f.set_len(off).map_err(write_err)?;
    Ok(())
}

/// Writes the stored stream into `pipe`, checking every block's hash on the way.
pub fn feed_stream(pipe: OwnedFd, blocks: &Blocks, stream: &Stream) -> Result<u64, BlockError> {
    let mut out = File::from(pipe);
    let mut total = 0;
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
        total += data.len() as u64;
    }
    Ok(total)
}
