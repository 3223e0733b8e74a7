//! The cluster under test: guests booted by the test support, and the real daemons as
//! separate processes (the coordinator and one sidecar per guest), asked through the
//! `cutline` CLI. Dropping it stops everything it started: daemons, QEMUs (also the
//! ones sidecars relaunched), the store's tmpfs and the run's directory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use super::Options;
use super::procs::{self, Daemon};
use super::status::Status;
use crate::mount::Tmpfs;
use crate::{DiskSpec, Guest, L2Switch, TestEnv};

/// Initial ledger balance of each guest.
pub const BALANCE: u64 = 1_000_000;

/// Guests, daemons and their files.
pub struct Cluster {
    /// The run's directory (guests, state, store, logs).
    pub dir: PathBuf,
    /// The coordinator's state directory.
    pub state: PathBuf,
    /// The sidecars' store (a tmpfs when the runner may mount one).
    pub store: PathBuf,
    /// The members' names.
    pub names: Vec<String>,
    /// The guests, replaced by their relaunched QEMUs after a rollback.
    pub guests: Vec<Guest>,
    /// The coordinator.
    pub coordinator: Daemon,
    /// One sidecar per guest, in the order of `guests`; with hosts, the host agents.
    pub sidecars: Vec<Daemon>,
    cutline: PathBuf,
    tmpfs: Option<Tmpfs>,
    garage: Option<crate::garage::Garage>,
    switch: Option<L2Switch>,
    env: Option<TestEnv>,
}

