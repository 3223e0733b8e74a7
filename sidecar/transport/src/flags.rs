//! The names of the command-line flags and environment variables of the TCP control
//! plane, for errors that tell which one is missing.

/// A flag and the environment variable that can stand for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    /// The flag, with its dashes.
    pub flag: &'static str,
    /// The environment variable.
    pub env: &'static str,
}

impl std::fmt::Display for Flag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (or {})", self.flag, self.env)
    }
}

/// The CA that signed the coordinator's certificate (clients).
pub const TLS_CA: Flag = Flag { flag: "--tls-ca", env: "CUTLINE_TLS_CA" };
/// This end's certificate chain (the coordinator's, or a client's).
pub const TLS_CERT: Flag = Flag { flag: "--tls-cert", env: "CUTLINE_TLS_CERT" };
/// This end's private key.
pub const TLS_KEY: Flag = Flag { flag: "--tls-key", env: "CUTLINE_TLS_KEY" };
/// The CA that signs the clients' certificates (the coordinator).
pub const TLS_CLIENT_CA: Flag = Flag { flag: "--tls-client-ca", env: "CUTLINE_TLS_CLIENT_CA" };
/// The name the coordinator's certificate must carry (clients).
pub const TLS_SERVER_NAME: Flag = Flag { flag: "--tls-server-name", env: "CUTLINE_TLS_SERVER_NAME" };
/// The file holding the pre-shared token.
pub const TOKEN_FILE: Flag = Flag { flag: "--token-file", env: "CUTLINE_TOKEN_FILE" };
/// The environment variable holding the pre-shared token itself.
pub const TOKEN_ENV: &str = "CUTLINE_TOKEN";
