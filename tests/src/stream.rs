//! The counters of the workload's `stream` mode, and the output-gate scenario the tests
//! run on every backend: hold a sender, check that nothing reaches its peer, release,
//! check that everything arrives once, in order, and that the TCP stream lived through it.

use std::time::Duration;

use anyhow::{Context, ensure};
use netfilter::{Gate, GateState, HoldOutcome, HoldReport};
use serde_json::Value;

use crate::{Guest, wait_until};

/// Timeout of a control request.
const T: Duration = Duration::from_secs(20);
/// Time for frames already past the gate when it closed to land.
const SETTLE: Duration = Duration::from_millis(300);
/// Ethernet + IPv4 + UDP headers around a stream datagram's 64-byte payload.
pub const DATAGRAM_FRAME: u64 = 14 + 20 + 8 + 64;

/// A guest's stream counters, from one status line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamCounters {
    /// UDP datagrams sent.
    pub udp_sent: u64,
    /// UDP datagrams received (distinct sequence numbers).
    pub udp_received: u64,
    /// Highest sequence number received.
    pub udp_highest: u64,
    /// Numbers below the highest never received.
    pub udp_missing: u64,
    /// Datagrams that filled a gap.
    pub udp_ooo: u64,
    /// Datagrams received twice.
    pub udp_dup: u64,
    /// TCP bytes sent.
    pub tcp_sent: u64,
    /// TCP bytes received.
    pub tcp_received: u64,
    /// TCP bytes that broke the pattern.
    pub tcp_bad: u64,
    /// Incoming TCP connections reset.
    pub tcp_resets: u64,
    /// Incoming TCP connections closed.
    pub tcp_closed: u64,
    /// Incoming TCP connections accepted.
    pub tcp_conns: u64,
    /// Outgoing TCP connections that failed.
    pub tcp_send_errors: u64,
}

impl StreamCounters {
    /// Reads the counters from a status line.
    pub fn from_status(v: &Value) -> StreamCounters {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        StreamCounters {
            udp_sent: n("udp_sent"),
            udp_received: n("udp_received"),
            udp_highest: n("udp_highest"),
            udp_missing: n("udp_missing"),
            udp_ooo: n("udp_ooo"),
            udp_dup: n("udp_dup"),
            tcp_sent: n("tcp_sent"),
            tcp_received: n("tcp_received"),
            tcp_bad: n("tcp_bad"),
            tcp_resets: n("tcp_resets"),
            tcp_closed: n("tcp_closed"),
            tcp_conns: n("tcp_conns"),
            tcp_send_errors: n("tcp_send_errors"),
        }
    }
}

/// `-netdev` arguments (id `n0`) that link two guests directly by a unix stream socket at
/// `path`: guest 0 listens, guest 1 connects (and retries until guest 0 is up). A stream
/// has back-pressure, so the link itself never drops a frame, even when a release lets a
/// burst go faster than the receiving guest takes it: any loss would be the gate's.
pub fn direct_link(path: &std::path::Path) -> [String; 2] {
    let p = path.display();
    [
        format!("stream,id=n0,server=on,addr.type=unix,addr.path={p}"),
        format!("stream,id=n0,server=off,addr.type=unix,addr.path={p},reconnect-ms=100"),
    ]
}

/// QEMU arguments that give the guest's virtio-net the largest receive ring (1024), so
/// that the burst of a released hold fits while the guest catches up.
pub fn large_rx_ring() -> Vec<String> {
    vec!["-global".into(), "virtio-net-pci.rx_queue_size=1024".into()]
}

/// The guest's stream counters now.
pub async fn counters(guest: &Guest) -> anyhow::Result<StreamCounters> {
    let v = guest.control().request("status", T).await?;
    Ok(StreamCounters::from_status(&v))
}

/// Stops the guest's senders; the counters returned are its final send counts.
pub async fn stop(guest: &Guest) -> anyhow::Result<StreamCounters> {
    let v = guest.control().request("stream-stop", T).await?;
    ensure!(v["event"] == "stream_stopped", "{}: {v}", guest.name);
    Ok(StreamCounters::from_status(&v))
}

/// Starts the guest's senders again.
pub async fn start(guest: &Guest) -> anyhow::Result<()> {
    let v = guest.control().request("stream-start", T).await?;
    ensure!(v["event"] == "stream_started", "{}: {v}", guest.name);
    Ok(())
}

/// Waits until `receiver` gets both UDP and TCP from its sender.
pub async fn wait_flowing(receiver: &Guest, timeout: Duration) -> anyhow::Result<StreamCounters> {
    wait_until(timeout, || async {
        let c = counters(receiver).await.ok()?;
        (c.udp_received > 20 && c.tcp_received > 4096).then_some(c)
    })
    .await
    .with_context(|| format!("no UDP and TCP stream reached {} within {timeout:?}", receiver.name))
}

