//! The TCP control plane against the real `cutline serve` binary (no QEMU): TLS with
//! client certificates and the token, and what happens to every kind of peer that
//! lacks one of them, is slow, too big, or too many.

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coordinator::client::{self, ClientError};
use sidecar::proto::{self, Envelope, FrameReader, MAX_MESSAGE, Msg, Request};
use sidecar::transport::ConnectError;
use support::{Coordinator, Pki, TOKEN, chain, first_reply, register, status};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `cutline ARGS` with `envs`; returns (success, stdout, stderr).
fn cli(args: &[&str], envs: &[(&str, &std::path::Path)]) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = Command::new(support::cutline());
    cmd.args(args);
    for var in [
        "CUTLINE_TOKEN",
        "CUTLINE_TOKEN_FILE",
        "CUTLINE_COORDINATOR",
        "CUTLINE_TLS_CA",
        "CUTLINE_TLS_CERT",
        "CUTLINE_TLS_KEY",
        "CUTLINE_TLS_CLIENT_CA",
        "CUTLINE_TLS_SERVER_NAME",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output()?;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into()))
}

/// Asks for the status with the PKI's good client.
async fn good_status(pki: &Pki, c: &Coordinator) -> anyhow::Result<serde_json::Value> {
    let dialer = pki.client_args(&pki.ca, &pki.client).dialer(&c.endpoint())?;
    Ok(client::ask(&dialer, Request::Status).await?)
}

/// Reads until the server closes; returns what came and how long it took.
async fn until_closed(
    mut s: impl tokio::io::AsyncRead + Unpin,
    limit: Duration,
) -> anyhow::Result<(Vec<u8>, Duration)> {
    let t = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((t + limit).into(), s.read(&mut buf)).await {
            Err(_) => anyhow::bail!("still open after {limit:?}"),
            Ok(Ok(0) | Err(_)) => return Ok((got, t.elapsed())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn the_cli_asks_over_tls_and_a_sidecar_registers() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "1s", &[])?;
    let tcp = format!("tcp:{}", c.addr);
    let p = |p: &std::path::Path| p.display().to_string();
    // Flags (the token from a file).
    let (ca, cert, key, token) = (p(&pki.ca), p(&pki.client.cert), p(&pki.client.key), p(&pki.token));
    let args = ["--json", "status", "--coordinator", &tcp, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let (ok, out, err) = cli(&[&args[..], &["--token-file", &token]].concat(), &[])?;
    assert!(ok, "{out}{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out)?["cluster"], "default", "{out}");
    // The environment only (the token itself in CUTLINE_TOKEN), by name (localhost).
    let localhost = format!("tcp:localhost:{}", c.addr.rsplit_once(':').map_or("", |(_, port)| port));
    let token_value = std::ffi::OsString::from(format!("{TOKEN}\n"));
    let envs = [
        ("CUTLINE_COORDINATOR", std::path::Path::new(&localhost)),
        ("CUTLINE_TLS_CA", &pki.ca),
        ("CUTLINE_TLS_CERT", &pki.client.cert),
        ("CUTLINE_TLS_KEY", &pki.client.key),
        ("CUTLINE_TOKEN", std::path::Path::new(&token_value)),
    ];
    let (ok, out, err) = cli(&["--json", "status"], &envs)?;
    assert!(ok, "{out}{err}");
    // An explicit server name for an address that is not one.
    let (ok, out, err) = cli(&[&args[..], &["--token-file", &token, "--tls-server-name", "localhost"]].concat(), &[])?;
    assert!(ok, "{out}{err}");

    // A sidecar's registration over TLS is welcomed, and counted as a member.
    let dialer = pki.client_args(&pki.ca, &pki.client).dialer(&c.endpoint())?;
    let (r, mut w) = dialer.connect().await?;
    proto::write(&mut w, &Envelope::plain(register("vm0", Some(TOKEN)))).await?;
    let mut r = FrameReader::new(r);
    let welcome = tokio::time::timeout(Duration::from_secs(10), r.next()).await??;
    assert!(matches!(welcome.msg, Msg::Welcome { .. }), "{welcome:?}");
    let s = client::ask(&dialer, Request::Status).await?;
    assert!(s["members"].as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "vm0")), "{s}");
    Ok(())
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "1s", &[])?;
    let dialer = pki.client_args(&pki.ca, &pki.client).dialer(&c.endpoint())?;
    let bad = |m: &Msg| matches!(m, Msg::Error { what } if what == "bad token");
    for token in [Some("wrong"), Some(""), None, Some(&format!("{TOKEN}x")[..]), Some(&TOKEN[..TOKEN.len() - 1])] {
        let m = first_reply(&dialer, status(token)).await?;
        assert!(bad(&m), "ask with {token:?}: {m:?}");
        let m = first_reply(&dialer, register("vm1", token)).await?;
        assert!(bad(&m), "register with {token:?}: {m:?}");
    }
    // The CLI with another token file.
    let dir = tempfile::tempdir()?;
    let wrong = dir.path().join("token");
    std::fs::write(&wrong, "not the token\n")?;
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let p = |p: &std::path::Path| p.display().to_string();
    let tcp = format!("tcp:{}", c.addr);
    let (ca, cert, key, token) = (p(&pki.ca), p(&pki.client.cert), p(&pki.client.key), p(&wrong));
    let args = ["status", "--coordinator", &tcp, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let (ok, _, err) = cli(&[&args[..], &["--token-file", &token]].concat(), &[])?;
    assert!(!ok && err.contains("bad token"), "{err}");
    // The right one still works.
    assert!(matches!(first_reply(&dialer, status(Some(TOKEN))).await?, Msg::Answer { result: Ok(_) }));
    Ok(())
}

/// A client presenting `config`'s certificate (or none): the handshake or the first
/// read fails, never an answer.
async fn refused_client(c: &Coordinator, config: rustls::ClientConfig) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(&c.addr).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await {
        Ok(tls) => tls,
        Err(e) => return Ok(e.to_string()),
    };
    let (r, mut w) = tokio::io::split(tls);
    let _ = proto::write(&mut w, &Envelope::plain(status(Some(TOKEN)))).await;
    match tokio::time::timeout(Duration::from_secs(10), proto::read(r)).await? {
        Ok(env) => anyhow::bail!("the coordinator answered a client it should refuse: {env:?}"),
        Err(e) => Ok(chain(&e)),
    }
}

