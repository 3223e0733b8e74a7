//! The cluster protocol between the coordinator, the sidecars and the CLI.
//!
//! Per epoch (a two-phase commit with vector timestamps): `Prepare` → `Vote`; `Cut` →
//! `CutDone`; `Release` → `Released`; `Durable`; `Commit` (after the coordinator's record
//! is durable) or `Abort`. Every message from the coordinator carries its incarnation
//! (a number persisted and raised at each start) and every epoch message its epoch, so a
//! late answer to an earlier incarnation or epoch can never count for the current one.
//! `Register` and `Welcome` carry [`PROTOCOL`]; peers of another version are refused.

mod clock;
mod frame;
mod msg;

pub use clock::{COORDINATOR, VectorClock};
pub use frame::{FrameError, FrameReader, MAX_MESSAGE, read, same_token, write};
pub use msg::{Envelope, Msg, PROTOCOL, Request};
