//! Cluster checkpoints and rollback against real QEMU: three ledger + journal guests, the
//! coordinator and three sidecars in this process (each a task that can crash).

use std::time::Duration;

use coordinator::harness::{BALANCE, LocalCluster};
use coordinator::server::OutputCommit;
use cutline_tests::DiskSpec;
use sidecar::proto::Request;

const LONG: Duration = Duration::from_secs(120);

async fn cluster(configure: impl FnOnce(&mut coordinator::server::Config)) -> anyhow::Result<LocalCluster> {
    LocalCluster::start(
        3,
        &["ledger", "journal"],
        |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        },
        configure,
    )
    .await
}

async fn assert_invariants(c: &LocalCluster, when: &str) -> anyhow::Result<()> {
    let inv = c.check().await?;
    eprintln!("{when}: {}", inv.detail);
    assert!(inv.ledger_ok, "ledger total not conserved {when}: {}", inv.detail);
    assert!(inv.journals_ok, "a journal broke {when}: {}", inv.detail);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_kills_each_rolled_back_with_the_invariants_held() -> anyhow::Result<()> {
    let mut c = cluster(|cfg| cfg.interval = Some(Duration::from_secs(2))).await?;
    let result = async {
        for round in 0..3usize {
            c.wait_epochs(2, LONG).await?;
            let victim = (round * 7 + std::process::id() as usize) % c.guests.len();
            eprintln!("round {round}: killing {}", c.guests[victim].name);
            c.guests[victim].kill();
            let s = c.wait_recovered(round + 1, LONG).await?;
            let r = s["figures"]["recent"]["recoveries"]["last"]
                .as_array()
                .and_then(|l| l.last())
                .cloned()
                .unwrap_or_default();
            eprintln!("round {round}: recovered to epoch {} in {} ms", r["epoch"], r["recovery_ms"]);
            c.adopt().await?;
            assert_invariants(&c, &format!("after recovery {round}")).await?;
        }
        // Every record names a manifest that exists with that digest.
        let v = c.ask(Request::Verify { epoch: None }).await?;
        assert_eq!(v["ok"], true, "{v}");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    c.stop().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_vote_aborts_cleanly_and_the_previous_epoch_restores() -> anyhow::Result<()> {
    let c = cluster(|_| {}).await?;
    let result = async {
        let first = c.ask(Request::Checkpoint).await?;
        let epoch = first["epoch"].as_u64().unwrap_or(0);
        let refusal = sidecar::agent::refusal_file(&c.env.dir().join("store"), "vm1");
        std::fs::write(&refusal, b"maintenance")?;
        let err = c.ask(Request::Checkpoint).await.expect_err("vm1 votes no");
        assert!(err.to_string().contains("vm1 voted no"), "{err}");
        std::fs::remove_file(&refusal)?;
        let list = c.ask(Request::List).await?;
        let epochs: Vec<u64> =
            list["epochs"].as_array().into_iter().flatten().filter_map(|r| r["epoch"].as_u64()).collect();
        assert_eq!(epochs, vec![epoch], "the aborted epoch left no record");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let r = c.ask(Request::Restore { epoch: None }).await?;
        assert_eq!(r["epoch"].as_u64(), Some(epoch));
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let mut c = c;
    if result.is_ok() {
        c.adopt().await?;
        assert_invariants(&c, "after restoring the epoch before the refused one").await?;
        // With the refusal gone, epochs commit again.
        c.ask(Request::Checkpoint).await?;
    }
    c.stop().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_killed_mid_epoch_aborts_it_and_the_vm_keeps_running() -> anyhow::Result<()> {
    let mut c = cluster(|cfg| cfg.failure_timeout = Duration::from_secs(2)).await?;
    let result = async {
        let first = c.ask(Request::Checkpoint).await?["epoch"].as_u64().unwrap_or(0);
        // Kill vm2's sidecar while an epoch runs.
        let dialer = c.dialer();
        let ask = tokio::spawn(async move { coordinator::client::ask(&dialer, Request::Checkpoint).await });
        c.wait_status(LONG, |s| s["phase"]["state"] == "epoch").await?;
        c.crash_agent(2);
        let r = ask.await?;
        assert!(r.is_err(), "the epoch must abort: {r:?}");
        // Its VM runs on: no rollback, checkpoints pause until the sidecar is back.
        let s = c
            .wait_status(LONG, |s| {
                s["members"][2]["health"].as_str().is_some_and(|h| h.contains("sidecar lost"))
                    || s["members"][2]["connected"] == false
            })
            .await?;
        assert_eq!(s["figures"]["recoveries"], 0, "{s}");
        assert!(c.ask(Request::Checkpoint).await.is_err(), "no epoch while a sidecar is away");
        c.start_agent(2);
        c.wait_status(LONG, |s| {
            s["members"].as_array().is_some_and(|m| m.iter().all(|x| x["health"] == "up" && x["connected"] == true))
        })
        .await?;
        let next = c.ask(Request::Checkpoint).await?["epoch"].as_u64().unwrap_or(0);
        assert!(next > first);
        // The previous epoch restores.
        let r = c.ask(Request::Restore { epoch: Some(first) }).await?;
        assert_eq!(r["epoch"].as_u64(), Some(first));
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_ok() {
        c.adopt().await?;
        assert_invariants(&c, "after restoring the epoch before the lost sidecar").await?;
    }
    c.stop().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_epoch_never_leaves_a_half_committed_epoch() -> anyhow::Result<()> {
    let mut c = cluster(|_| {}).await?;
    let result = async {
        c.ask(Request::Checkpoint).await?;
        for _ in 0..3 {
            let dialer = c.dialer();
            let ask = tokio::spawn(async move { coordinator::client::ask(&dialer, Request::Checkpoint).await });
            c.wait_status(LONG, |s| {
                s["phase"]["members"].as_object().is_some_and(|m| m.values().any(|st| st == "cut" || st == "durable"))
            })
            .await?;
            c.crash_coordinator();
            let _ = ask.await;
            c.start_coordinator();
            c.wait_status(LONG, |s| {
                s["members"].as_array().is_some_and(|m| m.len() == 3 && m.iter().all(|x| x["connected"] == true))
            })
            .await?;
            // Every record is whole: three members, each manifest present with its digest.
            let v = c.ask(Request::Verify { epoch: None }).await?;
            assert_eq!(v["ok"], true, "{v}");
            let list = c.ask(Request::List).await?;
            for r in list["epochs"].as_array().into_iter().flatten() {
                assert_eq!(r["members"].as_array().map(Vec::len), Some(3), "{r}");
            }
            // The restarted coordinator commits epochs again.
            c.ask(Request::Checkpoint).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    c.stop().await;
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_output_commit_holds_packets_until_the_commit() -> anyhow::Result<()> {
    let c = cluster(|cfg| cfg.output_commit = OutputCommit::Strict).await?;
    let result = async {
        for _ in 0..2 {
            c.ask(Request::Checkpoint).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = c.ask(Request::Status).await?;
        let holds = &s["figures"]["hold_ms"];
        let list = c.ask(Request::List).await?;
        let min_durable = list["epochs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| Some(r["timings"]["durable_ms"].as_f64()? - r["timings"]["cut_ms"].as_f64()?))
            .fold(f64::MAX, f64::min);
        eprintln!("strict holds {holds:?}; storing took at least {min_durable:.0} ms after the last cut");
        assert_eq!(holds["count"], 6, "every member released twice: {s}");
        // Seed 000's property: between two committed rounds each member's own component of
        // its vector timestamp advanced by 5 (request received, checkpoint, ack sent, done
        // received, stored).
        let records = list["epochs"].as_array().cloned().unwrap_or_default();
        assert_eq!(records.len(), 2);
        for m in records[1]["members"].as_array().into_iter().flatten() {
            let name = m["name"].as_str().unwrap_or("");
            let before = records[0]["members"]
                .as_array()
                .and_then(|ms| ms.iter().find(|x| x["name"] == name))
                .map(|x| x["vt"][name].as_u64().unwrap_or(0));
            let after = m["vt"][name].as_u64().unwrap_or(0);
            assert_eq!(
                Some(after),
                before.map(|b| b + 5),
                "{name}'s own component across a round: {} -> {after}",
                before.unwrap_or(0)
            );
        }
        let shortest = holds["min"].as_f64().unwrap_or(0.0);
        assert!(
            shortest >= min_durable,
            "a gate opened before its epoch committed: held {shortest} ms, storing took {min_durable} ms"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    c.stop().await;
    result
}
