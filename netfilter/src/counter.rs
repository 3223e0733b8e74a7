//! The gate's own count of held packets and bytes, and the decoder of the frames
//! QEMU's `filter-mirror` writes to its chardev.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::bounds::{Bound, Bounds};

/// Largest frame a mirror may announce: QEMU's `NET_BUFSIZE` (4096 + 65536) and then some.
pub const MAX_FRAME: usize = 128 << 10;

/// Packets and bytes held by the current hold, shared by the backend that counts and
/// the watchdog that enforces the bounds.
#[derive(Debug)]
pub(crate) struct Counter {
    packets: AtomicU64,
    bytes: AtomicU64,
    lost: AtomicBool,
    bounds: Bounds,
    /// Woken when a bound is reached or the count is lost.
    pub(crate) tripped: Notify,
}

impl Counter {
    pub(crate) fn new(bounds: Bounds) -> Counter {
        Counter {
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lost: AtomicBool::new(false),
            bounds,
            tripped: Notify::new(),
        }
    }

    /// Starts a new hold's count.
    pub(crate) fn reset(&self) {
        self.packets.store(0, Ordering::SeqCst);
        self.bytes.store(0, Ordering::SeqCst);
    }

    /// Counts one held frame of `len` bytes.
    pub(crate) fn add(&self, len: u64) {
        let p = self.packets.fetch_add(1, Ordering::SeqCst) + 1;
        let b = self.bytes.fetch_add(len, Ordering::SeqCst) + len;
        if self.bounds.exceeded(p, b).is_some() {
            self.tripped.notify_one();
        }
    }

    /// Replaces the count with a sample read from elsewhere (the plug qdisc's backlog).
    pub(crate) fn set(&self, packets: u64, bytes: u64) {
        self.packets.store(packets, Ordering::SeqCst);
        self.bytes.store(bytes, Ordering::SeqCst);
        if self.bounds.exceeded(packets, bytes).is_some() {
            self.tripped.notify_one();
        }
    }

    /// Marks the count as lost (or found again).
    pub(crate) fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::SeqCst);
        if lost {
            self.tripped.notify_one();
        }
    }

    /// (packets, bytes) so far.
    pub(crate) fn get(&self) -> (u64, u64) {
        (self.packets.load(Ordering::SeqCst), self.bytes.load(Ordering::SeqCst))
    }

    /// The bound reached, if any; a lost count counts as reached.
    pub(crate) fn exceeded(&self) -> Option<Bound> {
        if self.lost.load(Ordering::SeqCst) {
            return Some(Bound::CountLost);
        }
        let (p, b) = self.get();
        self.bounds.exceeded(p, b)
    }
}

/// A mirror stream that is not what filter-mirror writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// A length prefix beyond any Ethernet frame QEMU sends.
    #[error("mirror frame of {0} bytes is larger than any QEMU sends")]
    TooLarge(usize),
}

/// Splits filter-mirror's stream (`u32` big-endian length, then the frame; no vnet header)
/// into frame lengths, across reads of any size.
#[derive(Debug, Default)]
pub struct MirrorDecoder {
    header: [u8; 4],
    header_len: usize,
    /// Bytes of the current frame's body still to skip.
    body_left: usize,
}

impl MirrorDecoder {
    /// Feeds bytes read from the socket; calls `frame(len)` for every frame they complete.
    pub fn push(&mut self, mut data: &[u8], mut frame: impl FnMut(usize)) -> Result<(), FrameError> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(data.len());
                self.body_left -= n;
                data = &data[n..];
                continue;
            }
            let n = (4 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 4 {
                self.header_len = 0;
                let len = u32::from_be_bytes(self.header) as usize;
                if len > MAX_FRAME {
                    return Err(FrameError::TooLarge(len));
                }
                frame(len);
                self.body_left = len;
            }
        }
        Ok(())
    }

    /// True between frames (no partial header or body pending).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn stream(frames: &[usize]) -> Vec<u8> {
        let mut s = Vec::new();
        for &len in frames {
            s.extend_from_slice(&(len as u32).to_be_bytes());
            s.extend(std::iter::repeat_n(0xab, len));
        }
        s
    }

    #[test]
    fn decodes_frames_split_at_every_byte() {
        let frames = [60, 1514, 0, 98, 42];
        let s = stream(&frames);
        for chunk in [1, 2, 3, 5, 7, 64, s.len()] {
            let mut d = MirrorDecoder::default();
            let mut got = Vec::new();
            for c in s.chunks(chunk) {
                d.push(c, |len| got.push(len)).expect("valid stream");
            }
            assert_eq!(got, frames, "chunk size {chunk}");
            assert!(d.at_boundary());
        }
    }

    #[test]
    fn partial_frame_is_not_a_boundary() {
        let s = stream(&[100]);
        let mut d = MirrorDecoder::default();
        let mut n = 0;
        d.push(&s[..50], |_| n += 1).expect("valid");
        assert_eq!(n, 1, "a frame is counted once its length is known");
        assert!(!d.at_boundary());
    }

    #[test]
    fn rejects_absurd_lengths() {
        let mut d = MirrorDecoder::default();
        let err = d.push(&u32::MAX.to_be_bytes(), |_| {}).expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[test]
    fn counter_trips_at_the_bound_and_resets() {
        let c = Counter::new(Bounds { max_hold: Duration::from_secs(1), max_packets: 3, max_bytes: 1 << 20 });
        c.add(100);
        c.add(100);
        assert_eq!(c.exceeded(), None);
        c.add(100);
        assert_eq!(c.get(), (3, 300));
        assert_eq!(c.exceeded(), Some(Bound::Packets));
        c.reset();
        assert_eq!(c.exceeded(), None);
        c.set(0, 2 << 20);
        assert_eq!(c.exceeded(), Some(Bound::Bytes));
        c.reset();
        c.set_lost(true);
        assert_eq!(c.exceeded(), Some(Bound::CountLost));
    }
}
