//! One host: a container on the test's network, and the processes in it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use testcontainers::clients::Cli;
use testcontainers::core::WaitFor;
use testcontainers::{Container, GenericImage, RunnableImage};

use super::image::USR_LINKS;
use super::{BIN_DIR, GARAGE, TestNet, WORK_DIR, docker, tail, target_bin_dir};
use crate::accel::Accel;

/// The client every host is started with (the CLI client: see the module's doc).
fn client() -> &'static Cli {
    static CLIENT: OnceLock<Cli> = OnceLock::new();
    CLIENT.get_or_init(Cli::default)
}

/// What PID 1 of a host runs: sleeps forever, reaping every orphan (each `wait` reaps
/// any child that exited), and exits at once on SIGTERM.
const INIT: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

/// A QEMU process in a host, as [`Host::qemus`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuProcess {
    /// The host's name ([`Host::name`]).
    pub host: String,
    /// The guest's name (QEMU's `-name`).
    pub vm: String,
    /// Its pid on this machine.
    pub pid: i32,
    /// Its pid inside the host.
    pub pid_inside: i32,
    /// When it started, in ms since the epoch (to the kernel's clock tick).
    pub started_unix_ms: u64,
}

/// When process `stat` (the text of `/proc/PID/stat`) started, in ms since the epoch.
fn started_unix_ms(stat: &str) -> u64 {
    let ticks: u64 = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.split_whitespace().nth(19))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100).max(1);
    btime * 1000 + ticks * 1000 / hz
}

/// A process started in a host by [`Host::spawn`].
#[derive(Debug, Clone)]
pub struct Spawned {
    /// Its pid inside the host.
    pub pid: u32,
    /// Its stdout and stderr, on this side.
    pub log: PathBuf,
}

/// One host: a running container on a [`TestNet`], removed (by id, forced) when dropped,
/// also by a panic. Its work directory stays with the test's directory.
pub struct Host {
    name: String,
    container_name: String,
    dir: PathBuf,
    accel: Accel,
    garage: bool,
    /// Its processes' pid namespace (`pid:[4026532…]`), which tells them apart from this
    /// machine's side.
    pidns: String,
    /// Its DNS aliases on the network, kept across a reconnect.
    aliases: Mutex<Vec<String>>,
    logs: Mutex<Vec<PathBuf>>,
    // Dropped before `net`: the container goes before its network can.
    container: Container<'static, GenericImage>,
    net: TestNet,
}

