//! The QMP connection: handshake, concurrent commands matched by id, events, closure.

use std::collections::HashMap;
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::event::{Event, EventStream};
use crate::peer::{PeerIdentity, peer_credentials};
use crate::{QmpError, fdpass};

/// Largest QMP message accepted; `query-qmp-schema` is well below this.
const MAX_MESSAGE: u64 = 64 << 20;

/// Settings of a QMP connection.
#[derive(Debug, Clone)]
pub struct QmpOptions {
    /// How long to wait for the socket and the greeting.
    pub connect_timeout: Duration,
    /// Default time a command may take before `Timeout`.
    pub command_timeout: Duration,
    /// Enable out-of-band execution when QEMU offers it.
    pub enable_oob: bool,
}

impl Default for QmpOptions {
    fn default() -> Self {
        QmpOptions {
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            enable_oob: true,
        }
    }
}

/// QEMU's version as announced in the greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// Major version, e.g. 10.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2`.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The QMP greeting: QEMU's version and the capabilities it offers.
#[derive(Debug, Clone)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Capabilities offered, e.g. `oob`.
    pub capabilities: Vec<String>,
}

impl Greeting {
    fn parse(msg: &Value) -> Result<Greeting, String> {
        let qmp = msg.get("QMP").ok_or("the first message has no `QMP` member")?;
        let q = qmp.pointer("/version/qemu").ok_or("the greeting has no version")?;
        let num = |k: &str| q.get(k).and_then(Value::as_u64).ok_or(format!("the greeting's version has no `{k}`"));
        let version = QemuVersion {
            major: num("major")?,
            minor: num("minor")?,
            micro: num("micro")?,
            package: qmp.pointer("/version/package").and_then(Value::as_str).unwrap_or("").trim().to_owned(),
        };
        let capabilities = qmp
            .get("capabilities")
            .and_then(Value::as_array)
            .map(|caps| caps.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        Ok(Greeting { version, capabilities })
    }
}

/// Why a QMP connection closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// QEMU closed the socket (it quit, crashed or was killed).
    Eof,
    /// Reading the socket failed.
    ReadError(String),
    /// QEMU sent something that is not QMP.
    Protocol(String),
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Eof => f.write_str("QEMU closed the socket"),
            CloseReason::ReadError(e) => write!(f, "read error: {e}"),
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
        }
    }
}

type Reply = Result<Value, QmpError>;

/// Commands waiting for their replies, and whether the connection is closed.
#[derive(Default)]
struct Pending {
    waiting: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    closed: Option<CloseReason>,
}

/// State shared between callers and the reader task.
struct Shared {
    pending: Mutex<Pending>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<Event>>>,
    closed_tx: watch::Sender<Option<CloseReason>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these locks cannot leave them inconsistent: every
    // critical section is a single map or vector operation.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

enum Writer {
    Unix(unix::OwnedWriteHalf),
    Tcp(tcp::OwnedWriteHalf),
}

impl Writer {
    async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Writer::Unix(w) => w.write_all(buf).await,
            Writer::Tcp(w) => w.write_all(buf).await,
        }
    }
}

struct Inner {
    shared: Arc<Shared>,
    writer: tokio::sync::Mutex<Writer>,
    next_id: AtomicU64,
    greeting: Greeting,
    oob: bool,
    peer: Option<(i32, u32)>,
    target: String,
    options: QmpOptions,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A QMP connection to one QEMU. Cheap to clone; every clone shares the connection,
/// so many tasks may issue commands at once.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp").field("target", &self.inner.target).field("qemu", &self.inner.greeting.version).finish()
    }
}

