//! Background snapshots into mapped-ram files against real QEMU (10.0 leaves their page
//! bitmaps empty; the sidecar repairs them): checkpoints of running guests restore with
//! the ledger and journal invariants held, and a guest rewriting N MiB between two
//! checkpoints stores about N MiB, where the sequential stream stores more.

use std::time::Duration;

use cutline_tests::{DiskSpec, Guest, GuestSpec, TestEnv, oracle};
use serde_json::Value;
use sidecar::checkpoint::{self, Options};
use sidecar::restore;
use sidecar::store::{Manifest, Store};

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);
const BALANCE: u64 = 1_000_000;

async fn take(g: &Guest, store: &Store, opts: &Options) -> anyhow::Result<Manifest> {
    let qmp = g.qmp().await?;
    Ok(checkpoint::checkpoint(&qmp, store, &g.name, opts, &mut |m| eprintln!("  {}: {m}", g.name)).await?)
}

fn assert_background_mapped(m: &Manifest) {
    assert_eq!(m.mode, "background-snapshot", "{:?}", m.mode_reason);
    assert_eq!(m.memory.layout, "mapped-ram", "QEMU 10 supports mapped-ram");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_and_journal_guests_restore_from_background_mapped_ram_checkpoints() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let (_switch, mut guests) = env
        .cluster(2, &["ledger", "journal"], |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 50)
        })
        .await?;
    for g in &guests {
        for mode in ["ledger", "journal"] {
            g.control().wait_from(0, mode, |v| v["event"] == "ready" && v["mode"] == mode, BOOT).await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Independent checkpoints of the two guests hold a consistent ledger only with no
    // transfer in flight: quiesce, cut both, resume.
    let mut ids = Vec::new();
    for round in 0..2 {
        for g in &guests {
            g.control().request("quiesce", T).await?;
        }
        let mut taken = Vec::new();
        for g in &guests {
            let m = take(g, &store, &Options::default()).await?;
            assert_background_mapped(&m);
            eprintln!(
                "{} checkpoint {}: pause {:.1} ms, memory {} MiB file, {} KiB new",
                g.name,
                m.id,
                m.timings.pause_ms,
                m.memory.bytes >> 20,
                m.memory.bytes_stored >> 10
            );
            taken.push(m.id);
        }
        for g in &guests {
            g.control().request("resume", T).await?;
        }
        ids.push(taken);
        if round == 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let before = oracle::check(&guests, BALANCE).await?;
    assert!(before.ok(), "before restore: {}", before.detail);

    // Restore the first round (the guests went on past it) and check the oracles.
    for g in &mut guests {
        g.kill();
    }
    let mut restored = Vec::new();
    for (g, id) in guests.iter().zip(&ids[0]) {
        let r = restore::restore(&store, &g.name, Some(*id), false, &mut |m| eprintln!("  {}: {m}", g.name)).await?;
        eprintln!("{} restored checkpoint {id} in {:.0} ms", g.name, r.duration_ms);
        restored.push(g.adopt(r.pid).await?);
    }
    let after = oracle::check(&restored, BALANCE).await?;
    eprintln!("after restoring round 0: {}", after.detail);
    assert!(after.ledger_ok, "ledger total not conserved after restore: {}", after.detail);
    assert!(after.journals_ok, "journal memory and disk disagree after restore: {}", after.detail);
    // The restored guests run on: transfers and journal entries continue.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = oracle::check(&restored, BALANCE).await?;
    assert!(later.ok(), "after running on: {}", later.detail);
    Ok(())
}

/// Takes two checkpoints with `opts`, waiting between them until the dirtier has
/// rewritten its whole buffer at least once; returns the second.
async fn rewrite_between(g: &Guest, store: &Store, opts: &Options) -> anyhow::Result<Manifest> {
    take(g, store, opts).await?;
    let pass = |v: &Value| v["pass"].as_u64().unwrap_or(0);
    let start = pass(&g.control().request("status", T).await?);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pass(&g.control().request("status", T).await?) < start + 1 {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the dirtier made no pass in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    take(g, store, opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_n_mib_stores_about_n_mib_with_mapped_ram() -> anyhow::Result<()> {
    const MIB: u64 = 8;
    let env = TestEnv::new().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let spec = GuestSpec::new("dirtier", &["dirtier"]).setting("mib", MIB).setting("mibps", 8);
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "dirtier", |v| v["event"] == "ready" && v["mode"] == "dirtier", BOOT).await?;

    let mapped = rewrite_between(&guest, &store, &Options::default()).await?;
    assert_background_mapped(&mapped);
    let stream = rewrite_between(&guest, &store, &Options { stream_memory: true, ..Options::default() }).await?;
    assert_eq!((stream.mode.as_str(), stream.memory.layout.as_str()), ("background-snapshot", "stream"));
    let ram = mapped.ram_bytes;
    eprintln!(
        "FIGURE: guest rewrote its {MIB} MiB buffer between two background checkpoints of {} MiB RAM: \
         mapped-ram stored {:.1} MiB, stream stored {:.1} MiB",
        ram >> 20,
        mapped.memory.bytes_stored as f64 / 1048576.0,
        stream.memory.bytes_stored as f64 / 1048576.0
    );
    // Pages at fixed offsets: the rewritten buffer, what the guest's kernel touched, and
    // the device state; as for stop-and-copy, at most 1.3 x N plus 5% of RAM.
    let bound = 13 * (MIB << 20) / 10 + ram / 20;
    assert!(
        mapped.memory.bytes_stored < bound,
        "mapped-ram stored {} bytes (bound {bound})",
        mapped.memory.bytes_stored
    );
    assert!(
        mapped.memory.bytes_stored >= MIB << 20,
        "the rewritten buffer is new content: {}",
        mapped.memory.bytes_stored
    );

    // The second mapped-ram checkpoint restores: the dirtier goes on from where it was.
    let before = guest.control().request("status", T).await?;
    guest.kill();
    let r = restore::restore(&store, &guest.name, Some(mapped.id), false, &mut |m| eprintln!("  {m}")).await?;
    let restored = guest.adopt(r.pid).await?;
    let now = restored.control().request("status", T).await?;
    eprintln!("dirtier after restoring checkpoint {}: {now} (before the kill: {before})", mapped.id);
    assert!(now["pass"].as_u64() >= Some(1), "{now}");
    Ok(())
}
