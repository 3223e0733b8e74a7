//! Hosts for multi-host tests: each host is a Docker container on a network of the test's
//! own, so that a test can lose a whole host (as by power loss), cut one off the network,
//! and find a VM's files only where that VM's host kept them.
//!
//! - [`HostImage`] makes the one local image every host runs: an almost empty root
//!   filesystem (no registry is reachable, so nothing is pulled). Containers bind-mount
//!   this machine's `/usr` read-only, so QEMU, busybox and the libraries are the
//!   machine's own, and the workspace's binaries at [`BIN_DIR`].
//! - [`TestNet`] is an internal Docker network, removed by id when dropped.
//! - [`Host`] is one container, started through testcontainers; every host mounts its
//!   own directory of the test's at the same path, [`WORK_DIR`], so a VM's recorded
//!   paths (`/vms/vm0/qmp.sock`) are valid on whichever host runs it, and the test reaches
//!   the sockets there through the host-side directory.
//! - [`Switch`] runs `cutline-switch` on a host: the guests' Ethernet across hosts.
//! - [`Host::start_guest`] boots a test guest inside a host; [`check`] is the ledger and
//!   journal oracle over such guests.
//!
//! The testcontainers release is 0.15 with its docker CLI client: later releases talk
//! to the engine through bollard at a fixed API version (1.44 and up) that the engine
//! here (20.10, API 1.41) refuses, while the CLI negotiates. Its calls panic on failure,
//! so [`Host::start`] catches that and reports the container's own error.
//!
//! Every call runs the `docker` CLI and blocks: call from a multi-thread runtime (as the
//! QEMU tests do) or `spawn_blocking`.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use testcontainers::clients::Cli;
use testcontainers::core::WaitFor;
use testcontainers::{Container, GenericImage, RunnableImage};

use crate::accel::Accel;
use crate::control::Control;
use crate::guest::{GuestSpec, qemu_argv};
use crate::image::GuestImage;
use crate::oracle::Invariants;

/// Where each host's own work directory is mounted, read-write: the same path on every
/// host, a different directory of the test's behind it.
pub const WORK_DIR: &str = "/vms";
/// Where the workspace's binaries (`target/debug`) are mounted, read-only.
pub const BIN_DIR: &str = "/cutline/bin";
/// Where the `garage` binary is mounted, read-only, when this machine has one.
pub const GARAGE: &str = "/cutline/tools/garage";

/// A `docker` command that failed.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    /// The docker CLI could not be run at all.
    #[error("cannot run `docker {args}` for {subject}")]
    Spawn {
        /// The image, network or container concerned.
        subject: String,
        /// The command's arguments.
        args: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The docker CLI exited with an error.
    #[error("`docker {args}` failed for {subject}: {stderr}")]
    Failed {
        /// The image, network or container concerned.
        subject: String,
        /// The command's arguments.
        args: String,
        /// What docker printed on stderr.
        stderr: String,
    },
}

