//! Output gates that hold a VM's outgoing packets from just before its checkpoint
//! cut until every VM of the cluster has taken its cut, then release them in order.
//!
//! The gates themselves (QEMU `filter-buffer`, Linux `plug` qdisc) arrive with the
//! netfilter issue; this crate so far only names the states a gate can be in.

/// Whether a VM's outgoing packets flow or are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// Packets flow to the network.
    Open,
    /// Packets are queued on the host until release.
    Held,
}
