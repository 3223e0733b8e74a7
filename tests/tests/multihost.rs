//! Issue 11, across real hosts: a cluster on three host containers and a coordinator in
//! a container of its own, with real processes (`cutline serve`, host agents, their
//! sidecars, Garage nodes, QEMU under TCG); see [`cutline_tests::hosts::cluster`].
//!
//! - A host container killed: its VM comes back on a surviving host from the last
//!   committed epoch, and `status` places it there.
//! - A host cut off the network: its VM stops there before a copy starts elsewhere; the
//!   host, connected again, registers holding nothing.
//! - A Garage storage node lost (its process killed): epochs still commit.
//! - The coordinator's container killed, another one takes the alias and the same store:
//!   it carries on (a later incarnation, from the last committed epoch); hosts that
//!   could not renew their lease meanwhile fence, and come back from that epoch.
//!
//! After each, the ledger total and the journals hold on the guests wherever they run,
//! no VM ran twice, and the last committed epoch never went back (checked on every
//! sample). Each test prints its figures. The tests run one at a time (a lock of their
//! own): each boots three guests, and two clusters at once would starve TCG. Every log is
//! kept when a test fails (its path is printed), or always under `$CUTLINE_TEST_LOGS`.

use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;

use cutline_tests::TestEnv;
use cutline_tests::hosts::cluster::{log_lines, unix_ms};
use cutline_tests::hosts::{self, ClusterSpec, MultiHost, Observation};
use serde_json::{Value, json};

/// How long a recovery may take on a loaded 2-core machine.
const RECOVERY: Duration = Duration::from_secs(120);

/// Holds the lock that runs these tests one at a time.
fn one_at_a_time() -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    let dir = cutline_tests::image::default_cache_dir();
    std::fs::create_dir_all(&dir)?;
    let file = std::fs::File::create(dir.join("multihost.lock"))?;
    tokio::task::block_in_place(|| nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive))
        .map_err(|(_, e)| anyhow::anyhow!("locking multihost.lock: {e}"))
}

/// Runs `scenario` on a new cluster of `spec`; on failure prints the logs' tails and
/// keeps every log (also under `$CUTLINE_TEST_LOGS`, if set); then checks that every
/// container and the network are gone.
async fn run<F>(spec: ClusterSpec, scenario: F) -> anyhow::Result<()>
where
    F: AsyncFnOnce(&mut MultiHost) -> anyhow::Result<()>,
{
    let _lock = one_at_a_time()?;
    let env = TestEnv::new().await?;
    let started = Instant::now();
    let mut c = MultiHost::new(&env, spec).await?;
    let result = async {
        c.launch(&env).await?;
        eprintln!("cluster up in {} ms", started.elapsed().as_millis());
        scenario(&mut c).await
    }
    .await;
    if result.is_err() {
        c.dump_logs();
    }
    // Every log is kept when the test fails, or always under $CUTLINE_TEST_LOGS.
    let keep = std::env::var_os("CUTLINE_TEST_LOGS").map(std::path::PathBuf::from);
    if let Some(base) = keep.or_else(|| result.is_err().then(std::env::temp_dir)) {
        let to = base.join(format!("multihost-logs-{}-{}", std::process::id(), unix_ms(SystemTime::now())));
        match c.save_logs(&to) {
            Ok(n) => eprintln!("{n} logs kept in {}", to.display()),
            Err(e) => eprintln!("cannot keep the logs in {}: {e:#}", to.display()),
        }
    }
    let (ids, network) = c.ids();
    drop(c);
    for id in &ids {
        anyhow::ensure!(!hosts::container_exists(id)?, "container {id} remains");
    }
    anyhow::ensure!(!hosts::network_exists(&network)?, "network {network} remains");
    eprintln!("test took {} s", started.elapsed().as_secs());
    result
}

/// Checks the ledger and the journals on every guest where it runs now.
async fn invariants(c: &MultiHost, when: &str) -> anyhow::Result<()> {
    let inv = c.check().await?;
    anyhow::ensure!(inv.ok(), "invariants broke {when}: {:#}", inv.detail);
    eprintln!("invariants held {when}: {}", inv.detail["ledger"]);
    Ok(())
}

/// How long before `host` was declared lost its VMs were declared failed on other
/// evidence (negative: after), per VM detection.
fn failed_before_lost(o: &Observation, host: &str, lost_at: u64) -> Value {
    let vms: Vec<Value> = o
        .recent("detections")
        .into_iter()
        .filter(|d| d["vm"].is_string())
        .map(|d| {
            let before = lost_at as i64 - d["at_unix_ms"].as_i64().unwrap_or(0);
            json!({"vm": d["vm"], "ms_before_host_lost": before, "reason": d["reason"]})
        })
        .collect();
    json!({"host": host, "vm_detections": vms})
}