/// Runs `docker args` (feeding it `input`) and returns its trimmed stdout.
fn docker_with(subject: &str, args: &[&str], input: Option<&[u8]>) -> Result<String, DockerError> {
    let spawn = |source| DockerError::Spawn { subject: subject.to_owned(), args: args.join(" "), source };
    let mut child = Command::new("docker")
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn)?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data).map_err(spawn)?;
    }
    let out = child.wait_with_output().map_err(spawn)?;
    if !out.status.success() {
        return Err(DockerError::Failed {
            subject: subject.to_owned(),
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn docker(subject: &str, args: &[&str]) -> Result<String, DockerError> {
    docker_with(subject, args, None)
}

/// `n` random bytes in hex, for unique names.
fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The last `n` lines of a file, for failure messages.
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The image every host runs: built from an in-memory root filesystem and imported once.
pub struct HostImage;

/// The top-level directories a merged-usr system links into `/usr`.
const USR_LINKS: &[&str] = &["bin", "lib", "lib64", "sbin"];

impl HostImage {
    /// The repository of the image's tags.
    pub const REPOSITORY: &'static str = "cutline-host";

    /// The root filesystem as a tar: empty mount points, the machine's top-level links
    /// into `/usr` (`/bin -> usr/bin` on merged-usr), and minimal `/etc` files. Entries
    /// are in a fixed order with fixed times and owners, so equal content hashes equal.
    pub fn rootfs() -> anyhow::Result<Vec<u8>> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut dir = |path: &str, mode: u32| -> std::io::Result<()> {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(mode);
            h.set_size(0);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, std::io::empty())
        };
        for (path, mode) in [
            ("cutline/", 0o755),
            ("cutline/bin/", 0o755),
            ("cutline/tools/", 0o755),
            ("dev/", 0o755),
            ("etc/", 0o755),
            ("proc/", 0o555),
            ("root/", 0o700),
            ("run/", 0o755),
            ("sys/", 0o555),
            ("tmp/", 0o1777),
            ("usr/", 0o755),
            ("var/", 0o755),
            ("var/tmp/", 0o1777),
            ("vms/", 0o755),
        ] {
            dir(path, mode)?;
        }
        for name in USR_LINKS {
            // Only links: a real top-level directory is mounted from the machine instead.
            let Ok(target) = std::fs::read_link(Path::new("/").join(name)) else { continue };
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_mode(0o777);
            h.set_size(0);
            h.set_mtime(0);
            tar.append_link(&mut h, name, &target)?;
        }
        let files: [(&str, &str); 4] = [
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
            ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
            ("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n"),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ];
        for (path, text) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_size(text.len() as u64);
            h.set_mtime(0);
            h.set_cksum();
            tar.append_data(&mut h, path, text.as_bytes())?;
        }
        Ok(tar.into_inner()?)
    }

    /// Makes sure the image is in the local engine and returns its tag,
    /// `cutline-host:<first 12 hex digits of the tar's sha256>`: imported with
    /// `docker import` only when `docker image inspect` does not know the tag, under a
    /// lock so that concurrent test processes import it once.
    pub fn ensure() -> anyhow::Result<String> {
        let tar = Self::rootfs().context("making the host root filesystem")?;
        let digest: String = Sha256::digest(&tar).iter().map(|b| format!("{b:02x}")).collect();
        let tag = format!("{}:{}", Self::REPOSITORY, &digest[..12]);
        let present = || docker(&format!("image {tag}"), &["image", "inspect", "--format", "{{.Id}}", &tag]).is_ok();
        if present() {
            return Ok(tag);
        }
        let lock_dir = crate::image::default_cache_dir();
        std::fs::create_dir_all(&lock_dir).with_context(|| format!("creating {}", lock_dir.display()))?;
        let lock_path = lock_dir.join("host-image.lock");
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("creating {}", lock_path.display()))?;
        let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| e)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        if !present() {
            docker_with(&format!("image {tag}"), &["import", "--message", "cutline test host", "-", &tag], Some(&tar))?;
        }
        Ok(tag)
    }
}

/// The directory of this workspace's binaries (`target/<profile>`), found from the
/// running executable without building anything: tests that run a binary in a host
/// build it first with [`crate::workspace_bin`], which puts it there.
pub fn target_bin_dir() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let mut dir = exe.parent().with_context(|| format!("no directory above {}", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().with_context(|| format!("no target dir above {}", exe.display()))?;
    }
    Ok(dir.to_owned())
}

/// True while the engine knows a container with this id.
pub fn container_exists(id: &str) -> anyhow::Result<bool> {
    Ok(!docker(&format!("container {id}"), &["ps", "-a", "-q", "--no-trunc", "--filter", &format!("id={id}")])?
        .is_empty())
}

/// True while the engine knows a network with this id.
pub fn network_exists(id: &str) -> anyhow::Result<bool> {
    Ok(!docker(&format!("network {id}"), &["network", "ls", "-q", "--no-trunc", "--filter", &format!("id={id}")])?
        .is_empty())
}

/// The label of every test network; `cutline-test.pid` says which process made it.
const LABEL: &str = "cutline-test";

/// Removes every test network whose process is gone (killed by SIGKILL, crashed) with the
/// containers on it, by id; returns how many networks went. Networks hold address pools
/// the engine has few of, and a dead test's hosts may still run QEMU.
pub fn sweep() -> anyhow::Result<usize> {
    let mut removed = 0;
    let label = format!("label={LABEL}");
    for net in docker("test networks", &["network", "ls", "-q", "--no-trunc", "--filter", &label])?.lines() {
        let subject = format!("network {net}");
        let pid = docker(
            &subject,
            &["network", "inspect", "--format", &format!("{{{{index .Labels \"{LABEL}.pid\"}}}}"), net],
        )?;
        if pid.is_empty() || Path::new("/proc").join(&pid).exists() {
            continue;
        }
        let containers = docker(&subject, &["ps", "-a", "-q", "--no-trunc", "--filter", &format!("network={net}")])?;
        for id in containers.lines() {
            docker(&format!("container {id} of {subject}"), &["rm", "-f", "-v", id])?;
        }
        docker(&subject, &["network", "rm", net])?;
        tracing::info!(network = net, pid, containers = containers.lines().count(), "removed what a dead test left");
        removed += 1;
    }
    Ok(removed)
}