#[tokio::test]
async fn a_client_certificate_of_another_ca_or_none_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "1s", &[])?;
    // Through the shared dialer, with a certificate of the other CA.
    let dialer = pki.client_args(&pki.ca, &pki.other_client).dialer(&c.endpoint())?;
    let e = client::ask(&dialer, Request::Status).await.expect_err("refused");
    assert!(matches!(e, ClientError::CertificateRefused { .. }), "{e:?}");
    assert!(chain(&e).contains("UnknownCA"), "{}", chain(&e));
    // Raw rustls: the other CA's certificate, and no certificate at all.
    let roots = sidecar::transport::tls::load_roots(&pki.ca, "CA")?;
    let builder = || -> anyhow::Result<_> {
        Ok(rustls::ClientConfig::builder_with_provider(sidecar::transport::tls::provider())
            .with_protocol_versions(sidecar::transport::tls::VERSIONS)?
            .with_root_certificates(roots.clone()))
    };
    let certs = sidecar::transport::tls::load_certs(&pki.other_client.cert, "cert")?;
    let key = sidecar::transport::tls::load_key(&pki.other_client.key)?;
    let why = refused_client(&c, builder()?.with_client_auth_cert(certs, key)?).await?;
    assert!(why.contains("UnknownCA") || why.contains("alert"), "{why}");
    let why = refused_client(&c, builder()?.with_no_client_auth()).await?;
    assert!(why.contains("CertificateRequired") || why.contains("alert"), "{why}");
    let log = c.log_text();
    assert!(log.contains("TLS handshake failed"), "{log}");
    // The CLI says it failed.
    let p = |p: &std::path::Path| p.display().to_string();
    let (tcp, ca, cert, key, token) =
        (format!("tcp:{}", c.addr), p(&pki.ca), p(&pki.other_client.cert), p(&pki.other_client.key), p(&pki.token));
    let args = ["status", "--coordinator", &tcp, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let (ok, _, err) = cli(&[&args[..], &["--token-file", &token]].concat(), &[])?;
    assert!(!ok && err.contains("refused this client's TLS certificate"), "{err}");
    // The good client is served.
    good_status(&pki, &c).await?;
    Ok(())
}

