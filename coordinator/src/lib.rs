//! The coordinator of a virtual cluster: runs the checkpoint protocol over the
//! sidecars, detects failures and rolls the cluster back.
//!
//! The protocol arrives with the coordinator issue; so far this crate only defines
//! the epoch, the number that orders a cluster's checkpoints.

/// The number of one cluster-wide checkpoint round; committed epochs form the
/// recovery line, the newest committed one first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch after this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0 + 1)
    }
}
