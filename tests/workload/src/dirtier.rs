//! Dirtier mode: rewrite successive 4 KiB pages of a buffer at a fixed rate.
//!
//! Each page write stores the current pass number (u64, starting at 1) in the page's first
//! 8 bytes and fills the rest with pseudo-random bytes seeded by pass and page, so that
//! every rewrite is new content a checkpoint must store (no page repeats another, none
//! compresses); `bytes` counts whole pages dirtied (4096 per page write).

use crate::status::{Event, StatusWriter, fatal_forever};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Page size used for dirtying.
pub const PAGE: usize = 4096;
/// Pacing slice.
const SLICE: Duration = Duration::from_millis(10);
/// Pages written per slice when unpaced.
const UNPACED_BATCH: u64 = 256;

/// A buffer plus the cursor that walks it.
#[derive(Debug)]
pub struct Pages {
    buf: Vec<u8>,
    next: usize,
    pass: u64,
}

impl Pages {
    /// Allocates `bytes` (rounded down to whole pages, at least one) and touches every page.
    pub fn new(bytes: usize) -> Self {
        let pages = (bytes / PAGE).max(1);
        let mut buf = vec![0u8; pages * PAGE];
        for p in buf.chunks_exact_mut(PAGE) {
            // SAFETY: p has PAGE >= 1 bytes; volatile so the touch is not optimised away.
            unsafe { std::ptr::write_volatile(p.as_mut_ptr(), 1) };
        }
        Pages { buf, next: 0, pass: 1 }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.buf.len() / PAGE
    }

    /// Completed passes over the whole buffer.
    pub fn passes(&self) -> u64 {
        self.pass - 1
    }

    /// Dirties the next `n` pages (wrapping); returns how many full passes completed.
    pub fn dirty(&mut self, n: u64) -> u64 {
        let mut wrapped = 0;
        for _ in 0..n {
            let off = self.next * PAGE;
            let page = &mut self.buf[off..off + PAGE];
            fastrand::Rng::with_seed(self.pass.rotate_left(32) ^ self.next as u64).fill(&mut page[8..]);
            // SAFETY: page holds PAGE >= 8 valid, writable bytes and [u8; 8] has alignment 1.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr().cast::<[u8; 8]>(), self.pass.to_le_bytes()) };
            self.next += 1;
            if self.next == self.pages() {
                self.next = 0;
                self.pass += 1;
                wrapped += 1;
            }
        }
        std::hint::black_box(&mut self.buf);
        wrapped
    }

    /// The pass number stored in page `i`.
    #[cfg(test)]
    pub fn stamp(&self, i: usize) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.buf[i * PAGE..i * PAGE + 8]);
        u64::from_le_bytes(a)
    }
}

/// A running dirtier.
pub struct Dirtier {
    mib: u64,
    pass: AtomicU64,
    bytes: AtomicU64,
}

impl Dirtier {
    /// Allocates `mib` MiB and dirties it at `mibps` MiB/s (0 = as fast as possible).
    pub fn start(mib: u64, mibps: u64, status: Arc<StatusWriter>) -> Arc<Dirtier> {
        let d = Arc::new(Dirtier { mib, pass: AtomicU64::new(0), bytes: AtomicU64::new(0) });
        let d2 = Arc::clone(&d);
        let st = Arc::clone(&status);
        crate::spawn(&status, "dirtier", move || d2.run(mibps, &st));
        d
    }

    /// Counters for ticks and status replies.
    pub fn fields(&self) -> Vec<(String, Value)> {
        vec![
            ("pass".into(), self.pass.load(Ordering::Relaxed).into()),
            ("bytes".into(), self.bytes.load(Ordering::Relaxed).into()),
            ("mib".into(), self.mib.into()),
        ]
    }

    fn run(&self, mibps: u64, status: &StatusWriter) {
        let Some(bytes) = usize::try_from(self.mib).ok().and_then(|m| m.checked_mul(1 << 20)) else {
            fatal_forever(status, Event::new("fatal").with("what", "dirtier size too large").with("mib", self.mib));
        };
        let mut pages = Pages::new(bytes);
        status.emit(Event::new("ready").with("mode", "dirtier").with("mib", self.mib));
        let pages_per_sec = mibps.saturating_mul((1 << 20) / PAGE as u64);
        let start = Instant::now();
        let mut epoch = start;
        let mut done_in_epoch: u64 = 0;
        loop {
            let n = if mibps == 0 {
                UNPACED_BATCH
            } else {
                let elapsed = epoch.elapsed();
                let due = (elapsed.as_micros() as u64).saturating_mul(pages_per_sec) / 1_000_000;
                if due.saturating_sub(done_in_epoch) > pages_per_sec {
                    // More than a second behind (e.g. clock jump after restore): resynchronise.
                    epoch = Instant::now();
                    done_in_epoch = 0;
                    0
                } else {
                    due.saturating_sub(done_in_epoch)
                }
            };
            if n > 0 {
                pages.dirty(n);
                done_in_epoch += n;
                self.pass.store(pages.passes(), Ordering::Relaxed);
                self.bytes.fetch_add(n * PAGE as u64, Ordering::Relaxed);
            }
            if mibps == 0 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(SLICE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_wraps_and_stamps_pass() {
        let mut p = Pages::new(4 * PAGE);
        assert_eq!(p.pages(), 4);
        assert_eq!(p.dirty(3), 0);
        assert_eq!((p.stamp(0), p.stamp(2)), (1, 1));
        assert_eq!(p.dirty(2), 1);
        assert_eq!(p.passes(), 1);
        assert_eq!(p.stamp(0), 2);
        assert_eq!(p.stamp(1), 1);
        assert_eq!(p.dirty(11), 3);
        assert_eq!(p.passes(), 4);
    }

    #[test]
    fn tiny_buffer_has_one_page() {
        let mut p = Pages::new(10);
        assert_eq!(p.pages(), 1);
        assert_eq!(p.dirty(2), 2);
    }
}
