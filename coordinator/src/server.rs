//! The coordinator daemon: it locks its state directory, raises its incarnation, and
//! serves members and the CLI over a unix socket (and optionally TCP); one actor
//! ([`crate::actor`]) runs the epochs, failure detection and recovery.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sidecar::proto::{self, Envelope, FrameReader, Msg};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::actor::{Actor, Input};
use crate::record::Catalog;
use crate::state::StateDir;

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
    /// State directory: records, default socket.
    pub state_dir: PathBuf,
    /// Unix socket (mode 0600).
    pub socket: PathBuf,
    /// Optional TCP listener, with `token`.
    pub listen: Option<String>,
    /// Pre-shared token for TCP.
    pub token: Option<String>,
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
    /// A peer's first message (and token) must arrive within this.
    pub first_message_timeout: Duration,
}

impl Config {
    /// Defaults with state in `state_dir`.
    pub fn new(state_dir: &Path) -> Config {
        Config {
            state_dir: state_dir.to_owned(),
            socket: state_dir.join("cutline.sock"),
            listen: None,
            token: None,
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
        }
    }
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
}

/// Runs the coordinator for cluster `default` until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
    let cluster = "default".to_owned();
    let dir = StateDir::lock(&cfg.state_dir.join(&cluster))?;
    let catalog = Catalog::open(&cfg.state_dir.join(&cluster))?;
    catalog.prune(cfg.keep.max(1));
    let mut durable = dir.load()?;
    durable.incarnation += 1;
    durable.next_epoch = durable.next_epoch.max(catalog.epochs().last().map_or(1, |e| e + 1));
    dir.save(&durable)?;
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
    let listeners = listen(&cfg, in_tx.clone()).await?;
    tracing::info!(socket = %cfg.socket.display(), incarnation = durable.incarnation, next_epoch = durable.next_epoch,
        members = durable.members.len(), "coordinator running");
    let socket = cfg.socket.clone();
    let mut actor = Actor::new(cfg, cluster, catalog, dir, durable, in_tx);
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
    in_tx: mpsc::UnboundedSender<Input>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, ServerError> {
    let mut tasks = Vec::new();
    let _ = std::fs::remove_file(&cfg.socket);
    if let Some(dir) = cfg.socket.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let unix = tokio::net::UnixListener::bind(&cfg.socket)
        .map_err(|source| ServerError::Listen { addr: cfg.socket.display().to_string(), source })?;
    std::fs::set_permissions(&cfg.socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|source| ServerError::Listen { addr: cfg.socket.display().to_string(), source })?;
    let ids = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let first = cfg.first_message_timeout;
    {
        let (in_tx, ids, slots) = (in_tx.clone(), ids.clone(), slots.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok((s, _)) = unix.accept().await {
                let (r, w) = s.into_split();
                let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let peer = Peer { id, token: None, local: true, first_message_timeout: first };
                serve(peer, Box::new(r), Box::new(w), &slots, &in_tx);
            }
        }));
    }
    if let Some(addr) = &cfg.listen {
        let token = cfg.token.clone().ok_or_else(|| ServerError::Listen {
            addr: addr.clone(),
            source: std::io::Error::other("TCP needs a pre-shared token (--token or CUTLINE_TOKEN)"),
        })?;
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Listen { addr: addr.clone(), source })?;
        tasks.push(tokio::spawn(async move {
            while let Ok((s, _)) = tcp.accept().await {
                let (r, w) = s.into_split();
                let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let peer = Peer { id, token: Some(token.clone()), local: false, first_message_timeout: first };
                serve(peer, Box::new(r), Box::new(w), &slots, &in_tx);
            }
        }));
    }
    Ok(tasks)
}

type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;
type Writer = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

/// Who is on a connection.
struct Peer {
    id: u64,
    token: Option<String>,
    local: bool,
    first_message_timeout: Duration,
}

/// Serves a connection when a slot is free; refuses it otherwise.
fn serve(peer: Peer, r: Reader, mut w: Writer, slots: &Arc<Semaphore>, in_tx: &mpsc::UnboundedSender<Input>) {
    match slots.clone().try_acquire_owned() {
        Ok(permit) => {
            let in_tx = in_tx.clone();
            tokio::spawn(async move {
                connection(peer, r, w, in_tx).await;
                drop(permit);
            });
        }
        Err(_) => {
            tracing::warn!(conn = peer.id, "too many connections: refused");
            tokio::spawn(async move {
                let what = "too many connections to the coordinator".to_owned();
                let _ = tokio::time::timeout(
                    Duration::from_secs(1),
                    proto::write(&mut w, &Envelope::plain(Msg::Error { what })),
                )
                .await;
            });
        }
    }
}

/// One peer: a sidecar (first message `register`) or the CLI (`ask`).
async fn connection(peer: Peer, r: Reader, mut w: Writer, in_tx: mpsc::UnboundedSender<Input>) {
    let id = peer.id;
    let mut r = FrameReader::new(r);
    let reply = |what: String| Envelope::plain(Msg::Error { what });
    let first = match tokio::time::timeout(peer.first_message_timeout, r.next()).await {
        Ok(Ok(env)) => env,
        Ok(Err(proto::FrameError::Closed | proto::FrameError::Io(_))) => return,
        Ok(Err(e)) => {
            tracing::warn!(conn = id, "bad first message: {e}");
            let _ = proto::write(&mut w, &reply(e.to_string())).await;
            return;
        }
        Err(_) => {
            tracing::warn!(conn = id, "no first message within {:?}: closed", peer.first_message_timeout);
            let _ = proto::write(&mut w, &reply("no message in time".into())).await;
            return;
        }
    };
    let authorized = |given: &Option<String>| match &peer.token {
        None => true,
        Some(t) => given.as_deref().is_some_and(|g| proto::same_token(g, t)),
    };
    match &first.msg {
        Msg::Ask { token: given, request, .. } => {
            if !authorized(given) {
                let _ = proto::write(&mut w, &reply("bad token".into())).await;
                return;
            }
            let (tx, rx) = oneshot::channel();
            let _ = in_tx.send(Input::Ask { request: request.clone(), reply: tx });
            let result = rx.await.unwrap_or_else(|_| Err("coordinator stopped".into()));
            let _ = proto::write(&mut w, &Envelope::plain(Msg::Answer { result })).await;
        }
        Msg::Register { token: given, .. } => {
            if !authorized(given) {
                let _ = proto::write(&mut w, &reply("bad token".into())).await;
                return;
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
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
                        Ok(env) => {
                            let _ = in_tx.send(Input::Msg { conn: id, env });
                        }
                        Err(proto::FrameError::Closed | proto::FrameError::Io(_)) => break,
                        Err(e) => tracing::warn!(conn = id, "malformed message ignored: {e}"),
                    }
                }
            }
            writer.abort();
            let _ = in_tx.send(Input::Closed { conn: id });
        }
        other => {
            tracing::warn!(conn = id, "first message was {}, expected register or ask", other.kind());
            let _ = proto::write(&mut w, &reply(format!("unexpected {}", other.kind()))).await;
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
