//! A cluster whose commit records live on a real three-node Garage cluster: the record
//! write is the commit point, so a store that loses its quorum aborts epochs cleanly
//! while the guests run on, and commits resume when a node returns.

use std::time::{Duration, Instant};

use coordinator::harness::{BALANCE, LocalCluster};
use cutline_objects::Objects;
use cutline_tests::DiskSpec;
use cutline_tests::garage::Garage;
use sidecar::proto::Request;

fn records(g: &Garage) -> anyhow::Result<Vec<String>> {
    let o = Objects::open(&g.location(0, "cluster")?)?;
    Ok(o.list("epochs/")?.into_iter().map(|m| m.key).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_on_garage_survive_a_node_and_abort_cleanly_without_a_quorum() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut g = tokio::task::block_in_place(|| Garage::start(dir.path()))?;
    let location = g.location(0, "cluster")?;
    let mut c = LocalCluster::start(
        3,
        &["ledger", "journal"],
        |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        },
        |cfg| cfg.records = Some(location),
    )
    .await?;
    let result = async {
        let first = c.ask(Request::Checkpoint).await?["epoch"].as_u64().unwrap_or(0);
        let keys = tokio::task::block_in_place(|| records(&g))?;
        assert_eq!(keys.len(), 1, "the commit record is on Garage: {keys:?}");
        assert!(keys[0].starts_with(&format!("epochs/{first:010}-")), "keyed by epoch and incarnation: {keys:?}");

        // One node of three lost: epochs commit.
        tokio::task::block_in_place(|| g.kill(2))?;
        c.ask(Request::Checkpoint).await?;

        // Two lost: the record cannot be written; the epoch aborts, nothing rolls back.
        tokio::task::block_in_place(|| g.kill(1))?;
        let t = Instant::now();
        let err = c.ask(Request::Checkpoint).await.expect_err("no quorum, no commit");
        eprintln!("without a quorum the epoch aborted after {:?}: {err}", t.elapsed());
        let s = c.ask(Request::Status).await?;
        assert_eq!(s["figures"]["recoveries"], 0, "{s}");
        assert!(s["members"].as_array().is_some_and(|m| m.iter().all(|x| x["health"] == "up")), "{s}");

        // A node back: commits resume (the first tries may still meet a healing cluster).
        tokio::task::block_in_place(|| g.restart(1))?;
        let deadline = Instant::now() + Duration::from_secs(90);
        let resumed = loop {
            match c.ask(Request::Checkpoint).await {
                Ok(v) => break v["epoch"].as_u64().unwrap_or(0),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => anyhow::bail!("commits did not resume: {e}"),
            }
        };
        tokio::task::block_in_place(|| g.restart(2))?;
        // The aborted epoch left no record once the store could delete it.
        let keys = tokio::task::block_in_place(|| records(&g))?;
        assert!(keys.iter().any(|k| k.starts_with(&format!("epochs/{resumed:010}-"))), "{keys:?}");
        assert!(keys.len() <= 2, "only the kept records remain: {keys:?}");

        // The newest committed epoch restores from its record on Garage.
        let r = c.ask(Request::Restore { epoch: None }).await?;
        assert_eq!(r["epoch"].as_u64(), Some(resumed));
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_ok() {
        c.adopt().await?;
        let inv = c.check().await?;
        eprintln!("after restoring from Garage's record: {}", inv.detail);
        assert!(inv.ledger_ok && inv.journals_ok, "{}", inv.detail);
    }
    c.stop().await;
    result
}
