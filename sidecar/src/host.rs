//! `cutline-sidecar host`: the host agent, one per host. It registers the host with the
//! coordinator (name, address, cores, memory, the QEMU emulators it has), holds the
//! host's lease by heartbeats, runs one `cutline-sidecar serve` per VM the coordinator
//! (or the operator, at start) gives it, and fences: when the lease runs out it kills
//! every VM it protects and their sidecars, on its own. The sidecars it starts read the
//! lease from a file and fence their VM too, so a dead host agent cannot leave a VM
//! running past its lease.

pub mod lease;
pub mod lease_file;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::proto::{Envelope, FrameReader, Msg, PROTOCOL};
use crate::store::error_chain;
use crate::transport::Dialer;
use lease::{Lease, LeaseEffect, LeaseEvent};
use lease_file::FileLease;

/// How a host agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// How to reach the coordinator.
    pub coordinator: Dialer,
    /// The coordinator's address as given (passed on to the sidecars).
    pub coordinator_arg: String,
    /// Arguments that carry TLS and the token to the sidecars (`--tls-ca PATH`, ...).
    pub transport_args: Vec<String>,
    /// Cluster name.
    pub cluster: String,
    /// This host's name.
    pub host: String,
    /// Its address, as operators reach it.
    pub address: String,
    /// The agent's directory: the lease file, the VMs it runs, the sidecars' logs.
    pub state: PathBuf,
    /// The sidecars' store (with `objects`: their local work directory).
    pub store: PathBuf,
    /// The object store the sidecars keep checkpoints in (`s3://…`), if any.
    pub objects: Option<String>,
    /// VMs to protect from the start: (name, QMP socket).
    pub vms: Vec<(String, PathBuf)>,
    /// The sidecar program (this executable).
    pub sidecar: PathBuf,
    /// Longest the sidecars' output gates may hold packets.
    pub max_hold: Duration,
}

/// Errors that stop a host agent.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// Its state directory is unusable.
    #[error("host agent state {path}")]
    State {
        /// The directory or file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The VMs file is damaged.
    #[error("host agent state {path} is damaged: {why}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Writing a state file failed.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// How long a connect to the coordinator may take before the agent tries again.
const CONNECT_WITHIN: Duration = Duration::from_secs(2);

/// The VMs a host runs, kept in `STATE/vms.json` so a restarted agent runs them again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Assigned {
    vms: BTreeMap<String, PathBuf>,
}

/// One VM's sidecar.
struct Sidecar {
    qmp: PathBuf,
    /// The coordinator said this host runs it (a `Run` of this agent's process): until
    /// then no sidecar starts, so a VM that moved away while this agent was down is
    /// never touched here.
    confirmed: bool,
    child: Option<Child>,
    /// When its sidecar last started (restarts are spaced).
    started: Option<Instant>,
}

/// The host agent's state.
struct HostAgent {
    cfg: Config,
    lease: Lease,
    vms: BTreeMap<String, Sidecar>,
    seq: u64,
}

/// What the host has, for its registration.
pub fn resources() -> (u32, u64, u64, Vec<String>) {
    let cores = std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(1);
    let (total, available) = meminfo();
    let mut qemu: Vec<String> = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .filter(|n| n.starts_with("qemu-system-"))
        .collect();
    qemu.sort();
    qemu.dedup();
    (cores, total, available, qemu)
}

