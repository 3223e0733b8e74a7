//! `cutline demo`: one command that shows the whole job on this machine. Three guests
//! run the ledger and the journal on one virtual network; a coordinator and three
//! sidecars checkpoint them every 2 s; one guest is killed with SIGKILL; the cluster is
//! rolled back to its last committed epoch; the invariants are checked and the figures
//! printed. Everything it starts is stopped and removed at the end.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutline_tests::DiskSpec;
use serde_json::{Value, json};
use sidecar::proto::Request;

use crate::harness::{BALANCE, LocalCluster};
use crate::server::{OutputCommit, Rollback};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// Number of guests.
    pub guests: usize,
    /// Checkpoint interval.
    pub interval: Duration,
    /// Committed epochs before the failure.
    pub epochs_before_failure: u64,
    /// Print JSON instead of text.
    pub json: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig { guests: 3, interval: Duration::from_secs(2), epochs_before_failure: 3, json: false }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Runs the demo; `Ok(true)` when every invariant held.
pub async fn run(cfg: DemoConfig) -> anyhow::Result<bool> {
    let say = |msg: &str| {
        if !cfg.json {
            eprintln!("demo: {msg}");
        }
    };
    let started = Instant::now();
    say(&format!(
        "preparing the guest image, booting {} guests (ledger + journal, 128 MiB, 16 MiB qcow2 disk each), starting the coordinator and the sidecars",
        cfg.guests
    ));
    let interval = cfg.interval;
    let mut cluster = LocalCluster::start(
        cfg.guests,
        &["ledger", "journal"],
        |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        },
        |c| {
            c.interval = Some(interval);
            c.rollback = Rollback::Cluster;
            c.output_commit = OutputCommit::Release;
        },
    )
    .await?;
    say(&format!("running under {}; checkpointing every {:?}", cluster.env.accel.as_arg(), cfg.interval));
    let result = scenario(&cfg, &mut cluster, &say, started).await;
    cluster.stop().await;
    let report = result?;
    if cfg.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    Ok(report["ok"] == true)
}

async fn scenario(
    cfg: &DemoConfig,
    cluster: &mut LocalCluster,
    say: &dyn Fn(&str),
    started: Instant,
) -> anyhow::Result<Value> {
    say(&format!("waiting for {} committed epochs", cfg.epochs_before_failure));
    cluster.wait_epochs(cfg.epochs_before_failure, Duration::from_secs(120)).await?;
    let victim = fastrand_index(cluster.guests.len());
    let victim_name = cluster.guests[victim].name.clone();
    say(&format!("killing {victim_name} with SIGKILL"));
    let killed_at_ms = unix_ms();
    cluster.guests[victim].kill();
    let status = cluster.wait_recovered(1, Duration::from_secs(120)).await?;
    let recent = &status["figures"]["recent"];
    let recovery = recent["recoveries"]["last"][0].clone();
    let detected_ms = recent["detections"]["last"][0]["at_unix_ms"].as_u64().unwrap_or(killed_at_ms);
    say(&format!(
        "rolled back to epoch {} in {:.0} ms",
        recovery["epoch"],
        recovery["recovery_ms"].as_f64().unwrap_or(0.0)
    ));
    cluster.adopt().await?;
    // Let the cluster trade and checkpoint a while longer, then check.
    tokio::time::sleep(cfg.interval * 2).await;
    say("checking the invariants");
    let inv = cluster.check().await?;
    let status = cluster.ask(Request::Status).await?;
    let f = &status["figures"];
    Ok(json!({
        "ok": inv.ledger_ok && inv.journals_ok,
        "invariants": inv.detail,
        "failure": {"vm": victim_name, "detection_ms": detected_ms.saturating_sub(killed_at_ms), "recovery": recovery},
        "figures": {
            "epochs_committed": f["epochs_committed"],
            "epochs_aborted": f["epochs_aborted"],
            "pause_ms": f["pause_ms"],
            "network_hold_ms": f["hold_ms"],
            "commit_latency_ms": f["commit_ms"],
            "epoch_ms": f["epoch_ms"],
        },
        "wall_s": started.elapsed().as_secs_f64(),
    }))
}

fn fastrand_index(n: usize) -> usize {
    (unix_ms() as usize) % n.max(1)
}

fn print_report(r: &Value) {
    let inv = &r["invariants"];
    let mark = |ok: &Value| if *ok == true { "held" } else { "BROKEN" };
    println!("cutline demo: {}", if r["ok"] == true { "every invariant held" } else { "AN INVARIANT BROKE" });
    println!(
        "  ledger total conserved: {} (total {}, expected {})",
        mark(&inv["ledger"]["ok"]),
        inv["ledger"]["total"],
        inv["ledger"]["expected"]
    );
    for j in inv["journals"]["guests"].as_array().into_iter().flatten() {
        println!(
            "  journal of {}: {} (count {}, last record on disk {})",
            j["vm"].as_str().unwrap_or(""),
            mark(&j["ok"]),
            j["count"],
            j["disk_last"]
        );
    }
    let f = &r["figures"];
    let fail = &r["failure"];
    println!(
        "  failure: {} killed with SIGKILL; detected in {} ms; cluster rolled back to epoch {} and running again in {:.0} ms",
        fail["vm"].as_str().unwrap_or(""),
        fail["detection_ms"],
        fail["recovery"]["epoch"],
        fail["recovery"]["recovery_ms"].as_f64().unwrap_or(0.0)
    );
    println!("  epochs committed: {}, aborted: {}", f["epochs_committed"], f["epochs_aborted"]);
    println!(
        "  guest pause per checkpoint: p50 {:.1} ms, max {:.1} ms",
        f["pause_ms"]["p50"].as_f64().unwrap_or(0.0),
        f["pause_ms"]["max"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  network hold per VM: p50 {:.1} ms, p99 {:.1} ms",
        f["network_hold_ms"]["p50"].as_f64().unwrap_or(0.0),
        f["network_hold_ms"]["p99"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  commit latency (record written and fsynced): p50 {:.2} ms",
        f["commit_latency_ms"]["p50"].as_f64().unwrap_or(0.0)
    );
    println!("  whole demo: {:.0} s", r["wall_s"].as_f64().unwrap_or(0.0));
}
