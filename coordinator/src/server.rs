//! The coordinator daemon: members register over a socket; one actor runs the epochs,
//! watches heartbeats and VM failures, and rolls the cluster back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use sidecar::proto::{self, COORDINATOR, Envelope, Msg, Request, VectorClock};
use tokio::io::BufReader;
use tokio::sync::{mpsc, oneshot};

use crate::record::{Catalog, EpochTimings, MemberRecord, Record};

/// When packets held for the cut are let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputCommit {
    /// As soon as every member has cut (no orphan messages; the shortest hold).
    Release,
    /// Only after the epoch commits (external clients never see output a failure could take back).
    Strict,
}

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
    /// The state directory is unusable.
    #[error(transparent)]
    Record(#[from] crate::record::RecordError),
}

type Tx = mpsc::UnboundedSender<Envelope>;

/// Inputs of the actor.
enum Input {
    Register { conn: u64, tx: Tx, env: Envelope },
    Msg { conn: u64, env: Envelope },
    Closed { conn: u64 },
    Ask { request: Request, reply: oneshot::Sender<Result<Value, String>> },
}

#[derive(Debug, Clone, PartialEq)]
enum Health {
    Up,
    VmFailed(String),
    SidecarLost,
    Restoring,
}

impl Health {
    fn as_str(&self) -> String {
        match self {
            Health::Up => "up".into(),
            Health::VmFailed(r) => format!("vm failed: {r}"),
            Health::SidecarLost => "sidecar lost (VM alive)".into(),
            Health::Restoring => "restoring".into(),
        }
    }
}

struct Member {
    qmp: String,
    store: String,
    pid: Option<i32>,
    conn: Option<(u64, Tx)>,
    last_seen: Instant,
    health: Health,
}

#[derive(Default)]
struct EpochRun {
    epoch: u64,
    members: Vec<String>,
    started: Option<Instant>,
    cut_sent: Option<Instant>,
    prepare_ms: f64,
    cut_ms: f64,
    votes: BTreeSet<String>,
    cut_done: BTreeMap<String, (u64, f64)>,
    released: BTreeMap<String, (f64, u64)>,
    durable: BTreeMap<String, (u64, String, u64, VectorClock)>,
    release_sent: bool,
    deadline: Option<Instant>,
    waiters: Vec<oneshot::Sender<Result<Value, String>>>,
}

struct Recovery {
    epoch: u64,
    record: Record,
    targets: Vec<String>,
    detected_at: Instant,
    restored: BTreeSet<String>,
    resumed: BTreeSet<String>,
    resume_sent: bool,
    reason: String,
    waiters: Vec<oneshot::Sender<Result<Value, String>>>,
}

enum Phase {
    Idle,
    Epoch(EpochRun),
    Recovery(Recovery),
}

/// Figures the coordinator keeps for `status` (and the demo's report).
#[derive(Default, serde::Serialize)]
struct Figures {
    pause_ms: Vec<f64>,
    hold_ms: Vec<f64>,
    commit_ms: Vec<f64>,
    epoch_ms: Vec<f64>,
    detections: Vec<Value>,
    recoveries: Vec<Value>,
    aborted: u64,
}

