//! Failpoints for crash tests: `CUTLINE_FAILPOINT=NAME[,NAME...]` makes the process kill
//! itself with SIGKILL when it reaches a named protocol step, so that tests crash the
//! real binaries at exact moments. Unset (the normal case) it costs one env lookup.

/// Environment variable naming the failpoints to fire.
pub const ENV: &str = "CUTLINE_FAILPOINT";

/// Every failpoint the binaries have, for tests to draw from.
pub const ALL: &[&str] = &[
    "sidecar-after-vote",
    "sidecar-mid-cut",
    "sidecar-after-cut",
    "sidecar-after-durable",
    "sidecar-after-commit",
    "sidecar-during-restore",
    "coordinator-after-prepare",
    "coordinator-before-record",
    "coordinator-after-record",
    "coordinator-during-recovery",
];

/// Kills this process with SIGKILL if failpoint `name` is set.
pub fn hit(name: &str) {
    debug_assert!(ALL.contains(&name), "unknown failpoint {name}");
    let Ok(set) = std::env::var(ENV) else { return };
    if set.split(',').any(|x| x.trim() == name) {
        eprintln!("cutline: failpoint {name} reached: SIGKILL");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
        std::process::abort();
    }
}
