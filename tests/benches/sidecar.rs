//! Sidecar figures for a 256 MiB guest, each beside a baseline from the same run:
//! background-snapshot vs stop-and-copy pause; bytes stored per incremental checkpoint
//! (idle, and a dirtier rewriting 32 MiB); checkpoint write throughput vs the raw
//! fsync'd write bandwidth of the same disk; restore time vs a cold boot.
//!
//! `cargo bench -p cutline-tests --bench sidecar`

use std::io::Write;
use std::time::{Duration, Instant};

use cutline_tests::{DiskSpec, GuestSpec, TestEnv};
use sidecar::checkpoint::{self, Options};
use sidecar::restore;
use sidecar::store::{Manifest, Store};

const MIB: f64 = 1048576.0;
const BOOT: Duration = Duration::from_secs(60);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn take(qmp: &qmp_client::Qmp, store: &Store, name: &str, opts: &Options) -> anyhow::Result<Manifest> {
    Ok(checkpoint::checkpoint(qmp, store, name, opts, &mut |_| {}).await?)
}

/// Raw sequential write of `bytes` into `dir` followed by fsync, in bytes per second.
fn raw_write_bandwidth(dir: &std::path::Path, bytes: usize) -> anyhow::Result<f64> {
    let path = dir.join("raw-bandwidth");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path)?;
    for _ in 0..bytes / chunk.len() {
        f.write_all(&chunk)?;
    }
    f.sync_all()?;
    let bps = bytes as f64 / t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(bps)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    println!("accelerator: {}; guests: 256 MiB, 1 vCPU, one 64 MiB qcow2 disk", env.accel.as_arg());
    let store = Store::open(&env.dir().join("store"))?;

    // 1. Pause: both modes on the same idle guest, interleaved.
    let mut spec = GuestSpec::new("idle", &["idle"]);
    spec.memory_mib = 256;
    spec.disks.push(DiskSpec::qcow2(64));
    let boot_started = Instant::now();
    let mut idle = env.guest(&spec).await?;
    idle.control().wait_event("start", BOOT).await?;
    let cold_boot = boot_started.elapsed();
    let qmp = idle.qmp().await?;
    let first = take(&qmp, &store, "idle", &Options::default()).await?;
    let (mut bg, mut sc) = (Vec::new(), Vec::new());
    let mut idle_incremental = Vec::new();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = take(&qmp, &store, "idle", &Options::default()).await?;
        bg.push(m.timings.pause_ms);
        idle_incremental.push(m.bytes_stored as f64);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = take(&qmp, &store, "idle", &Options { stop_and_copy: true, ..Options::default() }).await?;
        sc.push(m.timings.pause_ms);
    }
    println!("\nguest pause per checkpoint (QEMU STOP->RESUME timestamps), 5 each, interleaved:");
    println!("  {:<24} {:>10} {:>10}", "", "median ms", "max ms");
    let (bgm, scm) = (median(bg.clone()), median(sc.clone()));
    println!("  {:<24} {:>10.1} {:>10.1}", "background-snapshot", bgm, bg.iter().copied().fold(0.0, f64::max));
    println!("  {:<24} {:>10.1} {:>10.1}", "stop-and-copy (baseline)", scm, sc.iter().copied().fold(0.0, f64::max));
    println!("  {:<24} {:>10.3}", "ratio", bgm / scm);

    // 2. Bytes stored per incremental checkpoint.
    let ram = first.ram_bytes as f64;
    let idle_med = median(idle_incremental);
    println!("\nbytes stored per checkpoint (RAM {:.0} MiB):", ram / MIB);
    println!(
        "  first (full) checkpoint, idle guest:   {:>8.1} MiB ({:.1}% of RAM)",
        first.bytes_stored as f64 / MIB,
        100.0 * first.bytes_stored as f64 / ram
    );
    println!(
        "  incremental, idle guest (median of 5): {:>8.2} MiB ({:.2}% of RAM; target <= 5%)",
        idle_med / MIB,
        100.0 * idle_med / ram
    );

    // 3. Throughput of the first checkpoint vs raw fsync'd writes to the same disk.
    let ckpt_bps = first.bytes_stored as f64 / (first.timings.duration_ms / 1000.0);
    let raw_bps = raw_write_bandwidth(store.root(), 256 << 20)?;
    println!("\nwrite throughput into the store's disk:");
    println!("  first checkpoint (bytes stored / checkpoint duration): {:>7.1} MiB/s", ckpt_bps / MIB);
    println!("  raw sequential write + fsync, 256 MiB (baseline):      {:>7.1} MiB/s", raw_bps / MIB);
    println!("  ratio:                                                 {:>7.2}", ckpt_bps / raw_bps);
    drop(qmp);

    // 4. Restore vs cold boot.
    idle.kill();
    let mut restores = Vec::new();
    let mut downtimes = Vec::new();
    for _ in 0..3 {
        let r = restore::restore(&store, "idle", Some(first.id), false, &mut |_| {}).await?;
        restores.push(r.duration_ms);
        downtimes.push(r.downtime_ms);
        let restored = idle.adopt(r.pid).await?;
        restored.control().request("status", Duration::from_secs(30)).await?;
        drop(restored);
    }
    let rm = median(restores);
    println!("\nrestore of the first checkpoint (3 runs, every block verified):");
    println!("  restore, whole (verify + rebuild disk + relaunch + load): {:>7.0} ms median", rm);
    println!("  of which the old guest is down (relaunch + load):         {:>7.0} ms median", median(downtimes));
    println!(
        "  cold boot to workload start (baseline):                   {:>7.0} ms",
        cold_boot.as_secs_f64() * 1000.0
    );
    println!(
        "  ratio restore/cold boot:                                  {:>7.2}",
        rm / (cold_boot.as_secs_f64() * 1000.0)
    );

    // 2b. Dirtier rewriting 32 MiB between checkpoints.
    let mut spec = GuestSpec::new("dirtier", &["dirtier"]).setting("mib", 32).setting("mibps", 32);
    spec.memory_mib = 256;
    let dirtier = env.guest(&spec).await?;
    dirtier.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let qmp = dirtier.qmp().await?;
    take(&qmp, &store, "dirtier", &Options::default()).await?;
    let mut stored = Vec::new();
    let mut rewritten = Vec::new();
    for _ in 0..3 {
        let a = dirtier.control().request("status", Duration::from_secs(30)).await?;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let m = take(&qmp, &store, "dirtier", &Options::default()).await?;
        let b = dirtier.control().request("status", Duration::from_secs(30)).await?;
        let wrote = b["bytes"].as_u64().unwrap_or(0).saturating_sub(a["bytes"].as_u64().unwrap_or(0));
        rewritten.push(wrote as f64);
        stored.push(m.bytes_stored as f64);
    }
    let s = median(stored);
    println!(
        "  incremental, dirtier rewriting its 32 MiB (median of 3): {:>6.1} MiB stored; bound 1.3 x 32 MiB + 5% RAM = {:.1} MiB (it wrote {:.0} MiB meanwhile)",
        s / MIB,
        (1.3 * 32.0 * MIB + 0.05 * ram) / MIB,
        median(rewritten) / MIB
    );
    Ok(())
}
