//! A test guest: one QEMU process in its own process group, killed when dropped.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use qmp_client::Qmp;

use crate::accel::Accel;
use crate::control::Control;
use crate::image::GuestImage;

/// A data disk for a guest.
#[derive(Debug, Clone)]
pub struct DiskSpec {
    /// Size in MiB.
    pub size_mib: u64,
    /// Image format: `qcow2` or `raw`.
    pub format: String,
    /// The `-device` driver: `virtio-blk-pci`, `scsi-hd` (on virtio-scsi) or `ide-hd`.
    pub device: String,
}

impl DiskSpec {
    /// A qcow2 virtio-blk disk of `size_mib`.
    pub fn qcow2(size_mib: u64) -> DiskSpec {
        DiskSpec { size_mib, format: "qcow2".into(), device: "virtio-blk-pci".into() }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Name, used for the guest's directory and in logs.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// Machine type (`q35`, `pc`).
    pub machine: String,
    /// Workload modes (`ledger`, `journal`, `dirtier`, `idle`).
    pub modes: Vec<String>,
    /// Index in the cluster.
    pub id: usize,
    /// Cluster size.
    pub peers: usize,
    /// Extra `cutline.KEY=VALUE` settings for the workload.
    pub settings: Vec<(String, String)>,
    /// `-netdev` argument (id must be `n0`), or none for no NIC.
    pub netdev: Option<String>,
    /// Data disks.
    pub disks: Vec<DiskSpec>,
    /// More QEMU arguments, appended as they are.
    pub extra_args: Vec<String>,
}

impl GuestSpec {
    /// A 128 MiB q35 guest running `modes`.
    pub fn new(name: &str, modes: &[&str]) -> GuestSpec {
        GuestSpec {
            name: name.to_owned(),
            memory_mib: 128,
            machine: "q35".into(),
            modes: modes.iter().map(|m| (*m).to_owned()).collect(),
            id: 0,
            peers: 1,
            settings: Vec::new(),
            netdev: None,
            disks: Vec::new(),
            extra_args: Vec::new(),
        }
    }

