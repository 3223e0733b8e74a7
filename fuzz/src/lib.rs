//! Helpers shared by the fuzz targets: an in-memory reader that hands out its bytes in
//! chunks the input chooses (optionally stalling between them, so that reads are
//! cancelled mid-message), and a minimal executor for futures that never wait on
//! anything but such readers.

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

/// Chunk sizes drawn from `seed`: 1..=64 bytes, or up to 4 KiB, or the rest at once.
pub fn chunk_sizes(seed: u8) -> impl Iterator<Item = usize> {
    let mut x = u32::from(seed) | 0x100;
    std::iter::repeat_with(move || {
        // xorshift32: deterministic per seed.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        match seed % 4 {
            0 => usize::MAX,
            1 => 1 + (x % 4) as usize,
            2 => 1 + (x % 64) as usize,
            _ => 1 + (x % 4096) as usize,
        }
    })
}

/// Bytes read back in chunks; with `stall`, every other poll is `Pending` (without a
/// wake-up: the targets poll these readers by hand).
pub struct Chunked<I> {
    data: Vec<u8>,
    pos: usize,
    sizes: I,
    stall: bool,
    stalled: bool,
}

impl<I: Iterator<Item = usize>> Chunked<I> {
    /// Reads `data` in chunks of `sizes`.
    pub fn new(data: Vec<u8>, sizes: I, stall: bool) -> Chunked<I> {
        Chunked { data, pos: 0, sizes, stall, stalled: false }
    }
}

impl<I: Iterator<Item = usize> + Unpin> AsyncRead for Chunked<I> {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.stall && !this.stalled {
            this.stalled = true;
            return Poll::Pending;
        }
        this.stalled = false;
        let size = this.sizes.next().unwrap_or(usize::MAX).max(1);
        let n = size.min(buf.remaining()).min(this.data.len() - this.pos);
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Runs a future that is never `Pending` to completion; panics if it waits (nothing
/// would wake it).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("a future over in-memory data waited"),
    }
}