impl Qmp {
    /// Connects to QEMU's QMP unix socket at `path` with default options.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Qmp, QmpError> {
        Qmp::connect_unix(path, QmpOptions::default()).await
    }

    /// Connects to a QMP unix socket, reads the greeting and negotiates capabilities.
    pub async fn connect_unix(path: impl AsRef<Path>, options: QmpOptions) -> Result<Qmp, QmpError> {
        let target = path.as_ref().display().to_string();
        let stream = tokio::time::timeout(options.connect_timeout, UnixStream::connect(path.as_ref()))
            .await
            .map_err(|_| QmpError::Connect { target: target.clone(), source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(|source| QmpError::Connect { target: target.clone(), source })?;
        let peer = peer_credentials(&stream).ok();
        let (r, w) = stream.into_split();
        Qmp::handshake(Box::new(r), Writer::Unix(w), peer, target, options).await
    }

    /// Connects to a QMP TCP socket (`-qmp tcp:HOST:PORT,server`). Fd passing and
    /// peer identity are not available over TCP.
    pub async fn connect_tcp(addr: &str, options: QmpOptions) -> Result<Qmp, QmpError> {
        let target = addr.to_owned();
        let stream = tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| QmpError::Connect { target: target.clone(), source: std::io::ErrorKind::TimedOut.into() })?
            .map_err(|source| QmpError::Connect { target: target.clone(), source })?;
        // Nagle would delay small commands behind each other; QMP is request/response.
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Qmp::handshake(Box::new(r), Writer::Tcp(w), None, target, options).await
    }

    async fn handshake(
        read: Box<dyn AsyncRead + Send + Unpin>,
        mut writer: Writer,
        peer: Option<(i32, u32)>,
        target: String,
        options: QmpOptions,
    ) -> Result<Qmp, QmpError> {
        let mut reader = BufReader::new(read);
        let not_qmp = |reason: String| QmpError::NotQmp { target: target.clone(), reason };
        let first = tokio::time::timeout(options.connect_timeout, read_message(&mut reader))
            .await
            .map_err(|_| {
                not_qmp(format!(
                    "no greeting within {:?} (QEMU serves one client per QMP socket: is another one connected?)",
                    options.connect_timeout
                ))
            })?
            .map_err(|e| not_qmp(e.to_string()))?
            .ok_or_else(|| not_qmp("closed without a greeting".into()))?;
        let greeting = Greeting::parse(&first).map_err(not_qmp)?;
        let oob = options.enable_oob && greeting.capabilities.iter().any(|c| c == "oob");
        let mut negotiate = json!({"execute": "qmp_capabilities", "id": 0});
        if oob {
            negotiate["arguments"] = json!({"enable": ["oob"]});
        }
        let line = format!("{negotiate}\n");
        writer
            .write_all(line.as_bytes())
            .await
            .map_err(|source| QmpError::Send { command: "qmp_capabilities".into(), source })?;
        // Events may already come before the reply; none matter before we are connected.
        loop {
            let msg = tokio::time::timeout(options.connect_timeout, read_message(&mut reader))
                .await
                .map_err(|_| not_qmp("no reply to qmp_capabilities".into()))?
                .map_err(|e| not_qmp(e.to_string()))?
                .ok_or_else(|| not_qmp("closed during capabilities negotiation".into()))?;
            if msg.get("event").is_some() {
                continue;
            }
            if let Some(err) = msg.get("error") {
                return Err(qemu_error("qmp_capabilities", err));
            }
            if msg.get("return").is_some() {
                break;
            }
            return Err(not_qmp(format!("unexpected reply to qmp_capabilities: {msg}")));
        }
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared { pending: Mutex::default(), subscribers: Mutex::default(), closed_tx });
        let reader = tokio::spawn(read_loop(reader, shared.clone()));
        tracing::debug!(target = %target, qemu = %greeting.version, oob, "QMP connected");
        Ok(Qmp {
            inner: Arc::new(Inner {
                shared,
                writer: tokio::sync::Mutex::new(writer),
                next_id: AtomicU64::new(1),
                greeting,
                oob,
                peer,
                target,
                options,
                reader,
            }),
        })
    }

    /// The greeting QEMU sent: its version and offered capabilities.
    pub fn greeting(&self) -> &Greeting {
        &self.inner.greeting
    }

    /// True when out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob
    }

    /// The socket path or address this connection goes to.
    pub fn target(&self) -> &str {
        &self.inner.target
    }

    /// The QEMU process on the other end (pid from SO_PEERCRED, argv from /proc).
    pub fn peer(&self) -> Result<PeerIdentity, QmpError> {
        let (pid, uid) = self.inner.peer.ok_or(QmpError::NotUnix { what: "peer identity" })?;
        PeerIdentity::of_pid(pid, uid)
    }

    /// The pid of the QEMU process on the other end, for unix sockets.
    pub fn peer_pid(&self) -> Option<i32> {
        self.inner.peer.map(|(pid, _)| pid)
    }

    /// Runs a typed command from the `qapi` crate's schema (QEMU 9.1).
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok, QmpError> {
        let args = serde_json::to_value(&command)
            .map_err(|source| QmpError::Decode { command: C::NAME.to_owned(), source })?;
        let ret = self.execute_raw(C::NAME, args).await?;
        serde_json::from_value(ret).map_err(|source| QmpError::Decode { command: C::NAME.to_owned(), source })
    }

    /// Runs any command by name with raw JSON arguments (`Null` or `{}` for none),
    /// for what the schema lacks or QEMU 10 changed. Returns the raw `return` value.
    pub async fn execute_raw(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.send(command, arguments, None, false, self.inner.options.command_timeout).await
    }

    /// Like [`Qmp::execute_raw`] with its own timeout.
    pub async fn execute_raw_timeout(
        &self,
        command: &str,
        arguments: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.send(command, arguments, None, false, timeout).await
    }

    /// Sends several in-band commands in one write, in order, then waits for every reply.
    ///
    /// QEMU runs in-band commands one at a time in the order they arrive, so their effects
    /// happen in this order, one round trip in all instead of one per command. Each command
    /// gets its own result; a failing command does not stop the ones after it.
    pub async fn execute_raw_pipelined(&self, commands: &[(&str, Value)]) -> Vec<Result<Value, QmpError>> {
        let timeout = self.inner.options.command_timeout;
        let mut waits = Vec::with_capacity(commands.len());
        let mut text = String::new();
        {
            let mut pending = lock(&self.inner.shared.pending);
            for (command, arguments) in commands {
                if let Some(reason) = pending.closed.clone() {
                    waits.push(Err(QmpError::Disconnected { what: (*command).to_owned(), reason }));
                    continue;
                }
                let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                pending.waiting.insert(id, ((*command).to_owned(), tx));
                let mut msg = json!({ "execute": command, "id": id });
                if !(arguments.is_null() || arguments.as_object().is_some_and(|o| o.is_empty())) {
                    msg["arguments"] = arguments.clone();
                }
                text.push_str(&format!("{msg}\n"));
                waits.push(Ok((id, (*command).to_owned(), rx)));
            }
        }
        tracing::trace!(commands = commands.len(), "QMP send pipelined");
        let written = self.inner.writer.lock().await.write_all(text.as_bytes()).await;
        let mut out = Vec::with_capacity(waits.len());
        let deadline = tokio::time::Instant::now() + timeout;
        for wait in waits {
            let (id, command, rx) = match wait {
                Ok(w) => w,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            if let Err(e) = &written {
                lock(&self.inner.shared.pending).waiting.remove(&id);
                out.push(Err(QmpError::Send { command, source: std::io::Error::new(e.kind(), e.to_string()) }));
                continue;
            }
            out.push(match tokio::time::timeout_at(deadline, rx).await {
                Ok(Ok(reply)) => reply,
                Ok(Err(_)) => Err(QmpError::Disconnected {
                    what: command,
                    reason: self.close_reason().unwrap_or(CloseReason::Eof),
                }),
                Err(_) => {
                    lock(&self.inner.shared.pending).waiting.remove(&id);
                    Err(QmpError::Timeout { what: command, after: timeout })
                }
            });
        }
        out
    }

    /// Runs a command out-of-band (`exec-oob`), overtaking queued in-band commands.
    /// Only commands QEMU marks `allow-oob` (e.g. `migrate-pause`) accept this.
    pub async fn execute_oob_raw(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        if !self.inner.oob {
            return Err(QmpError::OobUnavailable { command: command.to_owned() });
        }
        self.send(command, arguments, None, true, self.inner.options.command_timeout).await
    }

    /// Passes `fd` to QEMU under `name` (`getfd`), for use as `fd:NAME` in e.g. `migrate`.
    pub async fn getfd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.send("getfd", json!({"fdname": name}), Some(fd.as_raw_fd()), false, self.inner.options.command_timeout)
            .await
            .map(|_| ())
    }

    /// Adds `fd` to an fd set (`add-fd`), for use as `/dev/fdset/ID` in file names.
    /// Returns QEMU's `{fdset-id, fd}`.
    pub async fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
    ) -> Result<Value, QmpError> {
        let mut args = json!({});
        if let Some(id) = fdset_id {
            args["fdset-id"] = json!(id);
        }
        if let Some(o) = opaque {
            args["opaque"] = json!(o);
        }
        self.send("add-fd", args, Some(fd.as_raw_fd()), false, self.inner.options.command_timeout).await
    }

    /// Subscribes to every event from now on. Subscribe before issuing the command
    /// whose event you then wait for, so the event cannot be missed.
    pub fn subscribe(&self) -> EventStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = self.inner.shared.closed_tx.subscribe();
        // Registered under the pending lock so a concurrent close cannot slip between
        // the check and the registration.
        let pending = lock(&self.inner.shared.pending);
        if pending.closed.is_none() {
            lock(&self.inner.shared.subscribers).push(tx);
        }
        drop(pending);
        EventStream { rx, closed }
    }

    /// Runs a command and waits for the first event `event` that satisfies `pred`,
    /// subscribed before the command is sent.
    pub async fn execute_and_wait<F>(
        &self,
        command: &str,
        arguments: Value,
        event: &str,
        pred: F,
        timeout: Duration,
    ) -> Result<(Value, Event), QmpError>
    where
        F: FnMut(&Event) -> bool,
    {
        let mut events = self.subscribe();
        let ret = self.execute_raw(command, arguments).await?;
        let ev = events.wait_for(event, pred, timeout).await?;
        Ok((ret, ev))
    }

    /// Resolves when the connection closes: QEMU quit, crashed or was killed.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.inner.shared.closed_tx.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or(CloseReason::Eof),
            Err(_) => CloseReason::Eof,
        }
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.inner.shared.pending).closed.clone()
    }

    async fn send(
        &self,
        command: &str,
        arguments: Value,
        fd: Option<RawFd>,
        oob: bool,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.inner.shared.pending);
            if let Some(reason) = pending.closed.clone() {
                return Err(QmpError::Disconnected { what: command.to_owned(), reason });
            }
            pending.waiting.insert(id, (command.to_owned(), tx));
        }
        let mut msg = json!({ if oob { "exec-oob" } else { "execute" }: command, "id": id });
        if !(arguments.is_null() || arguments.as_object().is_some_and(|o| o.is_empty())) {
            msg["arguments"] = arguments;
        }
        let line = format!("{msg}\n");
        tracing::trace!(%command, id, "QMP send");
        let written = {
            let mut w = self.inner.writer.lock().await;
            match (fd, &mut *w) {
                (None, w) => w.write_all(line.as_bytes()).await,
                (Some(fd), Writer::Unix(w)) => fdpass::write_with_fd(w, line.as_bytes(), fd).await,
                (Some(_), Writer::Tcp(_)) => {
                    lock(&self.inner.shared.pending).waiting.remove(&id);
                    return Err(QmpError::NotUnix { what: "fd passing" });
                }
            }
        };
        if let Err(source) = written {
            lock(&self.inner.shared.pending).waiting.remove(&id);
            return Err(QmpError::Send { command: command.to_owned(), source });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(QmpError::Disconnected {
                what: command.to_owned(),
                reason: self.close_reason().unwrap_or(CloseReason::Eof),
            }),
            Err(_) => {
                lock(&self.inner.shared.pending).waiting.remove(&id);
                Err(QmpError::Timeout { what: command.to_owned(), after: timeout })
            }
        }
    }
}