    /// Sets a workload setting (`cutline.KEY=VALUE`).
    pub fn setting(mut self, key: &str, value: impl ToString) -> GuestSpec {
        self.settings.push((key.to_owned(), value.to_string()));
        self
    }
}

/// Errors of starting a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// QEMU could not be started.
    #[error("cannot start QEMU for guest {name}")]
    Spawn {
        /// Guest name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Preparing a file for the guest failed.
    #[error("cannot prepare {path} for guest {name}: {why}")]
    Prepare {
        /// Guest name.
        name: String,
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// QEMU exited before its QMP socket appeared.
    #[error("QEMU for guest {name} exited at start: {stderr}")]
    Exited {
        /// Guest name.
        name: String,
        /// QEMU's stderr.
        stderr: String,
    },
    /// QMP failed.
    #[error(transparent)]
    Qmp(#[from] qmp_client::QmpError),
    /// The control channel failed.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

/// A running QEMU test guest. Dropping it kills QEMU's whole process group.
pub struct Guest {
    /// The guest's name.
    pub name: String,
    /// Its directory: sockets, logs, disks.
    pub dir: PathBuf,
    /// The QMP socket.
    pub qmp_path: PathBuf,
    /// The QEMU command line it was started with.
    pub argv: Vec<String>,
    /// When QEMU was spawned.
    pub started: Instant,
    control: Option<Control>,
    process: Process,
}

/// The QEMU process of a guest: started by the test, or adopted after a restore
/// started it in its own session (its pid is its process group id).
enum Process {
    Child(Child),
    Adopted(i32),
}

/// The QEMU binary: `$CUTLINE_QEMU` or `qemu-system-x86_64`.
pub fn qemu_binary() -> String {
    std::env::var("CUTLINE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into())
}

/// Builds the QEMU command line for `spec` in `dir`.
pub fn qemu_argv(spec: &GuestSpec, image: &GuestImage, accel: Accel, dir: &Path) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut cmdline = format!(
        "console=ttyS0 panic=-1 quiet cutline.mode={} cutline.id={} cutline.peers={}",
        spec.modes.join(","),
        spec.id,
        spec.peers
    );
    for (k, v) in &spec.settings {
        cmdline.push_str(&format!(" cutline.{k}={v}"));
    }
    let mut a: Vec<String> = vec![
        qemu_binary(),
        "-name".into(),
        spec.name.clone(),
        "-accel".into(),
        accel.as_arg().into(),
        "-machine".into(),
        spec.machine.clone(),
        "-m".into(),
        spec.memory_mib.to_string(),
        "-smp".into(),
        "1".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-kernel".into(),
        image.kernel.display().to_string(),
        "-initrd".into(),
        image.initrd.display().to_string(),
        "-append".into(),
        cmdline,
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p("qmp.sock")),
        "-serial".into(),
        format!("file:{}", p("console.log")),
        "-chardev".into(),
        format!("socket,id=ctl,path={},server=on,wait=off", p("control.sock")),
        "-serial".into(),
        "chardev:ctl".into(),
    ];
    if let Some(netdev) = &spec.netdev {
        a.extend(["-netdev".into(), netdev.clone()]);
        a.extend(["-device".into(), format!("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:{:02x}", spec.id + 1)]);
    }
    for (i, d) in spec.disks.iter().enumerate() {
        let file = p(&format!("disk{i}.{}", d.format));
        a.extend(["-blockdev".into(), format!("driver=file,node-name=file{i},filename={file}")]);
        a.extend(["-blockdev".into(), format!("driver={},node-name=disk{i},file=file{i}", d.format)]);
        match d.device.as_str() {
            "scsi-hd" => {
                if i == 0 {
                    a.extend(["-device".into(), "virtio-scsi-pci,id=scsi0".into()]);
                }
                a.extend(["-device".into(), format!("scsi-hd,drive=disk{i},bus=scsi0.0")]);
            }
            other => a.extend(["-device".into(), format!("{other},drive=disk{i},id=dev{i}")]),
        }
    }
    a.extend(spec.extra_args.iter().cloned());
    a
}

fn option(argv: &[String], name: &str) -> Option<String> {
    argv.windows(2).find(|w| w[0] == name).map(|w| w[1].clone())
}

impl Guest {
    /// Creates the guest's disks, starts QEMU and connects to its control channel.
    pub async fn start(spec: &GuestSpec, image: &GuestImage, accel: Accel, root: &Path) -> Result<Guest, GuestError> {
        let dir = root.join(&spec.name);
        let prep =
            |path: &Path, why: String| GuestError::Prepare { name: spec.name.clone(), path: path.to_owned(), why };
        std::fs::create_dir_all(&dir).map_err(|e| prep(&dir, e.to_string()))?;
        for (i, d) in spec.disks.iter().enumerate() {
            let file = dir.join(format!("disk{i}.{}", d.format));
            if !file.exists() {
                let out = Command::new("qemu-img")
                    .args(["create", "-q", "-f", &d.format])
                    .arg(&file)
                    .arg(format!("{}M", d.size_mib))
                    .output()
                    .map_err(|e| prep(&file, format!("qemu-img: {e}")))?;
                if !out.status.success() {
                    return Err(prep(&file, String::from_utf8_lossy(&out.stderr).into_owned()));
                }
            }
        }
        let argv = qemu_argv(spec, image, accel, &dir);
        let stderr_path = dir.join("qemu.stderr");
        let stderr = File::create(&stderr_path).map_err(|e| prep(&stderr_path, e.to_string()))?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).process_group(0);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill QEMU
        // when the spawning thread dies, so a crashed test leaves no QEMU behind.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        let started = Instant::now();
        let child = cmd.spawn().map_err(|source| GuestError::Spawn { name: spec.name.clone(), source })?;
        let mut guest = Guest {
            name: spec.name.clone(),
            qmp_path: dir.join("qmp.sock"),
            dir,
            argv,
            started,
            control: None,
            process: Process::Child(child),
        };
        // A daemonizing QEMU's first process exits once the daemon runs; take the
        // daemon's pid from its pidfile so that cleanup reaches it.
        if let Some(pidfile) =
            guest.argv.iter().any(|a| a == "-daemonize").then(|| option(&guest.argv, "-pidfile")).flatten()
        {
            if let Process::Child(c) = &mut guest.process {
                let _ = c.wait();
            }
            let pid = std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok()).ok_or_else(|| {
                GuestError::Exited {
                    name: guest.name.clone(),
                    stderr: format!("no pid in {pidfile}: {}", guest.stderr()),
                }
            })?;
            guest.process = Process::Adopted(pid);
        }
        let control = Control::connect(&guest.dir.join("control.sock"), Duration::from_secs(10)).await;
        match control {
            Ok(c) => guest.control = Some(c),
            Err(e) => {
                if !guest.is_running() {
                    return Err(GuestError::Exited { name: guest.name.clone(), stderr: guest.stderr() });
                }
                return Err(e.into());
            }
        }
        Ok(guest)
    }

    /// Takes charge of a QEMU that a restore relaunched for this guest (same directory
    /// and argv), reconnecting to its control channel; it is killed on drop like any guest.
    pub async fn adopt(&self, pid: i32) -> Result<Guest, GuestError> {
        let mut guest = Guest {
            name: self.name.clone(),
            dir: self.dir.clone(),
            qmp_path: self.qmp_path.clone(),
            argv: self.argv.clone(),
            started: Instant::now(),
            control: None,
            process: Process::Adopted(pid),
        };
        guest.control = Some(Control::connect(&guest.dir.join("control.sock"), Duration::from_secs(10)).await?);
        Ok(guest)
    }

    /// QEMU's process id (also its process group id).
    pub fn pid(&self) -> i32 {
        match &self.process {
            Process::Child(c) => c.id() as i32,
            Process::Adopted(pid) => *pid,
        }
    }

    /// A new QMP connection to the guest (QEMU serves one client at a time).
    pub async fn qmp(&self) -> Result<Qmp, qmp_client::QmpError> {
        Qmp::connect(&self.qmp_path).await
    }

    /// The workload's control channel.
    pub fn control(&self) -> &Control {
        // Set by `start`, which fails rather than return a guest without it.
        self.control.as_ref().unwrap_or_else(|| unreachable!("guest {} has no control channel", self.name))
    }

    /// Sends SIGKILL to QEMU's process group and reaps it.
    pub fn kill(&mut self) {
        let pid = self.pid();
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        match &mut self.process {
            Process::Child(c) => {
                let _ = c.wait();
            }
            Process::Adopted(pid) => {
                // Ours to reap when it was re-parented to the test (a child subreaper);
                // otherwise wait until it has exited with every thread.
                let _ = nix::sys::wait::waitpid(Pid::from_raw(*pid), None);
                for _ in 0..250 {
                    if sidecar::process::is_gone(*pid) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        match &mut self.process {
            Process::Child(c) => matches!(c.try_wait(), Ok(None)),
            Process::Adopted(pid) => !sidecar::process::is_gone(*pid),
        }
    }

    /// The guest console (ttyS0) so far.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// QEMU's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let tail = |s: String| {
                s.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            };
            eprintln!("--- guest {} console (tail) ---\n{}", self.name, tail(self.console()));
            eprintln!("--- guest {} QEMU stderr ---\n{}", self.name, tail(self.stderr()));
        }
        self.kill();
    }
}
