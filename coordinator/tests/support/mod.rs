//! Support for the TCP tests: certificates made at test time (rcgen), the real
//! `cutline serve` binary on 127.0.0.1 (port 0, read back from its log), and clients.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use sidecar::proto::{self, Envelope, Msg, PROTOCOL, Request};
use sidecar::transport::{ClientArgs, Dialer, Endpoint};

/// The token the coordinators of these tests expect.
pub const TOKEN: &str = "correct horse battery staple";

/// The `cutline` binary.
pub fn cutline() -> &'static str {
    env!("CARGO_BIN_EXE_cutline")
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Every file of the tests' PKI: a CA that signs the coordinator's and the clients'
/// certificates, and another CA with a client and a server of its own.
pub struct Pki {
    /// Holds the files.
    pub dir: tempfile::TempDir,
    /// The CA (both the coordinator's and the clients').
    pub ca: PathBuf,
    /// The coordinator: 127.0.0.1 and localhost.
    pub server: Identity,
    /// A client of the CA.
    pub client: Identity,
    /// Another CA.
    pub other_ca: PathBuf,
    /// A client of the other CA.
    pub other_client: Identity,
    /// The token file (0600).
    pub token: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, text)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

fn ca(name: &str) -> anyhow::Result<CertifiedIssuer<'static, KeyPair>> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    Ok(CertifiedIssuer::self_signed(p, KeyPair::generate()?)?)
}

fn leaf(
    dir: &Path,
    file: &str,
    issuer: &CertifiedIssuer<'static, KeyPair>,
    cn: &str,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<Identity> {
    let mut p = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, issuer)?;
    Ok(Identity {
        cert: write(dir, &format!("{file}.crt"), &cert.pem())?,
        key: write(dir, &format!("{file}.key"), &key.serialize_pem())?,
    })
}

impl Pki {
    /// Makes every certificate and the token file.
    pub fn new() -> anyhow::Result<Pki> {
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        let main = ca("cutline test CA")?;
        let other = ca("some other CA")?;
        let server =
            leaf(d, "server", &main, "coordinator", &["127.0.0.1", "localhost"], ExtendedKeyUsagePurpose::ServerAuth)?;
        let client = leaf(d, "client", &main, "vm0", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        let other_client = leaf(d, "other-client", &other, "intruder", &[], ExtendedKeyUsagePurpose::ClientAuth)?;
        Ok(Pki {
            ca: write(d, "ca.crt", &main.pem())?,
            other_ca: write(d, "other-ca.crt", &other.pem())?,
            token: write(d, "token", &format!("{TOKEN}\n"))?,
            server,
            client,
            other_client,
            dir,
        })
    }

    /// Client flags: trusting `ca`, presenting `id`, the token file.
    pub fn client_args(&self, ca: &Path, id: &Identity) -> ClientArgs {
        ClientArgs {
            tls_ca: Some(ca.to_owned()),
            tls_cert: Some(id.cert.clone()),
            tls_key: Some(id.key.clone()),
            tls_server_name: None,
            token_file: Some(self.token.clone()),
        }
    }
}

/// A running `cutline serve --listen 127.0.0.1:0` (killed when dropped).
pub struct Coordinator {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Its log (stderr).
    pub log: PathBuf,
    _state: tempfile::TempDir,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes ANSI colour sequences.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

impl Coordinator {
    /// Starts the coordinator with the PKI's server identity and client CA, the token
    /// file, `first_message_timeout` (e.g. `1s`), and `extra` arguments of `serve`.
    pub fn start(pki: &Pki, first_message_timeout: &str, extra: &[&str]) -> anyhow::Result<Coordinator> {
        let state = tempfile::tempdir()?;
        let log = state.path().join("coordinator.log");
        let child = Command::new(cutline())
            .arg("--state")
            .arg(state.path())
            .args(["serve", "--listen", "127.0.0.1:0", "--first-message-timeout", first_message_timeout])
            .arg("--tls-cert")
            .arg(&pki.server.cert)
            .arg("--tls-key")
            .arg(&pki.server.key)
            .arg("--tls-client-ca")
            .arg(&pki.ca)
            .arg("--token-file")
            .arg(&pki.token)
            .args(extra)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("CUTLINE_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut c = Coordinator { child, addr: String::new(), log, _state: state };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = c.log_text();
            if let Some(line) = text.lines().find(|l| l.contains("listening on TCP")) {
                let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")).context("addr= in the log")?;
                c.addr = addr.to_owned();
                return Ok(c);
            }
            if let Some(status) = c.child.try_wait()? {
                anyhow::bail!("cutline serve exited ({status}): {text}");
            }
            anyhow::ensure!(Instant::now() < deadline, "cutline serve did not listen: {text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log so far, without colours.
    pub fn log_text(&self) -> String {
        plain(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Tcp(self.addr.clone())
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

/// Opens a connection with `dialer`, sends `msg`, and returns the first message back.
pub async fn first_reply(dialer: &Dialer, msg: Msg) -> anyhow::Result<Msg> {
    let (r, mut w) = dialer.connect().await?;
    proto::write(&mut w, &Envelope::plain(msg)).await?;
    let reply = tokio::time::timeout(Duration::from_secs(10), proto::read(r)).await??;
    Ok(reply.msg)
}

/// An `ask` for the status, with `token`.
pub fn status(token: Option<&str>) -> Msg {
    Msg::Ask { cluster: "default".into(), token: token.map(str::to_owned), request: Request::Status }
}

/// A registration of `name`, with `token`.
pub fn register(name: &str, token: Option<&str>) -> Msg {
    Msg::Register {
        version: PROTOCOL,
        cluster: "default".into(),
        name: name.into(),
        qmp: "/nonexistent/qmp".into(),
        store: "/nonexistent/store".into(),
        pid: None,
        pid_start: None,
        checkpoints: vec![],
        token: token.map(str::to_owned),
        host: None,
        ram_bytes: None,
    }
}

/// The error chain of `e`, joined.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}
