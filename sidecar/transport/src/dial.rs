//! The client side, shared by the sidecar and the CLI: where the coordinator is, the
//! flags that say how to reach it, and one [`Dialer`] that opens connections to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use crate::flags;
use crate::tls::{ClientFiles, TlsError, required};
use crate::token::{Token, TokenError};

/// Longest a TCP connect, and then a TLS handshake, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The reading half of a connection to the coordinator.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// The writing half of a connection to the coordinator.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Where the coordinator listens: a unix socket path (`unix:` optional) or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A local unix socket: plaintext, guarded by its mode (0600).
    Unix(PathBuf),
    /// `HOST:PORT`: TLS and the token.
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Endpoint, Self::Err> {
        Ok(match s.strip_prefix("tcp:") {
            Some(addr) => Endpoint::Tcp(addr.to_owned()),
            None => Endpoint::Unix(PathBuf::from(s.strip_prefix("unix:").unwrap_or(s))),
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// The host part of `HOST:PORT` (`[V6]:PORT` gives `V6`); all of `addr` without a port.
pub fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => addr,
    };
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// How a client (a sidecar, the CLI) reaches a TCP coordinator; unused for a unix socket.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// TCP: the CA certificate (PEM) that signed the coordinator's certificate; no other
    /// is trusted.
    #[arg(long, global = true, env = "CUTLINE_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// TCP: the certificate chain (PEM) this end presents: a client's, signed by the
    /// coordinator's client CA (for `cutline serve`: the coordinator's own).
    #[arg(long, global = true, env = "CUTLINE_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// TCP: the private key (PEM) of --tls-cert.
    #[arg(long, global = true, env = "CUTLINE_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// TCP: the name the coordinator's certificate must carry (a DNS name or an IP
    /// address in its subjectAltName); default: the host part of the address.
    #[arg(long, global = true, env = "CUTLINE_TLS_SERVER_NAME", value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// TCP: a file holding the pre-shared token (mode 0600 or stricter; one trailing
    /// newline is ignored); else the token is taken from CUTLINE_TOKEN. Never on the
    /// command line.
    #[arg(long, global = true, env = "CUTLINE_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,
}

/// Errors of setting up a [`Dialer`].
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The TLS material is missing or unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The token is missing or unusable.
    #[error(transparent)]
    Token(#[from] TokenError),
}

impl ClientArgs {
    /// The dialer for `endpoint`. A TCP endpoint needs the CA, the client's certificate
    /// and key, and the token; they are read now, once.
    pub fn dialer(&self, endpoint: &Endpoint) -> Result<Dialer, SetupError> {
        let addr = match endpoint {
            Endpoint::Unix(path) => return Ok(Dialer::Unix(path.clone())),
            Endpoint::Tcp(addr) => addr,
        };
        let needs = "a TCP coordinator";
        let files = ClientFiles {
            ca: required(self.tls_ca.as_deref(), needs, flags::TLS_CA)?.to_owned(),
            cert: required(self.tls_cert.as_deref(), needs, flags::TLS_CERT)?.to_owned(),
            key: required(self.tls_key.as_deref(), needs, flags::TLS_KEY)?.to_owned(),
        };
        let name = self.tls_server_name.clone().unwrap_or_else(|| host_of(addr).to_owned());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|source| TlsError::ServerName { name: name.clone(), source })?;
        let config = files.config()?;
        let token = Token::load(self.token_file.as_deref())?;
        Ok(Dialer::Tls(Arc::new(TlsDialer {
            addr: addr.clone(),
            name,
            server_name,
            connector: TlsConnector::from(config),
            token,
        })))
    }
}

/// Errors of connecting to the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Nothing accepts connections there.
    #[error("cannot connect to {addr} (is `cutline serve` running there?)")]
    Connect {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The coordinator's certificate does not prove it is `name`.
    #[error(
        "the coordinator at {addr} is not trusted as {name} (is --tls-ca the CA that signed its certificate, and {name} a name in it? see --tls-server-name)"
    )]
    Untrusted {
        /// The address.
        addr: String,
        /// The name checked.
        name: String,
        /// Cause (rustls's verdict).
        #[source]
        source: std::io::Error,
    },
    /// The TLS handshake failed otherwise (e.g. the peer closed: not a TLS server, or at
    /// its connection cap).
    #[error("TLS handshake with {addr} failed")]
    Handshake {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The connect or the handshake took longer than [`CONNECT_TIMEOUT`].
    #[error("no connection to {addr} within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The address.
        addr: String,
    },
}

/// Whether `e` (a read on a TLS connection) is a fatal alert from the coordinator. In
/// TLS 1.3 the client's side of the handshake is done before the coordinator checks the
/// client's certificate, so a refused certificate shows as such an alert on the first
/// read.
pub fn is_alert(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .is_some_and(|e| matches!(e, rustls::Error::AlertReceived(_)))
}

