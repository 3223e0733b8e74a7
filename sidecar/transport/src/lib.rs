//! How cutline's sidecars and CLI reach the coordinator.
//!
//! - A local **unix socket** (mode 0600): plaintext, no token; only the socket's owner
//!   (and root) can connect.
//! - **TCP** (`tcp:HOST:PORT`): always TLS 1.3 (rustls, `ring`) with authentication both
//!   ways: the client verifies the coordinator's certificate against `--tls-ca` and the
//!   name `--tls-server-name` (default: the host part of the address); the coordinator
//!   requires a client certificate signed by its `--tls-client-ca`. On top of the
//!   channel, every `Register` and `Ask` carries a pre-shared [`Token`], read from
//!   `--token-file` or `CUTLINE_TOKEN`, never from argv. There is no plaintext TCP.
//!
//! The client side ([`ClientArgs`], [`Dialer`]) is shared by the sidecar and the CLI;
//! the loaders in [`tls`] are shared with the coordinator's listener.

pub mod dial;
pub mod flags;
pub mod tls;
pub mod token;

pub use dial::{ClientArgs, ConnectError, Dialer, Endpoint, Reader, SetupError, Writer};
pub use tls::TlsError;
pub use token::{Token, TokenError};
