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
//! - [`MultiHost`] is a whole cluster across hosts: a coordinator in a container of its
//!   own, a Garage node, a host agent and guests on each host (see [`cluster`]).
//!
//! The testcontainers release is 0.15 with its docker CLI client: later releases talk
//! to the engine through bollard at a fixed API version (1.44 and up) that the engine
//! here (20.10, API 1.41) refuses, while the CLI negotiates. Its calls panic on failure,
//! so [`Host::start`] catches that and reports the container's own error.
//!
//! Every call runs the `docker` CLI and blocks: call from a multi-thread runtime (as the
//! QEMU tests do) or `spawn_blocking`.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

pub mod cluster;
mod guest;
mod host;
mod image;
mod net;
mod pki;
mod switch;

pub use cluster::{ClusterSpec, Coordinator, MultiHost, Observation};
pub use guest::HostGuest;
pub use host::{Host, QemuProcess, Spawned};
pub use image::{HostImage, target_bin_dir};
pub use net::{TestNet, container_exists, network_exists, sweep};
pub use pki::{PKI_DIR, Pki, PkiPaths};
pub use switch::Switch;

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

/// The ledger and journal invariants over guests in hosts: [`crate::oracle::check`]
/// (which reports each guest's host).
pub async fn check(guests: &[&HostGuest], balance: u64) -> anyhow::Result<Invariants> {
    crate::oracle::check(guests, balance).await
}