fn qemu_error(command: &str, err: &Value) -> QmpError {
    QmpError::Qemu {
        command: command.to_owned(),
        class: err.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_owned(),
        desc: err.get("desc").and_then(Value::as_str).unwrap_or("(no description)").to_owned(),
    }
}

/// Reads one newline-terminated JSON message; `Ok(None)` at end of stream.
async fn read_message<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<Option<Value>> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut *reader).take(MAX_MESSAGE).read_until(b'\n', &mut line).await?;
        if n == 0 {
            return Ok(None);
        }
        if line.last() != Some(&b'\n') && n as u64 == MAX_MESSAGE {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "QMP message larger than 64 MiB"));
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        return serde_json::from_slice(&line).map(Some).map_err(|e| {
            let shown = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not JSON ({e}): {shown:?}"))
        });
    }
}

/// Routes replies to their callers by id and events to every subscriber, until the socket closes.
async fn read_loop<R: AsyncRead + Unpin>(mut reader: BufReader<R>, shared: Arc<Shared>) {
    let reason = loop {
        let msg = match read_message(&mut reader).await {
            Ok(Some(msg)) => msg,
            Ok(None) => break CloseReason::Eof,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => break CloseReason::Protocol(e.to_string()),
            Err(e) => break CloseReason::ReadError(e.to_string()),
        };
        if let Some(event) = Event::from_message(&msg) {
            tracing::debug!(event = %event.name, "QMP event");
            lock(&shared.subscribers).retain(|s| s.send(event.clone()).is_ok());
            continue;
        }
        let Some(id) = msg.get("id").and_then(Value::as_u64) else {
            tracing::warn!(%msg, "QMP message without a known id ignored");
            continue;
        };
        let Some((command, tx)) = lock(&shared.pending).waiting.remove(&id) else {
            tracing::debug!(id, "reply to a command nobody waits for (timed out?)");
            continue;
        };
        let reply = match (msg.get("return"), msg.get("error")) {
            (Some(ret), _) => Ok(ret.clone()),
            (None, Some(err)) => Err(qemu_error(&command, err)),
            (None, None) => Err(QmpError::NotQmp {
                target: command.clone(),
                reason: format!("reply without return or error: {msg}"),
            }),
        };
        let _ = tx.send(reply);
    };
    tracing::debug!(%reason, "QMP connection closed");
    let waiting = {
        let mut pending = lock(&shared.pending);
        pending.closed = Some(reason.clone());
        std::mem::take(&mut pending.waiting)
    };
    for (_, (command, tx)) in waiting {
        let _ = tx.send(Err(QmpError::Disconnected { what: command, reason: reason.clone() }));
    }
    lock(&shared.subscribers).clear();
    shared.closed_tx.send_replace(Some(reason));
}

