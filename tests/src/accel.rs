//! Which accelerator test guests use: KVM only when a probe boot proves it works.
//!
//! On machines where `/dev/kvm` opens but guests hang in early boot, the presence of
//! the device says nothing; a guest that reaches userspace does.

use std::path::Path;
use std::time::Duration;

/// The accelerator for QEMU's `-accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    /// The `-accel` argument.
    pub fn as_arg(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// How long a probe guest may take to reach userspace under KVM.
const PROBE_TIMEOUT: Duration = Duration::from_secs(15);

/// Decides the accelerator: `CUTLINE_ACCEL=kvm|tcg` if set; else TCG when `/dev/kvm`
/// does not open; else the result of a probe boot, cached per host boot in `cache_dir`.
pub fn choose(cache_dir: &Path, probe: impl FnOnce(Accel, Duration) -> bool) -> Accel {
    match std::env::var("CUTLINE_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        return Accel::Tcg;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join("accel-probe");
    if let Ok(s) = std::fs::read_to_string(&cache)
        && let Some((id, verdict)) = s.split_once(' ')
        && id == boot_id.trim()
    {
        return if verdict.trim() == "kvm" { Accel::Kvm } else { Accel::Tcg };
    }
    let ok = probe(Accel::Kvm, PROBE_TIMEOUT);
    let accel = if ok { Accel::Kvm } else { Accel::Tcg };
    tracing::info!(accel = accel.as_arg(), "KVM probe boot decided the accelerator");
    let _ = std::fs::create_dir_all(cache_dir);
    let tmp = cache.with_extension("tmp");
    if std::fs::write(&tmp, format!("{} {}\n", boot_id.trim(), accel.as_arg())).is_ok() {
        let _ = std::fs::rename(&tmp, &cache);
    }
    accel
}
