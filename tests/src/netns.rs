//! A network namespace of the test's own, with a bridge that test guests' taps join, so
//! that tap-backed guests talk to each other without their traffic leaving the namespace.
//! Dropping it deletes the namespace and with it every device inside (taps, bridge, ifbs).
//!
//! QEMU opens its tap by name in its own namespace, so a guest starts with a tap in the
//! host namespace that is down, has no address and joins nothing, and the test moves it
//! into the namespace ([`NetNs::adopt_tap`]) before bringing it up on the bridge.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Errors of setting up the namespace.
#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    /// `ip` could not be run.
    #[error("cannot run ip")]
    Spawn(#[source] std::io::Error),
    /// An `ip` command failed.
    #[error("`ip {args}` failed: {stderr}")]
    Command {
        /// The arguments.
        args: String,
        /// Its stderr.
        stderr: String,
    },
}

/// A test-made network namespace with one bridge, `br0`.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip ARGS` and returns its stdout.
pub fn ip(args: &[&str]) -> Result<String, NetNsError> {
    let out = Command::new("ip").args(args).output().map_err(NetNsError::Spawn)?;
    if !out.status.success() {
        return Err(NetNsError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl NetNs {
    /// Creates a namespace named after the process and a counter, with `lo` and `br0` up.
    pub fn new() -> Result<NetNs, NetNsError> {
        let name = format!("cutline-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (for `ip -n`, `tc -n`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<String, NetNsError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// Runs `tc -n NAME ARGS` and returns its stdout (failures as `None`).
    pub fn tc(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("tc").args(["-n", self.name.as_str()]).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Moves the host tap `tap` into the namespace, onto `br0`, and brings it up. Waits up
    /// to 10 s for the tap to appear: QEMU creates it after the sockets a test waits for.
    pub fn adopt_tap(&self, tap: &str) -> Result<(), NetNsError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ip(&["link", "show", "dev", tap]).is_err() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        ip(&["link", "set", tap, "netns", &self.name])?;
        self.ip(&["link", "set", tap, "master", "br0"])?;
        self.ip(&["link", "set", tap, "up"])?;
        Ok(())
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = self.ip(&["-o", "link", "show"]).unwrap_or_default();
        out.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap_or(n).to_owned()).collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            tracing::warn!(ns = %self.name, %e, "cannot delete the test network namespace");
        }
    }
}

/// A tap name unique to this process (at most 15 characters).
pub fn tap_name(i: usize) -> String {
    format!("clt{}x{i}", std::process::id() % 1_000_000)
}
