//! The test's Docker network, and the sweep of what dead tests left.

use std::path::Path;
use std::sync::Arc;

use super::{docker, random_hex};

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