/// MemTotal and MemAvailable, bytes.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|k| k.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Runs the host agent until `shutdown` resolves. Its sidecars are stopped on shutdown;
/// their VMs keep running (they stay fenced by the lease file).
pub async fn run(cfg: Config, shutdown: impl std::future::Future<Output = ()>) -> Result<(), HostError> {
    crate::store::private::create_dir_all(&cfg.state)
        .map_err(|source| HostError::State { path: cfg.state.clone(), source })?;
    let mut assigned = load_assigned(&cfg.state)?;
    for (n, q) in &cfg.vms {
        assigned.vms.insert(n.clone(), q.clone());
    }
    save_assigned(&cfg.state, &assigned)?;
    // A lease of an earlier run of this agent may still run: keep the file as it is.
    let mut a = HostAgent {
        vms: assigned
            .vms
            .into_iter()
            .map(|(n, qmp)| (n, Sidecar { qmp, confirmed: false, child: None, started: None }))
            .collect(),
        cfg,
        lease: Lease::default(),
        seq: 0,
    };
    // Sidecars an earlier run of this agent left (it was killed): stopped, so that the
    // ones this run starts own their VMs; the VMs keep running meanwhile.
    let orphans = stop_orphans(&a.lease_path());
    if !orphans.is_empty() {
        tracing::warn!(host = %a.cfg.host, ?orphans, "stopped the sidecars of an earlier run of this agent");
    }
    match FileLease::read(&a.lease_path()) {
        // Fenced in an earlier run: a new registration starts unleased.
        FileLease::Fenced => FileLease::Unleased.write(&a.lease_path())?,
        // Held by an earlier run: it still runs out on time, with or without a coordinator.
        held @ FileLease::Held(_) => a.lease = Lease::held_until(held.until().unwrap_or_else(Instant::now)),
        FileLease::Unleased => {}
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = a.session() => {
                if let Err(e) = r {
                    tracing::warn!(host = %a.cfg.host, "coordinator session ended: {e}");
                }
            }
        }
        // Between sessions the lease still runs out on time.
        let pause = tokio::time::sleep(Duration::from_millis(300));
        tokio::pin!(pause);
        loop {
            tokio::select! {
                _ = &mut shutdown => {
                    a.stop_sidecars().await;
                    return Ok(());
                }
                _ = &mut pause => break,
                _ = tokio::time::sleep(Duration::from_millis(50)) => a.tick().await,
            }
        }
    }
    a.stop_sidecars().await;
    Ok(())
}

fn load_assigned(state: &Path) -> Result<Assigned, HostError> {
    let path = state.join("vms.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| HostError::Damaged { path, why: e.to_string() }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Assigned::default()),
        Err(source) => Err(HostError::State { path, source }),
    }
}

fn save_assigned(state: &Path, a: &Assigned) -> Result<(), HostError> {
    let data = serde_json::to_vec_pretty(a)
        .map_err(|e| HostError::Damaged { path: state.join("vms.json"), why: e.to_string() })?;
    Ok(crate::store::write_atomically(&state.join("vms.json"), &data)?)
}

