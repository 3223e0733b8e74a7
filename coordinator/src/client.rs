//! Asking a running coordinator: what the `cutline` commands other than `serve` do.

use std::path::Path;

use serde_json::Value;
use sidecar::proto::{self, Envelope, Msg, Request};

/// Errors of asking.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No coordinator listens there.
    #[error("no coordinator at {addr} (is `cutline serve` running?)")]
    Connect {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The conversation broke.
    #[error("talking to the coordinator failed: {0}")]
    Protocol(String),
    /// The coordinator answered with an error.
    #[error("{0}")]
    Refused(String),
}

/// Sends `request` to the coordinator at `addr` (a unix socket path or `tcp:HOST:PORT`).
pub async fn ask(addr: &str, token: Option<&str>, request: Request) -> Result<Value, ClientError> {
    let connect = |source| ClientError::Connect { addr: addr.to_owned(), source };
    let (r, mut w): (Box<dyn tokio::io::AsyncRead + Send + Unpin>, Box<dyn tokio::io::AsyncWrite + Send + Unpin>) =
        match addr.strip_prefix("tcp:") {
            Some(a) => {
                let (r, w) = tokio::net::TcpStream::connect(a).await.map_err(connect)?.into_split();
                (Box::new(r), Box::new(w))
            }
            None => {
                let (r, w) = tokio::net::UnixStream::connect(Path::new(addr)).await.map_err(connect)?.into_split();
                (Box::new(r), Box::new(w))
            }
        };
    let env = Envelope::plain(Msg::Ask { cluster: "default".into(), token: token.map(str::to_owned), request });
    proto::write(&mut w, &env).await.map_err(|e| ClientError::Protocol(e.to_string()))?;
    match proto::read(r).await.map_err(|e| ClientError::Protocol(e.to_string()))?.msg {
        Msg::Answer { result: Ok(v) } => Ok(v),
        Msg::Answer { result: Err(e) } | Msg::Error { what: e } => Err(ClientError::Refused(e)),
        other => Err(ClientError::Protocol(format!("unexpected {}", other.kind()))),
    }
}
