//! The output gate's QEMU filter-buffer backend against real guests: two guests stream
//! UDP and TCP to each other over a direct, lossless stream link and one of them is held.

use std::time::Duration;

use anyhow::Context;
use cutline_tests::stream::{self, counters, hold_and_check, wait_delivered, wait_flowing};
use cutline_tests::{Guest, GuestSpec, TestEnv};
use netfilter::{Bound, Bounds, FilterBufferConfig, FilterBufferError, Gate, GateError, GateState, ID_PREFIX, Refusal};
use serde_json::{Value, json};

const BOOT: Duration = Duration::from_secs(60);

/// Two streaming guests linked directly by a stream socket: 0 sends to 1 and 1 to 0.
async fn streaming_pair(env: &TestEnv, rate: u32) -> anyhow::Result<Vec<Guest>> {
    let link = stream::direct_link(&env.dir().join("link.sock"));
    let mut guests = Vec::new();
    for (i, netdev) in link.into_iter().enumerate() {
        let mut spec = GuestSpec::new(&format!("vm{i}"), &["stream"]).setting("srate", rate).setting("tbps", 16 * 1024);
        spec.id = i;
        spec.peers = 2;
        spec.netdev = Some(netdev);
        spec.extra_args = stream::large_rx_ring();
        guests.push(env.guest(&spec).await?);
    }
    for g in &guests {
        g.control().wait_from(0, "stream ready", |v| v["event"] == "ready" && v["mode"] == "stream", BOOT).await?;
    }
    Ok(guests)
}

fn config(env: &TestEnv) -> FilterBufferConfig {
    FilterBufferConfig::new(env.dir().join("gate"))
}

