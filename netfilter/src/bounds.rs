//! How long and how much a gate may hold, and what it reports when a bound forces a release.

use std::fmt;
use std::time::Duration;

/// QEMU's filter-buffer queue drops every packet beyond this many (net/queue.c, `nq_maxlen`).
pub const QEMU_QUEUE_LIMIT: u64 = 10_000;

/// The longest hold QEMU's filter-buffer timer can express (its `interval` is a u32 of µs),
/// halved because the gate arms that timer at twice the hold bound (see [`Bounds::qemu_interval_us`]).
pub const MAX_HOLD: Duration = Duration::from_micros(u32::MAX as u64 / 2);

/// Limits of one hold. The gate releases by itself, and reports a [`Breach`], as soon as one
/// is reached, so that the caller aborts the checkpoint instead of losing packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Longest hold.
    pub max_hold: Duration,
    /// Most packets held, summed over the gate's netdevs. Must stay below
    /// [`QEMU_QUEUE_LIMIT`] with room for the packets that arrive while the release is on its way.
    pub max_packets: u64,
    /// Most bytes held (Ethernet frames, summed over the gate's netdevs).
    pub max_bytes: u64,
}

impl Default for Bounds {
    /// 10 s, 8,192 packets, 64 MiB.
    fn default() -> Self {
        Bounds { max_hold: Duration::from_secs(10), max_packets: 8_192, max_bytes: 64 << 20 }
    }
}

/// A bound that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BoundsError {
    /// `max_hold` is zero or longer than QEMU's timer can express.
    #[error("max_hold {0:?} must be above zero and at most {MAX_HOLD:?}")]
    Hold(Duration),
    /// `max_packets` is zero or leaves no room below QEMU's queue limit.
    #[error("max_packets {0} must be 1..={max}", max = QEMU_QUEUE_LIMIT * 9 / 10)]
    Packets(u64),
    /// `max_bytes` is zero.
    #[error("max_bytes must be above zero")]
    Bytes,
}

impl Bounds {
    /// Checks the bounds: non-zero, a hold QEMU's timer can express, and at least 10% of
    /// QEMU's queue left free for the packets that arrive while a forced release is on its way.
    pub fn validate(&self) -> Result<(), BoundsError> {
        if self.max_hold.is_zero() || self.max_hold > MAX_HOLD {
            return Err(BoundsError::Hold(self.max_hold));
        }
        if self.max_packets == 0 || self.max_packets > QEMU_QUEUE_LIMIT * 9 / 10 {
            return Err(BoundsError::Packets(self.max_packets));
        }
        if self.max_bytes == 0 {
            return Err(BoundsError::Bytes);
        }
        Ok(())
    }

    /// The `interval` given to QEMU's filter-buffer, in µs: twice `max_hold`.
    ///
    /// QEMU flushes a buffer that stays on for `interval` of *virtual* time. Virtual time
    /// never runs faster than the host's clock (it stops while the VM is paused), so while
    /// the gate lives its own `max_hold` always fires first and the release stays explicit;
    /// if the process driving the gate dies mid-hold, QEMU's timer still lets the packets go.
    pub fn qemu_interval_us(&self) -> u32 {
        let us = self.max_hold.as_micros().saturating_mul(2).max(1_000_000);
        u32::try_from(us).unwrap_or(u32::MAX)
    }

    /// The bound `packets` and `bytes` reach, if any (packets are checked first).
    pub fn exceeded(&self, packets: u64, bytes: u64) -> Option<Bound> {
        if packets >= self.max_packets {
            Some(Bound::Packets)
        } else if bytes >= self.max_bytes {
            Some(Bound::Bytes)
        } else {
            None
        }
    }
}

/// Which limit forced a release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The hold lasted `max_hold`.
    Time,
    /// `max_packets` packets were held.
    Packets,
    /// `max_bytes` bytes were held.
    Bytes,
    /// The gate lost its count of held packets (the mirror socket closed), so it could no
    /// longer tell how close QEMU's queue was to dropping.
    CountLost,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Bound::Time => "hold time",
            Bound::Packets => "packet count",
            Bound::Bytes => "byte count",
            Bound::CountLost => "lost packet count",
        })
    }
}

/// A release the gate made by itself because a bound was reached. The packets were all
/// delivered, but some of them left before the cut was committed: abort the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Breach {
    /// The bound that was reached.
    pub bound: Bound,
    /// The hold that was cut short (see [`crate::HoldReport::epoch`]).
    pub epoch: u64,
    /// Packets held when the release began.
    pub packets: u64,
    /// Bytes held when the release began.
    pub bytes: u64,
    /// How long the hold had lasted.
    pub held_for: Duration,
}

impl fmt::Display for Breach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "hold {} released by its {} bound after {:?} ({} packets, {} bytes)",
            self.epoch, self.bound, self.held_for, self.packets, self.bytes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_leave_room_below_qemus_queue() {
        let b = Bounds::default();
        assert_eq!(b.validate(), Ok(()));
        assert!(b.max_packets < QEMU_QUEUE_LIMIT);
    }

    #[test]
    fn rejects_unusable_bounds() {
        let b = Bounds::default();
        assert!(matches!(Bounds { max_hold: Duration::ZERO, ..b }.validate(), Err(BoundsError::Hold(_))));
        assert!(Bounds { max_hold: MAX_HOLD + Duration::from_secs(1), ..b }.validate().is_err());
        assert_eq!(Bounds { max_packets: 0, ..b }.validate(), Err(BoundsError::Packets(0)));
        assert_eq!(Bounds { max_packets: 9_500, ..b }.validate(), Err(BoundsError::Packets(9_500)));
        assert_eq!(Bounds { max_bytes: 0, ..b }.validate(), Err(BoundsError::Bytes));
    }

    #[test]
    fn qemu_interval_is_twice_the_hold_within_u32() {
        let b = Bounds { max_hold: Duration::from_secs(10), ..Bounds::default() };
        assert_eq!(b.qemu_interval_us(), 20_000_000);
        let short = Bounds { max_hold: Duration::from_millis(10), ..b };
        assert_eq!(short.qemu_interval_us(), 1_000_000, "at least a second");
        let long = Bounds { max_hold: MAX_HOLD, ..b };
        assert!(long.qemu_interval_us() >= u32::MAX - 1);
    }

    #[test]
    fn exceeded_names_the_bound() {
        let b = Bounds { max_hold: Duration::from_secs(1), max_packets: 10, max_bytes: 1000 };
        assert_eq!(b.exceeded(9, 999), None);
        assert_eq!(b.exceeded(10, 0), Some(Bound::Packets));
        assert_eq!(b.exceeded(1, 1000), Some(Bound::Bytes));
    }
}
