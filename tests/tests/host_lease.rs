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

use coordinator::client;
use cutline_tests::chaos::procs::{Daemon, kill_qemus_under, qemus_under};
use cutline_tests::{TestEnv, oracle, workspace_bin};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use sidecar::proto::Request;
use sidecar::transport::Dialer;

const LEASE: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(1);

async fn status(d: &Dialer) -> Value {
    client::ask(d, Request::Status).await.unwrap_or(Value::Null)
}

async fn wait_status(d: &Dialer, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(d).await;
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: not in {timeout:?}; status: {s:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until no QEMU of the test runs; returns how long that took.
async fn wait_no_qemu(dir: &Path, timeout: Duration) -> Duration {
    let t = Instant::now();
    while !qemus_under(dir).is_empty() {
        assert!(t.elapsed() < timeout, "QEMUs still run after {timeout:?}: {:?}", qemus_under(dir));
        tokio::time::sleep(Duration::from_millis(20)).await;
        cutline_tests::chaos::procs::reap_orphans(&[]);
    }
    t.elapsed()
}

fn all_up_on(s: &Value, host: &str) -> bool {
    s["members"].as_array().is_some_and(|m| {
        m.len() == 2 && m.iter().all(|x| x["health"] == "up" && x["connected"] == true && x["host"] == host)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_without_its_lease_fences_its_vms_first_and_they_come_back_from_the_last_epoch() {
    cutline_tests::init_tracing();
    let env = TestEnv::new().await.expect("env");
    let (_switch, mut guests) = env
        .cluster(2, &["ledger", "journal"], |mut s| {
            s.disks.push(cutline_tests::DiskSpec::qcow2(16));
            s.setting("balance", coordinator::harness::BALANCE).setting("jrate", 20)
        })
        .await
        .expect("guests");
    for g in &guests {
        g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(90)).await.expect("ready");
    }
    let dir = env.dir().to_owned();
    let state = dir.join("coordinator");
    let sock = state.join("cutline.sock");
    let cutline = workspace_bin("cutline").expect("cutline").display().to_string();
    let sidecar_bin = workspace_bin("cutline-sidecar").expect("cutline-sidecar").display().to_string();
    let s = |p: &Path| p.display().to_string();
    let mut coordinator = Daemon::new(
        "coordinator",
        vec![
            cutline.clone(),
            "--state".into(),
            s(&state),
            "serve".into(),
            "--heartbeat".into(),
            "300ms".into(),
            "--timeout".into(),
            "2s".into(),
            "--lease".into(),
            format!("{}ms", LEASE.as_millis()),
            "--lease-margin".into(),
            format!("{}ms", MARGIN.as_millis()),
        ],
        dir.join("coordinator.log"),
    );
    coordinator.start(None).expect("coordinator");
    let mut host_argv = vec![
        sidecar_bin.clone(),
        "host".into(),
        "--coordinator".into(),
        s(&sock),
        "--name".into(),
        "h1".into(),
        "--address".into(),
        "127.0.0.1".into(),
        "--state".into(),
        s(&dir.join("host")),
        "--store".into(),
        s(&dir.join("store")),
    ];
    for g in &guests {
        host_argv.extend(["--vm".into(), format!("{}={}", g.name, g.qmp_path.display())]);
    }
    let mut host = Daemon::new("host h1", host_argv, dir.join("host.log"));
    while !sock.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    host.start(None).expect("host agent");
    let d = Dialer::Unix(sock.clone());
    let st = wait_status(&d, Duration::from_secs(60), "members up on h1", |s| all_up_on(s, "h1")).await;
    let h = &st["hosts"][0];
    assert_eq!(h["name"], "h1");
    assert!(h["cores"].as_u64().unwrap_or(0) >= 1 && h["mem_available"].as_u64().unwrap_or(0) > 0, "{h}");
    assert!(h["qemu"].to_string().contains("qemu-system-x86_64"), "{h}");
    let epoch = client::ask(&d, Request::Checkpoint).await.expect("an epoch commits")["epoch"].as_u64().expect("epoch");

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
    let back = wait_status(&d, Duration::from_secs(120), "recovered on h1", |s| {
        s["figures"]["recoveries"].as_u64().unwrap_or(0) >= 1 && s["phase"]["state"] == "idle" && all_up_on(s, "h1")
    })
    .await;
    eprintln!("recovered {:?} after the partition began", cut.elapsed());
    let rec = &back["figures"]["recent"]["recoveries"]["last"];
    assert_eq!(rec.as_array().and_then(|r| r.last()).map(|r| r["epoch"].clone()), Some(epoch.into()), "{rec}");
    assert!(back["figures"]["recent"]["detections"].to_string().contains("host"), "{back}");
    for g in guests.iter_mut() {
        let pid = back["members"]
            .as_array()
            .and_then(|m| m.iter().find(|x| x["name"] == g.name.as_str()))
            .and_then(|x| x["pid"].as_i64())
            .expect("pid") as i32;
        let new = g.adopt(pid).await.expect("adopt");
        drop(std::mem::replace(g, new));
    }
    let inv = oracle::check(&guests, coordinator::harness::BALANCE).await.expect("oracle");
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
