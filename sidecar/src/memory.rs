//! Saving and feeding the migration stream: content-defined chunks of the stream go to
//! the block store as QEMU writes them into a pipe, and come back out of it at restore.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

use crate::store::manifest::Stream;
use crate::store::{BlockError, Blocks, Policy};

/// Content-defined chunk sizes for the stream: small enough that a scattered dirty page
/// costs little (an idle guest's incremental checkpoint stays well under 1% of its RAM),
/// large enough that a 256 MiB guest is a few thousand block files, not tens of thousands
/// (creating files, not hashing or compressing, dominates the store's cost).
const MIN_CHUNK: usize = 16 << 10;
const AVG_CHUNK: usize = 64 << 10;
const MAX_CHUNK: usize = 256 << 10;

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
    let mut stream = Stream { bytes: 0, blocks: Vec::new(), bytes_stored: 0 };
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
        total += *len;
    }
    Ok(total)
}
