//! The one error type of the QMP client.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong talking QMP to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected (no such file, refused, not a socket).
    #[error("cannot connect to QMP socket {target}")]
    Connect {
        /// The socket path or TCP address.
        target: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not send a QMP greeting: it is not QEMU's monitor, or not in QMP mode.
    #[error("{target} is not a QMP monitor: {reason}")]
    NotQmp {
        /// The socket path or TCP address.
        target: String,
        /// What was wrong with the greeting.
        reason: String,
    },
    /// QEMU answered a command with an error.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Qemu {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// No reply (or no awaited event) arrived in time.
    #[error("`{what}` timed out after {after:?}")]
    Timeout {
        /// The command or event that was awaited.
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The connection closed (QEMU exited or crashed) before the reply arrived.
    #[error("QMP connection closed ({reason}) while waiting for `{what}`")]
    Disconnected {
        /// The command or event that was awaited.
        what: String,
        /// Why the connection closed.
        reason: crate::CloseReason,
    },
    /// A reply did not have the shape the typed command expects.
    #[error("cannot decode the reply to `{command}`")]
    Decode {
        /// The command whose reply failed to decode.
        command: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Writing to the socket failed.
    #[error("cannot send `{command}` to QEMU")]
    Send {
        /// The command being sent.
        command: String,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An operation needs a unix socket (fd passing, peer identity) but the connection is TCP.
    #[error("{what} needs a unix-socket QMP connection")]
    NotUnix {
        /// The operation that was attempted.
        what: &'static str,
    },
    /// Out-of-band execution was asked for but is not enabled on this connection.
    #[error("`{command}` cannot run out-of-band: QEMU did not offer oob or it was not enabled")]
    OobUnavailable {
        /// The command.
        command: String,
    },
    /// The identity of the QEMU process could not be read.
    #[error("cannot read the identity of QEMU process {pid} from {path}")]
    Peer {
        /// The process id.
        pid: i32,
        /// The /proc file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl QmpError {
    /// QEMU's error class when QEMU refused a command, else `None`.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            QmpError::Qemu { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when the connection to QEMU is gone.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected { .. })
    }
}
