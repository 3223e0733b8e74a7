//! Regression tests of the fault paths with real processes: the `cutline` and
//! `cutline-sidecar` binaries and QEMU (TCG), two ledger + journal guests, each daemon
//! killed with SIGKILL at a named protocol step (`CUTLINE_FAILPOINT`) or stopped with
//! SIGSTOP. Every test checks the guests' oracles after the fault.

use std::path::Path;
use std::time::{Duration, Instant};

use cutline_tests::chaos::Options;
use cutline_tests::chaos::cluster::{BALANCE, Cluster};
use cutline_tests::chaos::procs::{self, Daemon};
use cutline_tests::chaos::status::{Phase, Status};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const LONG: Duration = Duration::from_secs(120);

async fn cluster() -> anyhow::Result<Cluster> {
    cutline_tests::init_tracing();
    let opts = Options { kinds: Vec::new(), ..Options::default() };
    Cluster::start(&opts).await
}

/// Polls `cutline status` until `pred` holds.
async fn wait(c: &Cluster, what: &str, timeout: Duration, pred: impl Fn(&Status) -> bool) -> anyhow::Result<Status> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = c.status().await;
        if let Ok(s) = &s
            && pred(s)
        {
            return Ok(s.clone());
        }
        if Instant::now() > deadline {
            anyhow::bail!("{what}: not within {timeout:?}; status {:?}\n{}", s.map(|s| s.raw), c.logs(30));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits for the cluster to be healthy with `count` more epochs committed than `after`.
async fn commits(c: &Cluster, after: u64, count: u64) -> anyhow::Result<Status> {
    wait(c, &format!("{count} epochs after {after}"), LONG, |s| {
        s.healthy(&c.names) && s.last_committed.unwrap_or(0) >= after + count
    })
    .await
}

/// The ledger total and every journal hold, exactly one QEMU per guest runs, and every
/// record names every member.
async fn invariants(c: &mut Cluster, when: &str) -> anyhow::Result<()> {
    let s = c.status().await?;
    c.adopt(&s).await?;
    let inv = cutline_tests::oracle::check(&c.guests, BALANCE).await?;
    anyhow::ensure!(inv.ok(), "{when}: invariants broken: {}", inv.detail);
    let qemus = procs::qemus_under(&c.dir);
    anyhow::ensure!(qemus.len() == c.names.len(), "{when}: {} QEMUs run for {} VMs", qemus.len(), c.names.len());
    let list = c.list().await?;
    let partial = cutline_tests::chaos::status::partial_records(&list, &c.names);
    anyhow::ensure!(partial.is_empty(), "{when}: half-committed epochs {partial:?}");
    Ok(())
}

/// Restarts daemon `name` with `failpoint`, waits for it to kill itself there, restarts it.
async fn crash_at(c: &mut Cluster, name: &str, failpoint: &'static str) -> anyhow::Result<()> {
    let d = c.daemon(name).ok_or_else(|| anyhow::anyhow!("no daemon {name}"))?;
    d.kill();
    d.start(Some(failpoint))?;
    let deadline = Instant::now() + LONG;
    loop {
        let d = c.daemon(name).ok_or_else(|| anyhow::anyhow!("no daemon {name}"))?;
        if let Some(status) = d.exited() {
            anyhow::ensure!(procs::killed(status), "{name} exited without the failpoint: {status}");
            return d.start(None);
        }
        anyhow::ensure!(Instant::now() < deadline, "{name} never reached {failpoint}\n{}", c.logs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn signal(d: &Daemon, sig: Signal) -> anyhow::Result<()> {
    let pid = d.pid().ok_or_else(|| anyhow::anyhow!("{} does not run", d.name))?;
    Ok(kill(Pid::from_raw(pid), sig)?)
}

fn manifests(store: &Path, vm: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store.join("vms").join(vm))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    v.sort();
    v
}

/// The first report: a sidecar SIGKILLed between its cut and the commit left its
/// bitmap `cutline-N` behind, and every later epoch aborted with "Bitmap already exists".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_between_cut_and_commit_never_wedges_the_cluster() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let s = commits(&c, 0, 1).await?;
    let mut last = s.last_committed.unwrap_or(0);
    for fp in ["sidecar-after-cut", "sidecar-after-durable", "sidecar-mid-cut"] {
        crash_at(&mut c, "sidecar vm0", fp).await?;
        let s = commits(&c, last, 2).await?;
        eprintln!("after {fp}: epoch {:?} committed", s.last_committed);
        assert_eq!(s.raw["figures"]["aborted_in_a_row"], 0, "{}", s.raw);
        last = s.last_committed.unwrap_or(0);
        // The guest of a cut that died mid-way runs again: its ledger answers.
        invariants(&mut c, fp).await?;
    }
    Ok(())
}

/// A coordinator killed before or after its record: epoch numbers are never reused, no
/// record holds a checkpoint of another cut, and a late result of the dead incarnation
/// counts for nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_coordinator_never_reuses_an_epoch_nor_mixes_cuts() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let s = commits(&c, 0, 1).await?;
    let mut last = s.last_committed.unwrap_or(0);
    let mut incarnation = s.raw["incarnation"].as_u64().unwrap_or(0);
    for fp in ["coordinator-before-record", "coordinator-after-record", "coordinator-after-prepare"] {
        crash_at(&mut c, "coordinator", fp).await?;
        let s = commits(&c, last, 2).await?;
        let inc = s.raw["incarnation"].as_u64().unwrap_or(0);
        assert!(inc > incarnation, "a restart raises the incarnation: {incarnation} -> {inc}");
        incarnation = inc;
        let list = c.list().await?;
        let epochs = cutline_tests::chaos::status::epochs(&list);
        assert!(epochs.windows(2).all(|w| w[0] < w[1]), "{epochs:?}");
        // Every record's checkpoints are the ones in the stores, with their digests.
        let v = c.cli(&["verify"]).await?;
        assert_eq!(v["ok"], true, "after {fp}: {v}");
        last = s.last_committed.unwrap_or(0);
        invariants(&mut c, fp).await?;
    }
    Ok(())
}

/// A coordinator started on a fresh (or wrong) state directory knows nothing of the
/// members: it must not make them delete their history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_coordinator_state_deletes_no_checkpoint() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    commits(&c, 0, 2).await?;
    c.coordinator.kill();
    let before: Vec<Vec<String>> = c.names.iter().map(|n| manifests(&c.store, n)).collect();
    assert!(before.iter().all(|m| !m.is_empty()));
    let fresh = c.dir.join("fresh-state");
    let argv = vec![
        cutline_tests::workspace_bin("cutline")?.display().to_string(),
        "--state".into(),
        fresh.display().to_string(),
        "serve".into(),
        "--coordinator".into(),
        c.state.join("cutline.sock").display().to_string(),
    ];
    c.coordinator = Daemon::new("coordinator", argv, c.dir.join("fresh-coordinator.log"));
    c.coordinator.start(None)?;
    let names = c.names.clone();
    let deadline = Instant::now() + LONG;
    loop {
        let s = c.cli(&["--coordinator", &c.state.join("cutline.sock").display().to_string(), "status"]).await;
        if let Ok(v) = s
            && v["members"]
                .as_array()
                .is_some_and(|m| m.len() == names.len() && m.iter().all(|x| x["connected"] == true))
        {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the sidecars did not register\n{}", c.logs(30));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<Vec<String>> = c.names.iter().map(|n| manifests(&c.store, n)).collect();
    assert_eq!(before, after, "a coordinator that knows nothing made the sidecars delete checkpoints");
    Ok(())
}

/// A silent sidecar whose QEMU lives (stopped: a long verify or a stop-and-copy cut look
/// alike to the coordinator) is "sidecar lost", never a VM failure: no rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_sidecar_whose_vm_lives_causes_no_rollback() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let s = commits(&c, 0, 1).await?;
    let pids: Vec<i32> = c.guests.iter().map(|g| g.pid()).collect();
    signal(&c.sidecars[1], Signal::SIGSTOP)?;
    let lost = wait(&c, "vm1's sidecar lost", LONG, |s| {
        s.members.iter().any(|m| m.name == "vm1" && m.health.contains("sidecar lost"))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = c.status().await;
    signal(&c.sidecars[1], Signal::SIGCONT)?;
    lost?;
    let during = during?;
    assert_eq!(during.recoveries, 0, "{}", during.raw);
    assert_ne!(during.phase, Phase::Recovery, "{}", during.raw);
    commits(&c, s.last_committed.unwrap_or(0), 2).await?;
    let now: Vec<i32> = c.guests.iter().map(|g| g.pid()).collect();
    assert_eq!(pids, now, "no VM was restarted");
    invariants(&mut c, "after the sidecar came back").await
}

/// A recovery that cannot finish (a member's sidecar stopped) halts within its deadlines
/// and says why in the status; `cutline restore` then finishes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_that_cannot_finish_halts_with_its_cause_and_restore_retries() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    // The coordinator again, with short recovery deadlines.
    c.coordinator.kill();
    let argv = vec![
        cutline_tests::workspace_bin("cutline")?.display().to_string(),
        "--state".into(),
        c.state.display().to_string(),
        "serve".into(),
        "--interval".into(),
        "2s".into(),
        "--heartbeat".into(),
        "300ms".into(),
        "--timeout".into(),
        "3s".into(),
        "--step-timeout".into(),
        "6s".into(),
        "--recovery-attempts".into(),
        "2".into(),
    ];
    c.coordinator = Daemon::new("coordinator", argv, c.dir.join("coordinator-short.log"));
    c.coordinator.start(None)?;
    let s = commits(&c, 0, 1).await?;
    signal(&c.sidecars[1], Signal::SIGSTOP)?;
    kill(Pid::from_raw(c.guests[0].pid()), Signal::SIGKILL)?;
    let halted = wait(&c, "halted", LONG, |s| s.phase == Phase::Halted).await;
    signal(&c.sidecars[1], Signal::SIGCONT)?;
    let halted = halted?;
    let reason = halted.raw["phase"]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("failed 2 times") && reason.contains("vm1"), "{}", halted.raw);
    assert!(halted.raw["figures"]["halts"].as_u64() == Some(1), "{}", halted.raw);
    // No epoch while halted.
    assert!(c.cli(&["checkpoint"]).await.is_err());
    wait(&c, "vm1's sidecar back", LONG, |s| s.members.iter().any(|m| m.name == "vm1" && m.connected)).await?;
    let r = c.cli(&["restore"]).await?;
    assert_eq!(r["epoch"].as_u64(), s.last_committed, "{r}");
    commits(&c, s.last_committed.unwrap_or(0), 1).await?;
    invariants(&mut c, "after the operator's restore").await
}

/// A sidecar killed in the middle of a restore (its old QEMU stopped, the new one not
/// launched): the restarted sidecar finishes the recovery and no VM ever runs twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_midway_finishes_and_never_runs_a_vm_twice() -> anyhow::Result<()> {
    let mut c = cluster().await?;
    let s = commits(&c, 0, 1).await?;
    c.sidecars[0].kill();
    c.sidecars[0].start(Some("sidecar-during-restore"))?;
    wait(&c, "vm0 back", LONG, |s| s.healthy(&c.names)).await?;
    kill(Pid::from_raw(c.guests[1].pid()), Signal::SIGKILL)?;
    let deadline = Instant::now() + LONG;
    loop {
        anyhow::ensure!(procs::qemus_under(&c.dir).len() <= c.names.len(), "two instances of one VM");
        if let Some(status) = c.sidecars[0].exited() {
            anyhow::ensure!(procs::killed(status), "exited without the failpoint: {status}");
            c.sidecars[0].start(None)?;
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never reached the failpoint\n{}", c.logs(30));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + LONG;
    loop {
        anyhow::ensure!(procs::qemus_under(&c.dir).len() <= c.names.len(), "two instances of one VM");
        let st = c.status().await?;
        if st.healthy(&c.names) && st.last_committed.unwrap_or(0) > s.last_committed.unwrap_or(0) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no recovery: {}\n{}", st.raw, c.logs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    invariants(&mut c, "after the restore was killed midway").await
}

/// One owner: a second sidecar for a VM and a second coordinator on a state directory
/// exit with an error naming the VM or the directory; the first ones carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sidecar_or_coordinator_is_refused() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = commits(&c, 0, 1).await?;
    let run =
        |args: Vec<String>| std::process::Command::new(&args[0]).args(&args[1..]).env("RUST_LOG", "error").output();
    let sidecar = cutline_tests::workspace_bin("cutline-sidecar")?.display().to_string();
    let out = run(vec![
        sidecar,
        "serve".into(),
        "--coordinator".into(),
        c.state.join("cutline.sock").display().to_string(),
        "--name".into(),
        "vm0".into(),
        "--qmp".into(),
        c.guests[0].qmp_path.display().to_string(),
        "--store".into(),
        c.store.display().to_string(),
    ])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("already serves VM vm0"), "{err}");
    let cutline = cutline_tests::workspace_bin("cutline")?.display().to_string();
    let out = run(vec![cutline, "--state".into(), c.state.display().to_string(), "serve".into()])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("another coordinator uses"), "{err}");
    commits(&c, s.last_committed.unwrap_or(0), 1).await?;
    Ok(())
}
