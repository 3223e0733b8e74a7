//! Test guests booted inside a host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{Host, WORK_DIR, random_hex, tail};
use crate::control::Control;
use crate::guest::{GuestSpec, qemu_argv};
use crate::image::GuestImage;

impl Host {
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
                    .with_context(|| format!("copying {} into {}", from.display(), self.container_name()))?;
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
    /// For a NIC, set `spec.netdev` from [`super::Switch::netdev`].
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
        let argv = qemu_argv(spec, &image, self.accel(), Path::new(&inside));
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
            host: self.container_name().to_owned(),
            qmp_path: dir.join("qmp.sock"),
            control_path,
            dir,
            argv,
            pid: qemu.pid,
            control,
        })
    }
}

impl Host {
    /// A guest that runs in this host now although the test did not start it here (a
    /// restore relaunched it, here or after moving it from another host): connects to its
    /// control channel under `/vms/<name>/`. `pid` is its QEMU's pid in the host, `argv`
    /// its command line as recorded.
    pub async fn adopt_guest(&self, name: &str, pid: u32, argv: Vec<String>) -> anyhow::Result<HostGuest> {
        let dir = self.host_path(&format!("{WORK_DIR}/{name}"))?;
        let control_path = dir.join("control.sock");
        let control = Control::connect(&control_path, Duration::from_secs(10))
            .await
            .with_context(|| format!("guest {name} in {}", self.subject()))?;
        Ok(HostGuest {
            name: name.to_owned(),
            host: self.container_name().to_owned(),
            qmp_path: dir.join("qmp.sock"),
            control_path,
            dir,
            argv,
            pid,
            control,
        })
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

impl crate::oracle::Workload for HostGuest {
    fn name(&self) -> &str {
        &self.name
    }
    fn control(&self) -> &Control {
        HostGuest::control(self)
    }
    fn host(&self) -> Option<&str> {
        Some(&self.host)
    }
}
