//! Output gates that hold a VM's outgoing packets from just before its checkpoint
//! cut until every VM of the cluster has taken its cut, then release them in order.
//!
//! A [`Gate`] covers every netdev of one guest and has two backends:
//! - QEMU's `filter-buffer` on `queue=rx` of each netdev, driven over QMP
//!   ([`Gate::attach_qemu`]), with a `filter-mirror` in front that lets the gate count what
//!   is held, since QEMU exposes no such count and drops past 10,000 queued packets;
//! - the Linux `plug` qdisc on an `ifb` that the guest's tap redirects its ingress to
//!   ([`Gate::attach_plug`]), for taps QEMU's netfilters refuse (vhost, multiqueue).
//!
//! Holds are bounded in time, packets and bytes ([`Bounds`]); a watchdog releases a hold
//! that reaches a bound and reports a [`Breach`], so that the caller aborts the checkpoint
//! rather than QEMU or the kernel dropping packets silently.
//!
//! ```no_run
//! # async fn f(qmp: qmp_client::Qmp) -> Result<(), netfilter::GateError> {
//! use netfilter::{Bounds, FilterBufferConfig, Gate};
//! let gate = Gate::attach_qemu("vm0", qmp, &FilterBufferConfig::new("/run/cutline"), Bounds::default()).await?;
//! gate.hold().await?;
//! // ... every VM takes its cut ...
//! let report = gate.release().await?;
//! if report.is_some_and(|r| r.breach.is_some()) {
//!     // a bound released early: abort this checkpoint
//! }
//! # Ok(()) }
//! ```

mod bounds;
mod counter;
mod filter_buffer;
mod gate;
mod mirror;
mod netdev;
mod plug;

pub use bounds::{Bound, Bounds, BoundsError, Breach, MAX_HOLD, QEMU_QUEUE_LIMIT};
pub use counter::{FrameError, MAX_FRAME, MirrorDecoder};
pub use filter_buffer::{FilterBufferConfig, FilterBufferError, ID_PREFIX};
pub use gate::{Gate, GateError, GateState, GateStats, HoldOutcome, HoldReport};
pub use mirror::MirrorError;
pub use netdev::{NetdevSpec, Refusal, netdevs_of_argv, refusal_of_qemu_error};
pub use plug::{PlugConfig, PlugError};
