//! The workload's control channel: status lines from the guest, commands to it.
//!
//! The guest's second serial port (ttyS1) is a QEMU socket chardev in server mode;
//! this connects to it, keeps every `CUTLINE {json}` status line, and sends commands.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

/// The prefix of a status line.
pub const PREFIX: &str = "CUTLINE ";

/// Errors of the control channel.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The chardev socket did not accept a connection.
    #[error("cannot connect to the guest control socket {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Sending a command failed.
    #[error("cannot send `{command}` to the guest")]
    Send {
        /// The command.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The awaited status did not come.
    #[error("no `{what}` status from the guest within {after:?}; last lines: {last}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it waited.
        after: Duration,
        /// The last status lines seen, for diagnosis.
        last: String,
    },
}

#[derive(Default)]
struct Log {
    lines: Mutex<Vec<Value>>,
    notify: Notify,
}

/// A connection to a guest workload's control channel.
pub struct Control {
    log: Arc<Log>,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    next_req: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Control {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Control {
    /// Connects to the control socket, retrying until `timeout` while QEMU creates it.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Control, ControlError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(ControlError::Connect { path: path.to_owned(), source: e });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let (r, w) = stream.into_split();
        let log = Arc::new(Log::default());
        let reader_log = log.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Some(json) = line.find(PREFIX).map(|i| &line[i + PREFIX.len()..]) else { continue };
                match serde_json::from_str::<Value>(json.trim()) {
                    Ok(v) => {
                        reader_log.lines.lock().unwrap_or_else(|e| e.into_inner()).push(v);
                        reader_log.notify.notify_waiters();
                    }
                    Err(e) => tracing::warn!(%line, %e, "unparsable status line"),
                }
            }
        });
        Ok(Control { log, writer: tokio::sync::Mutex::new(w), next_req: AtomicU64::new(1), reader })
    }

    /// A position in the status log: waits started from it see only later lines.
    pub fn mark(&self) -> usize {
        self.log.lines.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Every status line received so far.
    pub fn lines(&self) -> Vec<Value> {
        self.log.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for the first status line at or after `from` that satisfies `pred`.
    pub async fn wait_from<F>(
        &self,
        from: usize,
        what: &str,
        mut pred: F,
        timeout: Duration,
    ) -> Result<Value, ControlError>
    where
        F: FnMut(&Value) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut next = from;
        loop {
            let notified = self.log.notify.notified();
            {
                let lines = self.log.lines.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(v) = lines.iter().skip(next).find(|v| pred(v)) {
                    return Ok(v.clone());
                }
                next = lines.len();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let lines = self.lines();
                let last = lines.iter().rev().take(3).map(Value::to_string).collect::<Vec<_>>().join(" | ");
                return Err(ControlError::Timeout { what: what.to_owned(), after: timeout, last });
            }
        }
    }

    /// Waits for a status line with `"event": event`, from the start of the log.
    pub async fn wait_event(&self, event: &str, timeout: Duration) -> Result<Value, ControlError> {
        self.wait_from(0, event, |v| v["event"] == event, timeout).await
    }

    /// Sends `verb` with a fresh request token and waits for the reply that echoes it.
    pub async fn request(&self, verb: &str, timeout: Duration) -> Result<Value, ControlError> {
        let req = format!("r{}", self.next_req.fetch_add(1, Ordering::Relaxed));
        let from = self.mark();
        self.send(&format!("{verb} {req}")).await?;
        self.wait_from(from, verb, |v| v["req"] == req.as_str(), timeout).await
    }

    /// Sends one raw command line.
    pub async fn send(&self, line: &str) -> Result<(), ControlError> {
        let mut w = self.writer.lock().await;
        let err = |source| ControlError::Send { command: line.to_owned(), source };
        w.write_all(format!("{line}\n").as_bytes()).await.map_err(err)?;
        w.flush().await.map_err(|source| ControlError::Send { command: line.to_owned(), source })
    }
}
