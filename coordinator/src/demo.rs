//! `cutline demo`: one command that shows the whole job on this machine. Three guests
//! run the ledger and the journal on one virtual network; a coordinator and three
//! sidecars checkpoint them every 2 s; one guest is killed with SIGKILL; the cluster is
//! rolled back to its last committed epoch; the invariants are checked and the figures
//! printed. Everything it starts is stopped and removed at the end.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cutline_tests::{DiskSpec, TestEnv};
use serde_json::{Value, json};
use sidecar::proto::Request;

use crate::client;
use crate::server::{self, OutputCommit, Rollback};

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

const BALANCE: u64 = 1_000_000;
const T: Duration = Duration::from_secs(30);

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[(((s.len() - 1) as f64) * p).round() as usize]
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default()
}

/// Runs the demo; `Ok(true)` when every invariant held.
pub async fn run(cfg: DemoConfig) -> anyhow::Result<bool> {
    let say = |msg: &str| {
        if !cfg.json {
            eprintln!("demo: {msg}");
        }
    };
    let started = Instant::now();
    say("preparing the guest image (kernel, busybox, workload) and the accelerator");
    let env = TestEnv::new().await?;
    say(&format!(
        "booting {} guests (ledger + journal, 128 MiB, 16 MiB qcow2 disk each) under {}",
        cfg.guests,
        env.accel.as_arg()
    ));
    let (_switch, mut guests) = env
        .cluster(cfg.guests, &["ledger", "journal"], |mut s| {
            s.disks.push(DiskSpec::qcow2(16));
            s.setting("balance", BALANCE).setting("jrate", 20)
        })
        .await?;
    for g in &guests {
        g.control()
            .wait_from(0, "ledger ready", |v| v["event"] == "ready" && v["mode"] == "ledger", Duration::from_secs(90))
            .await?;
    }

    let state = env.dir().join("state");
    let mut scfg = server::Config::new(&state);
    scfg.interval = Some(cfg.interval);
    scfg.rollback = Rollback::Cluster;
    scfg.output_commit = OutputCommit::Release;
    let socket = scfg.socket.display().to_string();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let coordinator = tokio::spawn(server::run(scfg, stopped(stop_rx.clone())));
    let mut agents = Vec::new();
    for g in &guests {
        let acfg = sidecar::agent::Config {
            coordinator: sidecar::agent::Endpoint::Unix(state.join("cutline.sock")),
            token: None,
            cluster: "default".into(),
            name: g.name.clone(),
            qmp: g.qmp_path.clone(),
            store: env.dir().join("store"),
            bounds: netfilter::Bounds::default(),
        };
        agents.push(tokio::spawn(sidecar::agent::run(acfg, stopped(stop_rx.clone()))));
    }
    say(&format!("coordinator and {} sidecars started; checkpointing every {:?}", guests.len(), cfg.interval));

    let result = async {
        let status = wait_status(&socket, Duration::from_secs(60), |s| {
            s["members"].as_array().is_some_and(|m| m.len() == guests.len() && m.iter().all(|x| x["health"] == "up"))
        })
        .await?;
        let first = status["last_committed"].as_u64().unwrap_or(0);
        let target = first + cfg.epochs_before_failure;
        say(&format!("waiting for {} committed epochs", cfg.epochs_before_failure));
        wait_status(&socket, Duration::from_secs(120), |s| s["last_committed"].as_u64().unwrap_or(0) >= target).await?;

        let victim = fastrand_index(guests.len());
        let victim_name = guests[victim].name.clone();
        say(&format!("killing {victim_name} with SIGKILL"));
        let killed_at_ms = unix_ms();
        guests[victim].kill();
        let status = wait_status(&socket, Duration::from_secs(120), |s| {
            s["figures"]["recoveries"].as_array().is_some_and(|r| !r.is_empty())
                && s["now"] == "idle"
                && s["members"].as_array().is_some_and(|m| m.iter().all(|x| x["health"] == "up"))
        })
        .await?;
        let recovery = status["figures"]["recoveries"][0].clone();
        let detected_ms = status["figures"]["detections"][0]["at_unix_ms"].as_u64().unwrap_or(killed_at_ms);
        say(&format!("rolled back to epoch {} in {:.0} ms", recovery["epoch"], recovery["recovery_ms"].as_f64().unwrap_or(0.0)));

        // The restored guests are new QEMU processes: take charge of them.
        let mut restored = Vec::new();
        for g in &guests {
            let pid = status["members"]
                .as_array()
                .and_then(|m| m.iter().find(|x| x["name"] == g.name.as_str()))
                .and_then(|x| x["pid"].as_i64())
                .ok_or_else(|| anyhow::anyhow!("no pid for {}", g.name))?;
            restored.push(g.adopt(pid as i32).await?);
        }
        // Let the cluster trade and checkpoint a while longer, then check.
        tokio::time::sleep(cfg.interval * 2).await;
        say("checking the invariants");
        let mut total = 0;
        for g in &restored {
            g.control().request("quiesce", T).await?;
        }
        let mut balances = Vec::new();
        let mut journals = Vec::new();
        for g in &restored {
            let b = g.control().request("balance", T).await?;
            total += b["balance"].as_u64().unwrap_or(0);
            balances.push(json!({"vm": g.name, "balance": b["balance"], "sent": b["sent"], "received": b["received"]}));
            let c = g.control().request("check", T).await?;
            journals.push(json!({"vm": g.name, "ok": c["ok"], "count": c["count"], "disk_last": c["disk_last"]}));
        }
        for g in &restored {
            g.control().request("resume", T).await?;
        }
        let expected = BALANCE * guests.len() as u64;
        let ledger_ok = total == expected;
        let journals_ok = journals.iter().all(|j| j["ok"] == true);
        let status = client::ask(&socket, None, Request::Status).await?;
        let f = &status["figures"];
        let report = json!({
            "ok": ledger_ok && journals_ok,
            "invariants": {
                "ledger": {"ok": ledger_ok, "total": total, "expected": expected, "balances": balances},
                "journals": {"ok": journals_ok, "guests": journals},
            },
            "failure": {"vm": victim_name, "detection_ms": detected_ms.saturating_sub(killed_at_ms), "recovery": recovery},
            "figures": {
                "epochs_committed": status["last_committed"],
                "epochs_aborted": f["aborted"],
                "pause_ms": {"p50": pct(&floats(&f["pause_ms"]), 0.5), "max": pct(&floats(&f["pause_ms"]), 1.0)},
                "network_hold_ms": {"p50": pct(&floats(&f["hold_ms"]), 0.5), "p99": pct(&floats(&f["hold_ms"]), 0.99), "max": pct(&floats(&f["hold_ms"]), 1.0)},
                "commit_latency_ms": {"p50": pct(&floats(&f["commit_ms"]), 0.5), "max": pct(&floats(&f["commit_ms"]), 1.0)},
                "epoch_ms": {"p50": pct(&floats(&f["epoch_ms"]), 0.5)},
            },
            "wall_s": started.elapsed().as_secs_f64(),
        });
        Ok::<(Value, Vec<cutline_tests::Guest>), anyhow::Error>((report, restored))
    }
    .await;

    // Every QEMU the sidecars relaunched is the demo's to stop too.
    let relaunched: Vec<i32> = client::ask(&socket, None, Request::Status)
        .await
        .ok()
        .and_then(|s| {
            s["members"].as_array().map(|m| m.iter().filter_map(|x| x["pid"].as_i64()).map(|p| p as i32).collect())
        })
        .unwrap_or_default();
    let _ = stop_tx.send(true);
    for pid in relaunched {
        if !guests.iter().any(|g| g.pid() == pid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
    for a in agents {
        let _ = a.await;
    }
    let _ = coordinator.await;
    for g in guests.iter_mut() {
        g.kill();
    }
    let (report, restored) = result?;
    drop(restored);
    if cfg.json {
        println!("{report}");
    } else {
        print_report(&report);
    }
    Ok(report["ok"] == true)
}

fn fastrand_index(n: usize) -> usize {
    (unix_ms() as usize) % n.max(1)
}

async fn wait_status(socket: &str, timeout: Duration, mut pred: impl FnMut(&Value) -> bool) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = client::ask(socket, None, Request::Status).await
            && pred(&s)
        {
            return Ok(s);
        }
        if Instant::now() > deadline {
            let s = client::ask(socket, None, Request::Status).await.unwrap_or(Value::Null);
            anyhow::bail!("the cluster did not get there in {timeout:?}; status: {s}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
