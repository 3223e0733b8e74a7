//! The coordinator daemon: it locks its state directory, raises its incarnation, and
//! serves members and the CLI over a unix socket (mode 0600, plaintext, no token) and
//! optionally TCP (always TLS with client certificates, and the pre-shared token); one
//! actor ([`crate::actor`]) runs the epochs, failure detection and recovery.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sidecar::proto::{self, Envelope, FrameReader, Msg};
use sidecar::transport::{TlsError, Token};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::actor::{Actor, Input};
use crate::record::Catalog;
use crate::state::StateDir;
use crate::tls::ServerFiles;

pub use crate::phase::OutputCommit;

/// What a failure rolls back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Rollback {
    /// Every member, to the last committed epoch.
    Cluster,
    /// Only the failed VM (seed 000): safe only for VMs that do not talk to each other.
    Vm,
}

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// State directory: incarnation and membership, default socket, and the commit
    /// records unless `records` names an object store.
    pub state_dir: PathBuf,
    /// Where commit records go: an object store shared with the sidecars (so that the
    /// records survive this host), or `None` for `STATE_DIR/CLUSTER/epochs/`.
    pub records: Option<cutline_objects::Location>,
    /// Unix socket (mode 0600).
    pub socket: PathBuf,
    /// Optional TCP listener: TLS and the token.
    pub tcp: Option<Tcp>,
    /// Heartbeat period members are told to use.
    pub heartbeat: Duration,
    /// Heartbeats missing for this long fail a member.
    pub failure_timeout: Duration,
    /// Take a checkpoint every this often.
    pub interval: Option<Duration>,
    /// Committed epochs kept.
    pub keep: usize,
    /// What a failure rolls back.
    pub rollback: Rollback,
    /// When held output is released.
    pub output_commit: OutputCommit,
    /// Longest a protocol step may take before the epoch aborts.
    pub step_timeout: Duration,
    /// A restored cluster failing again within this window rolls back one epoch further.
    pub latent_window: Duration,
    /// Recovery attempts (each with `step_timeout` per step) before the cluster halts.
    pub recovery_attempts: u32,
    /// Longest the sidecars may take to verify an epoch's checkpoints.
    pub verify_timeout: Duration,
    /// Connections served at once; more are refused.
    pub max_connections: usize,
    /// A peer's TLS handshake (TCP) and first message (with the token) must be done
    /// within this of its connect; else it is dropped.
    pub first_message_timeout: Duration,
    /// The lease a host agent's granted heartbeat buys its host.
    pub lease: Duration,
    /// Waited beyond a lost host's lease before its VMs start elsewhere (clock rate
    /// differences and the fence's own time; docs/HOSTS.md).
    pub lease_margin: Duration,
    /// The host a lost host's VMs go to first while it is up and has room (seed 003's
    /// backup host); else the host with the most free memory.
    pub standby: Option<String>,
    /// Who this coordinator is (pid and host), as its claim on a shared store says.
    pub who: String,
}

impl Config {
    /// Defaults with state in `state_dir`.
    pub fn new(state_dir: &Path) -> Config {
        Config {
            state_dir: state_dir.to_owned(),
            records: None,
            socket: state_dir.join("cutline.sock"),
            tcp: None,
            heartbeat: Duration::from_secs(1),
            failure_timeout: Duration::from_secs(3),
            interval: None,
            keep: 2,
            rollback: Rollback::Cluster,
            output_commit: OutputCommit::Release,
            step_timeout: Duration::from_secs(60),
            latent_window: Duration::from_secs(10),
            recovery_attempts: 3,
            verify_timeout: Duration::from_secs(600),
            max_connections: 256,
            first_message_timeout: Duration::from_secs(5),
            lease: Duration::from_secs(5),
            lease_margin: Duration::from_secs(2),
            standby: None,
            who: format!(
                "coordinator pid {} on {} at unix ms {}",
                std::process::id(),
                std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim(),
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis())
            ),
        }
    }
}