/// Waits until `receiver` has every datagram and byte of `sent` (a sender's final counts).
pub async fn wait_delivered(
    receiver: &Guest,
    sent: &StreamCounters,
    timeout: Duration,
) -> anyhow::Result<StreamCounters> {
    let last = std::sync::Mutex::new(StreamCounters::default());
    let got = wait_until(timeout, || async {
        let c = counters(receiver).await.ok()?;
        *last.lock().unwrap_or_else(|e| e.into_inner()) = c.clone();
        (c.udp_highest >= sent.udp_sent && c.tcp_received >= sent.tcp_sent).then_some(c)
    })
    .await;
    let last = last.into_inner().unwrap_or_else(|e| e.into_inner());
    got.with_context(|| format!("{} did not receive everything: sent {sent:?}, received {last:?}", receiver.name))
}

/// The scenario every backend must pass. `sender` streams to `receiver` through `gate`:
/// while held for `hold`, nothing of the sender reaches the receiver; after release every
/// datagram arrives, once, in order, the TCP stream carries on without a reset, and the
/// gate counted at least the datagrams it held. Returns the gate's report.
pub async fn hold_and_check(
    gate: &Gate,
    sender: &Guest,
    receiver: &Guest,
    hold: Duration,
) -> anyhow::Result<HoldReport> {
    let base = wait_flowing(receiver, Duration::from_secs(60)).await?;
    let sender_base = counters(sender).await?;

    let outcome = gate.hold().await?;
    ensure!(matches!(outcome, HoldOutcome::Started { .. }), "{outcome:?}");
    ensure!(gate.state() == GateState::Held);
    ensure!(matches!(gate.hold().await?, HoldOutcome::AlreadyHeld { .. }), "a second hold changes nothing");
    tokio::time::sleep(SETTLE).await;
    let at_hold = counters(receiver).await?;
    // Every datagram the sender sends from here on passes the held gate.
    let sender_at_hold = counters(sender).await?;
    tokio::time::sleep(hold).await;
    // Stop sending while still held, so that the sender's counts are final.
    let sent = stop(sender).await?;
    tokio::time::sleep(SETTLE).await;
    let during = counters(receiver).await?;
    ensure!(
        during.udp_received == at_hold.udp_received && during.tcp_received == at_hold.tcp_received,
        "packets of the held guest reached its peer: {at_hold:?} then {during:?}"
    );
    ensure!(sent.udp_sent > sender_base.udp_sent + 10, "the sender barely sent while held: {sent:?}");
    // A lower bound of what the gate holds: what the sender sent once the hold was in
    // place. (Sent minus received overcounts: a receiver stalled by a loaded machine may
    // still have datagrams from before the hold unread in its socket buffer.)
    let held_udp = sent.udp_sent - sender_at_hold.udp_sent;
    ensure!(held_udp >= 10, "the sender barely sent once held: {sender_at_hold:?} then {sent:?}");
    // Datagrams the guest's sendto() counted may still sit in its own transmit queue (a
    // TCG guest on a loaded machine drains it slowly): every one reaches the gate in time.
    let counted = wait_until(Duration::from_secs(5), || async {
        let stats = gate.stats();
        (stats.packets >= held_udp).then_some(stats)
    })
    .await;
    let stats = gate.stats();
    ensure!(stats.state == GateState::Held && counted.is_some(), "{stats:?}, {held_udp} datagrams held");
    let during = counters(receiver).await?;
    ensure!(
        during.udp_received == at_hold.udp_received && during.tcp_received == at_hold.tcp_received,
        "packets of the held guest reached its peer: {at_hold:?} then {during:?}"
    );

    let report = gate.release().await?.context("release of a held gate gives a report")?;
    ensure!(gate.state() == GateState::Open);
    ensure!(gate.release().await?.is_none(), "a second release changes nothing");
    ensure!(report.breach.is_none(), "{report:?}");
    ensure!(report.dropped == 0, "{report:?}");
    ensure!(report.packets >= held_udp, "gate counted {} packets, {held_udp} datagrams were held", report.packets);
    ensure!(report.bytes >= held_udp * DATAGRAM_FRAME, "{report:?}");

    let after = wait_delivered(receiver, &sent, Duration::from_secs(30)).await?;
    ensure!(after.udp_received == base.udp_received + (sent.udp_sent - base.udp_highest), "{base:?} {after:?}");
    ensure!(after.udp_highest == sent.udp_sent, "{after:?}");
    ensure!(after.udp_missing == base.udp_missing, "datagrams lost: {base:?} then {after:?}");
    ensure!(after.udp_ooo == base.udp_ooo && after.udp_dup == base.udp_dup, "order broken: {base:?} then {after:?}");
    ensure!(after.tcp_received == sent.tcp_sent, "{sent:?} {after:?}");
    ensure!(after.tcp_bad == 0 && after.tcp_resets == 0 && after.tcp_closed == 0, "TCP broke: {after:?}");
    ensure!(after.tcp_conns == base.tcp_conns && sent.tcp_send_errors == sender_base.tcp_send_errors, "{after:?}");

    start(sender).await?;
    wait_until(Duration::from_secs(30), || async {
        counters(receiver).await.ok().filter(|c| c.tcp_received > after.tcp_received + 4096)
    })
    .await
    .context("the TCP stream did not carry on after the release")?;
    tracing::info!(?report, held_udp, "hold scenario passed");
    Ok(report)
}