#[tokio::test]
async fn a_coordinator_the_client_cannot_trust_is_refused_by_the_client() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "1s", &[])?;
    // Its certificate is not signed by the CA the client trusts.
    let dialer = pki.client_args(&pki.other_ca, &pki.client).dialer(&c.endpoint())?;
    let e = dialer.connect().await.map(|_| ()).expect_err("untrusted");
    assert!(matches!(e, ConnectError::Untrusted { .. }), "{e:?}");
    let text = chain(&e);
    assert!(text.contains("not trusted as 127.0.0.1") && text.contains("UnknownIssuer"), "{text}");
    // Its certificate does not carry the name asked for.
    let mut args = pki.client_args(&pki.ca, &pki.client);
    args.tls_server_name = Some("coordinator.example".into());
    let e = args.dialer(&c.endpoint())?.connect().await.map(|_| ()).expect_err("wrong name");
    let text = chain(&e);
    assert!(text.contains("not trusted as coordinator.example") && text.contains("not valid for name"), "{text}");
    // The CLI names it.
    let p = |p: &std::path::Path| p.display().to_string();
    let (tcp, ca, cert, key, token) =
        (format!("tcp:{}", c.addr), p(&pki.other_ca), p(&pki.client.cert), p(&pki.client.key), p(&pki.token));
    let args = ["status", "--coordinator", &tcp, "--tls-ca", &ca, "--tls-cert", &cert, "--tls-key", &key];
    let (ok, _, err) = cli(&[&args[..], &["--token-file", &token]].concat(), &[])?;
    assert!(!ok && err.contains("is not trusted as 127.0.0.1") && err.contains("--tls-ca"), "{err}");
    Ok(())
}

#[tokio::test]
async fn a_plaintext_client_is_disconnected_and_the_server_goes_on() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let mut c = Coordinator::start(&pki, "10s", &[])?;
    for _ in 0..3 {
        let mut s = tokio::net::TcpStream::connect(&c.addr).await?;
        let mut line = serde_json::to_vec(&Envelope::plain(status(Some(TOKEN))))?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let (got, took) = until_closed(s, Duration::from_secs(5)).await?;
        // At most a TLS alert record, never a message.
        assert!(!String::from_utf8_lossy(&got).contains("answer"), "{got:?}");
        assert!(got.first().is_none_or(|&b| b == 0x15), "not a TLS alert: {got:?}");
        // At once on the bad record, not at the 10 s deadline.
        assert!(took < Duration::from_secs(5), "closed after {took:?}");
    }
    assert!(c.alive());
    good_status(&pki, &c).await?;
    Ok(())
}

/// A real TLS ClientHello, as bytes.
fn client_hello(pki: &Pki) -> anyhow::Result<Vec<u8>> {
    let roots = sidecar::transport::tls::load_roots(&pki.ca, "CA")?;
    let config = rustls::ClientConfig::builder_with_provider(sidecar::transport::tls::provider())
        .with_protocol_versions(sidecar::transport::tls::VERSIONS)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), "127.0.0.1".try_into()?)?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    Ok(hello)
}