/// The TCP listener: there is no plaintext TCP, and every peer must also send the token.
#[derive(Debug, Clone)]
pub struct Tcp {
    /// `HOST:PORT` to listen on (port 0: any; the log says which).
    pub addr: String,
    /// The coordinator's certificate and the client CA.
    pub tls: ServerFiles,
    /// The pre-shared token every `register` and `ask` must carry.
    pub token: Token,
}

/// Errors that stop the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A socket could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The records are unusable.
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
    /// The state directory is unusable or held by another coordinator.
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    /// Another coordinator took over the shared store.
    #[error("superseded: {0}")]
    Superseded(String),
    /// The TLS material of the TCP listener is unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Runs the coordinator for cluster `default` until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
    let cluster = "default".to_owned();
    // Bad TLS material stops the start before anything else is touched.
    let acceptor = cfg.tcp.as_ref().map(|t| t.tls.acceptor()).transpose()?;
    let mut dir = StateDir::lock(&cfg.state_dir.join(&cluster))?;
    let local = cfg.state_dir.join(&cluster);
    // Opening an object store probes its server: off the async threads.
    let records = cfg.records.clone();
    let objects = tokio::task::spawn_blocking(move || match records {
        Some(location) => cutline_objects::Objects::open(&location),
        None => Ok(cutline_objects::Objects::Local(cutline_objects::Local::open(&local)?)),
    })
    .await
    .map_err(|e| crate::record::RecordError::Store(cutline_objects::ObjectsError::Config(e.to_string())))?
    .map_err(crate::record::RecordError::Store)?;
    if cfg.records.is_some() {
        // The state goes where the records go: a coordinator on another host carries on.
        dir = dir.with_shared(objects.clone());
    }
    let keep = cfg.keep.max(1);
    let who = cfg.who.clone();
    let (dir, mut durable, catalog) = tokio::task::spawn_blocking(move || {
        let mut durable = dir.load()?;
        durable.incarnation += 1;
        dir.claim(durable.incarnation, &who)?;
        let catalog = Catalog::open(objects, durable.incarnation)?;
        catalog.prune(keep);
        Ok::<_, ServerError>((dir, durable, catalog))
    })
    .await
    .map_err(|e| crate::record::RecordError::Store(cutline_objects::ObjectsError::Config(e.to_string())))??;
    durable.next_epoch = durable.next_epoch.max(catalog.epochs().last().map_or(1, |e| e + 1));
    dir.save(&durable)?;
    tracing::info!(records = %catalog.describe(), "commit records");
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
    let leases = Arc::new(std::sync::Mutex::new(crate::hosts::Leases::new(
        cfg.lease,
        cfg.lease_margin,
        Instant::now().into_std(),
    )));
    let listeners = listen(&cfg, acceptor, in_tx.clone(), leases.clone()).await?;
    tracing::info!(socket = %cfg.socket.display(), incarnation = durable.incarnation, next_epoch = durable.next_epoch,
        members = durable.members.len(), "coordinator running");
    let socket = cfg.socket.clone();
    let mut actor = Actor::new(cfg, cluster, catalog, dir, durable, in_tx, leases);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => actor.on_tick().await,
            input = in_rx.recv() => match input {
                Some(i) => actor.on_input(i).await,
                None => break,
            },
        }
        if let Some(why) = actor.superseded() {
            tracing::error!("stopping: {why}");
            for l in &listeners {
                l.abort();
            }
            let _ = std::fs::remove_file(&socket);
            return Err(ServerError::Superseded(why));
        }
    }
    for l in listeners {
        l.abort();
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// Binds the unix socket (0600) and the optional TCP listener; spawns their accept loops.
async fn listen(
    cfg: &Config,
    acceptor: Option<TlsAcceptor>,
    in_tx: mpsc::UnboundedSender<Input>,
    leases: Arc<std::sync::Mutex<crate::hosts::Leases>>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ServerError> {
    let mut tasks = Vec::new();
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(dir) = cfg.socket.parent() {
        let _ = sidecar::store::private::create_dir_all(dir);
    }
    let unix = UnixListener::bind(&cfg.socket)
        .map_err(|source| ServerError::Listen { addr: cfg.socket.display().to_string(), source })?;
    std::fs::set_permissions(&cfg.socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|source| ServerError::Listen { addr: cfg.socket.display().to_string(), source })?;
    let ids = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let first = cfg.first_message_timeout;
    {
        let (in_tx, ids, slots, leases) = (in_tx.clone(), ids.clone(), slots.clone(), leases.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                match unix.accept().await {
                    Ok((s, _)) => {
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let peer = Peer {
                            id,
                            addr: None,
                            token: None,
                            local: true,
                            first_message_timeout: first,
                            leases: leases.clone(),
                        };
                        serve(peer, Incoming::Unix(s), &slots, &in_tx);
                    }
                    Err(e) => accept_failed("unix", e).await,
                }
            }
        }));
    }
    if let (Some(tcp), Some(acceptor)) = (&cfg.tcp, acceptor) {
        let listener = TcpListener::bind(&tcp.addr)
            .await
            .map_err(|source| ServerError::Listen { addr: tcp.addr.clone(), source })?;
        let bound = listener.local_addr().map_or_else(|_| tcp.addr.clone(), |a| a.to_string());
        tracing::info!(addr = %bound, "listening on TCP (TLS 1.3, client certificates required)");
        let token = tcp.token.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((s, from)) => {
                        let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let peer = Peer {
                            id,
                            addr: Some(from.to_string()),
                            token: Some(token.clone()),
                            local: false,
                            first_message_timeout: first,
                            leases: leases.clone(),
                        };
                        serve(peer, Incoming::Tcp(s, acceptor.clone()), &slots, &in_tx);
                    }
                    Err(e) => accept_failed("TCP", e).await,
                }
            }
        }));
    }
    Ok(tasks)
}