/// An internal Docker network of one test, with a subnet Docker chooses. Clones share
/// it; the last one dropped removes it by id.
#[derive(Clone)]
pub struct TestNet(Arc<NetInner>);

struct NetInner {
    id: String,
    name: String,
}

impl TestNet {
    /// Creates `<prefix>-<pid>-<random>`: internal (no route out), labelled `cutline-test`
    /// with this process's pid. First removes what dead test processes left ([`sweep`]).
    pub fn create(prefix: &str) -> anyhow::Result<TestNet> {
        if let Err(e) = sweep() {
            tracing::warn!("cannot remove what dead tests left: {e:#}");
        }
        let pid = std::process::id();
        let name = format!("{prefix}-{pid}-{}", random_hex(3));
        let id = docker(
            &format!("network {name}"),
            &["network", "create", "--internal", "--label", LABEL, "--label", &format!("{LABEL}.pid={pid}"), &name],
        )?;
        Ok(TestNet(Arc::new(NetInner { id, name })))
    }

    /// The network's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// The network's id.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The subnet Docker gave it (`172.18.0.0/16`).
    pub fn subnet(&self) -> anyhow::Result<String> {
        Ok(docker(
            &format!("network {}", self.0.name),
            &["network", "inspect", "--format", "{{range .IPAM.Config}}{{.Subnet}}{{end}}", &self.0.id],
        )?)
    }
}

impl Drop for NetInner {
    fn drop(&mut self) {
        if let Err(e) = docker(&format!("network {}", self.name), &["network", "rm", &self.id]) {
            eprintln!("cannot remove test network {} ({}): {e}", self.name, self.id);
        }
    }
}

/// The client every host is started with (the CLI client: see the module's doc).
fn client() -> &'static Cli {
    static CLIENT: OnceLock<Cli> = OnceLock::new();
    CLIENT.get_or_init(Cli::default)
}

