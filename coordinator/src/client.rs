//! Asking a running coordinator: what the `cutline` commands other than `serve` do.

use serde_json::Value;
use sidecar::proto::{self, Envelope, Msg, Request};
use sidecar::transport::{ConnectError, Dialer};

/// Errors of asking.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection (over TCP: no trusted TLS session) to the coordinator.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The request could not be sent.
    #[error("sending to the coordinator at {addr} failed")]
    Send {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator ended the TLS session with an alert: it refused this client's
    /// certificate (the alert arrives after the client's side of the handshake).
    #[error(
        "the coordinator at {addr} refused this client's TLS certificate (is --tls-cert signed by the coordinator's --tls-client-ca, for client authentication?)"
    )]
    CertificateRefused {
        /// The address.
        addr: String,
        /// Cause (the alert).
        #[source]
        source: proto::FrameError,
    },
    /// No answer came.
    #[error("no answer from the coordinator at {addr}")]
    Receive {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: proto::FrameError,
    },
    /// The coordinator answered with another message than an answer.
    #[error("the coordinator sent {0}, expected an answer")]
    Unexpected(&'static str),
    /// The coordinator answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the coordinator `dialer` reaches (with the token over TCP) and
/// returns its answer.
pub async fn ask(dialer: &Dialer, request: Request) -> Result<Value, ClientError> {
    let (r, mut w) = dialer.connect().await?;
    let token = dialer.token().map(|t| t.expose().to_owned());
    let env = Envelope::plain(Msg::Ask { cluster: "default".into(), token, request });
    proto::write(&mut w, &env).await.map_err(|source| ClientError::Send { addr: dialer.addr(), source })?;
    let answer = proto::read(r).await.map_err(|source| match &source {
        proto::FrameError::Io(e) if sidecar::transport::dial::is_alert(e) => {
            ClientError::CertificateRefused { addr: dialer.addr(), source }
        }
        _ => ClientError::Receive { addr: dialer.addr(), source },
    })?;
    match answer.msg {
        Msg::Answer { result: Ok(v) } => Ok(v),
        Msg::Answer { result: Err(e) } | Msg::Error { what: e } => Err(ClientError::Refused(e)),
        other => Err(ClientError::Unexpected(other.kind())),
    }
}