/// A failed accept (e.g. out of file descriptors) is logged and retried after a pause:
/// it must not end the listener.
async fn accept_failed(what: &str, e: std::io::Error) {
    tracing::warn!("accepting a {what} connection failed: {e}");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Longest the last message to a peer (an error, an answer) and the close may take.
const LAST_WORD_TIMEOUT: Duration = Duration::from_secs(5);

/// Who is on a connection.
struct Peer {
    id: u64,
    /// The remote address (TCP).
    addr: Option<String>,
    token: Option<Token>,
    local: bool,
    first_message_timeout: Duration,
    /// The lease table: a host agent's heartbeats are granted here, not by the actor.
    leases: Arc<std::sync::Mutex<crate::hosts::Leases>>,
}

/// A connection as accepted, before its handshake.
enum Incoming {
    Unix(UnixStream),
    Tcp(TcpStream, TlsAcceptor),
}

/// Serves a connection when a slot is free; refuses it otherwise. A slot is taken
/// before the TLS handshake, so half-open handshakes count against the cap.
fn serve(peer: Peer, incoming: Incoming, slots: &Arc<Semaphore>, in_tx: &mpsc::UnboundedSender<Input>) {
    match slots.clone().try_acquire_owned() {
        Ok(permit) => {
            let in_tx = in_tx.clone();
            tokio::spawn(async move {
                // The handshake and the first message share one deadline.
                let deadline = Instant::now() + peer.first_message_timeout;
                if let Some((r, w)) = open(&peer, incoming, deadline).await {
                    connection(peer, r, w, deadline, in_tx).await;
                }
                drop(permit);
            });
        }
        Err(_) => {
            tracing::warn!(conn = peer.id, addr = peer.addr.as_deref(), "too many connections: refused");
            match incoming {
                Incoming::Unix(s) => {
                    tokio::spawn(async move {
                        let what = "too many connections to the coordinator".to_owned();
                        let (_r, w) = s.into_split();
                        last_word(Box::new(w), &Envelope::plain(Msg::Error { what })).await;
                    });
                }
                // Closed at once: a TLS handshake to say so would cost what the cap bounds.
                Incoming::Tcp(s, _) => drop(s),
            }
        }
    }
}

/// The connection's streams: a unix socket as it is; TCP after a TLS handshake that
/// verified the client's certificate, done by `deadline`.
async fn open(peer: &Peer, incoming: Incoming, deadline: Instant) -> Option<(Reader, Writer)> {
    match incoming {
        Incoming::Unix(s) => {
            let (r, w) = s.into_split();
            Some((Box::new(r), Box::new(w)))
        }
        Incoming::Tcp(s, acceptor) => {
            let _ = s.set_nodelay(true);
            let addr = peer.addr.as_deref();
            match tokio::time::timeout_at(deadline, acceptor.accept(s)).await {
                Ok(Ok(tls)) => {
                    let (r, w) = tokio::io::split(tls);
                    Some((Box::new(r), Box::new(w)))
                }
                Ok(Err(e)) => {
                    tracing::warn!(conn = peer.id, addr, "TLS handshake failed: {e}");
                    None
                }
                Err(_) => {
                    tracing::warn!(
                        conn = peer.id,
                        addr,
                        "no TLS handshake within {:?}: closed",
                        peer.first_message_timeout
                    );
                    None
                }
            }
        }
    }
}

/// Sends `env` and closes (over TLS: with a close_notify), within [`LAST_WORD_TIMEOUT`].
async fn last_word(mut w: Writer, env: &Envelope) {
    let _ = tokio::time::timeout(LAST_WORD_TIMEOUT, async {
        let _ = proto::write(&mut w, env).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
    })
    .await;
}

/// One peer: a sidecar (first message `register`) or the CLI (`ask`).
async fn connection(peer: Peer, r: Reader, w: Writer, deadline: Instant, in_tx: mpsc::UnboundedSender<Input>) {
    let (id, addr) = (peer.id, peer.addr.as_deref());
    let mut r = FrameReader::new(r);
    let reply = |what: String| Envelope::plain(Msg::Error { what });
    let first = match tokio::time::timeout_at(deadline, r.next()).await {
        Ok(Ok(env)) => env,
        Ok(Err(proto::FrameError::Closed | proto::FrameError::Io(_))) => return,
        Ok(Err(e)) => {
            tracing::warn!(conn = id, addr, "bad first message: {e}");
            last_word(w, &reply(e.to_string())).await;
            return;
        }
        Err(_) => {
            tracing::warn!(conn = id, addr, "no first message within {:?}: closed", peer.first_message_timeout);
            last_word(w, &reply("no message in time".into())).await;
            return;
        }
    };
    let authorized = |given: &Option<String>| match &peer.token {
        None => true,
        Some(t) => given.as_deref().is_some_and(|g| t.matches(g)),
    };
    match &first.msg {
        Msg::Ask { token: given, request, .. } => {
            if !authorized(given) {
                tracing::warn!(conn = id, addr, "ask with a bad token refused");
                last_word(w, &reply("bad token".into())).await;
                return;
            }
            let (tx, rx) = oneshot::channel();
            let _ = in_tx.send(Input::Ask { request: request.clone(), reply: tx });
            let result = rx.await.unwrap_or_else(|_| Err("coordinator stopped".into()));
            last_word(w, &Envelope::plain(Msg::Answer { result })).await;
        }
        Msg::Register { token: given, .. } | Msg::HostRegister { token: given, .. } => {
            if !authorized(given) {
                tracing::warn!(conn = id, addr, "registration with a bad token refused");
                last_word(w, &reply("bad token".into())).await;
                return;
            }
            let mut w = w;
            let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
            // A host agent's heartbeats are answered here; weakly held, so the connection
            // still closes when the actor drops the peer's sender.
            let direct = tx.downgrade();
            let _ = in_tx.send(Input::Register { conn: id, tx, local: peer.local, env: first });
            // The writer ends when the actor drops this member's sender (a refusal, a
            // replaced connection): then the connection closes.
            let writer = tokio::spawn(async move {
                while let Some(env) = rx.recv().await {
                    if proto::write(&mut w, &env).await.is_err() {
                        break;
                    }
                }
            });
            tokio::pin!(writer);
            loop {
                tokio::select! {
                    _ = &mut writer => break,
                    env = r.next() => match env {
                        Ok(env) => match crate::actor::hosts::grant(&peer.leases, id, &env.msg) {
                            Some(answer) => {
                                if let Some(tx) = direct.upgrade() {
                                    let _ = tx.send(Envelope::plain(answer));
                                }
                            }
                            None => {
                                let _ = in_tx.send(Input::Msg { conn: id, env });
                            }
                        },
                        Err(proto::FrameError::Closed | proto::FrameError::Io(_)) => break,
                        Err(e) => tracing::warn!(conn = id, addr, "malformed message ignored: {e}"),
                    }
                }
            }
            writer.abort();
            let _ = in_tx.send(Input::Closed { conn: id });
        }
        other => {
            tracing::warn!(conn = id, addr, "first message was {}, expected register or ask", other.kind());
            last_word(w, &reply(format!("unexpected {}", other.kind()))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sidecar::proto::{self, Envelope, FrameReader, Msg, PROTOCOL};
    use tokio::net::UnixStream;

    use super::*;

    fn register(name: &str, version: u32) -> Envelope {
        Envelope::plain(Msg::Register {
            version,
            cluster: "default".into(),
            name: name.into(),
            qmp: "/nonexistent/qmp".into(),
            store: "/nonexistent/store".into(),
            pid: None,
            pid_start: None,
            checkpoints: vec![],
            token: None,
            host: None,
            ram_bytes: None,
        })
    }

    async fn answer(s: &mut FrameReader<tokio::net::unix::OwnedReadHalf>) -> Msg {
        tokio::time::timeout(Duration::from_secs(5), s.next()).await.expect("in time").expect("a message").msg
    }

    #[tokio::test]
    async fn silent_peers_time_out_connections_are_capped_and_registrations_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::new(dir.path());
        cfg.max_connections = 3;
        cfg.first_message_timeout = Duration::from_millis(300);
        let socket = cfg.socket.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(run(cfg.clone(), async move {
            let _ = stopped.await;
        }));
        while UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // A second coordinator on the same state directory is refused.
        let second = run(Config { socket: dir.path().join("other.sock"), ..cfg }, async {}).await;
        assert!(matches!(second, Err(ServerError::State(crate::state::StateError::Locked { .. }))), "{second:?}");

        // A peer that says nothing is told so and dropped.
        let (r, _w) = UnixStream::connect(&socket).await.expect("connect").into_split();
        let mut r = FrameReader::new(r);
        assert!(matches!(answer(&mut r).await, Msg::Error { what } if what.contains("no message in time")));
        assert!(matches!(r.next().await, Err(proto::FrameError::Closed)));

        // Another protocol version is refused, naming both.
        let (r, mut w) = UnixStream::connect(&socket).await.expect("connect").into_split();
        let mut r = FrameReader::new(r);
        proto::write(&mut w, &register("vm0", PROTOCOL + 1)).await.expect("write");
        assert!(
            matches!(answer(&mut r).await, Msg::Error { what } if what.contains(&format!("version {}", PROTOCOL + 1)))
        );

        // A second live registration of one name is refused.
        let (r1, mut w1) = UnixStream::connect(&socket).await.expect("connect").into_split();
        let mut r1 = FrameReader::new(r1);
        proto::write(&mut w1, &register("vm0", PROTOCOL)).await.expect("write");
        assert!(matches!(answer(&mut r1).await, Msg::Welcome { version: PROTOCOL, .. }));
        let (r2, mut w2) = UnixStream::connect(&socket).await.expect("connect").into_split();
        let mut r2 = FrameReader::new(r2);
        proto::write(&mut w2, &register("vm0", PROTOCOL)).await.expect("write");
        assert!(matches!(answer(&mut r2).await, Msg::Error { what } if what.contains("already registered")));

        // Connections beyond the cap are refused (vm0's holds one; two silent ones fill it).
        let _a = UnixStream::connect(&socket).await.expect("connect");
        let _b = UnixStream::connect(&socket).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (r, _w) = UnixStream::connect(&socket).await.expect("connect").into_split();
        let mut r = FrameReader::new(r);
        assert!(matches!(answer(&mut r).await, Msg::Error { what } if what.contains("too many connections")));
        let _ = stop.send(());
        server.await.expect("join").expect("clean stop");
    }
}