/// The reader's pure parts, reachable by the fuzz targets in `fuzz/` (feature `fuzzing`):
/// thin doors to the code the client runs, not copies of it.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    /// One message of `reader`, as the client reads it.
    pub async fn read_message<R: AsyncRead + Unpin>(reader: &mut BufReader<R>) -> std::io::Result<Option<Value>> {
        super::read_message(reader).await
    }

    /// The greeting in the first message.
    pub fn parse_greeting(msg: &Value) -> Result<Greeting, String> {
        Greeting::parse(msg)
    }

    /// The event `msg` is, if it is one.
    pub fn event(msg: &Value) -> Option<Event> {
        Event::from_message(msg)
    }

    /// What the reader task delivered by the time the stream ended.
    #[derive(Debug)]
    pub struct Routed {
        /// Per command waiting: its reply (`None`: it was never answered).
        pub replies: Vec<(u64, Option<Result<Value, QmpError>>)>,
        /// The events a subscriber received, in order.
        pub events: Vec<Event>,
        /// Why the connection closed.
        pub closed: Option<CloseReason>,
    }

    /// Runs the client's reader task over `reader` to its end, with commands `ids` waiting
    /// (named `cmdID`) and one event subscriber.
    pub async fn route<R: AsyncRead + Unpin>(reader: R, ids: &[u64]) -> Routed {
        let (closed_tx, _) = watch::channel(None);
        let shared = Arc::new(Shared { pending: Mutex::default(), subscribers: Mutex::default(), closed_tx });
        let mut waits = Vec::new();
        for &id in ids {
            let (tx, rx) = oneshot::channel();
            if lock(&shared.pending).waiting.insert(id, (format!("cmd{id}"), tx)).is_none() {
                waits.push((id, rx));
            }
        }
        let (tx, mut events_rx) = mpsc::unbounded_channel();
        lock(&shared.subscribers).push(tx);
        read_loop(BufReader::new(reader), shared.clone()).await;
        let replies = waits.into_iter().map(|(id, mut rx)| (id, rx.try_recv().ok())).collect();
        let mut events = Vec::new();
        while let Ok(e) = events_rx.try_recv() {
            events.push(e);
        }
        let closed = lock(&shared.pending).closed.clone();
        Routed { replies, events, closed }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_10_greeting() {
        let g = serde_json::json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2+ds-2"}, "capabilities": ["oob"]}});
        let g = Greeting::parse(&g).expect("greeting");
        assert_eq!(g.version.to_string(), "10.0.2");
        assert_eq!(g.capabilities, ["oob"]);
    }

    /// A fake QMP server: greets, accepts capabilities, then answers each command with its
    /// position in arrival order, failing the command named `fail`.
    async fn fake_qemu(listener: tokio::net::UnixListener, fail: &'static str) -> Vec<String> {
        let (stream, _) = listener.accept().await.expect("accept");
        let (r, mut w) = stream.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":10,\"minor\":0,\"micro\":2},\"package\":\"\"},\"capabilities\":[]}}\n")
            .await
            .expect("greet");
        let mut seen = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            let msg: Value = serde_json::from_str(&line).expect("json");
            let name = msg["execute"].as_str().unwrap_or_default().to_owned();
            let reply = if name == fail {
                json!({"id": msg["id"], "error": {"class": "GenericError", "desc": "no"}})
            } else {
                json!({"id": msg["id"], "return": seen.len()})
            };
            if name != "qmp_capabilities" {
                seen.push(name);
            }
            w.write_all(format!("{reply}\n").as_bytes()).await.expect("reply");
        }
        seen
    }

    #[tokio::test]
    async fn pipelined_commands_run_in_order_with_their_own_results() {
        let dir = std::env::temp_dir().join(format!("qmp-pipelined-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&path);
        let server = tokio::spawn(fake_qemu(tokio::net::UnixListener::bind(&path).expect("bind"), "b"));
        let qmp = Qmp::connect(&path).await.expect("connect");
        let results = qmp.execute_raw_pipelined(&[("a", json!({})), ("b", Value::Null), ("c", json!({"x": 1}))]).await;
        assert_eq!(results.len(), 3);
        assert_eq!(results[0].as_ref().expect("a"), &json!(0));
        assert_eq!(results[1].as_ref().expect_err("b fails").qemu_class(), Some("GenericError"));
        assert_eq!(results[2].as_ref().expect("c"), &json!(2));
        drop(qmp);
        assert_eq!(server.await.expect("server"), ["a", "b", "c"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rejects_non_qmp_greeting() {
        assert!(Greeting::parse(&serde_json::json!({"hello": 1})).is_err());
    }
}