impl Cluster {
    /// Builds the daemons, boots the guests, starts the coordinator and the sidecars.
    pub async fn start(opts: &Options) -> anyhow::Result<Cluster> {
        let cutline = crate::workspace_bin("cutline")?;
        let sidecar = crate::workspace_bin("cutline-sidecar")?;
        let env = TestEnv::new().await?;
        let dir = env.dir().to_owned();
        let n = opts.guests;
        super::progress(&format!("booting {n} guests under {} in {}", env.accel.as_arg(), dir.display()));
        let (switch, guests) = env
            .cluster(n, &["ledger", "journal"], |mut s| {
                s.disks.push(DiskSpec::qcow2(16));
                s.memory_mib = 128;
                s.setting("balance", BALANCE).setting("jrate", 20)
            })
            .await?;
        for g in &guests {
            g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(90)).await?;
        }
        let state = dir.join("state");
        let store = dir.join("store");
        std::fs::create_dir_all(&state)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        // Checkpoints and records on Garage: the store directory is only the sidecars'
        // work directory.
        let garage = if opts.garage {
            let at = dir.join("garage");
            Some(tokio::task::spawn_blocking(move || crate::garage::Garage::start(&at)).await??)
        } else {
            None
        };
        let (s3_env, s3_url) = garage.as_ref().map(|g| (g.env(0), g.url("chaos"))).unzip();
        let s3_env = s3_env.unwrap_or_default();
        let tmpfs = if root && garage.is_none() {
            Some(Tmpfs::mount(&store, opts.store_mib, false)?)
        } else {
            anyhow::ensure!(!opts.kinds.contains(&super::faults::Kind::FullStore), "full-store needs root (a tmpfs)");
            std::fs::create_dir_all(&store)?;
            None
        };
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let s = |p: &Path| p.display().to_string();
        let mut argv = vec![
            s(&cutline),
            "--state".into(),
            s(&state),
            "serve".into(),
            "--interval".into(),
            ms(opts.interval),
            "--heartbeat".into(),
            ms(opts.heartbeat),
            "--timeout".into(),
            ms(opts.timeout),
        ];
        if let Some(url) = &s3_url {
            argv.extend(["--records".into(), url.clone()]);
        }
        if opts.hosts > 0 {
            argv.extend(["--lease".into(), ms(opts.lease), "--lease-margin".into(), ms(opts.lease_margin)]);
        }
        let coordinator = Daemon::new("coordinator", argv, dir.join("coordinator.log")).with_env(s3_env.clone());
        // With hosts: one host agent per host, the guests dealt round-robin; each runs the
        // sidecars of its guests.
        let hosts = (0..opts.hosts).map(|k| {
            let mut argv = Vec::new();
            if let Some(url) = &s3_url {
                argv.extend(["--objects".into(), url.clone()]);
            }
            argv.splice(0..0, [s(&sidecar)]);
            argv.extend([
                "host".into(),
                "--coordinator".into(),
                s(&state.join("cutline.sock")),
                "--name".into(),
                format!("h{k}"),
                "--address".into(),
                "127.0.0.1".into(),
                "--state".into(),
                s(&dir.join(format!("host-h{k}"))),
                "--store".into(),
                s(&store),
            ]);
            for g in guests.iter().skip(k).step_by(opts.hosts) {
                argv.extend(["--vm".into(), format!("{}={}", g.name, g.qmp_path.display())]);
            }
            Daemon::new(&format!("host h{k}"), argv, dir.join(format!("host-h{k}.log"))).with_env(s3_env.clone())
        });
        let sidecars = if opts.hosts > 0 {
            hosts.collect()
        } else {
            guests
                .iter()
                .map(|g| {
                    let mut argv = vec![
                        s(&sidecar),
                        "serve".into(),
                        "--coordinator".into(),
                        s(&state.join("cutline.sock")),
                        "--name".into(),
                        g.name.clone(),
                        "--qmp".into(),
                        s(&g.qmp_path),
                        "--store".into(),
                        s(&store),
                    ];
                    if let Some(url) = &s3_url {
                        argv.extend(["--objects".into(), url.clone()]);
                    }
                    Daemon::new(&format!("sidecar {}", g.name), argv, dir.join(format!("sidecar-{}.log", g.name)))
                        .with_env(s3_env.clone())
                })
                .collect()
        };
        let mut c = Cluster {
            names: guests.iter().map(|g| g.name.clone()).collect(),
            dir,
            state,
            store,
            guests,
            coordinator,
            sidecars,
            cutline,
            tmpfs,
            garage,
            switch: Some(switch),
            env: Some(env),
        };
        c.coordinator.start(None)?;
        for d in &mut c.sidecars {
            d.start(None)?;
        }
        Ok(c)
    }

    /// Runs `cutline --state STATE ARGS --json` and reads its answer.
    pub async fn cli(&self, args: &[&str]) -> anyhow::Result<Value> {
        procs::cutline_json(&self.cutline, &self.state, args).await
    }

    /// `cutline status`.
    pub async fn status(&self) -> anyhow::Result<Status> {
        Ok(Status::parse(self.cli(&["status"]).await?))
    }

    /// `cutline list`.
    pub async fn list(&self) -> anyhow::Result<Value> {
        self.cli(&["list"]).await
    }

    /// Takes charge of the QEMUs a rollback relaunched (by the pids `status` reports),
    /// replacing the guests' handles; returns the names adopted.
    pub async fn adopt(&mut self, status: &Status) -> anyhow::Result<Vec<String>> {
        let mut adopted = Vec::new();
        for g in self.guests.iter_mut() {
            let pid = status.pid(&g.name).ok_or_else(|| anyhow::anyhow!("no pid for {}", g.name))?;
            if pid != g.pid() {
                let new = g.adopt(pid).await.with_context(|| format!("adopt {} (pid {pid})", g.name))?;
                drop(std::mem::replace(g, new));
                adopted.push(g.name.clone());
            }
        }
        Ok(adopted)
    }

    /// Every daemon, the coordinator first.
    pub fn daemons(&mut self) -> impl Iterator<Item = &mut Daemon> {
        std::iter::once(&mut self.coordinator).chain(self.sidecars.iter_mut())
    }

    /// The daemon named `name`.
    pub fn daemon(&mut self, name: &str) -> Option<&mut Daemon> {
        self.daemons().find(|d| d.name == name)
    }

    /// The live `cutline-sidecar serve` processes of VM `name` in this run.
    pub fn sidecar_pids(&self, name: &str) -> Vec<i32> {
        let dir = self.dir.display().to_string();
        procs::processes()
            .into_iter()
            .filter(|p| {
                !p.zombie
                    && p.cmdline.iter().any(|a| a == "serve")
                    && p.cmdline.windows(2).any(|w| w[0] == "--name" && w[1] == name)
                    && p.cmdline.iter().any(|a| a.contains(&dir))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// Reaps the zombies of QEMUs the runner inherited from dead sidecars.
    pub fn reap(&self) {
        let mut keep: Vec<i32> = self.guests.iter().map(Guest::pid).collect();
        keep.extend(self.coordinator.pid());
        keep.extend(self.sidecars.iter().filter_map(Daemon::pid));
        procs::reap_orphans(&keep);
    }

    /// The tails of every daemon's log and of each guest's console.
    pub fn logs(&self, lines: usize) -> String {
        let mut out = String::new();
        for d in std::iter::once(&self.coordinator).chain(&self.sidecars) {
            out.push_str(&format!("--- {} log (tail) ---\n{}\n", d.name, d.tail(lines)));
        }
        for g in &self.guests {
            let console = procs::tail(&g.dir.join("console.log"), 3);
            out.push_str(&format!("--- guest {} console (tail) ---\n{console}\n", g.name));
        }
        out
    }

    /// The accelerator in use.
    pub fn accel(&self) -> &'static str {
        self.env.as_ref().map_or("?", |e| e.accel.as_arg())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Daemons first, so that no sidecar relaunches a QEMU while they are cleaned up.
        self.coordinator.kill();
        for d in &mut self.sidecars {
            d.kill();
        }
        // Sidecars a killed host agent left behind.
        let dir = self.dir.display().to_string();
        for p in procs::processes() {
            if !p.zombie && p.cmdline.iter().any(|a| a == "serve") && p.cmdline.iter().any(|a| a.contains(&dir)) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
        self.guests.clear();
        let stray = procs::kill_qemus_under(&self.dir);
        if !stray.is_empty() {
            super::progress(&format!("cleanup: killed QEMU processes {stray:?}"));
        }
        drop(self.switch.take());
        drop(self.tmpfs.take());
        drop(self.garage.take());
        drop(self.env.take());
    }
}
