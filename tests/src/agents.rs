//! The coordinator and host agents as real processes on this machine, for the host-lease
//! test and the host failover benchmark: `cutline serve` with leases, and one
//! `cutline-sidecar host` per host with the VMs it starts with; their status asked over
//! the coordinator's unix socket.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::chaos::procs::Daemon;
use crate::{Guest, workspace_bin};

/// The coordinator's unix socket under `dir`.
pub fn socket(dir: &Path) -> PathBuf {
    dir.join("coordinator").join("cutline.sock")
}

/// `cutline serve` with its state in `DIR/coordinator`, leases of `lease` and `margin`,
/// heartbeats every `heartbeat`, and `extra` flags; started.
pub fn coordinator(
    dir: &Path,
    heartbeat: Duration,
    lease: Duration,
    margin: Duration,
    extra: &[&str],
) -> anyhow::Result<Daemon> {
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut argv = vec![
        workspace_bin("cutline")?.display().to_string(),
        "--state".into(),
        dir.join("coordinator").display().to_string(),
        "serve".into(),
        "--heartbeat".into(),
        ms(heartbeat),
        "--lease".into(),
        ms(lease),
        "--lease-margin".into(),
        ms(margin),
    ];
    argv.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut d = Daemon::new("coordinator", argv, dir.join("coordinator.log"));
    d.start(None)?;
    let sock = socket(dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        anyhow::ensure!(Instant::now() < deadline, "the coordinator made no socket: {}", d.tail(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(d)
}

/// `cutline-sidecar host` named `name`, its state in `DIR/host-NAME`, the store in
/// `DIR/store`, protecting `guests` from the start; started.
pub fn host(dir: &Path, name: &str, guests: &[&Guest]) -> anyhow::Result<Daemon> {
    let s = |p: &Path| p.display().to_string();
    let mut argv = vec![
        workspace_bin("cutline-sidecar")?.display().to_string(),
        "host".into(),
        "--coordinator".into(),
        s(&socket(dir)),
        "--name".into(),
        name.into(),
        "--address".into(),
        "127.0.0.1".into(),
        "--state".into(),
        s(&dir.join(format!("host-{name}"))),
        "--store".into(),
        s(&dir.join("store")),
    ];
    for g in guests {
        argv.extend(["--vm".into(), format!("{}={}", g.name, g.qmp_path.display())]);
    }
    let mut d = Daemon::new(&format!("host {name}"), argv, dir.join(format!("host-{name}.log")));
    d.start(None)?;
    Ok(d)
}

/// Runs `cutline ARGS --json` against the coordinator at `dir`.
pub async fn cli(dir: &Path, args: &[&str]) -> anyhow::Result<Value> {
    crate::chaos::procs::cutline_json(&workspace_bin("cutline")?, &dir.join("coordinator"), args).await
}

/// Polls the status until `pred` holds; fails after `timeout` naming `what`.
pub async fn wait_status(
    dir: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = cli(dir, &["status"]).await.unwrap_or(Value::Null);
        if pred(&s) {
            return Ok(s);
        }
        anyhow::ensure!(Instant::now() < deadline, "{what}: not in {timeout:?}; status: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every one of `n` members up, connected, on a host of `hosts`.
pub fn all_up_on(s: &Value, n: usize, hosts: &[&str]) -> bool {
    s["members"].as_array().is_some_and(|m| {
        m.len() == n
            && m.iter().all(|x| x["health"] == "up" && x["connected"] == true && hosts.iter().any(|h| x["host"] == *h))
    })
}

/// Replaces each guest's handle by the QEMU the status names for it.
pub async fn adopt(guests: &mut [Guest], s: &Value) -> anyhow::Result<()> {
    for g in guests.iter_mut() {
        let pid = s["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == g.name.as_str()))
            .and_then(|x| x["pid"].as_i64())
            .ok_or_else(|| anyhow::anyhow!("no pid for {}", g.name))? as i32;
        if pid != g.pid() {
            let new = g.adopt(pid).await?;
            drop(std::mem::replace(g, new));
        }
    }
    Ok(())
}
