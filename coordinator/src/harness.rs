//! A whole cluster on this machine, in one process: guests on a loopback switch, the
//! coordinator and one sidecar agent per guest, each a task that can be stopped
//! (a crash, for the sidecar and the coordinator) and started again. `cutline demo`
//! and the cluster tests run on it.

use std::time::{Duration, Instant};

use cutline_tests::{Guest, GuestSpec, L2Switch, TestEnv};
use serde_json::Value;
use sidecar::proto::Request;
use sidecar::transport::Dialer;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::client;
use crate::server;

/// Initial ledger balance of each guest.
pub const BALANCE: u64 = 1_000_000;

/// A running task with its own stop signal.
struct Task {
    stop: watch::Sender<bool>,
    handle: JoinHandle<()>,
}

impl Task {
    fn spawn<F>(f: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> F) -> Task
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (stop, mut rx) = watch::channel(false);
        let stopped = Box::pin(async move {
            let _ = rx.wait_for(|s| *s).await;
        });
        Task { stop, handle: tokio::spawn(f(stopped)) }
    }

    /// Stops it cleanly.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.handle.await;
    }

    /// Kills it mid-flight, like a crash of the process.
    fn crash(self) {
        self.handle.abort();
    }
}

/// The invariants of the ledger and the journals, checked once.
#[derive(Debug, Clone)]
pub struct Invariants {
    /// Ledger total conserved.
    pub ledger_ok: bool,
    /// Every journal's memory matches its disk.
    pub journals_ok: bool,
    /// Details, for a report.
    pub detail: Value,
}

/// A cluster of `n` guests with a coordinator and sidecars.
pub struct LocalCluster {
    /// Test environment (directory, image, accelerator).
    pub env: TestEnv,
    /// The guests (replaced by their restored QEMUs after a rollback, see [`LocalCluster::adopt`]).
    pub guests: Vec<Guest>,
    /// The coordinator's socket.
    pub socket: String,
    /// The coordinator's configuration.
    pub config: server::Config,
    _switch: L2Switch,
    coordinator: Option<Task>,
    agents: Vec<Option<Task>>,
}

