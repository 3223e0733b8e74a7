//! The TLS material of a cluster across hosts, made at test time (rcgen): one CA that
//! signs the coordinator's certificate (its network alias in the SAN) and every client's,
//! and the token file. [`Pki::install`] copies what a host needs into its work directory.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use super::{Host, random_hex};

/// Where a host finds its TLS files and the token, inside it.
pub const PKI_DIR: &str = "/vms/pki";

/// The files every host gets: the CA, a client identity and the token; the coordinator's
/// host also gets the server identity.
pub struct Pki {
    dir: PathBuf,
    /// The coordinator's DNS names (its certificate's SAN).
    pub server_names: Vec<String>,
}

/// The paths inside a host of what [`Pki::install`] put there.
pub struct PkiPaths;

impl PkiPaths {
    /// The CA certificate.
    pub const CA: &'static str = "/vms/pki/ca.crt";
    /// The client certificate.
    pub const CLIENT_CERT: &'static str = "/vms/pki/client.crt";
    /// Its key.
    pub const CLIENT_KEY: &'static str = "/vms/pki/client.key";
    /// The coordinator's certificate (only where the coordinator runs).
    pub const SERVER_CERT: &'static str = "/vms/pki/server.crt";
    /// Its key.
    pub const SERVER_KEY: &'static str = "/vms/pki/server.key";
    /// The token file (0600).
    pub const TOKEN: &'static str = "/vms/pki/token";

    /// The client flags of `cutline` and `cutline-sidecar` for these files.
    pub fn client_args() -> Vec<String> {
        [
            ("--tls-ca", Self::CA),
            ("--tls-cert", Self::CLIENT_CERT),
            ("--tls-key", Self::CLIENT_KEY),
            ("--token-file", Self::TOKEN),
        ]
        .iter()
        .flat_map(|(f, p)| [(*f).to_owned(), (*p).to_owned()])
        .collect()
    }
}

/// Writes `text` to `dir/name`, mode 0600.
fn write_private(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 0600 {}", path.display()))?;
    Ok(path)
}

fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    names: &[String],
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<(String, String)> {
    let mut p = CertificateParams::new(names.to_vec())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// Makes the CA, the coordinator's certificate for `server_names`, a client
    /// certificate and a random token, under `dir`.
    pub fn new(dir: &Path, server_names: &[&str]) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "cutline multi-host test CA");
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca = CertifiedIssuer::self_signed(p, KeyPair::generate()?)?;
        let names: Vec<String> = server_names.iter().map(|n| (*n).to_owned()).collect();
        let (server_cert, server_key) = leaf(&ca, "coordinator", &names, ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) = leaf(&ca, "cutline host", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        write_private(dir, "ca.crt", &ca.pem())?;
        write_private(dir, "server.crt", &server_cert)?;
        write_private(dir, "server.key", &server_key)?;
        write_private(dir, "client.crt", &client_cert)?;
        write_private(dir, "client.key", &client_key)?;
        write_private(dir, "token", &format!("{}\n", random_hex(32)))?;
        Ok(Pki { dir: dir.to_owned(), server_names: names })
    }

    /// Copies the CA, the client identity and the token (and with `server`, the
    /// coordinator's identity) into `host` at [`PKI_DIR`], each file 0600.
    pub fn install(&self, host: &Host, server: bool) -> anyhow::Result<()> {
        let to = host.host_path(PKI_DIR)?;
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        let mut files = vec!["ca.crt", "client.crt", "client.key", "token"];
        if server {
            files.extend(["server.crt", "server.key"]);
        }
        for f in files {
            let text = std::fs::read_to_string(self.dir.join(f)).with_context(|| format!("reading {f}"))?;
            write_private(&to, f, &text)?;
        }
        Ok(())
    }

    /// Writes `text` as `name` (0600) into `host`'s [`PKI_DIR`]; returns its path inside.
    pub fn install_file(&self, host: &Host, name: &str, text: &str) -> anyhow::Result<String> {
        let to = host.host_path(PKI_DIR)?;
        std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
        write_private(&to, name, text)?;
        Ok(format!("{PKI_DIR}/{name}"))
    }
}