/// What PID 1 of a host runs: sleeps forever, reaping every orphan (each `wait` reaps
/// any child that exited), and exits at once on SIGTERM.
const INIT: &str = "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done";

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
        let host = Host {
            name: name.to_owned(),
            container_name,
            dir,
            accel,
            garage: garage.is_some(),
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
        Ok(host)
    }

    fn subject(&self) -> String {
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

    /// Connects the host to its test network again (possibly with another address).
    pub fn reconnect(&self) -> anyhow::Result<()> {
        docker(&self.subject(), &["network", "connect", self.net.id(), self.id()])?;
        Ok(())
    }

    /// True while the container runs.
    pub fn is_running(&self) -> anyhow::Result<bool> {
        Ok(docker(&self.subject(), &["inspect", "--format", "{{.State.Running}}", self.id()])? == "true")
    }

    /// Copies the guest kernel and initramfs into this host's work directory (once per
    /// image key: each host has its own copy, lost with it) and returns the image as seen
    /// inside the host.
    pub fn install_image(&self, image: &GuestImage) -> anyhow::Result<GuestImage> {
        let key: String = image.key.chars().take(16).collect();
        let inside = format!("{WORK_DIR}/image/{key}");
        let here = self.host_path(&inside)?;
        std::fs::create_dir_all(&here).with_context(|| format!("creating {}", here.display()))?;
        let copy = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
            let to = here.join(name);
            if !to.exists() {
                let tmp = here.join(format!("{name}.{}.tmp", random_hex(4)));
                std::fs::copy(from, &tmp)
                    .with_context(|| format!("copying {} into {}", from.display(), self.container_name))?;
                std::fs::rename(&tmp, &to).with_context(|| format!("renaming {}", tmp.display()))?;
            }
            Ok(Path::new(&inside).join(name))
        };
        Ok(GuestImage {
            kernel: copy(&image.kernel, "vmlinuz")?,
            initrd: copy(&image.initrd, "initrd")?,
            ..image.clone()
        })
    }

    /// Boots `spec` in this host: its files under `/vms/<name>/` (here under
    /// [`Host::host_dir`]), the kernel and initramfs copied in first, data disks made by
    /// `qemu-img` in the host, QEMU started in the host (its output in
    /// `/vms/<name>/qemu.log`), and the workload's control channel connected from here.
    /// For a NIC, set `spec.netdev` from [`Switch::netdev`].
    pub async fn start_guest(&self, spec: &GuestSpec, image: &GuestImage) -> anyhow::Result<HostGuest> {
        let inside = format!("{WORK_DIR}/{}", spec.name);
        let dir = self.host_path(&inside)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let image = self.install_image(image)?;
        for (i, d) in spec.disks.iter().enumerate() {
            let file = format!("{inside}/disk{i}.{}", d.format);
            if !self.host_path(&file)?.exists() {
                self.exec_ok(&["qemu-img", "create", "-q", "-f", &d.format, &file, &format!("{}M", d.size_mib)])
                    .with_context(|| format!("creating disk {i} of guest {}", spec.name))?;
            }
        }
        let argv = qemu_argv(spec, &image, self.accel, Path::new(&inside));
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let log = format!("{}/qemu.log", spec.name);
        let qemu = self.spawn(&args, &log).with_context(|| format!("starting QEMU for guest {}", spec.name))?;
        let control_path = dir.join("control.sock");
        // QEMU makes its sockets before the guest boots: a few seconds are plenty, unless
        // QEMU is gone, which is checked on the way.
        let deadline = Instant::now() + Duration::from_secs(30);
        let control = loop {
            match Control::connect(&control_path, Duration::from_secs(1)).await {
                Ok(c) => break c,
                Err(e) => {
                    let alive = self.process_alive(qemu.pid)?;
                    if !alive || Instant::now() >= deadline {
                        bail!(
                            "guest {} in {}: QEMU {}: {e}; its log:\n{}",
                            spec.name,
                            self.subject(),
                            if alive { "runs but its control socket does not answer" } else { "exited" },
                            tail(&qemu.log, 20)
                        );
                    }
                }
            }
        };
        Ok(HostGuest {
            name: spec.name.clone(),
            host: self.container_name.clone(),
            qmp_path: dir.join("qmp.sock"),
            control_path,
            dir,
            argv,
            pid: qemu.pid,
            control,
        })
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

/// A test guest running in a [`Host`]. Its QEMU dies with its host; dropping this only
/// closes the control connection (and prints the console's tail if the test panics).
pub struct HostGuest {
    /// The guest's name.
    pub name: String,
    /// The name of the container it runs in.
    pub host: String,
    /// Its directory on this side (`/vms/<name>` inside).
    pub dir: PathBuf,
    /// The QMP socket, on this side.
    pub qmp_path: PathBuf,
    /// The workload's control socket, on this side.
    pub control_path: PathBuf,
    /// The QEMU command line, with the paths inside the host.
    pub argv: Vec<String>,
    /// QEMU's pid inside the host.
    pub pid: u32,
    control: Control,
}

impl HostGuest {
    /// The workload's control channel.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// A new QMP connection to the guest, from this side of the bind mount.
    pub async fn qmp(&self) -> Result<qmp_client::Qmp, qmp_client::QmpError> {
        qmp_client::Qmp::connect(&self.qmp_path).await
    }

    /// True when QMP answers `query-status` within `timeout`.
    pub async fn qmp_answers(&self, timeout: Duration) -> bool {
        let ask = async {
            let qmp = self.qmp().await.ok()?;
            qmp.execute(qapi::qmp::query_status {}).await.ok()
        };
        matches!(tokio::time::timeout(timeout, ask).await, Ok(Some(_)))
    }

    /// The guest console (ttyS0) so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// QEMU's stdout and stderr so far.
    pub fn qemu_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }
}

impl Drop for HostGuest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- guest {} on {} console (tail) ---\n{}",
                self.name,
                self.host,
                tail(&self.dir.join("console.log"), 30)
            );
        }
    }
}

/// `cutline-switch` in a host of its own: the guests' Ethernet segment across hosts.
pub struct Switch {
    host: Host,
    ports: Vec<u16>,
    log: PathBuf,
}

