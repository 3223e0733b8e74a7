//! Test support for cutline's integration tests against real QEMU.
//!
//! [`TestEnv`] gives each test its own directory, the guest image (built once and
//! cached), the accelerator (KVM only when a probe boot proves it), and starts guests
//! that are killed with their process group when the test ends, even by a panic.

pub mod accel;
pub mod agents;
pub mod chaos;
pub mod control;
pub mod garage;
pub mod guest;
pub mod hosts;
pub mod image;
pub mod mount;
pub mod netns;
pub mod oracle;
pub mod stream;
pub mod switch;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

pub use accel::Accel;
pub use control::Control;
pub use guest::{DiskSpec, Guest, GuestSpec};
pub use image::{GuestImage, ImageSpec};
pub use switch::L2Switch;

/// One test's environment: a temp dir, the image and the accelerator.
pub struct TestEnv {
    /// The image guests boot.
    pub image: GuestImage,
    /// The accelerator guests use.
    pub accel: Accel,
    dir: tempfile::TempDir,
}

impl TestEnv {
    /// Prepares the environment: builds or reuses the image, decides the accelerator.
    pub async fn new() -> anyhow::Result<TestEnv> {
        init_tracing();
        // QEMUs that daemonize or that a restore relaunches in their own session are
        // re-parented to the test, which can then reap them, rather than to init.
        let _ = nix::sys::prctl::set_child_subreaper(true);
        let spec = ImageSpec::default();
        let image =
            tokio::task::spawn_blocking(move || GuestImage::get(&spec, &mut |msg| tracing::info!("{msg}"))).await??;
        let dir = tempfile::Builder::new().prefix("cutline-test-").tempdir()?;
        let probe_image = image.clone();
        let probe_dir = dir.path().join("probe");
        let accel = accel::choose(&image::default_cache_dir(), move |accel, timeout| {
            probe_boot(&probe_image, accel, &probe_dir, timeout)
        });
        Ok(TestEnv { image, accel, dir })
    }

    /// The test's own directory, removed when the test ends.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts one guest.
    pub async fn guest(&self, spec: &GuestSpec) -> anyhow::Result<Guest> {
        Ok(Guest::start(spec, &self.image, self.accel, self.dir.path()).await?)
    }

    /// Starts `n` guests on one L2 switch, each running `modes` as member `i` of `n`.
    /// `customize` may change each spec before boot.
    pub async fn cluster(
        &self,
        n: usize,
        modes: &[&str],
        mut customize: impl FnMut(GuestSpec) -> GuestSpec,
    ) -> anyhow::Result<(L2Switch, Vec<Guest>)> {
        let switch = L2Switch::start(n)?;
        let mut guests = Vec::with_capacity(n);
        for (i, port) in switch.ports().iter().enumerate() {
            let mut spec = GuestSpec::new(&format!("vm{i}"), modes);
            spec.id = i;
            spec.peers = n;
            spec.netdev = Some(port.netdev_arg("n0"));
            guests.push(self.guest(&customize(spec)).await?);
        }
        Ok((switch, guests))
    }
}

/// Boots an idle guest with `accel` and reports whether it reached userspace in time.
fn probe_boot(image: &GuestImage, accel: Accel, dir: &Path, timeout: Duration) -> bool {
    let run = async {
        let spec = GuestSpec::new("kvm-probe", &["idle"]);
        let guest = Guest::start(&spec, image, accel, dir).await.ok()?;
        guest.control().wait_event("start", timeout).await.ok()
    };
    // Called from async code through a blocking section: run on a private runtime.
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread().enable_all().build().ok().and_then(|rt| rt.block_on(run))
        })
        .join()
        .ok()
        .flatten()
        .is_some()
    })
}

/// The path of a binary of this workspace (`cutline-sidecar`, `cutline`), built (or
/// brought up to date) first: test runs build only libraries.
pub fn workspace_bin(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    // Test binaries live in target/<profile>/deps, binaries (such as cutline-chaos) in
    // target/<profile>: the workspace's binaries are in the latter.
    let mut dir = exe.parent().ok_or_else(|| anyhow::anyhow!("no directory above {}", exe.display()))?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().ok_or_else(|| anyhow::anyhow!("no target dir above {}", exe.display()))?;
    }
    let bin = dir.join(name);
    {
        let mut cargo = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        // The profile of the directory this binary runs from: a benchmark's is release.
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(p) => p,
        };
        cargo.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).args([
            "build",
            "--quiet",
            "--profile",
            profile,
            "--bin",
            name,
        ]);
        // Without the variables cargo sets for a test run (the test's package): build
        // scripts that watch them (ring's watches CARGO_MANIFEST_DIR and CARGO_PKG_*)
        // would otherwise be rerun, and their dependents rebuilt, by every test binary
        // calling this and by the next plain build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_BIN_EXE_")
                || [
                    "CARGO_MANIFEST_DIR",
                    "CARGO_MANIFEST_PATH",
                    "CARGO_MANIFEST_LINKS",
                    "CARGO_CRATE_NAME",
                    "CARGO_BIN_NAME",
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                ]
                .contains(&&*key)
            {
                cargo.env_remove(&*key);
            }
        }
        let status = cargo.status()?;
        anyhow::ensure!(status.success() && bin.exists(), "cannot build {name}");
    }
    Ok(bin)
}

/// Polls `check` every 20 ms until it returns `Some`, or gives up after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends test logs to the test's output (`RUST_LOG` filters; default `info`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
}