impl LocalCluster {
    /// Boots `n` guests running `modes`, with a 16 MiB qcow2 disk each, and starts the
    /// coordinator (configured by `configure`) and the sidecars.
    pub async fn start(
        n: usize,
        modes: &[&str],
        customize: impl FnMut(GuestSpec) -> GuestSpec,
        configure: impl FnOnce(&mut server::Config),
    ) -> anyhow::Result<LocalCluster> {
        let env = TestEnv::new().await?;
        let (switch, guests) = env.cluster(n, modes, customize).await?;
        for g in &guests {
            g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(90)).await?;
        }
        let mut config = server::Config::new(&env.dir().join("state"));
        configure(&mut config);
        let socket = config.socket.display().to_string();
        let mut c =
            LocalCluster { env, guests, socket, config, _switch: switch, coordinator: None, agents: Vec::new() };
        c.start_coordinator();
        for i in 0..n {
            c.agents.push(None);
            c.start_agent(i);
        }
        c.wait_status(Duration::from_secs(60), |s| {
            s["members"]
                .as_array()
                .is_some_and(|m| m.len() == n && m.iter().all(|x| x["health"] == "up" && x["connected"] == true))
        })
        .await?;
        Ok(c)
    }

    /// Starts (or restarts) the coordinator.
    pub fn start_coordinator(&mut self) {
        let cfg = self.config.clone();
        self.coordinator = Some(Task::spawn(move |stop| async move {
            if let Err(e) = server::run(cfg, stop).await {
                tracing::error!("coordinator: {e}");
            }
        }));
    }

    /// Kills the coordinator mid-flight.
    pub fn crash_coordinator(&mut self) {
        if let Some(t) = self.coordinator.take() {
            t.crash();
        }
    }

    /// Starts (or restarts) the sidecar of guest `i`.
    pub fn start_agent(&mut self, i: usize) {
        let cfg = sidecar::agent::Config {
            coordinator: self.dialer(),
            cluster: "default".into(),
            name: self.guests[i].name.clone(),
            qmp: self.guests[i].qmp_path.clone(),
            store: self.env.dir().join("store"),
            // Commit records on a server: the checkpoints go to the same store.
            objects: self.config.records.clone().filter(|l| l.local_root().is_none()),
            bounds: netfilter::Bounds::default(),
            host: None,
            lease_file: None,
        };
        self.agents[i] = Some(Task::spawn(move |stop| async move {
            if let Err(e) = sidecar::agent::run(cfg, stop).await {
                tracing::error!("sidecar: {e}");
            }
        }));
    }

    /// Kills the sidecar of guest `i` mid-flight (its VM keeps running).
    pub fn crash_agent(&mut self, i: usize) {
        if let Some(t) = self.agents[i].take() {
            t.crash();
        }
    }

    /// Reaches the coordinator (its unix socket).
    pub fn dialer(&self) -> Dialer {
        Dialer::Unix(self.config.socket.clone())
    }

    /// Asks the coordinator.
    pub async fn ask(&self, r: Request) -> Result<Value, client::ClientError> {
        client::ask(&self.dialer(), r).await
    }

    /// Polls the coordinator's status until `pred` holds.
    pub async fn wait_status(&self, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(s) = self.ask(Request::Status).await
                && pred(&s)
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                let s = self.ask(Request::Status).await.unwrap_or(Value::Null);
                anyhow::bail!("the cluster did not get there in {timeout:?}; status: {s}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `count` more epochs than now are committed.
    pub async fn wait_epochs(&self, count: u64, timeout: Duration) -> anyhow::Result<u64> {
        let now = self.ask(Request::Status).await?["last_committed"].as_u64().unwrap_or(0);
        let s = self.wait_status(timeout, |s| s["last_committed"].as_u64().unwrap_or(0) >= now + count).await?;
        Ok(s["last_committed"].as_u64().unwrap_or(0))
    }

    /// Waits for recovery number `nth` (1-based) to finish with every member up; its
    /// report is `status["figures"]["recent"]["recoveries"]["last"]`'s last entry.
    pub async fn wait_recovered(&self, nth: usize, timeout: Duration) -> anyhow::Result<Value> {
        self.wait_status(timeout, |s| {
            s["figures"]["recoveries"].as_u64().is_some_and(|r| r >= nth as u64)
                && s["phase"]["state"] == "idle"
                && s["members"].as_array().is_some_and(|m| m.iter().all(|x| x["health"] == "up"))
        })
        .await
    }

    /// Takes charge of the QEMUs a rollback relaunched (by the pids the coordinator
    /// reports), replacing the guests' handles.
    pub async fn adopt(&mut self) -> anyhow::Result<()> {
        let s = self.ask(Request::Status).await?;
        cutline_tests::agents::adopt(&mut self.guests, &s).await?;
        Ok(())
    }

    /// Quiesces every ledger, sums the balances, checks every journal, resumes.
    pub async fn check(&self) -> anyhow::Result<Invariants> {
        let inv = cutline_tests::oracle::check(&self.guests, BALANCE).await?;
        Ok(Invariants { ledger_ok: inv.ledger_ok, journals_ok: inv.journals_ok, detail: inv.detail })
    }

    /// Stops the sidecars and the coordinator, then every QEMU (the restored ones too).
    pub async fn stop(mut self) {
        let pids: Vec<i32> = self
            .ask(Request::Status)
            .await
            .ok()
            .and_then(|s| {
                s["members"].as_array().map(|m| m.iter().filter_map(|x| x["pid"].as_i64()).map(|p| p as i32).collect())
            })
            .unwrap_or_default();
        // The coordinator first, so that stopping sidecars does not look like failures.
        if let Some(t) = self.coordinator.take() {
            t.stop().await;
        }
        for a in self.agents.iter_mut() {
            if let Some(t) = a.take() {
                t.stop().await;
            }
        }
        for g in self.guests.iter_mut() {
            g.kill();
        }
        for pid in pids {
            if !self.guests.iter().any(|g| g.pid() == pid) && !sidecar::process::is_gone(pid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for a in self.agents.iter_mut().flatten() {
            a.handle.abort();
        }
        if let Some(c) = &self.coordinator {
            c.handle.abort();
        }
    }
}
