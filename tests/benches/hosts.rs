//! Host failover on this machine: four 256 MiB guests (ledger + journal, a 16 MiB qcow2
//! disk each) protected by host agent h0, an empty host agent h1, the real coordinator
//! and agents as processes. The baseline, same run: one guest's QEMU SIGKILLed and the
//! cluster rolled back on its own host. Then h0 is lost as by power loss (its agent, its
//! sidecars and the four QEMUs SIGKILLed) and the time until every VM runs again on h1 is
//! split into detection (to one heartbeat after the last granted one), lease wait (to the
//! host declared lost), fetch (the slowest restore's read of the checkpoint from the
//! store) and relaunch (the rest: placement, sidecars, QEMU, loading, resume).
//!
//! `cargo bench -p cutline-tests --bench hosts` (lease 2 s, margin 1 s, heartbeat 300 ms)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cutline_tests::agents::{self, all_up_on};
use cutline_tests::chaos::procs::{kill_qemus_under, processes};
use cutline_tests::{DiskSpec, TestEnv, oracle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const LEASE: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(1);
const HEARTBEAT: Duration = Duration::from_millis(300);
const GUESTS: usize = 4;
const BALANCE: u64 = 1_000_000;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn recoveries(s: &Value) -> u64 {
    s["figures"]["recoveries"].as_u64().unwrap_or(0)
}

/// The restores after `since` (unix ms): the slowest fetch and restore, ms.
fn restores_since(s: &Value, since: u64) -> (f64, f64) {
    let mut fetch: f64 = 0.0;
    let mut whole: f64 = 0.0;
    for r in s["figures"]["recent"]["restores"]["last"].as_array().into_iter().flatten() {
        if r["at_unix_ms"].as_u64().unwrap_or(0) >= since {
            fetch = fetch.max(r["fetch_ms"].as_f64().unwrap_or(0.0));
            whole = whole.max(r["restore_ms"].as_f64().unwrap_or(0.0));
        }
    }
    (fetch, whole)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (_switch, mut guests) = env
        .cluster(GUESTS, &["ledger", "journal"], |mut s| {
            s.memory_mib = 256;
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        })
        .await?;
    for g in &guests {
        g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(120)).await?;
    }
    let dir = env.dir().to_owned();
    let mut coordinator = agents::coordinator(&dir, HEARTBEAT, LEASE, MARGIN, &["--interval", "3s"])?;
    let mut h0 = agents::host(&dir, "h0", &guests.iter().collect::<Vec<_>>())?;
    let mut h1 = agents::host(&dir, "h1", &[])?;
    let long = Duration::from_secs(180);
    let committed = |s: &Value| s["last_committed"].as_u64().unwrap_or(0);
    let s = agents::wait_status(&dir, long, "all on h0 with a committed epoch", |s| {
        all_up_on(s, GUESTS, &["h0"]) && committed(s) >= 2
    })
    .await?;

    // Baseline: one QEMU killed, the cluster rolled back on its own host.
    let before = recoveries(&s);
    let pid = s["members"][0]["pid"].as_i64().unwrap_or(0) as i32;
    let t0 = unix_ms();
    kill(Pid::from_raw(pid), Signal::SIGKILL)?;
    let s = agents::wait_status(&dir, long, "rolled back on h0", |s| {
        recoveries(s) > before && s["phase"]["state"] == "idle" && all_up_on(s, GUESTS, &["h0"])
    })
    .await?;
    let local_ms = (unix_ms() - t0) as f64;
    let (local_fetch, _) = restores_since(&s, t0);
    agents::adopt(&mut guests, &s).await?;
    let inv = oracle::check(&guests, BALANCE).await?;
    anyhow::ensure!(inv.ok(), "invariants after the local rollback: {}", inv.detail);
    let last = committed(&s);
    let s = agents::wait_status(&dir, long, "a newer epoch", |s| committed(s) > last && all_up_on(s, GUESTS, &["h0"]))
        .await?;

    // h0 lost: its agent, its sidecars and its QEMUs, at once.
    let before = recoveries(&s);
    let qemus: Vec<i32> =
        s["members"].as_array().into_iter().flatten().filter_map(|m| m["pid"].as_i64()).map(|p| p as i32).collect();
    let t0 = unix_ms();
    h0.kill();
    for p in &qemus {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let s = agents::wait_status(&dir, long, "every VM running on h1", |s| {
        recoveries(s) > before && s["phase"]["state"] == "idle" && all_up_on(s, GUESTS, &["h1"])
    })
    .await?;
    let total_ms = (unix_ms() - t0) as f64;
    let lost = s["figures"]["recent"]["detections"]["last"]
        .as_array()
        .and_then(|d| d.iter().rev().find(|d| d["host"] == "h0").cloned())
        .ok_or_else(|| anyhow::anyhow!("no detection of h0: {s}"))?;
    let (lost_at, last_grant) =
        (lost["at_unix_ms"].as_u64().unwrap_or(0), lost["last_grant_unix_ms"].as_u64().unwrap_or(0));
    let noticed = (last_grant + HEARTBEAT.as_millis() as u64).max(t0);
    let detection = (noticed - t0) as f64;
    let lease_wait = lost_at.saturating_sub(noticed) as f64;
    let (fetch, restore) = restores_since(&s, t0);
    let relaunch = total_ms - detection - lease_wait - fetch;
    agents::adopt(&mut guests, &s).await?;
    let inv = oracle::check(&guests, BALANCE).await?;
    anyhow::ensure!(inv.ok(), "invariants after the failover: {}", inv.detail);

    let goal = (LEASE + MARGIN).as_secs_f64() * 1000.0 + 2000.0;
    println!("host failover, {GUESTS} x 256 MiB guests, lease {LEASE:?} + margin {MARGIN:?}, heartbeat {HEARTBEAT:?}");
    println!(
        "  baseline: one QEMU killed, rolled back on its own host: {local_ms:.0} ms (slowest fetch {local_fetch:.0} ms)"
    );
    println!(
        "  host lost -> every VM running on another host: {total_ms:.0} ms (goal lease + margin + 2 s = {goal:.0} ms)"
    );
    println!(
        "    detection {detection:.0} ms, lease wait {lease_wait:.0} ms, fetch {fetch:.0} ms, relaunch {relaunch:.0} ms (slowest restore {restore:.0} ms)"
    );
    println!(
        "  beyond the lease wait, failover / local rollback = {:.2}",
        (total_ms - detection - lease_wait) / local_ms
    );
    println!("  commit p50 {} ms", s["figures"]["commit_ms"]["p50"]);

    h1.kill();
    h0.kill();
    coordinator.kill();
    kill_qemus_under(&dir);
    for g in guests.iter_mut() {
        g.kill();
    }
    let d = dir.display().to_string();
    for p in processes() {
        if !p.zombie && p.cmdline.iter().any(|a| a.contains(&d)) {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
    }
    Ok(())
}
