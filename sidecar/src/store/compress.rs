//! When to compress a block: seed 001's rule, from running estimates.
//!
//! Compress when `t_compress + t_write_compressed < t_write_uncompressed`, that is when
//! `1/c + r/w < 1/w` for compression speed `c`, write bandwidth `w` and ratio `r`.
//! The estimates are exponentially weighted; while the rule says "don't", every
//! `SAMPLE_EVERY`th block is compressed anyway so the ratio estimate stays current.

use std::time::Duration;

/// Every how many skipped blocks one is compressed to refresh the estimates.
const SAMPLE_EVERY: u64 = 32;
/// Weight of a new observation.
const ALPHA: f64 = 0.1;

/// Running estimates behind the compression decision.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Estimates {
    /// Compression speed in bytes of input per second.
    pub compress_bps: f64,
    /// Sustained (fsync'd) write bandwidth of the store in bytes per second.
    pub write_bps: f64,
    /// Compressed size over input size.
    pub ratio: f64,
}

impl Default for Estimates {
    fn default() -> Self {
        // Until measured: zstd level 1 speed, a modest disk, a typical RAM ratio.
        Estimates { compress_bps: 500e6, write_bps: 200e6, ratio: 0.4 }
    }
}

/// The decision and the estimates it comes from.
#[derive(Debug, Clone)]
pub struct Policy {
    est: Estimates,
    skipped: u64,
}

impl Policy {
    /// A policy starting from `est`.
    pub fn new(est: Estimates) -> Policy {
        Policy { est, skipped: 0 }
    }

    /// The current estimates.
    pub fn estimates(&self) -> Estimates {
        self.est
    }

    /// True when compressing pays by the rule.
    pub fn pays(&self) -> bool {
        let e = &self.est;
        1.0 / e.compress_bps + e.ratio / e.write_bps < 1.0 / e.write_bps
    }

    /// Whether to try compressing the next block: when it pays, or as a periodic sample.
    pub fn should_try(&mut self) -> bool {
        if self.pays() {
            return true;
        }
        self.skipped += 1;
        self.skipped.is_multiple_of(SAMPLE_EVERY)
    }

    /// Records one compression: `input` bytes became `output` bytes in `took`.
    pub fn observe_compression(&mut self, input: usize, output: usize, took: Duration) {
        if input == 0 {
            return;
        }
        let secs = took.as_secs_f64().max(1e-7);
        self.est.compress_bps = ewma(self.est.compress_bps, input as f64 / secs);
        self.est.ratio = ewma(self.est.ratio, output as f64 / input as f64);
    }

    /// Records sustained write bandwidth: `bytes` made durable in `took`.
    pub fn observe_write(&mut self, bytes: u64, took: Duration) {
        if bytes < (1 << 20) {
            return; // too little to say anything about the disk
        }
        let secs = took.as_secs_f64().max(1e-6);
        self.est.write_bps = ewma(self.est.write_bps, bytes as f64 / secs);
    }
}

fn ewma(old: f64, new: f64) -> f64 {
    if new.is_finite() { old * (1.0 - ALPHA) + new * ALPHA } else { old }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compresses_compressible_data_on_a_slow_disk() {
        let p = Policy::new(Estimates { compress_bps: 400e6, write_bps: 100e6, ratio: 0.3 });
        assert!(p.pays());
    }

    #[test]
    fn does_not_compress_incompressible_data() {
        let p = Policy::new(Estimates { compress_bps: 400e6, write_bps: 100e6, ratio: 0.98 });
        assert!(!p.pays());
    }

    #[test]
    fn does_not_compress_when_the_disk_outruns_the_compressor() {
        let p = Policy::new(Estimates { compress_bps: 400e6, write_bps: 2e9, ratio: 0.5 });
        assert!(!p.pays());
    }

    #[test]
    fn samples_while_not_paying_and_learns() {
        let mut p = Policy::new(Estimates { compress_bps: 400e6, write_bps: 100e6, ratio: 0.99 });
        let tries = (0..64).filter(|_| p.should_try()).count();
        assert_eq!(tries, 2);
        for _ in 0..50 {
            p.observe_compression(1000, 100, Duration::from_micros(2));
        }
        assert!(p.pays(), "after seeing compressible data the rule flips: {:?}", p.estimates());
    }
}
