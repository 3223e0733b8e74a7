//! The coordinator's side of TLS: the certificate it presents on its TCP listener, and
//! the client CA that must have signed every TCP peer's certificate (sidecars and the
//! CLI). The loaders and the protocol choice (TLS 1.3, `ring`) are the clients' own, in
//! [`sidecar::transport::tls`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use sidecar::transport::flags;
use sidecar::transport::tls::{self, TlsError, required};
use tokio_rustls::TlsAcceptor;

/// What `--listen` needs, and names when it is missing.
const NEEDS: &str = "--listen (TCP is always TLS)";

/// The files of the coordinator's TLS.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The coordinator's certificate chain (PEM), its end-entity certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA (PEM) whose signature a client certificate needs.
    pub client_ca: PathBuf,
}

impl ServerFiles {
    /// The files from the flags of `cutline serve --listen`; the first one missing is
    /// named in the error.
    pub fn from_flags(
        cert: Option<&Path>,
        key: Option<&Path>,
        client_ca: Option<&Path>,
    ) -> Result<ServerFiles, TlsError> {
        Ok(ServerFiles {
            cert: required(cert, NEEDS, flags::TLS_CERT)?.to_owned(),
            key: required(key, NEEDS, flags::TLS_KEY)?.to_owned(),
            client_ca: required(client_ca, NEEDS, flags::TLS_CLIENT_CA)?.to_owned(),
        })
    }

    /// The acceptor: TLS 1.3, presents `cert`, and completes a handshake only with a
    /// client whose certificate `client_ca` signed.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let roots = tls::load_roots(&self.client_ca, "client CA certificate")?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), tls::provider())
            .build()
            .map_err(|source| TlsError::ClientVerifier { path: self.client_ca.clone(), source })?;
        let certs = tls::load_certs(&self.cert, "server certificate")?;
        let key = tls::load_key(&self.key)?;
        let config = ServerConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(tls::VERSIONS)
            .map_err(TlsError::Versions)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|source| TlsError::Identity { cert: self.cert.clone(), key: self.key.clone(), source })?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_names_the_first_missing_flag() {
        let p = Some(Path::new("/nonexistent"));
        let missing = |cert, key, ca| match ServerFiles::from_flags(cert, key, ca) {
            Err(TlsError::Missing { flag, .. }) => Some(flag),
            _ => None,
        };
        assert_eq!(missing(None, p, p), Some(flags::TLS_CERT));
        assert_eq!(missing(p, None, p), Some(flags::TLS_KEY));
        assert_eq!(missing(p, p, None), Some(flags::TLS_CLIENT_CA));
        assert_eq!(missing(p, p, p), None);
        let e = ServerFiles::from_flags(p, p, None).map(|_| ()).expect_err("missing");
        assert!(e.to_string().contains("--listen") && e.to_string().contains("--tls-client-ca"), "{e}");
        // Files that are not there are named.
        let files = ServerFiles::from_flags(p, p, p).expect("all given");
        let e = files.acceptor().map(|_| ()).expect_err("no files");
        assert!(e.to_string().contains("/nonexistent"), "{e}");
    }
}