#[tokio::test]
async fn a_slow_handshake_or_first_message_is_dropped_in_time_and_blocks_no_one() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "2s", &[])?;
    // A slow loris: a ClientHello, one byte every 100 ms (it would take tens of seconds).
    let hello = client_hello(&pki)?;
    assert!(hello.len() > 50, "{}", hello.len());
    let s = tokio::net::TcpStream::connect(&c.addr).await?;
    let connected = Instant::now();
    let (r, mut w) = s.into_split();
    let dribble = tokio::spawn(async move {
        for b in hello {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // Meanwhile others are served at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    good_status(&pki, &c).await?;
    assert!(t.elapsed() < Duration::from_millis(1500), "served after {:?}", t.elapsed());
    until_closed(r, Duration::from_secs(5)).await?;
    let took = connected.elapsed();
    assert!(took > Duration::from_millis(1800) && took < Duration::from_secs(4), "closed after {took:?}");
    dribble.abort();

    // A handshake done, then the first message one byte at a time: told and dropped.
    let dialer = pki.client_args(&pki.ca, &pki.client).dialer(&c.endpoint())?;
    let (r, mut w) = dialer.connect().await?;
    let t = Instant::now();
    let dribble = tokio::spawn(async move {
        for b in br#"{"inc":0,"vt":{},"msg":{"type":"ask""# {
            if w.write_all(&[*b]).await.is_err() || w.flush().await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let reply = tokio::time::timeout(Duration::from_secs(5), proto::read(r)).await??;
    assert!(matches!(&reply.msg, Msg::Error { what } if what.contains("no message in time")), "{reply:?}");
    assert!(t.elapsed() < Duration::from_secs(4), "dropped after {:?}", t.elapsed());
    dribble.abort();
    let log = c.log_text();
    assert!(log.contains("no TLS handshake within"), "{log}");
    Ok(())
}

#[tokio::test]
async fn an_oversized_frame_is_refused_and_the_server_goes_on() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "10s", &[])?;
    let dialer = pki.client_args(&pki.ca, &pki.client).dialer(&c.endpoint())?;
    let (r, mut w) = dialer.connect().await?;
    let mut big = vec![b'x'; MAX_MESSAGE + 10];
    big.push(b'\n');
    let writer = tokio::spawn(async move {
        let _ = w.write_all(&big).await;
        let _ = w.flush().await;
        w
    });
    let reply = tokio::time::timeout(Duration::from_secs(10), proto::read(r)).await??;
    assert!(matches!(&reply.msg, Msg::Error { what } if what.contains("larger than")), "{reply:?}");
    drop(writer.await?);
    good_status(&pki, &c).await?;
    Ok(())
}

#[tokio::test]
async fn the_connection_cap_holds_with_half_open_handshakes() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "3s", &["--max-connections", "2"])?;
    // Two TCP connections that never start their handshake fill the cap.
    let a = tokio::net::TcpStream::connect(&c.addr).await?;
    let b = tokio::net::TcpStream::connect(&c.addr).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let e = good_status(&pki, &c).await.expect_err("over the cap");
    let text = format!("{e:#}");
    assert!(text.contains("TLS handshake with") || text.contains("no answer"), "{text}");
    assert!(t.elapsed() < Duration::from_secs(2), "refused after {:?}", t.elapsed());
    assert!(c.log_text().contains("too many connections"));
    // When their deadline passes they are dropped, and the slots are free again.
    let (_, took_a) = until_closed(a, Duration::from_secs(5)).await?;
    let (_, _) = until_closed(b, Duration::from_secs(5)).await?;
    assert!(took_a < Duration::from_secs(4), "{took_a:?}");
    good_status(&pki, &c).await?;
    Ok(())
}

