//! The sidecar against real QEMU: point-in-time checkpoints that restore consistently.

use std::time::Duration;

use cutline_tests::{DiskSpec, Guest, GuestSpec, TestEnv};
use serde_json::Value;
use sidecar::checkpoint::{self, Options};
use sidecar::restore;
use sidecar::store::Store;

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

async fn ready(g: &Guest, mode: &str) -> anyhow::Result<Value> {
    Ok(g.control().wait_from(0, mode, |v| v["event"] == "ready" && v["mode"] == mode, BOOT).await?)
}

async fn take(g: &Guest, store: &Store, opts: &Options) -> anyhow::Result<sidecar::store::Manifest> {
    let qmp = g.qmp().await?;
    Ok(checkpoint::checkpoint(&qmp, store, &g.name, opts, &mut |m| eprintln!("  {m}")).await?)
}

async fn restore_and_adopt(
    g: &Guest,
    store: &Store,
    id: u64,
    paused: bool,
) -> anyhow::Result<(Guest, restore::Report)> {
    let r = restore::restore(store, &g.name, Some(id), paused, &mut |m| eprintln!("  {m}")).await?;
    Ok((g.adopt(r.pid).await?, r))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_guest_restores_consistently_from_every_checkpoint() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let mut spec = GuestSpec::new("journal", &["journal"]).setting("jrate", 100);
    spec.disks.push(DiskSpec::qcow2(32));
    let mut guest = env.guest(&spec).await?;
    ready(&guest, "journal").await?;
    let mut ids = Vec::new();
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let m = take(&guest, &store, &Options::default()).await?;
        eprintln!(
            "checkpoint {}: mode {}, pause {:.1} ms, stored {} KiB",
            m.id,
            m.mode,
            m.timings.pause_ms,
            m.bytes_stored >> 10
        );
        assert_eq!(m.mode, "background-snapshot", "{:?}", m.mode_reason);
        assert_eq!(m.disks.len(), 1);
        assert_eq!(m.disks[0].full, i == 0, "first copy full, later ones incremental: {:?}", m.disks[0].full_reason);
        ids.push(m.id);
    }
    // The journal keeps running after the checkpoints.
    let c = guest.control().request("check", T).await?;
    assert_eq!(c["ok"], true, "{c}");
    guest.kill();

    let mut last_count = 0;
    for id in ids {
        let (restored, r) = restore_and_adopt(&guest, &store, id, false).await?;
        let c = restored.control().request("check", T).await?;
        eprintln!("restored checkpoint {id} in {:.0} ms: {c}", r.duration_ms);
        assert_eq!(c["ok"], true, "journal memory and disk disagree after restoring checkpoint {id}: {c}");
        let count = c["count"].as_u64().unwrap_or(0);
        assert!(count > last_count, "checkpoint {id} restored an older journal ({count} <= {last_count})");
        last_count = count;
        drop(restored);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirtier_resumes_where_it_was_and_incremental_memory_is_small() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let spec = GuestSpec::new("dirtier", &["dirtier"]).setting("mib", 8).setting("mibps", 4);
    let mut guest = env.guest(&spec).await?;
    ready(&guest, "dirtier").await?;
    let first = take(&guest, &store, &Options::default()).await?;
    let before = guest.control().request("status", T).await?;
    let m = take(&guest, &store, &Options::default()).await?;
    let after = guest.control().request("status", T).await?;
    let ram = m.ram_bytes;
    eprintln!(
        "first checkpoint stored {} KiB, second {} KiB of {} MiB RAM",
        first.bytes_stored >> 10,
        m.memory.bytes_stored >> 10,
        ram >> 20
    );
    // A loose bound: with mapped-ram (tests/tests/mapped_ram.rs has the tight one) or with
    // the stream, whose content-defined chunks break around pages saved out of order.
    assert!(m.memory.bytes_stored < ram / 4, "the second checkpoint stored {} bytes", m.memory.bytes_stored);
    // Stop-and-copy writes mapped-ram (pages at fixed offsets): the dirtier rewrites its
    // 8 MiB buffer, so at most 1.3 x 8 MiB plus 5% of RAM is new.
    let sc = Options { stop_and_copy: true, ..Options::default() };
    take(&guest, &store, &sc).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m2 = take(&guest, &store, &sc).await?;
    assert_eq!(m2.memory.layout, "mapped-ram");
    let bound = 13 * (8 << 20) / 10 + ram / 20;
    eprintln!("stop-and-copy incremental stored {} KiB (bound {} KiB)", m2.memory.bytes_stored >> 10, bound >> 10);
    assert!(m2.memory.bytes_stored < bound, "stop-and-copy stored {} bytes (bound {bound})", m2.memory.bytes_stored);
    guest.kill();
    let (restored, _) = restore_and_adopt(&guest, &store, m.id, false).await?;
    let now = restored.control().request("status", T).await?;
    let bytes = |v: &Value| v["bytes"].as_u64().unwrap_or(0);
    eprintln!("dirtier bytes: before {} after {} restored {}", bytes(&before), bytes(&after), bytes(&now));
    assert!(bytes(&now) >= bytes(&before), "the restored dirtier went back before the checkpoint");
    assert!(bytes(&now) > 0 && now["pass"].as_u64() >= before["pass"].as_u64(), "{now}");
    Ok(())
}

fn raw_copy(src: &std::path::Path, dst: &std::path::Path) -> anyhow::Result<()> {
    let out = std::process::Command::new("qemu-img").args(["convert", "-U", "-O", "raw"]).arg(src).arg(dst).output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restoring_the_same_checkpoint_twice_gives_identical_state() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let mut spec = GuestSpec::new("twice", &["journal"]);
    spec.disks.push(DiskSpec::qcow2(16));
    let mut guest = env.guest(&spec).await?;
    ready(&guest, "journal").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m = take(&guest, &store, &Options::default()).await?;
    guest.kill();
    // The kernel and initrd the command line names are stored once, by hash, and
    // rebuild byte for byte (what a relaunch on another host would need).
    let roles: Vec<&str> = m.bases.iter().map(|b| b.role.as_str()).collect();
    assert_eq!(roles, ["kernel", "initrd"], "{:?}", m.bases);
    store.blocks().load(&m.packs)?;
    for b in &m.bases {
        let copy = env.dir().join(format!("base-{}", b.role));
        store.restore_base(b, &copy)?;
        assert!(std::fs::read(&copy)? == std::fs::read(&b.path)?, "{} rebuilt differently", b.path);
    }
    let mut images = Vec::new();
    for round in 0..2 {
        let (restored, _) = restore_and_adopt(&guest, &store, m.id, true).await?;
        let qmp = restored.qmp().await?;
        let ram = env.dir().join(format!("ram-{round}"));
        qmp.execute_raw("pmemsave", serde_json::json!({"val": 0, "size": m.ram_bytes, "filename": ram})).await?;
        let disk = env.dir().join(format!("disk-{round}.raw"));
        raw_copy(&guest.dir.join("disk0.qcow2"), &disk)?;
        images.push((std::fs::read(&ram)?, std::fs::read(&disk)?));
        drop(qmp);
        drop(restored);
    }
    assert!(images[0].0 == images[1].0, "guest RAM differs between two restores of checkpoint {}", m.id);
    assert!(images[0].1 == images[1].1, "disk differs between two restores of checkpoint {}", m.id);
    Ok(())
}
