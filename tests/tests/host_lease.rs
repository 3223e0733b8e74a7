//! The host lease with real processes on one machine: the coordinator (`cutline serve`)
//! and a host agent (`cutline-sidecar host`) as separate processes, the host agent's
//! sidecars as its children, two ledger and journal guests. A coordinator the host
//! cannot reach (SIGSTOP: a partition, from the host's side) makes the host fence its
//! VMs within the lease, before the coordinator's lease + margin; once the coordinator is
//! back it declares the host lost, places the VMs again, and the cluster comes back from
//! its last committed epoch with the ledger total and the journals intact. A SIGKILLed
//! host agent cannot renew either: its orphaned sidecars fence their VMs from the lease
//! file.

use std::path::Path;
use std::time::{Duration, Instant};

use cutline_tests::agents::{self, all_up_on};
use cutline_tests::chaos::procs::{kill_qemus_under, qemus_under, reap_orphans};
use cutline_tests::{DiskSpec, TestEnv, oracle};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LEASE: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(1);
const BALANCE: u64 = 1_000_000;

/// Waits until no QEMU of the test runs; returns how long that took.
async fn wait_no_qemu(dir: &Path, timeout: Duration) -> Duration {
    let t = Instant::now();
    while !qemus_under(dir).is_empty() {
        assert!(t.elapsed() < timeout, "QEMUs still run after {timeout:?}: {:?}", qemus_under(dir));
        tokio::time::sleep(Duration::from_millis(20)).await;
        reap_orphans(&[]);
    }
    t.elapsed()
}

/// Kills every process of the run (daemons, orphaned sidecars, relaunched QEMUs) when
/// dropped, so that a failed assertion leaves nothing running.
struct Cleanup(std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let dir = self.0.display().to_string();
        for p in cutline_tests::chaos::procs::processes() {
            if !p.zombie && p.cmdline.iter().any(|a| a.contains(&dir)) {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
        kill_qemus_under(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_its_lease_fences_its_vms_first_and_they_come_back_from_the_last_epoch() {
    cutline_tests::init_tracing();
    let env = TestEnv::new().await.expect("env");
    let (_switch, mut guests) = env
        .cluster(2, &["ledger", "journal"], |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        })
        .await
        .expect("guests");
    for g in &guests {
        g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(90)).await.expect("ready");
    }
    let dir = env.dir().to_owned();
    let _cleanup = Cleanup(dir.clone());
    let mut coordinator = agents::coordinator(&dir, Duration::from_millis(300), LEASE, MARGIN, &["--timeout", "2s"])
        .expect("coordinator");
    let mut host = agents::host(&dir, "h1", &guests.iter().collect::<Vec<_>>()).expect("host agent");
    let st = agents::wait_status(&dir, Duration::from_secs(60), "members up on h1", |s| all_up_on(s, 2, &["h1"]))
        .await
        .expect("up");
    let h = &st["hosts"][0];
    assert_eq!(h["name"], "h1");
    assert!(h["cores"].as_u64().unwrap_or(0) >= 1 && h["mem_available"].as_u64().unwrap_or(0) > 0, "{h}");
    assert!(h["qemu"].to_string().contains("qemu-system-x86_64"), "{h}");
    let epoch = agents::cli(&dir, &["checkpoint"]).await.expect("an epoch commits")["epoch"].as_u64().expect("epoch");

    // The coordinator stops answering: the host cannot renew and fences on its own.
    let cpid = Pid::from_raw(coordinator.pid().expect("coordinator pid"));
    let cut = Instant::now();
    kill(cpid, Signal::SIGSTOP).expect("SIGSTOP");
    let fenced = wait_no_qemu(&dir, LEASE + MARGIN + Duration::from_secs(5)).await;
    eprintln!("fenced {fenced:?} after the partition (lease {LEASE:?}, margin {MARGIN:?})");
    assert!(fenced < LEASE + MARGIN, "the VMs ran {fenced:?}, past the lease and margin");
    // Nothing relaunches them while cut off.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(qemus_under(&dir).is_empty(), "a VM came back while the host was cut off");
    kill(cpid, Signal::SIGCONT).expect("SIGCONT");
    let back = agents::wait_status(&dir, Duration::from_secs(120), "recovered on h1", |s| {
        s["figures"]["recoveries"].as_u64().unwrap_or(0) >= 1
            && s["phase"]["state"] == "idle"
            && all_up_on(s, 2, &["h1"])
    })
    .await
    .expect("recovered");
    eprintln!("recovered {:?} after the partition began", cut.elapsed());
    let rec = &back["figures"]["recent"]["recoveries"]["last"];
    assert_eq!(rec.as_array().and_then(|r| r.last()).map(|r| r["epoch"].clone()), Some(epoch.into()), "{rec}");
    // Detected either way: the host's lease and margin ran out, or (the sidecars being
    // local) its fenced QEMUs were found gone first; both are evidence.
    let detections = back["figures"]["recent"]["detections"].to_string();
    assert!(detections.contains("h1") || detections.contains("is gone"), "{back}");
    agents::adopt(&mut guests, &back).await.expect("adopt");
    let inv = oracle::check(&guests, BALANCE).await.expect("oracle");
    assert!(inv.ledger_ok && inv.journals_ok, "{:#}", inv.detail);

    // The host agent dies: its sidecars fence their VMs from the lease file.
    let hpid = Pid::from_raw(host.pid().expect("host pid"));
    let died = Instant::now();
    kill(hpid, Signal::SIGKILL).expect("SIGKILL");
    let fenced = wait_no_qemu(&dir, LEASE + MARGIN + Duration::from_secs(5)).await;
    eprintln!("fenced {fenced:?} after the host agent died");
    assert!(died.elapsed() < LEASE + MARGIN, "VMs ran {:?} after the host agent died", died.elapsed());

    host.kill();
    coordinator.kill();
    kill_qemus_under(&dir);
    for g in guests.iter_mut() {
        g.kill();
    }
    // Orphaned sidecars exit once they fenced; make sure none is left.
    for p in cutline_tests::chaos::procs::processes() {
        if p.cmdline.iter().any(|a| a.contains(&dir.display().to_string())) && !p.zombie {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
        }
    }
}