/// Errors of one session with the coordinator.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] crate::transport::ConnectError),
    #[error("connection to the coordinator: {0}")]
    Frame(#[from] crate::proto::FrameError),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error("expected host_welcome, got {0}")]
    NoWelcome(&'static str),
    #[error("the coordinator speaks protocol {0}, this host agent {PROTOCOL}")]
    Version(u32),
    #[error("the coordinator revoked this host's lease: {0}")]
    Revoked(String),
    #[error("fenced: the lease ran out; registering again")]
    Fenced,
}

impl HostAgent {
    fn lease_path(&self) -> PathBuf {
        self.cfg.state.join("lease")
    }

    fn vm_names(&self) -> Vec<String> {
        self.vms.keys().cloned().collect()
    }

    /// One connection to the coordinator: register, then heartbeats and orders.
    async fn session(&mut self) -> Result<(), SessionError> {
        // A lease is a few seconds: a connect to an address gone dead must give up well
        // within it, so that the agent reaches a coordinator started elsewhere in time.
        let (r, mut w) = tokio::time::timeout(CONNECT_WITHIN, self.cfg.coordinator.connect())
            .await
            .map_err(|_| SessionError::NoWelcome("no connection within 2 s"))??;
        let mut reader = FrameReader::new(r);
        let (cores, mem_total, mem_available, qemu) = resources();
        let register = Msg::HostRegister {
            version: PROTOCOL,
            cluster: self.cfg.cluster.clone(),
            host: self.cfg.host.clone(),
            address: self.cfg.address.clone(),
            cores,
            mem_total,
            mem_available,
            qemu,
            vms: self.vm_names(),
            token: self.cfg.coordinator.token().map(|t| t.expose().to_owned()),
        };
        crate::proto::write(&mut w, &Envelope::plain(register)).await.map_err(crate::proto::FrameError::Io)?;
        let welcome = tokio::time::timeout(Duration::from_secs(10), reader.next())
            .await
            .map_err(|_| SessionError::NoWelcome("nothing in 10 s"))??;
        let (inc, heartbeat) = match welcome.msg {
            Msg::HostWelcome { version, .. } if version != PROTOCOL => return Err(SessionError::Version(version)),
            Msg::HostWelcome { incarnation, heartbeat_ms, lease_ms, .. } => {
                tracing::info!(host = %self.cfg.host, incarnation, lease_ms, "host registered with the coordinator");
                (incarnation, Duration::from_millis(heartbeat_ms.max(50)))
            }
            Msg::Error { what } => return Err(SessionError::Refused(what)),
            other => return Err(SessionError::NoWelcome(other.kind())),
        };
        let _ = self.lease.step(LeaseEvent::Registered);
        if self.lease.until().is_none() {
            FileLease::Unleased.write(&self.lease_path()).ok();
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
        let writer = tokio::spawn(async move {
            while let Some(env) = rx.recv().await {
                if crate::proto::write(&mut w, &env).await.is_err() {
                    break;
                }
            }
        });
        let mut beat = tokio::time::interval(heartbeat);
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let result = loop {
            tokio::select! {
                _ = beat.tick() => {
                    self.seq += 1;
                    let seq = self.seq;
                    let _ = self.lease.step(LeaseEvent::Sent { seq, at: Instant::now() });
                    let msg = Msg::HostHeartbeat { seq, mem_available: meminfo().1, vms: self.vm_names() };
                    if tx.send(Envelope { inc, vt: Default::default(), msg }).is_err() {
                        break Err(SessionError::Frame(crate::proto::FrameError::Closed));
                    }
                }
                _ = tick.tick() => {
                    self.tick().await;
                    if matches!(self.lease.state(), lease::LeaseState::Fenced { .. }) {
                        break Err(SessionError::Fenced);
                    }
                }
                env = reader.next() => match env {
                    Ok(env) => {
                        if let Err(e) = self.on_msg(env.msg).await {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(e.into()),
                }
            }
        };
        writer.abort();
        result
    }

    async fn on_msg(&mut self, msg: Msg) -> Result<(), SessionError> {
        match msg {
            Msg::Lease { seq, ms } => match self.lease.step(LeaseEvent::Granted { seq, ms }) {
                Ok(_) => {
                    if let Some(until) = self.lease.until()
                        && let Err(e) = FileLease::held_until(until).write(&self.lease_path())
                    {
                        // The sidecars cannot see this grant: they fence when the last one runs out.
                        tracing::error!(host = %self.cfg.host, "cannot write the lease file: {}", error_chain(&e));
                    }
                }
                Err(r) => tracing::debug!(host = %self.cfg.host, "grant ignored: {r}"),
            },
            Msg::Run { name, qmp } if !self.vms.contains_key(&name) && qmp.is_empty() => {
                tracing::warn!(host = %self.cfg.host, vm = %name, "told to run a VM without its QMP socket: ignored");
            }
            Msg::Run { name, qmp } => {
                if crate::VmName::new(&name).is_err() {
                    tracing::warn!(host = %self.cfg.host, "refused to run a sidecar for bad VM name {name:?}");
                    return Ok(());
                }
                tracing::info!(host = %self.cfg.host, vm = %name, "runs here");
                let s = self.vms.entry(name.clone()).or_insert(Sidecar {
                    qmp: qmp.clone().into(),
                    confirmed: true,
                    child: None,
                    started: None,
                });
                s.confirmed = true;
                if !qmp.is_empty() {
                    s.qmp = qmp.into();
                }
                self.persist();
            }
            Msg::Evict { name, reason } => {
                tracing::warn!(host = %self.cfg.host, vm = %name, "evicted: {reason}");
                if let Some(s) = self.vms.remove(&name) {
                    stop_vm(&name, s).await;
                }
                self.persist();
            }
            Msg::Revoked { reason } => {
                let fx = self.lease.step(LeaseEvent::Revoked { why: reason.clone() }).unwrap_or_default();
                self.effects(fx).await;
                return Err(SessionError::Revoked(reason));
            }
            Msg::Error { what } => return Err(SessionError::Refused(what)),
            other => tracing::debug!(host = %self.cfg.host, "ignored {}", other.kind()),
        }
        Ok(())
    }

    fn persist(&self) {
        let a = Assigned { vms: self.vms.iter().map(|(n, s)| (n.clone(), s.qmp.clone())).collect() };
        if let Err(e) = save_assigned(&self.cfg.state, &a) {
            tracing::error!(host = %self.cfg.host, "cannot save the VMs this host runs: {e}");
        }
    }

    /// The lease's clock, and the sidecars kept running.
    async fn tick(&mut self) {
        let fx = self.lease.step(LeaseEvent::Tick { now: Instant::now() }).unwrap_or_default();
        self.effects(fx).await;
        if matches!(self.lease.state(), lease::LeaseState::Fenced { .. }) {
            return;
        }
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for n in names {
            self.keep_running(&n);
        }
    }

    async fn effects(&mut self, fx: Vec<LeaseEffect>) {
        for e in fx {
            let LeaseEffect::Fence { why } = e;
            self.fence(&why).await;
        }
    }

    /// Stops every VM this host protects, and its sidecar, and forgets them: the
    /// coordinator restarts them elsewhere.
    async fn fence(&mut self, why: &str) {
        tracing::error!(host = %self.cfg.host, vms = ?self.vm_names(), "fencing: {why}");
        if let Err(e) = FileLease::Fenced.write(&self.lease_path()) {
            tracing::error!(host = %self.cfg.host, "cannot write the lease file: {}", error_chain(&e));
        }
        for (n, s) in std::mem::take(&mut self.vms) {
            stop_vm(&n, s).await;
        }
        self.persist();
    }

    /// Starts `name`'s sidecar if it is not running (spaced by a second after an exit).
    fn keep_running(&mut self, name: &str) {
        let cfg = self.cfg.clone();
        let Some(s) = self.vms.get_mut(name).filter(|s| s.confirmed) else { return };
        if let Some(c) = &mut s.child {
            match c.try_wait() {
                Ok(None) => return,
                Ok(Some(status)) => tracing::warn!(host = %cfg.host, vm = %name, "sidecar exited: {status}"),
                Err(e) => tracing::warn!(host = %cfg.host, vm = %name, "sidecar: {e}"),
            }
            s.child = None;
        }
        if s.started.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        s.started = Some(Instant::now());
        match spawn_sidecar(&cfg, name, &s.qmp) {
            Ok(c) => {
                tracing::info!(host = %cfg.host, vm = %name, pid = c.id(), "sidecar started");
                s.child = Some(c);
            }
            Err(e) => tracing::error!(host = %cfg.host, vm = %name, "cannot start its sidecar: {e}"),
        }
    }

    async fn stop_sidecars(&mut self) {
        for s in self.vms.values_mut() {
            if let Some(mut c) = s.child.take() {
                let _ = c.start_kill();
                let _ = c.wait().await;
            }
        }
    }
}

/// SIGKILLs the `cutline-sidecar serve` processes that read `lease` (started by an
/// earlier run of this agent); returns their pids.
fn stop_orphans(lease: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let want = lease.display().to_string();
    let mut stopped = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let ours = args.iter().any(|a| a == "serve") && args.windows(2).any(|w| w[0] == "--lease-file" && w[1] == want);
        if ours
            && let Some(start) = crate::process::start_time(pid)
            && crate::process::kill_checked(pid, start).unwrap_or(false)
        {
            stopped.push(pid);
        }
    }
    stopped
}

/// Kills `name`'s sidecar, then every QEMU serving its QMP socket.
async fn stop_vm(name: &str, mut s: Sidecar) {
    if let Some(mut c) = s.child.take() {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    let killed = kill_qemus(&s.qmp);
    tracing::warn!(vm = %name, ?killed, "VM stopped here");
}

/// SIGKILLs every QEMU serving `qmp` (by pidfd, after its start time matches); returns
/// their pids.
pub fn kill_qemus(qmp: &Path) -> Vec<i32> {
    let mut killed = Vec::new();
    for pid in crate::restore::qemus_serving(qmp) {
        if let Some(start) = crate::process::start_time(pid)
            && crate::process::kill_checked(pid, start).unwrap_or(false)
        {
            killed.push(pid);
        }
    }
    killed
}

fn spawn_sidecar(cfg: &Config, name: &str, qmp: &Path) -> std::io::Result<Child> {
    let logs = cfg.state.join("logs");
    crate::store::private::create_dir_all(&logs)?;
    let log = crate::store::private::options().create(true).append(true).open(logs.join(format!("{name}.log")))?;
    let mut cmd = Command::new(&cfg.sidecar);
    if let Some(o) = &cfg.objects {
        cmd.arg("--objects").arg(o);
    }
    cmd.arg("serve")
        .args(["--coordinator", &cfg.coordinator_arg, "--cluster", &cfg.cluster, "--name", name])
        .arg("--qmp")
        .arg(qmp)
        .arg("--store")
        .arg(&cfg.store)
        .args(["--host", &cfg.host])
        .arg("--lease-file")
        .arg(cfg.state.join("lease"))
        .arg("--max-hold")
        .arg(humantime::format_duration(cfg.max_hold).to_string())
        .args(&cfg.transport_args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    cmd.spawn()
}
