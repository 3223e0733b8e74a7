//! The lease as a file on the host, so that every sidecar the host agent runs fences its
//! own VM when the lease runs out, even if the host agent itself is gone: the agent and
//! each sidecar are independent fencers. The file holds `held NANOS` (the end of the
//! lease on CLOCK_BOOTTIME, which counts suspended time too), `unleased` or `fenced`,
//! written atomically.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::time::{ClockId, clock_gettime};

/// What the file says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileLease {
    /// No lease yet: nothing to fence on time.
    Unleased,
    /// Held until this CLOCK_BOOTTIME instant (ns).
    Held(u128),
    /// Lost: fence now.
    Fenced,
}

/// CLOCK_BOOTTIME now, in ns.
pub fn boottime_ns() -> u128 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u128 * 1_000_000_000 + t.tv_nsec() as u128)
        .unwrap_or(0)
}

impl FileLease {
    /// The file form of a lease ending at `until` (a monotonic instant of this process).
    pub fn held_until(until: Instant) -> FileLease {
        let left: Duration = until.saturating_duration_since(Instant::now());
        FileLease::Held(boottime_ns() + left.as_nanos())
    }

    /// The lease's end as an instant of this process, while held (now, when past).
    pub fn until(&self) -> Option<Instant> {
        match *self {
            FileLease::Held(until) => {
                let left = until.saturating_sub(boottime_ns());
                Some(Instant::now() + Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX)))
            }
            _ => None,
        }
    }

    /// Whether the VMs must be stopped now.
    pub fn must_fence(&self) -> bool {
        match *self {
            FileLease::Unleased => false,
            FileLease::Held(until) => boottime_ns() >= until,
            FileLease::Fenced => true,
        }
    }

    /// Parses the file's content.
    pub fn parse(text: &str) -> Option<FileLease> {
        let text = text.trim();
        match text {
            "unleased" => Some(FileLease::Unleased),
            "fenced" => Some(FileLease::Fenced),
            _ => text.strip_prefix("held ").and_then(|n| n.parse().ok()).map(FileLease::Held),
        }
    }

    fn text(&self) -> String {
        match self {
            FileLease::Unleased => "unleased\n".into(),
            FileLease::Held(n) => format!("held {n}\n"),
            FileLease::Fenced => "fenced\n".into(),
        }
    }

    /// Writes it to `path` atomically.
    pub fn write(&self, path: &Path) -> Result<(), crate::store::StoreError> {
        crate::store::write_atomically(path, self.text().as_bytes())
    }

    /// Reads `path`: a missing file is no lease; an unreadable or damaged one fences,
    /// since whoever wrote it can no longer say the lease holds.
    pub fn read(path: &Path) -> FileLease {
        match std::fs::read_to_string(path) {
            Ok(t) => FileLease::parse(&t).unwrap_or(FileLease::Fenced),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => FileLease::Unleased,
            Err(_) => FileLease::Fenced,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_round_trips_and_damage_fences() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("lease");
        assert_eq!(FileLease::read(&p), FileLease::Unleased);
        let l = FileLease::held_until(Instant::now() + Duration::from_secs(60));
        l.write(&p).expect("write");
        assert_eq!(FileLease::read(&p), l);
        assert!(!l.must_fence());
        FileLease::held_until(Instant::now()).write(&p).expect("write");
        assert!(FileLease::read(&p).must_fence(), "ran out");
        std::fs::write(&p, "held soon").expect("write");
        assert!(FileLease::read(&p).must_fence(), "damaged");
        assert!(!FileLease::Unleased.must_fence());
    }
}
