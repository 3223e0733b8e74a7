//! A cutline cluster across host containers, with real processes: the coordinator
//! (`cutline serve`) in a container of its own that the others reach by a network alias,
//! [`COORDINATOR`]; on each host a Garage storage node, a host agent (`cutline-sidecar
//! host`, which runs a sidecar per VM) and test guests running the ledger and the journal;
//! the guests' Ethernet through a [`Switch`] container.
//!
//! - The control plane is TCP: TLS 1.3 with client certificates and the token ([`Pki`]).
//!   The test itself asks the coordinator through its unix socket, bind-mounted out of
//!   its container.
//! - Checkpoints, commit records and the coordinator's own state live in one Garage
//!   cluster, replication factor 3 ([`HostedGarage`]): a storage node on each host, whose
//!   sidecars use it on loopback, and a gateway node (no data) beside the coordinator,
//!   its loopback endpoint (cutline speaks plain HTTP only to loopback). Losing one host,
//!   or one storage node, leaves a quorum. The nodes' RPC timeout is short
//!   ([`HostedGarage::RPC_TIMEOUT_MS`]): with Garage's default, a request that picked a
//!   node lost silently waits for it up to a minute.
//! - A new coordinator ([`MultiHost::prepare_standby`], [`MultiHost::take_over`]) is a
//!   container of its own with a gateway node of its own, that takes the alias once the
//!   old one is gone and carries on from the store; nothing of the old one's files.
//! - [`MultiHost::observe`] samples the coordinator's status and every QEMU process of
//!   every host (from this machine's process table, told apart by pid namespace), and
//!   fails on a VM that runs twice or a last committed epoch that goes backwards other
//!   than by a rollback to a committed one. Every wait goes through it.
//!
//! Every container and the network are removed by id when a [`MultiHost`] is dropped,
//! also after a failure.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use sidecar::proto::{self, Envelope, Msg, Request};
use sidecar::transport::Dialer;

use super::pki::{PKI_DIR, Pki, PkiPaths};
use super::{BIN_DIR, Host, HostGuest, HostImage, QemuProcess, Spawned, Switch, TestNet, tail};
use crate::TestEnv;
use crate::accel::Accel;
use crate::garage::HostedGarage;
use crate::guest::{DiskSpec, GuestSpec};
use crate::oracle::Invariants;

/// The coordinator's DNS name on the test network (an alias, taken over by a new
/// coordinator's container) and in its certificate.
pub const COORDINATOR: &str = "coordinator";
/// Its TCP port.
pub const PORT: u16 = 7411;
/// The key prefix of the cluster's store in the bucket.
pub const PREFIX: &str = "multihost";

/// What to run.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Host containers (`host0`…).
    pub hosts: usize,
    /// The host of each guest (`vm0`…), by index.
    pub guests: Vec<usize>,
    /// Each guest's RAM.
    pub memory_mib: u32,
    /// `serve --interval`.
    pub interval: Duration,
    /// `serve --heartbeat`.
    pub heartbeat: Duration,
    /// `serve --lease`.
    pub lease: Duration,
    /// `serve --lease-margin`.
    pub margin: Duration,
    /// `serve --standby`: the host a lost host's VMs go to first.
    pub standby: Option<String>,
    /// Each guest's initial ledger balance.
    pub balance: u64,
}

impl Default for ClusterSpec {
    /// Three hosts, a guest on each, epochs every 2 s, heartbeats every 500 ms, a 3 s
    /// lease and a 1 s margin.
    fn default() -> ClusterSpec {
        ClusterSpec {
            hosts: 3,
            guests: vec![0, 1, 2],
            memory_mib: 128,
            interval: Duration::from_secs(2),
            heartbeat: Duration::from_millis(500),
            lease: Duration::from_secs(3),
            margin: Duration::from_secs(1),
            standby: None,
            balance: 1_000_000,
        }
    }
}

/// `cutline serve` in its container.
pub struct Coordinator {
    /// Its container.
    pub host: Host,
    /// Its process in the container, once started.
    pub process: Option<Spawned>,
    /// The pid in the container of its Garage gateway node.
    pub gateway: Option<u32>,
}