/// `v`, or an error naming `what` with the status.
fn need<T>(v: Option<T>, what: &str, o: &Observation) -> anyhow::Result<T> {
    v.with_context(|| format!("{what}: not in the status {:#}", o.status))
}

/// The p50 of a status figure.
fn p50(o: &Observation, figure: &str) -> Value {
    o.status["figures"][figure]["p50"].clone()
}

/// The entry of `kind` (`detections`, `placements`) whose `key` is `value`.
fn event(o: &Observation, kind: &str, key: &str, value: &str) -> Option<Value> {
    o.recent(kind).into_iter().rev().find(|e| e[key] == value)
}

/// Where a moved VM's restore spent its time, in ms after its placement: its new host's
/// agent started its sidecar, the sidecar registered, it fetched base images (if the host
/// lacked them), its new QEMU started (the checkpoint read from the store and the disks
/// rebuilt by then), and the restore ended (state loaded).
/// The coordinator's own account (`figures.recent.restores`) is added: the restore's
/// time and the part of it spent reading the checkpoint and rebuilding its files.
fn restore_steps(c: &MultiHost, o: &Observation, vm: &str, placed: &Value) -> anyhow::Result<Value> {
    let host = placed["to"].as_str().unwrap_or_default();
    let at = placed["at_unix_ms"].as_u64().unwrap_or(0);
    let dir = c.host(host)?.host_dir().to_owned();
    let first = |file: &str, needle: &str| {
        let lines = log_lines(&dir.join(file), needle).into_iter();
        let named = |l: &str| l.contains(&format!("vm={vm}")) || l.contains(&format!("vm=\"{vm}\""));
        lines.filter(|(t, l)| *t >= at && named(l)).map(|(t, _)| t as i64 - at as i64).next()
    };
    let sidecar_log = format!("agent/logs/{vm}.log");
    let qemu = o.qemus.iter().find(|q| q.vm == vm && q.host == host).map(|q| q.started_unix_ms as i64 - at as i64);
    let reported = o.recent("restores").into_iter().rev().find(|r| r["vm"] == vm && r["host"] == host);
    Ok(json!({
        "vm": vm,
        "to": host,
        "restore_ms (reported)": reported.as_ref().map(|r| r["restore_ms"].clone()),
        "fetch_ms (reported)": reported.as_ref().map(|r| r["fetch_ms"].clone()),
        "sidecar_started_ms": first("agent.log", "sidecar started"),
        "registered_ms": first(&sidecar_log, "registered with the coordinator"),
        "bases_fetched_ms": first(&sidecar_log, "base images fetched"),
        "qemu_started_ms": qemu,
        "restored_ms": first(&sidecar_log, "restored"),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_s_vm_comes_back_on_a_surviving_host_from_the_last_epoch() -> anyhow::Result<()> {
    run(ClusterSpec::default(), async |c: &mut MultiHost| {
        c.must_stay_up = vec!["host0".into(), "host2".into()];
        let before = c
            .wait(Duration::from_secs(60), "three epochs committed", |o| {
                o.status["figures"]["epochs_committed"].as_u64() >= Some(3)
            })
            .await?;
        let (commit_p50, epoch_p50) = (p50(&before, "commit_ms"), p50(&before, "epoch_ms"));
        eprintln!("members on three hosts: commit p50 {commit_p50} ms, epoch p50 {epoch_p50} ms");
        // An operator's CLI on a host sees the same cluster over TCP (TLS and the token).
        let tcp = c.status_over_tcp(0)?;
        anyhow::ensure!(
            tcp["incarnation"] == before.status["incarnation"] && tcp["members"].as_array().map(Vec::len) == Some(3),
            "status over TCP: {tcp:#}"
        );
        invariants(c, "before the kill").await?;

        let last = c.observe().await?.last_committed().unwrap_or(0);
        let killed_at = SystemTime::now();
        c.host("host1")?.kill()?;
        let o = c
            .wait(RECOVERY, "vm1 running again off host1 and the cluster recovered", |o| {
                o.status["figures"]["recoveries"].as_u64() >= Some(1)
                    && o.settled(|vm| match vm {
                        "vm0" => Some("host0".into()),
                        "vm2" => Some("host2".into()),
                        _ => None,
                    })
                    && o.member("vm1").is_some_and(|m| m["host"] != "host1")
            })
            .await?;
        let all_running = o.at;
        let to = o.member("vm1").and_then(|m| m["host"].as_str()).unwrap_or_default().to_owned();
        anyhow::ensure!(o.running("vm1") == [to.as_str()], "vm1 runs on {:?}, status says {to}", o.running("vm1"));
        let lost = need(event(&o, "detections", "host", "host1"), "host1 declared lost", &o)?;
        let placed = need(event(&o, "placements", "vm", "vm1"), "vm1 placed", &o)?;
        let rec = need(o.recent("recoveries").last().cloned(), "a recovery", &o)?;
        let epoch = rec["epoch"].as_u64().unwrap_or(0);
        anyhow::ensure!(epoch >= last, "rolled back to {epoch}, before {last}, the last committed at the kill");
        anyhow::ensure!(o.host("host1").is_some_and(|h| h["state"]["state"] == "lost"), "{:#}", o.status);
        c.follow(&o.status).await?;
        invariants(c, "after vm1 moved").await?;
        let after = c.wait_commits(epoch, 2, Duration::from_secs(60)).await?;

        let k = unix_ms(killed_at);
        let lost_at = lost["at_unix_ms"].as_u64().unwrap_or(0);
        let placed_at = placed["at_unix_ms"].as_u64().unwrap_or(0);
        eprintln!(
            "multihost figures (host killed): {}",
            json!({
                "lease_ms": o.status["lease_ms"],
                "last_grant_before_kill_ms": k.saturating_sub(lost["last_grant_unix_ms"].as_u64().unwrap_or(k)),
                "kill_to_declared_lost_ms": lost_at.saturating_sub(k),
                "lost_to_placed_ms": placed_at.saturating_sub(lost_at),
                "after_placement": restore_steps(c, &o, "vm1", &placed)?,
                "recovery_ms (detection to running)": rec["recovery_ms"],
                "kill_to_all_running_ms (sampled every 100 ms)": unix_ms(all_running).saturating_sub(k),
                "moved_to": to,
                "vm_failures_before_the_host_was_lost": failed_before_lost(&o, "host1", lost_at),
                "rolled_back_to_epoch": epoch,
                "epochs_aborted": after.status["figures"]["epochs_aborted"],
                "commit_ms_p50 (3 hosts)": commit_p50,
                "epoch_ms_p50 (3 hosts)": epoch_p50,
                "commit_ms_p50 (after, 2 hosts)": p50(&after, "commit_ms"),
            })
        );
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_host_stops_its_vms_before_they_start_elsewhere_and_rejoins_holding_none() -> anyhow::Result<()> {
    // Two guests on host1, which is cut off; host2 is the standby and has no guest (so
    // no copy of the base images either: the restores fetch them from the store).
    let spec = ClusterSpec { guests: vec![0, 1, 1], standby: Some("host2".into()), ..ClusterSpec::default() };
    run(spec, async |c: &mut MultiHost| {
        c.must_stay_up = vec!["host0".into(), "host2".into()];
        let o = c.wait_commits(0, 2, Duration::from_secs(60)).await?;
        let last = o.last_committed().unwrap_or(0);
        let moved = ["vm1", "vm2"];
        let pids: Vec<u32> =
            moved.iter().map(|vm| c.guests().iter().find(|g| g.name == *vm).map(|g| g.pid).unwrap_or(0)).collect();
        let agent = c.agent_pid(1).context("no agent on host1")?;

        let cut_at = SystemTime::now();
        c.host("host1")?.disconnect()?;
        // Sample until both VMs are placed elsewhere: when each was last seen on host1,
        // first seen gone there, and first seen elsewhere.
        let (mut last_alive, mut gone, mut checked) = ([None; 2], [None; 2], [false; 2]);
        let deadline = Instant::now() + RECOVERY;
        let o = loop {
            let o = c.observe().await?;
            for (i, vm) in moved.iter().enumerate() {
                if o.running(vm).contains(&"host1") {
                    last_alive[i] = Some(o.at);
                    anyhow::ensure!(gone[i].is_none(), "{vm} came back on host1 after it was fenced");
                } else if gone[i].is_none() {
                    gone[i] = Some(o.at);
                }
                if !checked[i] && event(&o, "placements", "vm", vm).is_some() {
                    // The coordinator has recorded the placement: nothing of the VM runs
                    // on host1 now, by host1's own process table.
                    let h = c.host("host1")?;
                    anyhow::ensure!(
                        !h.process_alive(pids[i])?,
                        "{vm}'s QEMU runs on host1 when it is placed elsewhere"
                    );
                    let ps = h.exec_ok(&["ps", "-eo", "pid,args"])?;
                    anyhow::ensure!(
                        !ps.lines().any(|l| l.contains("qemu-system") && l.contains(&format!("-name {vm} "))),
                        "{vm} runs on host1 when it is placed elsewhere:\n{ps}"
                    );
                    checked[i] = true;
                }
            }
            if checked.iter().all(|c| *c) {
                break o;
            }
            anyhow::ensure!(Instant::now() < deadline, "vm1 and vm2 were not placed: {:#}", o.status);
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let lost = need(event(&o, "detections", "host", "host1"), "host1 declared lost", &o)?;
        let lost_at = lost["at_unix_ms"].as_u64().unwrap_or(0);
        // Host1 is cut off, not dead: its agent runs on, holding nothing.
        anyhow::ensure!(c.host("host1")?.process_alive(agent)?, "host1's agent died in the partition");

        let o = c
            .wait(RECOVERY, "vm1 and vm2 running on host2 and the cluster recovered", |o| {
                o.status["figures"]["recoveries"].as_u64() >= Some(1)
                    && o.settled(|vm| Some(if vm == "vm0" { "host0" } else { "host2" }.to_owned()))
            })
            .await?;
        let rec = need(o.recent("recoveries").last().cloned(), "a recovery", &o)?;
        let epoch = rec["epoch"].as_u64().unwrap_or(0);
        anyhow::ensure!(epoch >= last, "rolled back to {epoch}, before {last}");
        let mut steps = Vec::new();
        for (i, vm) in moved.iter().enumerate() {
            let placed = need(event(&o, "placements", "vm", vm), "placed", &o)?;
            let placed_at = placed["at_unix_ms"].as_u64().unwrap_or(0);
            anyhow::ensure!(placed["to"] == "host2", "{vm} not on the standby: {placed}");
            let (alive, gone) = (last_alive[i].map(unix_ms), gone[i].map(unix_ms));
            anyhow::ensure!(
                alive.is_some_and(|t| t < placed_at) && gone.is_some_and(|t| t <= placed_at),
                "{vm} last seen on host1 at {alive:?}, gone at {gone:?}, placed at {placed_at}"
            );
            let q = need(o.qemus.iter().find(|q| q.vm == *vm), "the new QEMU", &o)?;
            anyhow::ensure!(
                gone.is_some_and(|g| q.started_unix_ms >= g),
                "{vm}'s new QEMU started at {} before its old one was seen gone at {gone:?}",
                q.started_unix_ms
            );
            let mut s = restore_steps(c, &o, vm, &placed)?;
            s["cut_to_last_seen_on_host1_ms"] = alive.map(|t| t.saturating_sub(unix_ms(cut_at))).into();
            s["cut_to_seen_gone_ms"] = gone.map(|t| t.saturating_sub(unix_ms(cut_at))).into();
            s["cut_to_placed_ms"] = placed_at.saturating_sub(unix_ms(cut_at)).into();
            steps.push(s);
        }
        c.follow(&o.status).await?;
        invariants(c, "after the partition").await?;
        eprintln!(
            "multihost figures (host cut off): {}",
            json!({
                "cut_to_declared_lost_ms": lost_at.saturating_sub(unix_ms(cut_at)),
                "vm_failures_before_the_host_was_lost": failed_before_lost(&o, "host1", lost_at),
                "recovery_ms (detection to running)": rec["recovery_ms"],
                "rolled_back_to_epoch": epoch,
                "vms": steps,
            })
        );

        // Connected again, host1's agent registers, fenced: up, holding no VM.
        let back = Instant::now();
        c.host("host1")?.reconnect()?;
        let o = c
            .wait(Duration::from_secs(60), "host1 registered again", |o| {
                o.host("host1").is_some_and(|h| {
                    h["state"]["state"] == "up"
                        && h["connected"] == true
                        && h["vms"].as_array().is_some_and(Vec::is_empty)
                })
            })
            .await?;
        eprintln!("host1 registered again {} ms after it was connected", back.elapsed().as_millis());
        let at = o.last_committed().unwrap_or(0);
        let o = c.wait_commits(at, 2, Duration::from_secs(60)).await?;
        anyhow::ensure!(
            o.qemus.iter().all(|q| q.host != "host1") && o.host("host1").is_some_and(|h| h["vms"] == json!([])),
            "host1 runs a VM again: {:?} {:#}",
            o.qemus,
            o.status
        );
        anyhow::ensure!(o.settled(|vm| Some(if vm == "vm0" { "host0" } else { "host2" }.to_owned())), "{:#}", o.status);
        invariants(c, "after host1 came back").await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_commit_with_one_garage_storage_node_lost() -> anyhow::Result<()> {
    // host2 runs no guest: its Garage node is the one lost (a host's sidecars reach the
    // store through their own node only).
    let spec = ClusterSpec { guests: vec![0, 1, 1], ..ClusterSpec::default() };
    run(spec, async |c: &mut MultiHost| {
        c.must_stay_up = vec!["host0".into(), "host1".into(), "host2".into()];
        let place = c.placement();
        let o = c.wait_commits(0, 2, Duration::from_secs(60)).await?;
        let (at, aborted) =
            (o.last_committed().unwrap_or(0), o.status["figures"]["epochs_aborted"].as_u64().unwrap_or(0));
        let before = p50(&o, "commit_ms");
        c.kill_garage_node(2)?;
        let t = Instant::now();
        let o = c.wait_commits(at, 3, Duration::from_secs(90)).await?;
        eprintln!(
            "multihost figures (a Garage node lost): {}",
            json!({
                "three_epochs_committed_in_ms": t.elapsed().as_millis() as u64,
                "aborted_meanwhile": o.status["figures"]["epochs_aborted"].as_u64().unwrap_or(0) - aborted,
                "commit_ms_p50 (3 nodes)": before,
                "commit_ms_last (2 nodes)": o.status["figures"]["commit_ms"]["last"],
            })
        );
        anyhow::ensure!(o.settled(|vm| place.get(vm).cloned()), "{:#}", o.status);
        invariants(c, "with a Garage node lost").await?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_coordinator_container_carries_on_from_the_store() -> anyhow::Result<()> {
    run(ClusterSpec::default(), async |c: &mut MultiHost| {
        let o = c.wait_commits(0, 2, Duration::from_secs(60)).await?;
        // The coordinator's container is killed; a standby container, made ready before
        // (as an operator's would be) with a gateway node of its own, takes the alias
        // and carries on from the store. Hosts that cannot renew their lease meanwhile
        // fence: then the cluster comes back from the last committed epoch.
        let incarnation = o.status["incarnation"].as_u64().unwrap_or(0);
        let recoveries = o.status["figures"]["recoveries"].as_u64().unwrap_or(0);
        let standby = c.prepare_standby()?;
        let last = c.observe().await?.last_committed().unwrap_or(0);
        let killed_at = Instant::now();
        c.kill_coordinator()?;
        c.take_over(standby).await?;
        let answered = killed_at.elapsed();
        let first = c.observe().await?;
        let inc = first.status["incarnation"].as_u64().unwrap_or(0);
        anyhow::ensure!(inc > incarnation, "incarnation {inc} after {incarnation}: {:#}", first.status);
        // Nothing committed is lost: the new coordinator knows the last commit it reads in
        // the store, at least the last one seen before the kill; its next epoch is later.
        let carried = first.last_committed().unwrap_or(0);
        let next = first.status["next_epoch"].as_u64().unwrap_or(0);
        anyhow::ensure!(
            carried >= last && next > carried,
            "last {last}, now {carried}, next {next}: {:#}",
            first.status
        );
        let o = c
            .wait(RECOVERY, "every member back with the new coordinator and two more epochs committed", |o| {
                o.settled(|_| None) && o.last_committed().is_some_and(|l| l >= carried + 2)
            })
            .await?;
        let back = killed_at.elapsed();
        let fenced = o.status["figures"]["recoveries"].as_u64().unwrap_or(0) > recoveries;
        if fenced {
            let rec = need(o.recent("recoveries").last().cloned(), "the recovery", &o)?;
            anyhow::ensure!(rec["epoch"].as_u64() == Some(carried), "recovered to {rec}, not to epoch {carried}");
        }
        let committed: Vec<u64> = o.recent("committed").iter().filter_map(|e| e["epoch"].as_u64()).collect();
        anyhow::ensure!(
            committed.iter().all(|e| *e > carried),
            "an epoch at or before {carried} committed again: {committed:?}"
        );
        c.follow(&o.status).await?;
        invariants(c, "after the coordinator moved").await?;
        eprintln!(
            "multihost figures (coordinator moved): {}",
            json!({
                "incarnation": [incarnation, inc],
                "last_committed_before_kill": last,
                "last_committed_read_from_the_store": carried,
                "kill_to_new_coordinator_answering_ms": answered.as_millis() as u64,
                "kill_to_members_back_and_two_epochs_ms": back.as_millis() as u64,
                "hosts_fenced_in_the_gap": fenced,
                "lease_ms": o.status["lease_ms"],
                "hosts_lost": o.recent("detections").iter().filter_map(|d| d["host"].as_str().map(str::to_owned)).collect::<Vec<_>>(),
                "commit_ms_p50": p50(&o, "commit_ms"),
            })
        );
        Ok(())
    })
    .await
}