/// Opens connections to the coordinator, the same way for the sidecar and the CLI.
#[derive(Debug, Clone)]
pub enum Dialer {
    /// A unix socket: plaintext, no token.
    Unix(PathBuf),
    /// TCP under TLS, with the token.
    Tls(Arc<TlsDialer>),
}

/// A TCP coordinator: its address, the TLS client configuration and the token.
pub struct TlsDialer {
    addr: String,
    name: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token: Token,
}

impl std::fmt::Debug for TlsDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsDialer").field("addr", &self.addr).field("name", &self.name).finish_non_exhaustive()
    }
}

impl Dialer {
    /// The token to send (TCP only).
    pub fn token(&self) -> Option<&Token> {
        match self {
            Dialer::Unix(_) => None,
            Dialer::Tls(t) => Some(&t.token),
        }
    }

    /// The address, for messages.
    pub fn addr(&self) -> String {
        match self {
            Dialer::Unix(p) => p.display().to_string(),
            Dialer::Tls(t) => format!("tcp:{}", t.addr),
        }
    }

    /// Opens a connection (over TCP: connected, the handshake done and the coordinator's
    /// certificate verified).
    pub async fn connect(&self) -> Result<(Reader, Writer), ConnectError> {
        match self {
            Dialer::Unix(path) => {
                let s = tokio::net::UnixStream::connect(path)
                    .await
                    .map_err(|source| ConnectError::Connect { addr: path.display().to_string(), source })?;
                let (r, w) = s.into_split();
                Ok((Box::new(r), Box::new(w)))
            }
            Dialer::Tls(t) => {
                let addr = || t.addr.clone();
                let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&t.addr))
                    .await
                    .map_err(|_| ConnectError::Timeout { addr: addr() })?
                    .map_err(|source| ConnectError::Connect { addr: addr(), source })?;
                // Small control messages: do not wait to fill a segment.
                let _ = tcp.set_nodelay(true);
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, t.connector.connect(t.server_name.clone(), tcp))
                    .await
                    .map_err(|_| ConnectError::Timeout { addr: addr() })?
                    .map_err(|source| {
                        let certificate = source
                            .get_ref()
                            .and_then(|e| e.downcast_ref::<rustls::Error>())
                            .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)));
                        if certificate {
                            ConnectError::Untrusted { addr: addr(), name: t.name.clone(), source }
                        } else {
                            ConnectError::Handshake { addr: addr(), source }
                        }
                    })?;
                let (r, w) = tokio::io::split(tls);
                Ok((Box::new(r), Box::new(w)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Args, Command};

    #[test]
    fn endpoints_and_host_parts() {
        assert_eq!("tcp:10.0.0.1:7000".parse::<Endpoint>(), Ok(Endpoint::Tcp("10.0.0.1:7000".into())));
        assert_eq!("/run/c.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/c.sock".into())));
        assert_eq!("unix:/run/c.sock".parse::<Endpoint>(), Ok(Endpoint::Unix("/run/c.sock".into())));
        assert_eq!(host_of("127.0.0.1:7000"), "127.0.0.1");
        assert_eq!(host_of("coord.example:7000"), "coord.example");
        assert_eq!(host_of("[::1]:7000"), "::1");
        assert_eq!(host_of("coord.example"), "coord.example");
    }

    #[test]
    fn a_tcp_dialer_names_the_first_missing_flag() {
        let tcp = Endpoint::Tcp("127.0.0.1:7000".into());
        let missing = |args: &ClientArgs| match args.dialer(&tcp) {
            Err(SetupError::Tls(TlsError::Missing { flag, .. })) => flag,
            other => panic!("expected a missing flag, got {other:?}"),
        };
        let mut args = ClientArgs::default();
        assert_eq!(missing(&args), flags::TLS_CA);
        args.tls_ca = Some("/nonexistent/ca.pem".into());
        assert_eq!(missing(&args), flags::TLS_CERT);
        args.tls_cert = Some("/nonexistent/cert.pem".into());
        assert_eq!(missing(&args), flags::TLS_KEY);
        let e = args.dialer(&tcp).expect_err("missing");
        assert!(e.to_string().contains("--tls-key") && e.to_string().contains("CUTLINE_TLS_KEY"), "{e}");
        // A unix socket needs none of it.
        assert!(matches!(ClientArgs::default().dialer(&Endpoint::Unix("/x".into())), Ok(Dialer::Unix(_))));
    }

    #[test]
    fn the_flags_are_the_ones_errors_name() {
        let cmd = ClientArgs::augment_args(Command::new("t"));
        for f in [flags::TLS_CA, flags::TLS_CERT, flags::TLS_KEY, flags::TLS_SERVER_NAME, flags::TOKEN_FILE] {
            let arg = cmd.get_arguments().find(|a| a.get_long().map(|l| format!("--{l}")) == Some(f.flag.to_owned()));
            let arg = arg.unwrap_or_else(|| panic!("no {}", f.flag));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(f.env));
        }
        assert!(cmd.get_arguments().all(|a| a.get_long() != Some("token")), "the token is never an argument");
    }
}