#[test]
fn serve_refuses_tcp_without_tls_or_a_safe_token() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let state = tempfile::tempdir()?;
    let p = |p: &std::path::Path| p.display().to_string();
    let (cert, key, ca, token) = (p(&pki.server.cert), p(&pki.server.key), p(&pki.ca), p(&pki.token));
    let st = p(state.path());
    let base = ["--state", &st, "serve", "--listen", "127.0.0.1:0"];
    let serve = |extra: &[&str]| cli(&[&base[..], extra].concat(), &[]);
    let refused = |extra: &[&str], needle: &str| -> anyhow::Result<()> {
        let (ok, out, err) = serve(extra)?;
        anyhow::ensure!(!ok && err.contains(needle), "{extra:?}: expected a refusal naming {needle:?}: {out}{err}");
        Ok(())
    };
    refused(&[], "--tls-cert")?;
    refused(&["--tls-cert", &cert], "--tls-key")?;
    refused(&["--tls-cert", &cert, "--tls-key", &key], "--tls-client-ca")?;
    let tls = ["--tls-cert", &cert[..], "--tls-key", &key, "--tls-client-ca", &ca];
    refused(&tls, "--token-file")?;
    let no_ca = ["--tls-cert", &cert[..], "--tls-key", &key, "--tls-client-ca", "/nonexistent/ca.pem"];
    refused(&[&no_ca[..], &["--token-file", &token]].concat(), "/nonexistent/ca.pem")?;
    // The certificate's key must be its own.
    let client_key = p(&pki.client.key);
    let mismatched = ["--tls-cert", &cert[..], "--tls-key", &client_key, "--tls-client-ca", &ca];
    refused(&[&mismatched[..], &["--token-file", &token]].concat(), "not a usable pair")?;
    // A token file others may read, an empty one.
    let loose = pki.dir.path().join("loose-token");
    std::fs::write(&loose, "abc\n")?;
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    refused(&[&tls[..], &["--token-file", &p(&loose)]].concat(), &format!("{} has mode 0644", loose.display()))?;
    let empty = pki.dir.path().join("empty-token");
    std::fs::write(&empty, "\n")?;
    std::fs::set_permissions(&empty, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    refused(&[&tls[..], &["--token-file", &p(&empty)]].concat(), "is empty")?;
    // The token is never an argument.
    refused(&[&tls[..], &["--token", "abc"]].concat(), "unexpected argument '--token'")?;
    // A client asking over TCP without TLS material is told which flag is missing.
    let (ok, _, err) = cli(&["status", "--coordinator", "tcp:127.0.0.1:1"], &[])?;
    assert!(!ok && err.contains("--tls-ca"), "{err}");
    Ok(())
}

/// A `cutline-sidecar serve` child (killed when dropped), its TCP settings from the
/// environment only; no QEMU: its VM is simply not reachable.
struct Sidecar(std::process::Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sidecar(
    pki: &Pki,
    c: &Coordinator,
    name: &str,
    id: &support::Identity,
) -> anyhow::Result<(Sidecar, std::path::PathBuf)> {
    let dir = pki.dir.path().join(name);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("sidecar.log");
    let child = Command::new(cutline_tests::workspace_bin("cutline-sidecar")?)
        .args(["serve", "--coordinator", &format!("tcp:{}", c.addr), "--name", name])
        .arg("--qmp")
        .arg(dir.join("nonexistent.qmp"))
        .arg("--store")
        .arg(dir.join("store"))
        .env("CUTLINE_TLS_CA", &pki.ca)
        .env("CUTLINE_TLS_CERT", &id.cert)
        .env("CUTLINE_TLS_KEY", &id.key)
        .env("CUTLINE_TOKEN_FILE", &pki.token)
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    Ok((Sidecar(child), log))
}

#[tokio::test]
async fn the_sidecar_registers_over_tls_and_is_told_when_its_certificate_is_refused() -> anyhow::Result<()> {
    let pki = Pki::new()?;
    let c = Coordinator::start(&pki, "1s", &[])?;
    let members = || async {
        let s = good_status(&pki, &c).await.ok()?;
        let names: Vec<String> =
            s["members"].as_array()?.iter().filter_map(|m| m["name"].as_str().map(str::to_owned)).collect();
        Some(names)
    };
    let (_vm0, _) = sidecar(&pki, &c, "vm0", &pki.client)?;
    let joined = cutline_tests::wait_until(Duration::from_secs(30), || async {
        members().await.filter(|m| m.iter().any(|n| n == "vm0"))
    })
    .await;
    assert!(joined.is_some(), "vm0 never registered: {}", c.log_text());
    let (_intruder, log) = sidecar(&pki, &c, "vm9", &pki.other_client)?;
    let told = cutline_tests::wait_until(Duration::from_secs(30), || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.contains("refused this sidecar's TLS certificate").then_some(text)
    })
    .await;
    assert!(told.is_some_and(|t| t.contains("UnknownCA")), "{}", std::fs::read_to_string(&log)?);
    assert_eq!(members().await, Some(vec!["vm0".to_owned()]));
    Ok(())
}
