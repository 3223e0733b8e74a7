//! An async QMP client for QEMU, on tokio.
//!
//! One connection serves many tasks at once: each command carries an `id`, and a
//! reader task routes replies to their callers and events to every subscriber.
//! Typed commands come from the `qapi` crate (QEMU 9.1 schema); [`Qmp::execute_raw`]
//! takes any command as raw JSON for what that schema lacks or QEMU 10 changed.
//! [`Qmp::closed`] resolves as soon as QEMU closes the socket, so a crash is seen at
//! once, and on unix sockets descriptors can be passed (`getfd`, `add-fd`) and the
//! QEMU process identified ([`Qmp::peer`]).
//!
//! ```no_run
//! # async fn f() -> Result<(), qmp_client::QmpError> {
//! let qmp = qmp_client::Qmp::connect("/run/vm0.qmp").await?;
//! let status = qmp.execute(qapi::qmp::query_status {}).await?;
//! println!("{:?}", status.status);
//! # Ok(()) }
//! ```

mod client;
mod error;
mod event;
mod fdpass;
mod peer;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use client::fuzzing;
pub use client::{CloseReason, Greeting, QemuVersion, Qmp, QmpOptions};
pub use error::QmpError;
pub use event::{Event, EventStream};
pub use peer::PeerIdentity;
pub use qapi;