/// Ids of the gate's objects and chardevs still in QEMU.
async fn gate_objects(qmp: &qmp_client::Qmp) -> anyhow::Result<Vec<String>> {
    let objects = qmp.execute_raw("qom-list", json!({"path": "/objects"})).await?;
    let chardevs = qmp.execute_raw("query-chardev", json!({})).await?;
    let names = objects.as_array().into_iter().flatten().filter_map(|o| o["name"].as_str());
    let labels = chardevs.as_array().into_iter().flatten().filter_map(|c| c["label"].as_str());
    Ok(names.chain(labels).filter(|n| n.starts_with(ID_PREFIX)).map(str::to_owned).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_guest_reaches_nobody_then_everything_arrives_in_order() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guests = streaming_pair(&env, 200).await?;
    let gate = Gate::attach_qemu("vm0", guests[0].qmp().await?, &config(&env), Bounds::default()).await?;
    assert_eq!(gate.state(), GateState::Open);
    assert!(gate.release().await?.is_none(), "releasing an open gate is harmless");
    // A 2 s hold: TCP retransmits into the held queue and must survive it.
    let report = hold_and_check(&gate, &guests[0], &guests[1], Duration::from_secs(2)).await?;
    eprintln!("2 s hold: {report:?}");
    assert!(report.held_for >= Duration::from_secs(2));
    // And again, to see that a gate is reusable and counts each hold on its own.
    let second = hold_and_check(&gate, &guests[0], &guests[1], Duration::from_millis(500)).await?;
    assert_eq!(second.epoch, report.epoch + 1);
    let stats = gate.stats();
    assert_eq!((stats.holds, stats.forced_releases), (2, 0));
    // The peer's own traffic was never held.
    let back = counters(&guests[0]).await?;
    assert!(back.udp_received > 0 && back.tcp_bad == 0, "{back:?}");
    gate.detach().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounds_release_by_themselves_and_report() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guests = streaming_pair(&env, 100).await?;
    let base = wait_flowing(&guests[1], BOOT).await?;

    // Time bound.
    let bounds = Bounds { max_hold: Duration::from_millis(700), ..Bounds::default() };
    let gate = Gate::attach_qemu("vm0", guests[0].qmp().await?, &config(&env), bounds).await?;
    let mut breaches = gate.breaches();
    gate.hold().await?;
    tokio::time::timeout(Duration::from_secs(10), breaches.changed()).await.context("no breach")??;
    let breach = (*breaches.borrow_and_update()).context("breach")?;
    assert_eq!(breach.bound, Bound::Time);
    assert!(breach.held_for >= Duration::from_millis(700), "{breach:?}");
    assert_eq!(gate.state(), GateState::Open, "the bound released the gate");
    let report = gate.release().await?.context("the forced release is reported to release()")?;
    assert_eq!(report.breach, Some(breach));
    assert!(gate.release().await?.is_none(), "and only once");
    gate.detach().await?;

    // Packet bound: 100 datagrams/s plus TCP reach 50 packets well within the time bound.
    let bounds = Bounds { max_packets: 50, ..Bounds::default() };
    let gate = Gate::attach_qemu("vm0", guests[0].qmp().await?, &config(&env), bounds).await?;
    let mut breaches = gate.breaches();
    gate.hold().await?;
    tokio::time::timeout(Duration::from_secs(10), breaches.changed()).await.context("no breach")??;
    let breach = (*breaches.borrow_and_update()).context("breach")?;
    assert_eq!(breach.bound, Bound::Packets);
    assert!(breach.packets >= 50, "{breach:?}");
    let report = gate.release().await?.context("report")?;
    assert!(report.packets >= 50 && report.breach.is_some(), "{report:?}");
    assert_eq!(gate.stats().forced_releases, 1);

    // Byte bound.
    gate.detach().await?;
    let bounds = Bounds { max_bytes: 20_000, ..Bounds::default() };
    let gate = Gate::attach_qemu("vm0", guests[0].qmp().await?, &config(&env), bounds).await?;
    let mut breaches = gate.breaches();
    gate.hold().await?;
    tokio::time::timeout(Duration::from_secs(10), breaches.changed()).await.context("no breach")??;
    assert_eq!(breaches.borrow_and_update().map(|b| b.bound), Some(Bound::Bytes));

    // Nothing was lost through the forced releases.
    let sent = stream::stop(&guests[0]).await?;
    let got = wait_delivered(&guests[1], &sent, Duration::from_secs(30)).await?;
    assert_eq!(got.udp_missing, base.udp_missing);
    assert_eq!((got.udp_ooo, got.udp_dup, got.tcp_bad, got.tcp_resets), (0, 0, 0, 0), "{got:?}");
    gate.detach().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_process_finds_the_held_filters_again_and_detach_removes_them() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guests = streaming_pair(&env, 100).await?;
    let base = wait_flowing(&guests[1], BOOT).await?;
    let qmp = guests[0].qmp().await?;
    {
        let gate = Gate::attach_qemu("vm0", qmp.clone(), &config(&env), Bounds::default()).await?;
        gate.hold().await?;
        // The process driving the gate dies mid-hold: the filters stay, still holding.
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = counters(&guests[1]).await?;
    let gate = Gate::attach_qemu("vm0", qmp.clone(), &config(&env), Bounds::default()).await?;
    assert_eq!(gate.state(), GateState::Held, "the hold in progress is adopted");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counters(&guests[1]).await?.udp_received, held.udp_received, "still held");
    let report = gate.release().await?.context("report")?;
    assert!(report.adopted, "{report:?}");
    let sent = stream::stop(&guests[0]).await?;
    let got = wait_delivered(&guests[1], &sent, Duration::from_secs(30)).await?;
    assert_eq!(got.udp_missing, base.udp_missing, "{got:?}");
    assert_eq!((got.udp_ooo, got.udp_dup, got.tcp_resets), (0, 0, 0));

    // One process drives a guest's gate: a second live gate is refused and changes nothing.
    let err = Gate::attach_qemu("vm0", qmp.clone(), &config(&env), Bounds::default()).await.expect_err("busy");
    assert!(matches!(err, GateError::FilterBuffer(FilterBufferError::Busy { .. })), "{err:?}");
    assert_eq!(gate.state(), GateState::Open);
    let objects = gate_objects(&qmp).await?;
    assert_eq!(objects.len(), 3, "one buffer, one mirror, one chardev: {objects:?}");
    gate.detach().await?;
    assert!(gate_objects(&qmp).await?.is_empty(), "detach removes every object");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netdevs_netfilters_refuse_are_refused_at_attach() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let ns = cutline_tests::netns::NetNs::new()?;
    let tap = cutline_tests::netns::tap_name(0);
    // A multiqueue tap that QEMU creates; the guest never runs (-S), and the tap goes into
    // the test's namespace before anything could use it.
    let mut spec = GuestSpec::new("mq", &["idle"]);
    spec.netdev = Some(format!("tap,id=n0,ifname={tap},script=no,downscript=no,queues=2"));
    spec.extra_args = vec!["-S".into()];
    let guest = env.guest(&spec).await?;
    ns.adopt_tap(&tap)?;
    let qmp = guest.qmp().await?;
    let err = Gate::attach_qemu("mq", qmp.clone(), &config(&env), Bounds::default()).await.expect_err("refused");
    eprintln!("{err}: {:?}", std::error::Error::source(&err).map(ToString::to_string));
    assert!(
        matches!(err, GateError::FilterBuffer(FilterBufferError::Unsupported { why: Refusal::Multiqueue, .. })),
        "{err:?}"
    );
    assert!(gate_objects(&qmp).await?.is_empty(), "a refused attach leaves nothing behind");
    // Bounds QEMU's queue cannot honour are refused before anything is installed.
    let bounds = Bounds { max_packets: 10_000, ..Bounds::default() };
    let err = Gate::attach_qemu("mq", qmp.clone(), &config(&env), bounds).await.expect_err("bad bounds");
    assert!(matches!(err, GateError::Bounds(_)), "{err:?}");
    let _: Value = qmp.execute_raw("query-status", json!({})).await?;
    Ok(())
}