impl Coordinator {
    /// Its unix socket, on this side.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        self.host.host_path("/vms/state/cutline.sock")
    }

    /// Its log, on this side.
    pub fn log(&self) -> anyhow::Result<PathBuf> {
        self.host.host_path("/vms/coordinator.log")
    }
}

/// One sample of the cluster: the coordinator's status (`Null` while it does not
/// answer) and every QEMU process of every host.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When the sample began (this machine's clock, which the containers share).
    pub at: SystemTime,
    /// `cutline status --json`.
    pub status: Value,
    /// The QEMU processes.
    pub qemus: Vec<QemuProcess>,
}

impl Observation {
    /// The member `vm` of the status.
    pub fn member(&self, vm: &str) -> Option<&Value> {
        self.status["members"].as_array()?.iter().find(|m| m["name"] == vm)
    }

    /// The host `name` of the status.
    pub fn host(&self, name: &str) -> Option<&Value> {
        self.status["hosts"].as_array()?.iter().find(|h| h["name"] == name)
    }

    /// The hosts whose QEMU runs `vm`.
    pub fn running(&self, vm: &str) -> Vec<&str> {
        self.qemus.iter().filter(|q| q.vm == vm).map(|q| q.host.as_str()).collect()
    }

    /// The last committed epoch.
    pub fn last_committed(&self) -> Option<u64> {
        self.status["last_committed"].as_u64()
    }

    /// The recent events of a kind (`detections`, `placements`, `recoveries`…).
    pub fn recent(&self, kind: &str) -> Vec<Value> {
        self.status["figures"]["recent"][kind]["last"].as_array().cloned().unwrap_or_default()
    }

    /// Every member is up and connected, its QEMU runs on exactly one host, the one
    /// `place` names for it (if any), and no recovery is under way (epochs may be: with
    /// periodic epochs one nearly always is).
    pub fn settled(&self, place: impl Fn(&str) -> Option<String>) -> bool {
        let Some(members) = self.status["members"].as_array() else { return false };
        ["idle", "epoch"].contains(&self.status["phase"]["state"].as_str().unwrap_or_default())
            && !members.is_empty()
            && members.iter().all(|m| {
                let name = m["name"].as_str().unwrap_or_default();
                m["health"] == "up"
                    && m["connected"] == true
                    && place(name).is_none_or(|h| m["host"] == h.as_str())
                    && self.running(name).len() == 1
            })
    }
}

/// `now` in ms since the epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Sends `request` to the coordinator at unix socket `socket`; its answer.
pub async fn ask(socket: &Path, request: Request) -> anyhow::Result<Value> {
    let dialer = Dialer::Unix(socket.to_owned());
    let (r, mut w) = dialer.connect().await?;
    let env = Envelope::plain(Msg::Ask { cluster: "default".into(), token: None, request });
    proto::write(&mut w, &env).await?;
    let answer = tokio::time::timeout(Duration::from_secs(30), proto::read(r)).await??;
    match answer.msg {
        Msg::Answer { result: Ok(v) } => Ok(v),
        Msg::Answer { result: Err(e) } | Msg::Error { what: e } => bail!("the coordinator refused: {e}"),
        other => bail!("the coordinator sent {}, expected an answer", other.kind()),
    }
}

/// The cluster. Fields drop in order: the containers before their network.
pub struct MultiHost {
    /// What runs.
    pub spec: ClusterSpec,
    dir: PathBuf,
    image: String,
    pki: Pki,
    /// The Garage cluster.
    pub garage: HostedGarage,
    garage_pids: Vec<Option<u32>>,
    agents: Vec<Option<Spawned>>,
    guests: Vec<HostGuest>,
    max_committed: Option<u64>,
    committed_seen: BTreeSet<u64>,
    /// Hosts the test does not fail: [`MultiHost::observe`] fails once one is declared
    /// lost.
    pub must_stay_up: Vec<String>,
    /// The coordinator now.
    pub coordinator: Coordinator,
    retired: Vec<Coordinator>,
    /// The hosts.
    pub hosts: Vec<Host>,
    switch: Switch,
    net: TestNet,
}