struct Actor {
    cfg: Config,
    cluster: String,
    catalog: Catalog,
    members: BTreeMap<String, Member>,
    clock: VectorClock,
    phase: Phase,
    next_epoch: u64,
    last_interval: Instant,
    last_recovery: Option<(Instant, u64)>,
    figures: Figures,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the coordinator for cluster `default` until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
    let cluster = "default".to_owned();
    let catalog = Catalog::open(&cfg.state_dir.join(&cluster))?;
    catalog.prune(cfg.keep.max(1));
    let next_epoch = catalog.epochs().last().map_or(1, |e| e + 1);
    let (in_tx, mut in_rx) = mpsc::unbounded_channel::<Input>();
    let listeners = listen(&cfg, in_tx.clone()).await?;
    let mut actor = Actor {
        last_interval: Instant::now(),
        cfg,
        cluster,
        catalog,
        members: BTreeMap::new(),
        clock: VectorClock::default(),
        phase: Phase::Idle,
        next_epoch,
        last_recovery: None,
        figures: Figures::default(),
    };
    tracing::info!(socket = %actor.cfg.socket.display(), next_epoch, "coordinator running");
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => actor.on_tick().await,
            input = in_rx.recv() => match input {
                Some(i) => actor.on_input(i),
                None => break,
            },
        }
    }
    for l in listeners {
        l.abort();
    }
    let _ = std::fs::remove_file(&actor.cfg.socket);
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
    let ids = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    {
        let (in_tx, ids) = (in_tx.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            while let Ok((s, _)) = unix.accept().await {
                let (r, w) = s.into_split();
                let id = ids.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(connection(id, Box::new(r), Box::new(w), None, in_tx.clone()));
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
                tokio::spawn(connection(id, Box::new(r), Box::new(w), Some(token.clone()), in_tx.clone()));
            }
        }));
    }
    Ok(tasks)
}

/// One peer: a sidecar (first message `register`) or the CLI (`ask`).
async fn connection(
    id: u64,
    r: Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    mut w: Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
    token: Option<String>,
    in_tx: mpsc::UnboundedSender<Input>,
) {
    let mut r = BufReader::new(r);
    let reply = |msg: Msg| Envelope { vt: VectorClock::default(), msg };
    let first = loop {
        match proto::read(&mut r).await {
            Ok(env) => break env,
            Err(proto::FrameError::Closed) | Err(proto::FrameError::Io(_)) => return,
            Err(e) => {
                tracing::warn!(conn = id, "bad first message: {e}");
                let _ = proto::write(&mut w, &reply(Msg::Error { what: e.to_string() })).await;
            }
        }
    };
    let authorized = |given: &Option<String>| match &token {
        None => true,
        Some(t) => given.as_deref().is_some_and(|g| proto::same_token(g, t)),
    };
    match &first.msg {
        Msg::Ask { token: given, request, .. } => {
            if !authorized(given) {
                let _ = proto::write(&mut w, &reply(Msg::Error { what: "bad token".into() })).await;
                return;
            }
            let (tx, rx) = oneshot::channel();
            let _ = in_tx.send(Input::Ask { request: request.clone(), reply: tx });
            let result = rx.await.unwrap_or_else(|_| Err("coordinator stopped".into()));
            let _ = proto::write(&mut w, &reply(Msg::Answer { result })).await;
        }
        Msg::Register { token: given, .. } => {
            if !authorized(given) {
                let _ = proto::write(&mut w, &reply(Msg::Error { what: "bad token".into() })).await;
                return;
            }
            let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
            let _ = in_tx.send(Input::Register { conn: id, tx, env: first });
            let writer = tokio::spawn(async move {
                while let Some(env) = rx.recv().await {
                    if proto::write(&mut w, &env).await.is_err() {
                        break;
                    }
                }
            });
            loop {
                match proto::read(&mut r).await {
                    Ok(env) => {
                        let _ = in_tx.send(Input::Msg { conn: id, env });
                    }
                    Err(proto::FrameError::Closed) | Err(proto::FrameError::Io(_)) => break,
                    Err(e) => tracing::warn!(conn = id, "malformed message ignored: {e}"),
                }
            }
            writer.abort();
            let _ = in_tx.send(Input::Closed { conn: id });
        }
        other => {
            tracing::warn!(conn = id, "first message was {}, expected register or ask", other.kind());
            let _ = proto::write(&mut w, &reply(Msg::Error { what: format!("unexpected {}", other.kind()) })).await;
        }
    }
}

