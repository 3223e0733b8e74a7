//! TLS material: PEM certificates and keys read from files, and the rustls
//! configurations both ends build from them. TLS 1.3 only, with the `ring` provider;
//! both ends authenticate (the coordinator requires client certificates).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::flags::Flag;

/// Errors of loading TLS material or building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A flag that `needs` requires was not given.
    #[error("{needs} needs {flag}")]
    Missing {
        /// What needs it (e.g. `--listen`, `a TCP coordinator`).
        needs: &'static str,
        /// The missing flag.
        flag: Flag,
    },
    /// A PEM file cannot be read or parsed.
    #[error("cannot read the {what} in {path}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: pem::Error,
    },
    /// A PEM file holds none of what it should.
    #[error("{path} holds no {what} (PEM)")]
    Empty {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate cannot be a trust anchor.
    #[error("the CA certificate in {path} is not usable")]
    Ca {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// The client CA cannot verify clients.
    #[error("the client CA in {path} cannot verify clients")]
    ClientVerifier {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    /// A certificate and a key do not make an identity (e.g. the key is not the
    /// certificate's).
    #[error("the certificate {cert} and the key {key} are not a usable pair")]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Cause.
        #[source]
        source: rustls::Error,
    },
    /// The provider offers no TLS 1.3.
    #[error("TLS 1.3 is not available")]
    Versions(#[source] rustls::Error),
    /// The server name is neither a DNS name nor an IP address.
    #[error("{name:?} is not a TLS server name (a DNS name or an IP address)")]
    ServerName {
        /// The name.
        name: String,
        /// Cause.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
}

/// The cryptography: `ring`, chosen explicitly (no process-wide default is installed).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The protocol versions used: TLS 1.3 only (both ends are cutline's).
pub const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// `Some(value)` or [`TlsError::Missing`] naming `flag`.
pub fn required<'a, T: ?Sized>(value: Option<&'a T>, needs: &'static str, flag: Flag) -> Result<&'a T, TlsError> {
    value.ok_or(TlsError::Missing { needs, flag })
}

/// Every certificate in the PEM file `path` (a chain: the end-entity's first).
pub fn load_certs(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem { what, path: path.to_owned(), source };
    let certs =
        CertificateDer::pem_file_iter(path).map_err(pem_error)?.collect::<Result<Vec<_>, _>>().map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, path: path.to_owned() });
    }
    Ok(certs)
}

/// The private key in the PEM file `path` (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let what = "private key";
    PrivateKeyDer::from_pem_file(path).map_err(|source| match source {
        pem::Error::NoItemsFound => TlsError::Empty { what, path: path.to_owned() },
        source => TlsError::Pem { what, path: path.to_owned(), source },
    })
}

/// The trust anchors in the PEM file `path`.
pub fn load_roots(path: &Path, what: &'static str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, what)? {
        roots.add(cert).map_err(|source| TlsError::Ca { path: path.to_owned(), source })?;
    }
    Ok(roots)
}

/// The files of a client's TLS identity and trust.
#[derive(Debug, Clone)]
pub struct ClientFiles {
    /// The CA that signed the coordinator's certificate.
    pub ca: PathBuf,
    /// The client's certificate chain.
    pub cert: PathBuf,
    /// The client's private key.
    pub key: PathBuf,
}

impl ClientFiles {
    /// The client configuration: trusts only `ca`, presents `cert` and `key`.
    pub fn config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = load_roots(&self.ca, "CA certificate")?;
        let certs = load_certs(&self.cert, "client certificate")?;
        let key = load_key(&self.key)?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Versions)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|source| TlsError::Identity { cert: self.cert.clone(), key: self.key.clone(), source })?;
        Ok(Arc::new(config))
    }
}