impl MultiHost {
    /// Starts everything, and returns once every member is up on its host and an epoch
    /// has committed: [`MultiHost::new`], then [`MultiHost::launch`].
    pub async fn start(env: &TestEnv, spec: ClusterSpec) -> anyhow::Result<MultiHost> {
        let mut c = Self::new(env, spec).await?;
        c.launch(env).await?;
        Ok(c)
    }

    /// Starts the containers, the Garage cluster and the coordinator.
    pub async fn new(env: &TestEnv, spec: ClusterSpec) -> anyhow::Result<MultiHost> {
        ensure!(spec.guests.iter().all(|h| *h < spec.hosts), "a guest on a host that is not there: {spec:?}");
        let dir = env.dir().to_owned();
        for bin in ["cutline", "cutline-sidecar"] {
            crate::workspace_bin(bin)?;
        }
        let image = HostImage::ensure()?;
        let net = TestNet::create("cutline-mh")?;
        let switch = Switch::start(&image, &net, "switch", &dir.join("switch"), spec.guests.len(), 7000)?;
        let mut hosts = Vec::new();
        for i in 0..spec.hosts {
            hosts.push(Host::start(&image, &net, &format!("host{i}"), &dir.join(format!("host{i}")), env.accel)?);
        }
        let mut coordinator =
            Coordinator { host: Self::coordinator_host(&image, &net, &dir, 0)?, process: None, gateway: None };
        coordinator.host.add_alias(COORDINATOR)?;
        let pki = Pki::new(&dir.join("pki"), &[COORDINATOR])?;
        let refs: Vec<&Host> = hosts.iter().collect();
        let garage = HostedGarage::start(&refs, &[&coordinator.host])?;
        for (h, server) in refs.iter().map(|h| (*h, false)).chain([(&coordinator.host, true)]) {
            pki.install(h, server)?;
            pki.install_file(h, "s3", &garage.credentials())?;
        }
        let garage_pids = refs.iter().map(|h| Self::garage_pid(h).map(Some)).collect::<anyhow::Result<_>>()?;
        coordinator.gateway = Some(Self::garage_pid(&coordinator.host)?);
        let mut c = MultiHost {
            dir,
            image,
            pki,
            garage,
            garage_pids,
            agents: (0..spec.hosts).map(|_| None).collect(),
            guests: Vec::new(),
            max_committed: None,
            committed_seen: BTreeSet::new(),
            must_stay_up: Vec::new(),
            coordinator,
            retired: Vec::new(),
            hosts,
            switch,
            net,
            spec,
        };
        c.wait_store(&c.coordinator.host)?;
        c.start_coordinator().await?;
        Ok(c)
    }

    /// Boots the guests, starts the host agents, and waits until every member is up on
    /// its host and an epoch has committed.
    pub async fn launch(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        self.boot_guests(env).await?;
        for i in 0..self.spec.hosts {
            self.start_agent(i)?;
        }
        let place = self.placement();
        self.wait(Duration::from_secs(120), "every member up on its host and an epoch committed", |o| {
            o.settled(|vm| place.get(vm).cloned()) && o.last_committed().is_some()
        })
        .await?;
        Ok(())
    }

    fn coordinator_host(image: &str, net: &TestNet, dir: &Path, n: usize) -> anyhow::Result<Host> {
        Host::start(image, net, &format!("coord{n}"), &dir.join(format!("coord{n}")), Accel::Tcg)
    }

    /// The pid of `host`'s Garage node (its log's pid file, written by `spawn`).
    fn garage_pid(host: &Host) -> anyhow::Result<u32> {
        let file = host.host_path("/vms/garage/garage.log.pid")?;
        let pid = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
        pid.trim().parse().with_context(|| format!("pid in {}", file.display()))
    }

    /// The environment of every cutline process in a host: the store on its own Garage
    /// node, info logs without colours.
    fn process_env(&self) -> Vec<String> {
        let mut env = self.garage.env(&format!("{PKI_DIR}/s3"));
        env.extend(["RUST_LOG=info".to_owned(), "NO_COLOR=1".to_owned()]);
        env
    }

