//! The reader of one `filter-mirror` chardev socket: counts the frames QEMU mirrors while
//! the gate holds, and drains the socket on request so that a release reports exact counts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::counter::{Counter, MirrorDecoder};

/// Errors of the mirror socket.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// QEMU's chardev socket did not accept a connection.
    #[error("cannot connect to the mirror socket {path}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The reader task is gone (the socket closed or sent garbage).
    #[error("the mirror socket {path} is closed")]
    Closed {
        /// The socket path.
        path: PathBuf,
    },
    /// The reader did not answer a drain request.
    #[error("the mirror socket {path} did not drain within {after:?}")]
    Drain {
        /// The socket path.
        path: PathBuf,
        /// How long it waited.
        after: Duration,
    },
}

/// A connected mirror socket with its reader task; the task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct MirrorReader {
    path: PathBuf,
    drain_tx: mpsc::Sender<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Drop for MirrorReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MirrorReader {
    /// Connects to QEMU's chardev socket at `path` and counts every frame into `counter`.
    pub(crate) async fn connect(path: &Path, counter: Arc<Counter>) -> Result<MirrorReader, MirrorError> {
        let stream =
            UnixStream::connect(path).await.map_err(|source| MirrorError::Connect { path: path.to_owned(), source })?;
        let (drain_tx, drain_rx) = mpsc::channel(4);
        let task = tokio::spawn(read_loop(stream, counter, drain_rx, path.to_owned()));
        Ok(MirrorReader { path: path.to_owned(), drain_tx, task })
    }

    /// True while the reader runs (the socket is open).
    pub(crate) fn is_alive(&self) -> bool {
        !self.task.is_finished()
    }

    /// Reads everything QEMU has written so far. Call after QEMU answered the command that
    /// turned the mirror off: QEMU writes each mirrored frame in full before it goes on,
    /// so every frame of the hold is in the socket by then.
    pub(crate) async fn drain(&self, timeout: Duration) -> Result<(), MirrorError> {
        let (tx, rx) = oneshot::channel();
        let closed = || MirrorError::Closed { path: self.path.clone() };
        self.drain_tx.send(tx).await.map_err(|_| closed())?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(MirrorError::Drain { path: self.path.clone(), after: timeout }),
        }
    }
}

async fn read_loop(
    stream: UnixStream,
    counter: Arc<Counter>,
    mut drain_rx: mpsc::Receiver<oneshot::Sender<()>>,
    path: PathBuf,
) {
    let mut decoder = MirrorDecoder::default();
    let mut buf = vec![0u8; 64 << 10];
    let why = loop {
        tokio::select! {
            ready = stream.readable() => {
                if let Err(e) = ready {
                    break e.to_string();
                }
                match read_available(&stream, &mut buf, &mut decoder, &counter) {
                    Ok(true) => {}
                    Ok(false) => break "QEMU closed it".to_owned(),
                    Err(e) => break e,
                }
            }
            req = drain_rx.recv() => {
                let Some(reply) = req else { return };
                match drain_now(&stream, &mut buf, &mut decoder, &counter) {
                    Ok(true) => {}
                    Ok(false) => break "QEMU closed it".to_owned(),
                    Err(e) => break e,
                }
                if !decoder.at_boundary() {
                    tracing::debug!(path = %path.display(), "mirror drained mid-frame; the frame was already counted");
                }
                let _ = reply.send(());
            }
        }
    };
    tracing::warn!(path = %path.display(), %why, "mirror socket closed: the gate can no longer count held packets");
    counter.set_lost(true);
}

/// Reads until the socket would block; false at end of stream.
fn read_available(
    stream: &UnixStream,
    buf: &mut [u8],
    decoder: &mut MirrorDecoder,
    counter: &Counter,
) -> Result<bool, String> {
    loop {
        match stream.try_read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => decoder.push(&buf[..n], |len| counter.add(len as u64)).map_err(|e| e.to_string())?,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Reads until the socket is empty with plain non-blocking `recv` calls. Unlike
/// [`read_available`] this does not trust tokio's readiness, which may not have seen
/// data QEMU wrote a moment ago; false at end of stream.
fn drain_now(
    stream: &UnixStream,
    buf: &mut [u8],
    decoder: &mut MirrorDecoder,
    counter: &Counter,
) -> Result<bool, String> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    loop {
        match recv(stream.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) => return Ok(false),
            Ok(n) => decoder.push(&buf[..n], |len| counter.add(len as u64)).map_err(|e| e.to_string())?,
            Err(nix::errno::Errno::EAGAIN) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bounds::Bounds;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn counts_frames_and_drains_exactly() {
        let dir = std::env::temp_dir().join(format!("cutline-mirror-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("m.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let counter = Arc::new(Counter::new(Bounds::default()));
        let (reader, accepted) = tokio::join!(MirrorReader::connect(&path, counter.clone()), listener.accept());
        let reader = reader.expect("connect");
        let (mut qemu, _) = accepted.expect("accept");
        let mut burst = Vec::new();
        for len in [60u32, 1514, 98] {
            burst.extend_from_slice(&len.to_be_bytes());
            burst.extend(std::iter::repeat_n(0u8, len as usize));
        }
        qemu.write_all(&burst).await.expect("write");
        reader.drain(Duration::from_secs(5)).await.expect("drain");
        assert_eq!(counter.get(), (3, 60 + 1514 + 98));
        drop(qemu);
        let lost = tokio::time::timeout(Duration::from_secs(5), async {
            while counter.exceeded().is_none() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(lost.is_ok(), "a closed socket marks the count lost");
        assert!(!reader.is_alive());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
