//! qmp-client against peers that are not QEMU: clear errors naming the socket.

use std::time::Duration;

use qmp_client::{Qmp, QmpError, QmpOptions};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn no_such_socket_names_the_path() {
    let err = Qmp::connect("/nonexistent/cutline/qmp.sock").await.expect_err("no socket");
    assert!(matches!(err, QmpError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("/nonexistent/cutline/qmp.sock"), "{err}");
}

#[tokio::test]
async fn a_socket_that_is_not_qemu_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("not-qmp.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let server = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        }
    });
    let err = Qmp::connect(&path).await.expect_err("not QMP");
    assert!(matches!(err, QmpError::NotQmp { .. }), "{err:?}");
    assert!(err.to_string().contains("not-qmp.sock"), "{err}");
    server.abort();
    Ok(())
}

#[tokio::test]
async fn a_silent_socket_times_out_with_a_clear_error() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("silent.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let opts = QmpOptions { connect_timeout: Duration::from_millis(300), ..QmpOptions::default() };
    let err = Qmp::connect_unix(&path, opts).await.expect_err("silent");
    assert!(err.to_string().contains("no greeting"), "{err}");
    server.abort();
    Ok(())
}