    /// Starts `cutline serve` in the coordinator's container and waits until it answers.
    async fn start_coordinator(&mut self) -> anyhow::Result<()> {
        let s = &self.spec;
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(self.process_env());
        argv.extend([format!("{BIN_DIR}/cutline"), "--state".into(), "/vms/state".into(), "serve".into()]);
        argv.extend(["--listen".into(), format!("0.0.0.0:{PORT}")]);
        for (flag, path) in [
            ("--tls-cert", PkiPaths::SERVER_CERT),
            ("--tls-key", PkiPaths::SERVER_KEY),
            ("--tls-client-ca", PkiPaths::CA),
            ("--token-file", PkiPaths::TOKEN),
        ] {
            argv.extend([flag.to_owned(), path.to_owned()]);
        }
        argv.extend(["--records".into(), self.garage.url(PREFIX)]);
        argv.extend(["--interval".into(), ms(s.interval), "--heartbeat".into(), ms(s.heartbeat)]);
        argv.extend(["--lease".into(), ms(s.lease), "--lease-margin".into(), ms(s.margin)]);
        if let Some(h) = &s.standby {
            argv.extend(["--standby".into(), h.clone()]);
        }
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let process = self.coordinator.host.spawn(&args, "coordinator.log")?;
        self.coordinator.process = Some(process);
        let socket = self.coordinator.socket()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match ask(&socket, Request::Status).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let log = self.coordinator.log()?;
                    let pid = self.coordinator.process.as_ref().map_or(0, |p| p.pid);
                    ensure!(
                        self.coordinator.host.process_alive(pid)?,
                        "the coordinator exited at start: {}",
                        tail(&log, 30)
                    );
                    ensure!(Instant::now() < deadline, "the coordinator does not answer ({e:#}): {}", tail(&log, 30));
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Boots every guest on its host and waits until each ledger is ready.
    async fn boot_guests(&mut self, env: &TestEnv) -> anyhow::Result<()> {
        let n = self.spec.guests.len();
        for (i, &h) in self.spec.guests.clone().iter().enumerate() {
            let mut spec = GuestSpec::new(&format!("vm{i}"), &["ledger", "journal"]);
            spec.id = i;
            spec.peers = n;
            spec.memory_mib = self.spec.memory_mib;
            spec.netdev = Some(self.switch.netdev(i)?);
            spec.disks.push(DiskSpec::qcow2(16));
            let spec = spec.setting("balance", self.spec.balance).setting("jrate", 20);
            self.guests.push(self.hosts[h].start_guest(&spec, &env.image).await?);
        }
        for g in &self.guests {
            let ready = |v: &Value| v["event"] == "ready" && v["mode"] == "ledger";
            g.control().wait_from(0, "ledger ready", ready, Duration::from_secs(120)).await?;
        }
        Ok(())
    }

    /// Starts host `i`'s agent, protecting the guests booted there.
    pub fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        let host = &self.hosts[i];
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(self.process_env());
        argv.extend([format!("{BIN_DIR}/cutline-sidecar"), "--objects".into(), self.garage.url(PREFIX)]);
        argv.extend(["host".into(), "--coordinator".into(), format!("tcp:{COORDINATOR}:{PORT}")]);
        argv.extend(PkiPaths::client_args());
        argv.extend(["--name".into(), host.name().to_owned(), "--address".into(), host.ip()?.to_string()]);
        argv.extend(["--state".into(), "/vms/agent".into(), "--store".into(), "/vms/work".into()]);
        for g in self.guests.iter().filter(|g| g.host == host.container_name()) {
            argv.extend(["--vm".into(), format!("{}=/vms/{}/qmp.sock", g.name, g.name)]);
        }
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.agents[i] = Some(host.spawn(&args, "agent.log")?);
        Ok(())
    }

    /// The host of each guest as booted (`vm0` → `host0`).
    pub fn placement(&self) -> std::collections::BTreeMap<String, String> {
        self.spec.guests.iter().enumerate().map(|(i, h)| (format!("vm{i}"), format!("host{h}"))).collect()
    }

