//! Cluster figures for 1, 2 and 4 guests of 256 MiB (ledger + journal, a 16 MiB qcow2
//! disk each): per-VM pause and network hold (p50/p99) over 6 epochs, commit latency
//! beside a raw write+fsync of the same record size in the same directory (the
//! baseline, same run), failure detection time and recovery time (failure detected to
//! every guest running again from the last committed epoch).
//!
//! `cargo bench -p cutline-tests --bench cluster`

use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use coordinator::harness::{BALANCE, LocalCluster};
use cutline_tests::DiskSpec;
use sidecar::proto::Request;

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(((s.len() - 1) as f64) * p).round() as usize]
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Write `bytes` to a new file in `dir`, fsync it, rename it, fsync the directory: the
/// same steps as a commit record, without the protocol.
fn raw_commit(dir: &std::path::Path, bytes: usize) -> anyhow::Result<f64> {
    let data = vec![b'x'; bytes];
    let t = Instant::now();
    let tmp = dir.join(".raw.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join("raw.json"))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if std::env::var_os("CUTLINE_BENCH_STORES").is_some() {
        return stores().await;
    }
    println!(
        "{:>6} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12} {:>10} {:>10}",
        "guests",
        "pause p50/p99",
        "hold p50/p99",
        "commit p50",
        "raw fsync p50",
        "record B",
        "epoch p50",
        "detect ms",
        "recover ms"
    );
    for n in [1usize, 2, 4] {
        let mut c = LocalCluster::start(
            n,
            &["ledger", "journal"],
            |mut s| {
                s.memory_mib = 256;
                s.disks.push(DiskSpec::qcow2(16));
                s.setting("balance", BALANCE).setting("jrate", 20)
            },
            |_| {},
        )
        .await?;
        let result = async {
            for _ in 0..6 {
                c.ask(Request::Checkpoint).await?;
            }
            let list = c.ask(Request::List).await?;
            let record_bytes = serde_json::to_vec_pretty(&list["epochs"][0])?.len();
            let state = c.env.dir().join("state").join("default").join("epochs");
            let mut raw = Vec::new();
            for _ in 0..6 {
                raw.push(raw_commit(&state, record_bytes)?);
            }
            let _ = std::fs::remove_file(state.join("raw.json"));
            let victim = n - 1;
            let killed = unix_ms();
            c.guests[victim].kill();
            let s = c.wait_recovered(1, Duration::from_secs(180)).await?;
            let f = &s["figures"];
            let detect =
                f["recent"]["detections"]["last"][0]["at_unix_ms"].as_u64().unwrap_or(killed).saturating_sub(killed);
            let recover = f["recent"]["recoveries"]["last"][0]["recovery_ms"].as_f64().unwrap_or(f64::NAN);
            // The coordinator reports each figure's percentiles over its latest samples.
            let q = |k: &str, p: &str| f[k][p].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>6} {:>6.1}/{:<7.1} {:>6.1}/{:<7.1} {:>11.2} ms {:>11.2} ms {:>12} {:>9.0} ms {:>10} {:>10.0}",
                n,
                q("pause_ms", "p50"),
                q("pause_ms", "p99"),
                q("hold_ms", "p50"),
                q("hold_ms", "p99"),
                q("commit_ms", "p50"),
                pct(&raw, 0.5),
                record_bytes,
                q("epoch_ms", "p50"),
                detect,
                recover
            );
            Ok::<(), anyhow::Error>(())
        }
        .await;
        c.stop().await;
        result?;
    }
    println!(
        "pause/hold: ms per VM per epoch (6 epochs); commit: writing + fsyncing the epoch record (the commit point);"
    );
    println!("raw fsync: the same bytes written, fsynced, renamed, directory fsynced, same dir, same run;");
    println!(
        "detect: SIGKILL of the last guest to the coordinator's failure record; recover: failure to every guest running."
    );
    Ok(())
}

/// Commit latency and epoch time of 2 guests with the store local, then on a three-node
/// Garage (checkpoints and records), each beside its baseline in the same run: the same
/// record bytes written and fsynced locally, or put to the same Garage.
/// `CUTLINE_BENCH_STORES=1 cargo bench -p cutline-tests --bench cluster`
async fn stores() -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let g = tokio::task::block_in_place(|| cutline_tests::garage::Garage::start(&dir.path().join("garage")))?;
    println!("{:>8} {:>12} {:>14} {:>12}", "store", "commit p50", "baseline p50", "epoch p50");
    for on_garage in [false, true] {
        let location = g.location(0, "bench")?;
        let c = LocalCluster::start(
            2,
            &["ledger", "journal"],
            |mut s| {
                s.memory_mib = 256;
                s.disks.push(DiskSpec::qcow2(16));
                s.setting("balance", BALANCE).setting("jrate", 20)
            },
            |cfg| {
                if on_garage {
                    cfg.records = Some(location.clone());
                }
            },
        )
        .await?;
        let result = async {
            for _ in 0..6 {
                c.ask(Request::Checkpoint).await?;
            }
            let list = c.ask(Request::List).await?;
            let record = serde_json::to_vec_pretty(&list["epochs"][0])?;
            let mut base = Vec::new();
            for i in 0..6 {
                if on_garage {
                    let objects = cutline_objects::Objects::open(&location)?;
                    let t = Instant::now();
                    tokio::task::block_in_place(|| objects.put(&format!("raw/{i}"), &record))?;
                    base.push(t.elapsed().as_secs_f64() * 1000.0);
                } else {
                    base.push(raw_commit(&c.env.dir().join("state").join("default").join("epochs"), record.len())?);
                }
            }
            let _ = std::fs::remove_file(c.env.dir().join("state").join("default").join("epochs").join("raw.json"));
            let f = c.ask(Request::Status).await?["figures"].clone();
            let q = |k: &str| f[k]["p50"].as_f64().unwrap_or(f64::NAN);
            println!(
                "{:>8} {:>9.1} ms {:>11.1} ms {:>9.0} ms",
                if on_garage { "garage" } else { "local" },
                q("commit_ms"),
                pct(&base, 0.5),
                q("epoch_ms")
            );
            Ok::<(), anyhow::Error>(())
        }
        .await;
        c.stop().await;
        result?;
    }
    println!("commit: the record write (the commit point); epoch: prepare to commit, packs stored included");
    Ok(())
}
