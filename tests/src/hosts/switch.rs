//! `cutline-switch` in a host of its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::Value;

use super::{BIN_DIR, Host, TestNet, tail};
use crate::accel::Accel;

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
                host.container_name(),
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