    /// The guests as the test reaches them now.
    pub fn guests(&self) -> &[HostGuest] {
        &self.guests
    }

    /// Host `name` (`host1`).
    pub fn host(&self, name: &str) -> anyhow::Result<&Host> {
        self.hosts.iter().find(|h| h.name() == name).with_context(|| format!("no host {name}"))
    }

    /// The status of the coordinator now (`Null` while it does not answer).
    pub async fn status(&self) -> Value {
        match self.coordinator.socket() {
            Ok(s) => ask(&s, Request::Status).await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        }
    }

    /// `cutline status --json` run in host `i` over TCP (TLS, the client certificate and
    /// the token), as an operator elsewhere would.
    pub fn status_over_tcp(&self, i: usize) -> anyhow::Result<Value> {
        let mut argv = vec![format!("{BIN_DIR}/cutline"), "--coordinator".into(), format!("tcp:{COORDINATOR}:{PORT}")];
        argv.extend(PkiPaths::client_args());
        argv.extend(["--json".into(), "status".into()]);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = self.hosts[i].exec_ok(&args)?;
        serde_json::from_str(&out).with_context(|| format!("status over TCP: {out}"))
    }

    /// Asks the coordinator now.
    pub async fn ask(&self, request: Request) -> anyhow::Result<Value> {
        ask(&self.coordinator.socket()?, request).await
    }

    /// Samples the status and every host's QEMUs, and checks what must hold at every
    /// instant: no VM runs twice; the last committed epoch never goes backwards, except
    /// by a rollback to an epoch seen committed; no host of [`MultiHost::must_stay_up`]
    /// is declared lost.
    pub async fn observe(&mut self) -> anyhow::Result<Observation> {
        let at = SystemTime::now();
        let status = self.status().await;
        let refs: Vec<&Host> = self.hosts.iter().collect();
        let qemus = Host::qemus(&refs);
        let o = Observation { at, status, qemus };
        for vm in (0..self.spec.guests.len()).map(|i| format!("vm{i}")) {
            let on = o.running(&vm);
            ensure!(on.len() <= 1, "{vm} runs twice, on {on:?}: {:?}", o.qemus);
        }
        for h in &self.must_stay_up {
            let lost = o.recent("detections").into_iter().find(|d| d["host"] == h.as_str());
            ensure!(
                lost.is_none(),
                "host {h}, which the test did not fail, was declared lost: {}",
                lost.unwrap_or_default()
            );
        }
        if let Some(last) = o.last_committed() {
            if let Some(max) = self.max_committed
                && last < max
            {
                let to = o.recent("recoveries").last().and_then(|r| r["epoch"].as_u64());
                ensure!(
                    to == Some(last) && self.committed_seen.contains(&last),
                    "the last committed epoch went back from {max} to {last}, not by a rollback to a committed epoch: {:#}",
                    o.status
                );
            }
            self.max_committed = self.max_committed.max(Some(last));
            self.committed_seen.insert(last);
        }
        Ok(o)
    }

