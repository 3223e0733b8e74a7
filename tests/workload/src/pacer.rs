//! Fixed-rate pacing on the monotonic clock, robust to clock jumps (e.g. after a restore).

use std::time::{Duration, Instant};

/// Wakes a loop up at a fixed interval without drifting; resynchronises when far behind.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next: Instant,
}

impl Pacer {
    /// A pacer firing `per_sec` times per second (0 = never waits).
    pub fn per_second(per_sec: u64) -> Self {
        let interval = if per_sec == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / u32::try_from(per_sec).unwrap_or(u32::MAX)
        };
        Pacer::every(interval)
    }

    /// A pacer firing every `interval`.
    pub fn every(interval: Duration) -> Self {
        Pacer { interval, next: Instant::now() + interval }
    }

    /// Sleeps until the next slot; when more than a second behind, restarts the schedule from now.
    pub fn wait(&mut self) {
        if self.interval.is_zero() {
            return;
        }
        let now = Instant::now();
        if self.next > now {
            std::thread::sleep(self.next - now);
            self.next += self.interval;
        } else if now - self.next > Duration::from_secs(1) {
            self.next = now + self.interval;
        } else {
            self.next += self.interval;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paces_roughly() {
        let mut p = Pacer::per_second(200);
        let t = Instant::now();
        for _ in 0..20 {
            p.wait();
        }
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(95), "{e:?}");
        assert!(e < Duration::from_millis(1000), "{e:?}");
    }

    #[test]
    fn zero_rate_never_waits() {
        let mut p = Pacer::per_second(0);
        let t = Instant::now();
        for _ in 0..1000 {
            p.wait();
        }
        assert!(t.elapsed() < Duration::from_millis(100));
    }
}
