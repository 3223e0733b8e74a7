//! The guest workloads as oracles: the ledger conserves its total across a 3-guest
//! cluster, and the journal's in-memory count matches its disk.

use std::time::Duration;

use cutline_tests::{DiskSpec, Guest, GuestSpec, TestEnv};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(20);
const BALANCE: u64 = 1_000_000;

/// Quiesces every ledger guest, then reads the balances; returns (sum, sent, received).
async fn ledger_totals(guests: &[Guest]) -> anyhow::Result<(u64, u64, u64)> {
    for g in guests {
        g.control().request("quiesce", T).await?;
    }
    let (mut sum, mut sent, mut received) = (0, 0, 0);
    for g in guests {
        let b = g.control().request("balance", T).await?;
        anyhow::ensure!(b["event"] == "balance", "{}: {b}", g.name);
        anyhow::ensure!(b["unacked"] == 0, "{} still has money in flight: {b}", g.name);
        sum += b["balance"].as_u64().unwrap_or(0);
        sent += b["sent"].as_u64().unwrap_or(0);
        received += b["received"].as_u64().unwrap_or(0);
    }
    Ok((sum, sent, received))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_ledger_guests_conserve_the_total() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let (switch, guests) = env.cluster(3, &["ledger"], |s| s.setting("balance", BALANCE)).await?;
    for g in &guests {
        g.control().wait_from(0, "ledger ready", |v| v["event"] == "ready" && v["mode"] == "ledger", BOOT).await?;
    }
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (sum, sent, received) = ledger_totals(&guests).await?;
        eprintln!("round {round}: total {sum}, {sent} transfers sent, {received} received");
        assert_eq!(sum, 3 * BALANCE, "the ledger total changed");
        assert_eq!(sent, received, "every transfer sent was received once");
        assert!(sent > 10 * (round + 1), "the guests barely traded: {sent} transfers");
        for g in &guests {
            let r = g.control().request("resume", T).await?;
            assert_eq!(r["event"], "resumed");
        }
    }
    assert!(switch.forwarded() > 0);
    Ok(())
}

#[tokio::test]
async fn journal_memory_matches_disk_in_an_uninterrupted_run() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut spec = GuestSpec::new("journal", &["journal"]);
    spec.disks.push(DiskSpec::qcow2(16));
    let guest = env.guest(&spec).await?;
    let ready = guest
        .control()
        .wait_from(0, "journal ready", |v| v["event"] == "ready" && v["mode"] == "journal", BOOT)
        .await?;
    assert!(ready["capacity"].as_u64().unwrap_or(0) >= 4000, "{ready}");
    let mut last = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let c: Value = guest.control().request("check", T).await?;
        assert_eq!(c["event"], "journal_check");
        assert_eq!(c["ok"], true, "journal inconsistent: {c}");
        let count = c["count"].as_u64().unwrap_or(0);
        let disk = c["disk_last"].as_u64().unwrap_or(0);
        assert!(disk == count || disk == count + 1, "{c}");
        assert!(count > last, "the journal is not advancing: {c}");
        last = count;
    }
    Ok(())
}

#[tokio::test]
async fn dirtier_reports_progress() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let spec = GuestSpec::new("dirtier", &["dirtier"]).setting("mib", 16).setting("mibps", 8);
    let guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "dirtier ready", |v| v["event"] == "ready" && v["mode"] == "dirtier", BOOT).await?;
    let a = guest.control().request("status", T).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let b = guest.control().request("status", T).await?;
    let bytes = |v: &Value| v.pointer("/dirtier/bytes").or_else(|| v.get("bytes")).and_then(Value::as_u64).unwrap_or(0);
    assert!(bytes(&b) > bytes(&a), "dirtier not writing: {a} then {b}");
    Ok(())
}