    /// Observes every 100 ms until `pred` holds; fails after `timeout`, naming `what`.
    pub async fn wait(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Observation) -> bool,
    ) -> anyhow::Result<Observation> {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.observe().await?;
            if pred(&o) {
                return Ok(o);
            }
            if Instant::now() >= deadline {
                bail!("{what}: not within {timeout:?}; QEMUs {:?}; status {:#}", o.qemus, o.status);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `n` more epochs than `after` have committed.
    pub async fn wait_commits(&mut self, after: u64, n: u64, timeout: Duration) -> anyhow::Result<Observation> {
        let what = format!("{n} epochs committed after epoch {after}");
        self.wait(timeout, &what, |o| o.last_committed().is_some_and(|l| l >= after + n)).await
    }

    /// Connects the test again to every guest that runs another QEMU than the one it
    /// reaches, where the status says it runs (after a recovery every QEMU is a new one,
    /// some on another host).
    pub async fn follow(&mut self, status: &Value) -> anyhow::Result<()> {
        for g in std::mem::take(&mut self.guests) {
            let m = status["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["name"] == g.name.as_str()))
                .with_context(|| format!("{} is not a member: {status:#}", g.name))?;
            let host = m["host"].as_str().with_context(|| format!("{} has no host: {m}", g.name))?;
            let pid = m["pid"].as_u64().with_context(|| format!("{} has no pid: {m}", g.name))? as u32;
            let h = self.hosts.iter().find(|h| h.name() == host).with_context(|| format!("no host {host}"))?;
            if g.host == h.container_name() && g.pid == pid {
                self.guests.push(g);
                continue;
            }
            // QEMU serves one control connection at a time: the old one goes first.
            let (name, argv) = (g.name.clone(), g.argv.clone());
            drop(g);
            self.guests.push(h.adopt_guest(&name, pid, argv).await?);
        }
        Ok(())
    }

    /// The ledger and journal invariants over every guest, wherever it runs now.
    pub async fn check(&self) -> anyhow::Result<Invariants> {
        crate::oracle::check(&self.guests, self.spec.balance).await
    }

    /// The pid in host `i` of its agent.
    pub fn agent_pid(&self, i: usize) -> Option<u32> {
        self.agents[i].as_ref().map(|a| a.pid)
    }

    /// SIGKILLs the Garage node of host `i`.
    pub fn kill_garage_node(&mut self, i: usize) -> anyhow::Result<()> {
        let pid = self.garage_pids[i].take().with_context(|| format!("no Garage node runs on host{i}"))?;
        self.hosts[i].signal(pid, "KILL")
    }

    /// Starts the Garage node of host `i` again (same identity) and waits until it serves.
    pub fn restart_garage_node(&mut self, i: usize) -> anyhow::Result<()> {
        ensure!(self.garage_pids[i].is_none(), "the Garage node of host{i} runs");
        self.garage_pids[i] = Some(self.garage.start_node(&self.hosts[i])?);
        self.wait_store(&self.hosts[i])
    }

    /// Starts a standby coordinator container (`coordN`) with the PKI, the credentials
    /// and a Garage gateway node of its own, added to the layout; nothing listens there
    /// yet and it does not have the alias.
    pub fn prepare_standby(&mut self) -> anyhow::Result<Coordinator> {
        let n = self.retired.len() + 1;
        let host = Self::coordinator_host(&self.image, &self.net, &self.dir, n)?;
        self.pki.install(&host, true)?;
        self.pki.install_file(&host, "s3", &self.garage.credentials())?;
        let via = self.garage_pids.iter().position(Option::is_some).context("no Garage storage node runs")?;
        let gateway = self.garage.add_gateway(&host, &self.hosts[via])?;
        self.wait_store(&host)?;
        Ok(Coordinator { host, process: None, gateway: Some(gateway) })
    }

    /// Waits until `host`'s own Garage node serves the bucket: a new node answers 503
    /// until it has the layout and the bucket's tables, and `cutline serve` gives up
    /// after a few quick retries at start (a supervisor would restart it).
    fn wait_store(&self, host: &Host) -> anyhow::Result<()> {
        let mut argv: Vec<String> = vec!["env".into()];
        argv.extend(self.process_env());
        argv.extend([format!("{BIN_DIR}/cutline-sidecar"), "--objects".into(), self.garage.url(PREFIX)]);
        argv.extend(["list".into(), "--store".into(), "/vms/garage/probe".into()]);
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = host.exec(&args)?;
            if out.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let status = HostedGarage::cli(host, &["status"]).unwrap_or_else(|e| format!("{e:#}"));
                bail!(
                    "the store does not answer through {}'s Garage node: {}\ngarage status there:\n{status}\nits log:\n{}",
                    host.name(),
                    String::from_utf8_lossy(&out.stderr),
                    tail(&host.host_path("/vms/garage/garage.log")?, 300)
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Kills the coordinator's container (`docker kill`).
    pub fn kill_coordinator(&self) -> anyhow::Result<()> {
        self.coordinator.host.kill()
    }

    /// Makes `standby` the coordinator: it takes the alias and `cutline serve` starts
    /// there, on the same store; returns once it answers. Taking the alias connects the
    /// container again, which breaks its gateway's connections and may change its
    /// address, which Garage reads only at start: the gateway restarts first (same
    /// identity) and the test waits until it serves the bucket.
    pub async fn take_over(&mut self, mut standby: Coordinator) -> anyhow::Result<()> {
        standby.host.add_alias(COORDINATOR)?;
        if let Some(pid) = standby.gateway.take() {
            standby.host.signal(pid, "KILL")?;
        }
        standby.gateway = Some(self.garage.start_node(&standby.host)?);
        self.wait_store(&standby.host)?;
        let old = std::mem::replace(&mut self.coordinator, standby);
        self.retired.push(old);
        self.start_coordinator().await
    }

    /// The ids of every container (the switch, the hosts, the coordinators) and of the
    /// network, to check that they are gone after the drop.
    pub fn ids(&self) -> (Vec<String>, String) {
        let mut ids: Vec<String> = self.hosts.iter().map(|h| h.id().to_owned()).collect();
        ids.push(self.switch.host().id().to_owned());
        ids.push(self.coordinator.host.id().to_owned());
        ids.extend(self.retired.iter().map(|c| c.host.id().to_owned()));
        (ids, self.net.id().to_owned())
    }

    /// Copies every log of the test's directory (the coordinators', the host agents',
    /// the sidecars', the Garage nodes', QEMU's, the consoles) under `to`, keeping their
    /// paths; returns how many.
    pub fn save_logs(&self, to: &Path) -> anyhow::Result<usize> {
        fn walk(from: &Path, rel: &Path, to: &Path, n: &mut usize) -> anyhow::Result<()> {
            for e in std::fs::read_dir(from.join(rel))?.flatten() {
                let (path, rel) = (e.path(), rel.join(e.file_name()));
                let ty = e.file_type()?;
                if ty.is_dir() {
                    walk(from, &rel, to, n)?;
                } else if ty.is_file() && path.extension().is_some_and(|x| x == "log") {
                    let dest = to.join(&rel);
                    if let Some(parent) = dest.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::copy(&path, &dest)?;
                    *n += 1;
                }
            }
            Ok(())
        }
        let mut n = 0;
        walk(&self.dir, Path::new(""), to, &mut n)?;
        Ok(n)
    }

    /// Prints the tails of every log: the coordinators', the host agents', the
    /// sidecars', the Garage nodes' and the guests' consoles. For a failed test.
    pub fn dump_logs(&self) {
        let print = |what: String, path: &Path| {
            if path.exists() {
                eprintln!("--- {what} ({}) ---\n{}", path.display(), tail(path, 20));
            }
        };
        for c in self.retired.iter().chain([&self.coordinator]) {
            if let Ok(log) = c.log() {
                print(format!("coordinator in {}", c.host.name()), &log);
            }
            print(format!("{} garage gateway", c.host.name()), &c.host.host_dir().join("garage/garage.log"));
        }
        for h in &self.hosts {
            let dir = h.host_dir();
            print(format!("{} host agent", h.name()), &dir.join("agent.log"));
            print(format!("{} garage", h.name()), &dir.join("garage/garage.log"));
            let logs = std::fs::read_dir(dir.join("agent/logs")).into_iter().flatten().flatten();
            for l in logs {
                print(format!("{} sidecar {}", h.name(), l.file_name().to_string_lossy()), &l.path());
            }
        }
        for g in &self.guests {
            print(format!("{} console", g.name), &g.dir.join("console.log"));
        }
    }
}

/// The lines of a log (tracing's format, without colours) that contain `needle`, with
/// their time in ms since the epoch.
pub fn log_lines(path: &Path, needle: &str) -> Vec<(u64, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| Some((rfc3339_ms(l.split_whitespace().next()?)?, l.to_owned())))
        .collect()
}

/// `2025-06-01T12:34:56.123456Z` in ms since the epoch.
fn rfc3339_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_times_are_read_in_ms_since_the_epoch() {
        assert_eq!(super::rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(super::rfc3339_ms("2024-02-29T12:00:00.123456Z"), Some(1_709_208_000_123));
        assert_eq!(super::rfc3339_ms("not a time"), None);
    }
}