impl Host {
    /// Starts host `name` (container `<network>-<name>`, also its DNS name on the
    /// network) from `image` on `net`, with `dir` (created if needed) as its [`WORK_DIR`]. For
    /// `Accel::Kvm` the container is privileged, which gives it `/dev/kvm` (the CLI client
    /// passes no `--device`).
    pub fn start(image: &str, net: &TestNet, name: &str, dir: &Path, accel: Accel) -> anyhow::Result<Host> {
        ensure!(
            name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)),
            "host name {name:?}: only [a-zA-Z0-9][a-zA-Z0-9_.-]* makes a container name"
        );
        let container_name = format!("{}-{name}", net.name());
        std::fs::create_dir_all(dir).with_context(|| format!("creating the work directory of {container_name}"))?;
        let dir = dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))?;
        // Checked first: `docker run` would otherwise try to pull a missing image.
        docker(&format!("image {image}"), &["image", "inspect", "--format", "{{.Id}}", image])
            .with_context(|| format!("image {image} is not in the local engine: make it with HostImage::ensure"))?;
        // And no container has the name: one found after a failed start is then ours to remove.
        let subject = format!("container {container_name}");
        let by_name = ["ps", "-a", "-q", "--no-trunc", "--filter", &format!("name=^/{container_name}$")];
        let existing = docker(&subject, &by_name)?;
        ensure!(existing.is_empty(), "a container named {container_name} already exists ({existing})");
        let (repo, tag) = image.rsplit_once(':').unwrap_or((image, "latest"));
        let bins = target_bin_dir()?;
        let mut generic = GenericImage::new(repo, tag)
            .with_entrypoint("/usr/bin/busybox")
            .with_volume("/usr", "/usr:ro")
            .with_volume(bins.display().to_string(), format!("{BIN_DIR}:ro"))
            .with_volume(dir.display().to_string(), WORK_DIR)
            .with_wait_for(WaitFor::Nothing);
        for name in USR_LINKS {
            let path = Path::new("/").join(name);
            if path.is_dir() && std::fs::read_link(&path).is_err() {
                generic = generic.with_volume(path.display().to_string(), format!("{}:ro", path.display()));
            }
        }
        let garage = crate::garage::binary().ok();
        if let Some(g) = &garage {
            generic = generic.with_volume(g.display().to_string(), format!("{GARAGE}:ro"));
        }
        let args = vec!["sh".to_owned(), "-c".to_owned(), INIT.to_owned()];
        let runnable = RunnableImage::from((generic, args))
            .with_container_name(&container_name)
            .with_network(net.name())
            .with_privileged(accel == Accel::Kvm);
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| client().run(runnable)));
        let container = match run {
            Ok(c) => c,
            Err(_) => {
                // `run` panics on failure; a container may have been created that did not
                // start: say why, and remove it.
                let id = docker(&subject, &by_name).unwrap_or_default();
                let why = if id.is_empty() {
                    "no container was created (docker's own message is logged above)".to_owned()
                } else {
                    let why = docker(&subject, &["inspect", "--format", "{{.State.Error}}", &id]).unwrap_or_default();
                    let _ = docker(&subject, &["rm", "-f", "-v", &id]);
                    why
                };
                bail!(
                    "cannot start host container {container_name} from image {image} on network {}: {why}",
                    net.name()
                );
            }
        };
        let mut host = Host {
            name: name.to_owned(),
            container_name,
            dir,
            accel,
            garage: garage.is_some(),
            pidns: String::new(),
            aliases: Mutex::default(),
            logs: Mutex::default(),
            container,
            net: net.clone(),
        };
        ensure!(
            host.is_running()?,
            "host container {} exited at start: {}",
            host.container_name,
            docker(&host.subject(), &["logs", host.id()]).unwrap_or_default()
        );
        let init = docker(&host.subject(), &["inspect", "--format", "{{.State.Pid}}", host.id()])?;
        let link = Path::new("/proc").join(&init).join("ns/pid");
        host.pidns = std::fs::read_link(&link)
            .with_context(|| format!("reading {} of {}", link.display(), host.subject()))?
            .display()
            .to_string();
        Ok(host)
    }

    pub(super) fn subject(&self) -> String {
        format!("host container {} ({})", self.container_name, self.id())
    }

    /// The host's name in the test (`host0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The container's name.
    pub fn container_name(&self) -> &str {
        &self.container_name
    }

    /// The container's id.
    pub fn id(&self) -> &str {
        self.container.id()
    }

    /// The network the host is on (or was on, while disconnected).
    pub fn net(&self) -> &TestNet {
        &self.net
    }

    /// The accelerator the host's guests use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The host's work directory on this side ([`WORK_DIR`] inside).
    pub fn host_dir(&self) -> &Path {
        &self.dir
    }

    /// This side's path of a path under [`WORK_DIR`] inside the host.
    pub fn host_path(&self, container_path: &str) -> anyhow::Result<PathBuf> {
        let rel = Path::new(container_path)
            .strip_prefix(WORK_DIR)
            .with_context(|| format!("{container_path} is not under {WORK_DIR} in {}", self.container_name))?;
        Ok(self.dir.join(rel))
    }

    /// The garage binary inside the host.
    pub fn garage(&self) -> anyhow::Result<&'static str> {
        ensure!(self.garage, "no garage binary was found when {} started: run ci/install.sh", self.container_name);
        Ok(GARAGE)
    }

    /// The host's address on its test network (it may change across
    /// [`Host::disconnect`] and [`Host::reconnect`]).
    pub fn ip(&self) -> anyhow::Result<Ipv4Addr> {
        let networks =
            docker(&self.subject(), &["inspect", "--format", "{{json .NetworkSettings.Networks}}", self.id()])?;
        let networks: Value =
            serde_json::from_str(&networks).with_context(|| format!("networks of {}", self.subject()))?;
        let ip = networks[self.net.name()]["IPAddress"].as_str().unwrap_or_default();
        ip.parse()
            .with_context(|| format!("{} has no address on network {}: {networks}", self.subject(), self.net.name()))
    }

    /// Runs `argv` in the host and waits for it. A command that ran, failed or not, is `Ok`.
    pub fn exec(&self, argv: &[&str]) -> anyhow::Result<Output> {
        let mut cmd = Command::new("docker");
        cmd.args(["exec", self.id()]).args(argv).stdin(Stdio::null());
        cmd.output().with_context(|| format!("cannot run docker exec {argv:?} in {}", self.subject()))
    }

    /// Runs `argv` in the host and returns its stdout; an error names the host, the
    /// command and its stderr when it does not exit 0.
    pub fn exec_ok(&self, argv: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(argv)?;
        ensure!(
            out.status.success(),
            "{argv:?} failed in {} ({}): {}",
            self.subject(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `argv` in the host without waiting, its stdout and stderr appended to
    /// `log`, a file name in the work directory. Its tail is printed if the test panics.
    pub fn spawn(&self, argv: &[&str], log: &str) -> anyhow::Result<Spawned> {
        let inside = format!("{WORK_DIR}/{log}");
        let host_log = self.host_path(&inside)?;
        let pid_inside = format!("{inside}.pid");
        let pid_file = self.host_path(&pid_inside)?;
        let _ = std::fs::remove_file(&pid_file);
        // `sh -c SCRIPT PIDFILE LOG ARGV…`: record the pid, then become ARGV with its
        // output appended to LOG.
        let script =
            "echo $$ > \"$0.tmp\" && mv \"$0.tmp\" \"$0\"; log=$1; shift; exec \"$@\" >>\"$log\" 2>&1 </dev/null";
        let mut args = vec!["exec", "-d", self.id(), "/usr/bin/busybox", "sh", "-c", script, &pid_inside, &inside];
        args.extend_from_slice(argv);
        docker(&self.subject(), &args)?;
        self.logs.lock().unwrap_or_else(|e| e.into_inner()).push(host_log.clone());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
                return Ok(Spawned { pid, log: host_log });
            }
            ensure!(Instant::now() < deadline, "{argv:?} did not start in {}: {}", self.subject(), tail(&host_log, 10));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`KILL`, `TERM`…) to process `pid` of the host.
    pub fn signal(&self, pid: u32, signal: &str) -> anyhow::Result<()> {
        self.exec_ok(&["kill", &format!("-{signal}"), &pid.to_string()]).map(|_| ())
    }

    /// True while process `pid` of the host runs (and is not a zombie).
    pub fn process_alive(&self, pid: u32) -> anyhow::Result<bool> {
        let out = self.exec(&["cat", &format!("/proc/{pid}/stat")])?;
        let stat = String::from_utf8_lossy(&out.stdout);
        Ok(out.status.success() && stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }

    /// Kills the whole host as by power loss (`docker kill`, SIGKILL to its init, so to
    /// every process in it) and waits until the engine reports it stopped.
    pub fn kill(&self) -> anyhow::Result<()> {
        docker(&self.subject(), &["kill", self.id()])?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.is_running()? {
            ensure!(Instant::now() < deadline, "{} still runs 20 s after docker kill", self.subject());
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Cuts the host off its test network (a partition): its processes run on.
    pub fn disconnect(&self) -> anyhow::Result<()> {
        docker(&self.subject(), &["network", "disconnect", self.net.id(), self.id()])?;
        Ok(())
    }

    /// Connects the host to its test network again (possibly with another address),
    /// with the aliases it had.
    pub fn reconnect(&self) -> anyhow::Result<()> {
        let aliases = self.aliases.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut args = vec!["network", "connect"];
        for a in &aliases {
            args.extend(["--alias", a.as_str()]);
        }
        args.extend([self.net.id(), self.id()]);
        docker(&self.subject(), &args)?;
        Ok(())
    }

    /// Gives the host a further DNS name on its network, `alias` (a service name that
    /// another host can take over once this one is gone): the host is connected again
    /// with it, so call this before anything in the host uses the network.
    pub fn add_alias(&self, alias: &str) -> anyhow::Result<()> {
        self.aliases.lock().unwrap_or_else(|e| e.into_inner()).push(alias.to_owned());
        self.disconnect()?;
        self.reconnect()
    }

    /// The QEMU processes running in `hosts` now, from this machine's process table:
    /// each one's host (by its pid namespace), its guest's `-name`, and its pids. Zombies
    /// are left out.
    pub fn qemus(hosts: &[&Host]) -> Vec<QemuProcess> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let dir = e.path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if !comm.starts_with("qemu-system") {
                continue;
            }
            let Ok(ns) = std::fs::read_link(dir.join("ns/pid")) else { continue };
            let ns = ns.display().to_string();
            let Some(host) = hosts.iter().find(|h| h.pidns == ns) else { continue };
            let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
            if stat.rsplit_once(") ").is_none_or(|(_, rest)| rest.starts_with('Z')) {
                continue;
            }
            let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
            let args: Vec<String> =
                cmdline.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let vm = args
                .iter()
                .position(|a| a == "-name")
                .and_then(|i| args.get(i + 1))
                .map(|n| n.split(',').next().unwrap_or_default().trim_start_matches("guest=").to_owned())
                .unwrap_or_default();
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let inside = status
                .lines()
                .find_map(|l| l.strip_prefix("NSpid:"))
                .and_then(|v| v.split_whitespace().last())
                .and_then(|p| p.parse().ok())
                .unwrap_or(pid);
            let started_unix_ms = started_unix_ms(&stat);
            out.push(QemuProcess { host: host.name.clone(), vm, pid, pid_inside: inside, started_unix_ms });
        }
        out
    }

    /// True while the container runs.
    pub fn is_running(&self) -> anyhow::Result<bool> {
        Ok(docker(&self.subject(), &["inspect", "--format", "{{.State.Running}}", self.id()])? == "true")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in self.logs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                eprintln!("--- {} {} (tail) ---\n{}", self.container_name, log.display(), tail(log, 30));
            }
        }
        // The container itself is removed (`docker rm -f -v <id>`) by testcontainers
        // when the field is dropped, right after this.
    }
}