impl Switch {
    /// Builds `cutline-switch`, starts host `name` on `net` with it listening on
    /// `ports` UDP ports from `base_port`, and waits for its ready line.
    pub fn start(
        image: &str,
        net: &TestNet,
        name: &str,
        dir: &Path,
        ports: usize,
        base_port: u16,
    ) -> anyhow::Result<Switch> {
        let bin = crate::workspace_bin("cutline-switch")?;
        let exe = format!("{BIN_DIR}/{}", bin.file_name().and_then(|n| n.to_str()).unwrap_or("cutline-switch"));
        let host = Host::start(image, net, name, dir, Accel::Tcg)?;
        let (n, base) = (ports.to_string(), base_port.to_string());
        let spawned = host.spawn(&[&exe, "--bind", "0.0.0.0", "--ports", &n, "--base-port", &base], "switch.log")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ready = std::fs::read_to_string(&spawned.log)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["event"] == "ready");
            if let Some(ready) = ready {
                let ports = ready["ports"].as_array().into_iter().flatten().filter_map(Value::as_u64);
                let ports = ports.map(u16::try_from).collect::<Result<Vec<_>, _>>()?;
                return Ok(Switch { host, ports, log: spawned.log });
            }
            ensure!(
                Instant::now() < deadline && host.process_alive(spawned.pid)?,
                "cutline-switch did not get ready in {}: {}",
                host.container_name,
                tail(&spawned.log, 10)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The host it runs in.
    pub fn host(&self) -> &Host {
        &self.host
    }

    /// Its UDP ports, one per guest.
    pub fn ports(&self) -> &[u16] {
        &self.ports
    }

    /// The `-netdev` argument (id `n0`) that wires a guest in any host to port `i`: QEMU
    /// binds `0.0.0.0` in its host at the port's own number (unique per guest, so several
    /// guests can share a host) and sends to the switch host's address.
    pub fn netdev(&self, i: usize) -> anyhow::Result<String> {
        let port =
            *self.ports.get(i).with_context(|| format!("the switch has {} ports, not {}", self.ports.len(), i + 1))?;
        let ip = self.host.ip()?;
        Ok(format!(
            "dgram,id=n0,local.type=inet,local.host=0.0.0.0,local.port={port},remote.type=inet,remote.host={ip},remote.port={port}"
        ))
    }

    /// Each port's guest address as last learned (`None` until its guest has sent).
    pub fn learned(&self) -> Vec<Option<String>> {
        let mut learned = vec![None; self.ports.len()];
        for v in std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        {
            if let (Some("learned"), Some(i), Some(addr)) =
                (v["event"].as_str(), v["port"].as_u64(), v["addr"].as_str())
                && let Some(slot) = usize::try_from(i).ok().and_then(|i| learned.get_mut(i))
            {
                *slot = Some(addr.to_owned());
            }
        }
        learned
    }
}

/// How long one control request of [`check`] may take.
const T: Duration = Duration::from_secs(30);

/// Asks `g` for `verb`, once more if no answer came (every request here is idempotent;
/// see [`crate::oracle`]).
async fn ask(g: &HostGuest, verb: &str) -> anyhow::Result<Value> {
    match g.control().request(verb, T).await {
        Err(crate::control::ControlError::Timeout { .. }) => {
            tracing::warn!(vm = %g.name, "no answer to `{verb}`: asking again");
            g.control().request(verb, T).await.with_context(|| format!("{verb} {} on {} (asked twice)", g.name, g.host))
        }
        r => r.with_context(|| format!("{verb} {} on {}", g.name, g.host)),
    }
}

/// The ledger and journal invariants over guests in hosts, as [`crate::oracle::check`]
/// does for local guests: quiesces every ledger, sums the balances (each guest started
/// with `balance`), checks every journal, and resumes the ledgers (also on an error).
pub async fn check(guests: &[&HostGuest], balance: u64) -> anyhow::Result<Invariants> {
    let measured = async {
        for g in guests {
            ask(g, "quiesce").await?;
        }
        let (mut total, mut balances, mut journals) = (0, Vec::new(), Vec::new());
        for g in guests {
            let b = ask(g, "balance").await?;
            total += b["balance"].as_u64().unwrap_or(0);
            balances.push(json!({"vm": g.name, "host": g.host, "balance": b["balance"], "sent": b["sent"], "received": b["received"]}));
            let c = ask(g, "check").await?;
            journals.push(json!({"vm": g.name, "ok": c["ok"], "count": c["count"], "disk_last": c["disk_last"]}));
        }
        let expected = balance * guests.len() as u64;
        let journals_ok = journals.iter().all(|j| j["ok"] == true);
        Ok::<_, anyhow::Error>(Invariants {
            ledger_ok: total == expected,
            journals_ok,
            detail: json!({
                "ledger": {"ok": total == expected, "total": total, "expected": expected, "balances": balances},
                "journals": {"ok": journals_ok, "guests": journals},
            }),
        })
    }
    .await;
    let mut resumed = Ok(());
    for g in guests {
        if let Err(e) = g.control().request("resume", T).await {
            resumed = Err(anyhow::anyhow!("resume {} on {}: {e}", g.name, g.host));
        }
    }
    let inv = measured?;
    resumed?;
    Ok(inv)
}