impl Actor {
    fn send(&mut self, name: &str, msg: Msg) {
        let env = Envelope { vt: self.clock.clone(), msg };
        if let Some(Member { conn: Some((_, tx)), .. }) = self.members.get(name) {
            let _ = tx.send(env);
        }
    }

    /// Sends `msg` to `names`; seed 000's messages advance the clock once per broadcast.
    fn broadcast(&mut self, names: &[String], msg: Msg) {
        if msg.ticks() {
            self.clock.tick(COORDINATOR);
        }
        for n in names {
            self.send(n, msg.clone());
        }
    }

    fn committed_ids(&self, name: &str) -> Vec<u64> {
        self.catalog
            .newest(self.cfg.keep)
            .iter()
            .filter_map(|r| r.members.iter().find(|m| m.name == name).map(|m| m.checkpoint))
            .collect()
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Register { conn, tx, env } => self.on_register(conn, tx, env),
            Input::Msg { conn, env } => {
                let Some(name) = self
                    .members
                    .iter()
                    .find(|(_, m)| m.conn.as_ref().is_some_and(|(c, _)| *c == conn))
                    .map(|(n, _)| n.clone())
                else {
                    return;
                };
                if env.msg.ticks() {
                    self.clock.receive(COORDINATOR, &env.vt);
                } else {
                    self.clock.merge(&env.vt);
                }
                if let Some(m) = self.members.get_mut(&name) {
                    m.last_seen = Instant::now();
                }
                self.on_member_msg(&name, env);
            }
            Input::Closed { conn } => {
                let name = self
                    .members
                    .iter()
                    .find(|(_, m)| m.conn.as_ref().is_some_and(|(c, _)| *c == conn))
                    .map(|(n, _)| n.clone());
                if let Some(name) = name {
                    tracing::warn!(vm = %name, "sidecar disconnected");
                    if let Some(m) = self.members.get_mut(&name) {
                        m.conn = None;
                    }
                    self.abort_epoch_with(&name, "a sidecar disconnected mid-epoch");
                }
            }
            Input::Ask { request, reply } => self.on_ask(request, reply),
        }
    }

    fn on_register(&mut self, conn: u64, tx: Tx, env: Envelope) {
        let Msg::Register { cluster, name, qmp, store, pid, .. } = env.msg else { return };
        if cluster != self.cluster {
            let _ = tx.send(Envelope {
                vt: self.clock.clone(),
                msg: Msg::Error { what: format!("no cluster {cluster} here (serving {})", self.cluster) },
            });
            return;
        }
        self.clock.merge(&env.vt);
        let committed = self.committed_ids(&name);
        let _ = tx.send(Envelope {
            vt: self.clock.clone(),
            msg: Msg::Welcome { committed, heartbeat_ms: self.cfg.heartbeat.as_millis() as u64 },
        });
        let restoring =
            matches!(&self.phase, Phase::Recovery(r) if r.targets.contains(&name) && !r.restored.contains(&name));
        let m = self.members.entry(name.clone()).or_insert(Member {
            qmp: qmp.clone(),
            store: store.clone(),
            pid,
            conn: None,
            last_seen: Instant::now(),
            health: Health::Up,
        });
        m.qmp = qmp;
        m.store = store;
        m.pid = pid.or(m.pid);
        m.conn = Some((conn, tx));
        m.last_seen = Instant::now();
        if m.health == Health::SidecarLost {
            tracing::info!(vm = %name, "sidecar back, VM alive: carrying on without rollback");
            m.health = Health::Up;
        }
        tracing::info!(vm = %name, members = self.members.len(), "member registered");
        if restoring && let Phase::Recovery(r) = &self.phase {
            let checkpoint = r.record.members.iter().find(|x| x.name == name).map(|x| x.checkpoint);
            let epoch = r.epoch;
            if let Some(checkpoint) = checkpoint {
                self.send(&name, Msg::Restore { epoch, checkpoint });
            }
        }
    }

    fn on_member_msg(&mut self, name: &str, env: Envelope) {
        match env.msg {
            Msg::Heartbeat => {}
            Msg::VmFailed { reason } => self.on_vm_failed(name, reason),
            Msg::Vote { epoch, yes, reason } => {
                let Phase::Epoch(run) = &mut self.phase else { return };
                if run.epoch != epoch {
                    return;
                }
                if !yes {
                    let why = format!("{name} voted no: {}", reason.unwrap_or_default());
                    self.abort_epoch(&why);
                    return;
                }
                run.votes.insert(name.to_owned());
                if run.votes.len() == run.members.len() {
                    run.prepare_ms = run.started.map_or(0.0, |t| ms(t.elapsed()));
                    run.cut_sent = Some(Instant::now());
                    run.deadline = Some(Instant::now() + self.cfg.step_timeout);
                    let members = run.members.clone();
                    self.broadcast(&members, Msg::Cut { epoch });
                }
            }
            Msg::CutDone { epoch, checkpoint, pause_ms } => {
                let Phase::Epoch(run) = &mut self.phase else { return };
                if run.epoch != epoch {
                    return;
                }
                run.cut_done.insert(name.to_owned(), (checkpoint, pause_ms));
                if run.cut_done.len() == run.members.len() {
                    run.cut_ms = run.cut_sent.map_or(0.0, |t| ms(t.elapsed()));
                    if self.cfg.output_commit == OutputCommit::Release {
                        run.release_sent = true;
                        let members = run.members.clone();
                        self.broadcast(&members, Msg::Release { epoch });
                    }
                }
            }
            Msg::Released { epoch, hold_ms, packets, breach } => {
                let current = matches!(&self.phase, Phase::Epoch(run) if run.epoch == epoch);
                if !current {
                    // Strict output commit releases after the commit: the epoch is done.
                    self.figures.hold_ms.push(hold_ms);
                    if let Some(b) = breach {
                        tracing::warn!(vm = %name, epoch, "output released early after the commit: {b}");
                    }
                    return;
                }
                if let Some(b) = breach {
                    self.abort_epoch(&format!("{name}'s output gate released early: {b}"));
                    return;
                }
                if let Phase::Epoch(run) = &mut self.phase {
                    run.released.insert(name.to_owned(), (hold_ms, packets));
                }
                self.maybe_commit();
            }
            Msg::Durable { epoch, checkpoint, digest, bytes_stored } => {
                let Phase::Epoch(run) = &mut self.phase else { return };
                if run.epoch != epoch {
                    return;
                }
                run.durable.insert(name.to_owned(), (checkpoint, digest, bytes_stored, env.vt.clone()));
                self.maybe_commit();
            }
            Msg::StepFailed { epoch, reason } => {
                let why = format!("{name}: {reason}");
                match &self.phase {
                    Phase::Epoch(run) if run.epoch == epoch => self.abort_epoch(&why),
                    Phase::Recovery(r) if r.epoch == epoch => {
                        tracing::error!(vm = %name, "recovery step failed: {reason}");
                        self.finish_recovery(Err(why));
                    }
                    _ => tracing::warn!(vm = %name, "step failed: {reason}"),
                }
            }
            Msg::Restored { epoch, pid, restore_ms } => {
                if let Some(m) = self.members.get_mut(name) {
                    m.pid = Some(pid);
                }
                let Phase::Recovery(r) = &mut self.phase else { return };
                if r.epoch != epoch {
                    return;
                }
                tracing::info!(vm = %name, epoch, restore_ms, "member restored (paused)");
                r.restored.insert(name.to_owned());
                if r.restored.len() == r.targets.len() && !r.resume_sent {
                    r.resume_sent = true;
                    let targets = r.targets.clone();
                    self.broadcast(&targets, Msg::Resume);
                }
            }
            Msg::Resumed => {
                let Phase::Recovery(r) = &mut self.phase else { return };
                r.resumed.insert(name.to_owned());
                if r.resumed.len() == r.targets.len() {
                    self.finish_recovery(Ok(()));
                }
            }
            other => {
                tracing::warn!(vm = %name, "unexpected {} from a sidecar", other.kind());
                self.send(name, Msg::Error { what: format!("unexpected {}", other.kind()) });
            }
        }
    }

    fn maybe_commit(&mut self) {
        let Phase::Epoch(run) = &mut self.phase else { return };
        let all = run.members.len();
        let released_ok = self.cfg.output_commit == OutputCommit::Strict || run.released.len() == all;
        if run.durable.len() < all || !released_ok {
            return;
        }
        let Phase::Epoch(mut run) = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        let t = Instant::now();
        let durable_ms = run.cut_sent.map_or(0.0, |c| ms(c.elapsed()));
        let members: Vec<MemberRecord> = run
            .members
            .iter()
            .filter_map(|n| {
                let m = self.members.get(n)?;
                let (checkpoint, digest, bytes, vt) = run.durable.get(n)?.clone();
                let pause = run.cut_done.get(n).map_or(0.0, |c| c.1);
                let (hold, packets) = run.released.get(n).copied().unwrap_or((0.0, 0));
                Some(MemberRecord {
                    name: n.clone(),
                    checkpoint,
                    manifest_digest: digest,
                    store: m.store.clone(),
                    qmp: m.qmp.clone(),
                    pause_ms: pause,
                    hold_ms: hold,
                    packets_held: packets,
                    bytes_stored: bytes,
                    vt,
                })
            })
            .collect();
        let mut record = Record {
            format: crate::record::FORMAT,
            cluster: self.cluster.clone(),
            epoch: run.epoch,
            committed_unix_ms: now_ms(),
            output_commit: format!("{:?}", self.cfg.output_commit).to_lowercase(),
            members,
            coordinator_vt: self.clock.clone(),
            timings: EpochTimings { prepare_ms: run.prepare_ms, cut_ms: run.cut_ms, durable_ms, total_ms: 0.0 },
            checksum: String::new(),
        };
        record.timings.total_ms = run.started.map_or(0.0, |s| ms(s.elapsed()));
        // The commit point. Its own latency cannot be in the record: it goes to the answer
        // and the status figures.
        if let Err(e) = self.catalog.commit(&mut record) {
            tracing::error!(epoch = run.epoch, "cannot write the commit record: {e}");
            self.phase = Phase::Epoch(run);
            self.abort_epoch(&format!("commit record: {e}"));
            return;
        }
        let commit_ms = ms(t.elapsed());
        tracing::info!(epoch = run.epoch, commit_ms, members = run.members.len(), "epoch committed");
        let members = run.members.clone();
        if self.cfg.output_commit == OutputCommit::Strict {
            self.broadcast(&members, Msg::Release { epoch: run.epoch });
        }
        self.catalog.prune(self.cfg.keep);
        for n in &members {
            let keep = self.committed_ids(n);
            self.send(n, Msg::Commit { epoch: run.epoch, keep });
        }
        for (_, p) in run.cut_done.values() {
            self.figures.pause_ms.push(*p);
        }
        for (h, _) in run.released.values() {
            self.figures.hold_ms.push(*h);
        }
        self.figures.commit_ms.push(commit_ms);
        self.figures.epoch_ms.push(record.timings.total_ms);
        let summary =
            json!({"epoch": run.epoch, "members": record.members, "timings": record.timings, "commit_ms": commit_ms});
        for w in run.waiters.drain(..) {
            let _ = w.send(Ok(summary.clone()));
        }
    }

    fn abort_epoch_with(&mut self, member: &str, why: &str) {
        if matches!(&self.phase, Phase::Epoch(run) if run.members.iter().any(|m| m == member)) {
            self.abort_epoch(&format!("{member}: {why}"));
        }
    }

    fn abort_epoch(&mut self, why: &str) {
        let Phase::Epoch(mut run) = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        tracing::warn!(epoch = run.epoch, "epoch aborted: {why}");
        self.figures.aborted += 1;
        let members = run.members.clone();
        self.broadcast(&members, Msg::Abort { epoch: run.epoch, reason: why.to_owned() });
        for w in run.waiters.drain(..) {
            let _ = w.send(Err(format!("epoch {} aborted: {why}", run.epoch)));
        }
    }

    /// Starts an epoch when the cluster is ready; `Err` says why not.
    fn start_epoch(&mut self, waiter: Option<oneshot::Sender<Result<Value, String>>>) {
        let refuse = |w: Option<oneshot::Sender<Result<Value, String>>>, why: String| {
            if let Some(w) = w {
                let _ = w.send(Err(why));
            }
        };
        match &mut self.phase {
            Phase::Epoch(run) => {
                if let Some(w) = waiter {
                    run.waiters.push(w);
                }
                return;
            }
            Phase::Recovery(_) => return refuse(waiter, "the cluster is recovering".into()),
            Phase::Idle => {}
        }
        if self.members.is_empty() {
            return refuse(waiter, "no members registered".into());
        }
        let not_ready: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.conn.is_none() || m.health != Health::Up)
            .map(|(n, m)| format!("{n} ({})", if m.conn.is_none() { "no sidecar".into() } else { m.health.as_str() }))
            .collect();
        if !not_ready.is_empty() {
            return refuse(waiter, format!("members not ready: {}", not_ready.join(", ")));
        }
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let members: Vec<String> = self.members.keys().cloned().collect();
        let run = EpochRun {
            epoch,
            members: members.clone(),
            started: Some(Instant::now()),
            deadline: Some(Instant::now() + self.cfg.step_timeout),
            waiters: waiter.into_iter().collect(),
            ..EpochRun::default()
        };
        tracing::debug!(epoch, "epoch starts");
        self.phase = Phase::Epoch(run);
        self.broadcast(&members, Msg::Prepare { epoch });
    }

    fn on_vm_failed(&mut self, name: &str, reason: String) {
        let now = Instant::now();
        tracing::warn!(vm = %name, %reason, "VM failure reported");
        if let Some(m) = self.members.get_mut(name) {
            if matches!(m.health, Health::VmFailed(_) | Health::Restoring) {
                return;
            }
            m.health = Health::VmFailed(reason.clone());
        }
        self.figures.detections.push(json!({"vm": name, "reason": reason, "at_unix_ms": now_ms()}));
        self.abort_epoch_with(name, "its VM failed");
        if matches!(self.phase, Phase::Recovery(_)) {
            // Failing again while recovering: restart the recovery (further back if latent).
            if let Phase::Recovery(r) = std::mem::replace(&mut self.phase, Phase::Idle) {
                for w in r.waiters {
                    let _ = w.send(Err(format!("{name} failed again during recovery")));
                }
            }
        }
        self.start_recovery(None, format!("{name}: {reason}"), now, None);
    }

    /// Rolls back to `epoch` (default: the last committed one, or the one before when
    /// the last recovery to it failed again within the latent window).
    fn start_recovery(
        &mut self,
        epoch: Option<u64>,
        reason: String,
        detected_at: Instant,
        waiter: Option<oneshot::Sender<Result<Value, String>>>,
    ) {
        let epochs = self.catalog.epochs();
        let last = epochs.last().copied();
        let target = match epoch {
            Some(e) => Some(e),
            // Failing again soon after a recovery: the error may be latent in the newest
            // checkpoint; go one committed epoch further back.
            None if self.last_recovery.is_some_and(|(at, _)| at.elapsed() < self.cfg.latent_window) => {
                let earlier = epochs.iter().rev().nth(1).copied();
                if let Some(e) = earlier {
                    tracing::warn!(
                        to = e,
                        "failed again soon after a recovery: rolling back one epoch further (latent error)"
                    );
                }
                earlier.or(last)
            }
            None => last,
        };
        let record =
            target.and_then(|t| self.catalog.read(t).ok()).or_else(|| last.and_then(|l| self.catalog.read(l).ok()));
        let Some(record) = record else {
            tracing::error!("no committed epoch to recover to: {reason}");
            if let Some(w) = waiter {
                let _ = w.send(Err("no committed epoch to recover to".into()));
            }
            return;
        };
        let target = record.epoch;
        let failed: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| matches!(m.health, Health::VmFailed(_)))
            .map(|(n, _)| n.clone())
            .collect();
        let targets: Vec<String> = match self.cfg.rollback {
            Rollback::Cluster => record.members.iter().map(|m| m.name.clone()).collect(),
            Rollback::Vm => {
                tracing::warn!("rolling back only the failed VM: safe only if the VMs do not talk to each other");
                record
                    .members
                    .iter()
                    .map(|m| m.name.clone())
                    .filter(|n| failed.contains(n) || epoch.is_some())
                    .collect()
            }
        };
        tracing::warn!(epoch = target, targets = ?targets, %reason, "recovery: rolling back");
        for n in &targets {
            if let Some(m) = self.members.get_mut(n) {
                m.health = Health::Restoring;
            }
        }
        self.last_recovery = Some((Instant::now(), target));
        let list: Vec<(String, u64)> = record
            .members
            .iter()
            .filter(|m| targets.contains(&m.name))
            .map(|m| (m.name.clone(), m.checkpoint))
            .collect();
        self.phase = Phase::Recovery(Recovery {
            epoch: target,
            record,
            targets,
            detected_at,
            restored: BTreeSet::new(),
            resumed: BTreeSet::new(),
            resume_sent: false,
            reason,
            waiters: waiter.into_iter().collect(),
        });
        for (n, checkpoint) in list {
            self.send(&n, Msg::Restore { epoch: target, checkpoint });
        }
    }

    fn finish_recovery(&mut self, result: Result<(), String>) {
        let Phase::Recovery(r) = std::mem::replace(&mut self.phase, Phase::Idle) else { return };
        let recovery_ms = ms(r.detected_at.elapsed());
        match &result {
            Ok(()) => {
                tracing::info!(epoch = r.epoch, recovery_ms, "cluster recovered");
                for n in &r.targets {
                    if let Some(m) = self.members.get_mut(n) {
                        m.health = Health::Up;
                    }
                }
                self.figures.recoveries.push(
                    json!({"epoch": r.epoch, "recovery_ms": recovery_ms, "reason": r.reason, "members": r.targets}),
                );
            }
            Err(e) => tracing::error!(epoch = r.epoch, "recovery failed: {e}"),
        }
        for w in r.waiters {
            let _ = w.send(result.clone().map(|_| json!({"epoch": r.epoch, "recovery_ms": recovery_ms})));
        }
        self.last_interval = Instant::now();
    }

    async fn on_tick(&mut self) {
        // Heartbeats.
        let timeout = self.cfg.failure_timeout;
        let silent: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.health == Health::Up && m.last_seen.elapsed() > timeout)
            .map(|(n, _)| n.clone())
            .collect();
        for n in silent {
            let qmp = self.members.get(&n).map(|m| m.qmp.clone()).unwrap_or_default();
            // The sidecar is silent: is its VM alive? (QEMU serves one QMP client, so a
            // live VM whose sidecar died answers us.)
            let alive = tokio::time::timeout(Duration::from_secs(2), qmp_client::Qmp::connect(&qmp))
                .await
                .is_ok_and(|r| r.is_ok());
            if alive {
                tracing::warn!(vm = %n, "heartbeats stopped but the VM runs: sidecar lost, no rollback");
                if let Some(m) = self.members.get_mut(&n) {
                    m.health = Health::SidecarLost;
                }
                self.abort_epoch_with(&n, "its sidecar stopped");
            } else {
                self.on_vm_failed(&n, format!("no heartbeat for {timeout:?} and its QMP socket does not answer"));
            }
        }
        // Step timeouts.
        if let Phase::Epoch(run) = &self.phase
            && run.deadline.is_some_and(|d| Instant::now() > d)
        {
            self.abort_epoch("a step timed out");
        }
        // Periodic checkpoints.
        if let Some(every) = self.cfg.interval
            && matches!(self.phase, Phase::Idle)
            && self.last_interval.elapsed() >= every
        {
            self.last_interval = Instant::now();
            self.start_epoch(None);
        }
    }

    fn on_ask(&mut self, request: Request, reply: oneshot::Sender<Result<Value, String>>) {
        match request {
            Request::Status => {
                let _ = reply.send(Ok(self.status()));
            }
            Request::Checkpoint => self.start_epoch(Some(reply)),
            Request::List => {
                let records = self.catalog.newest(usize::MAX);
                let _ = reply.send(Ok(json!({"epochs": records})));
            }
            Request::Restore { epoch } => {
                if matches!(self.phase, Phase::Recovery(_)) {
                    let _ = reply.send(Err("the cluster is already recovering".into()));
                    return;
                }
                self.abort_epoch("a restore was requested");
                self.start_recovery(epoch, "requested".into(), Instant::now(), Some(reply));
            }
            Request::Verify { epoch } => {
                let _ = reply.send(self.verify(epoch));
            }
        }
    }

    fn status(&self) -> Value {
        let members: Vec<Value> = self
            .members
            .iter()
            .map(|(n, m)| {
                json!({"name": n, "health": m.health.as_str(), "pid": m.pid, "connected": m.conn.is_some(),
                    "last_heartbeat_ms": ms(m.last_seen.elapsed()), "qmp": m.qmp, "store": m.store})
            })
            .collect();
        let phase = match &self.phase {
            Phase::Idle => json!("idle"),
            Phase::Epoch(r) => {
                json!({"epoch": r.epoch, "votes": r.votes.len(), "cut_done": r.cut_done.len(), "durable": r.durable.len()})
            }
            Phase::Recovery(r) => {
                json!({"recovering_to": r.epoch, "restored": r.restored.len(), "resumed": r.resumed.len()})
            }
        };
        json!({
            "cluster": self.cluster,
            "members": members,
            "last_committed": self.catalog.epochs().last(),
            "now": phase,
            "vt": self.clock,
            "figures": self.figures,
        })
    }

    fn verify(&self, epoch: Option<u64>) -> Result<Value, String> {
        let epoch = epoch.or_else(|| self.catalog.epochs().last().copied()).ok_or("no committed epoch")?;
        let record = self.catalog.read(epoch).map_err(|e| e.to_string())?;
        let mut damage = Vec::new();
        for m in &record.members {
            let store = sidecar::store::Store::open_existing(Path::new(&m.store)).map_err(|e| e.to_string())?;
            match store.manifest_digest(&m.name, m.checkpoint) {
                Ok(d) if d == m.manifest_digest => {}
                Ok(d) => damage.push(json!({"member": m.name, "item": "manifest", "why": format!("digest {d}, recorded {}", m.manifest_digest)})),
                Err(e) => damage.push(json!({"member": m.name, "item": "manifest", "why": e.to_string()})),
            }
            for d in store.verify(Some(&m.name), |_, _| {}).map_err(|e| e.to_string())? {
                if d.breaks.iter().any(|(n, id)| n == &m.name && *id == m.checkpoint) {
                    damage.push(json!({"member": m.name, "item": d.item, "why": d.why}));
                }
            }
        }
        Ok(json!({"epoch": epoch, "ok": damage.is_empty(), "damage": damage}))
    }
}
