//! Output-gate figures (QEMU filter-buffer backend): hold and release latency over 1000
//! cycles, and the extra latency a held packet sees beyond the hold itself, beside a
//! baseline from the same run: a QMP round trip (`qom-get` of the buffer's status) on the
//! same connection, the floor of anything QEMU does on command.
//!
//! Guest 0 sends 1000 sequence-numbered UDP datagrams per second to guest 1 through a
//! two-port relay of this bench that timestamps each datagram as it leaves guest 0's
//! netdev; a held datagram's extra latency is its arrival at the relay minus the moment
//! `release` was called.
//!
//! `flock /tmp/cutline-qemu.lock cargo bench -p cutline-tests --bench netfilter`

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use cutline_tests::{GuestSpec, TestEnv, wait_until};
use netfilter::{Bounds, FilterBufferConfig, Gate};
use serde_json::json;

const SPORT: u16 = 7200;
const CYCLES: usize = 1000;
const TIMED_HOLDS: usize = 50;
const TIMED_HOLD: Duration = Duration::from_millis(100);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn row(name: &str, v: &mut [Duration]) {
    v.sort();
    println!("  {:<44} {:>10.1} {:>10.1} {:>8}", name, us(percentile(v, 0.5)), us(percentile(v, 0.99)), v.len());
}

/// A two-port relay between two guests' dgram netdevs that timestamps guest 0's stream datagrams.
struct Relay {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u64, Instant)>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    netdevs: [String; 2],
}

/// The stream sequence number of an Ethernet frame from 10.0.0.1 to UDP port `SPORT`.
fn stream_seq(f: &[u8]) -> Option<u64> {
    if f.len() < 14 + 20 + 8 + 8 || f[12..14] != [0x08, 0x00] || f[23] != 17 || f[26..30] != [10, 0, 0, 1] {
        return None;
    }
    let udp = 14 + usize::from(f[14] & 0x0f) * 4;
    let port = u16::from_be_bytes([*f.get(udp + 2)?, *f.get(udp + 3)?]);
    let seq = f.get(udp + 8..udp + 16)?;
    (port == SPORT).then(|| u64::from_be_bytes(seq.try_into().unwrap_or([0; 8])))
}

impl Relay {
    fn start() -> anyhow::Result<Relay> {
        let socks = [UdpSocket::bind("127.0.0.1:0")?, UdpSocket::bind("127.0.0.1:0")?];
        for s in &socks {
            // A released hold arrives as one burst: do not let the relay's socket drop its tail.
            nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20))?;
        }
        let guests: [SocketAddr; 2] =
            [UdpSocket::bind("127.0.0.1:0")?.local_addr()?, UdpSocket::bind("127.0.0.1:0")?.local_addr()?];
        let netdevs = [0, 1].map(|i| {
            format!(
                "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
                guests[i].port(),
                socks[i].local_addr().map(|a| a.port()).unwrap_or(0)
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::with_capacity(1 << 20)));
        let mut threads = Vec::new();
        for i in 0..2 {
            let from = socks[i].try_clone()?;
            let to = socks[1 - i].try_clone()?;
            from.set_read_timeout(Some(Duration::from_millis(100)))?;
            let (stop, seen, dst) = (stop.clone(), seen.clone(), guests[1 - i]);
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(n) = from.recv(&mut buf) else { continue };
                    let now = Instant::now();
                    if i == 0
                        && let Some(seq) = stream_seq(&buf[..n])
                    {
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push((seq, now));
                    }
                    let _ = to.send_to(&buf[..n], dst);
                }
            }));
        }
        Ok(Relay { stop, seen, threads, netdevs })
    }

    fn seen_len(&self) -> usize {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn seen_from(&self, i: usize) -> Vec<(u64, Instant)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())[i..].to_vec()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    println!("accelerator: {}", env.accel.as_arg());
    let relay = Relay::start()?;
    let mut guests = Vec::new();
    for i in 0..2 {
        let mut spec = GuestSpec::new(&format!("vm{i}"), &["stream"])
            .setting("srate", if i == 0 { 1000 } else { 0 })
            .setting("tbps", 0);
        spec.id = i;
        spec.peers = 2;
        spec.netdev = Some(relay.netdevs[i].clone());
        guests.push(env.guest(&spec).await?);
    }
    for g in &guests {
        g.control().wait_from(0, "ready", |v| v["event"] == "ready", Duration::from_secs(60)).await?;
    }
    wait_until(Duration::from_secs(60), || async { (relay.seen_len() > 500).then_some(()) })
        .await
        .context("guest 0's stream never reached the relay")?;

    let qmp = guests[0].qmp().await?;
    let gate =
        Gate::attach_qemu("vm0", qmp.clone(), &FilterBufferConfig::new(env.dir().join("gate")), Bounds::default())
            .await?;

    // Baseline and hold/release cycles, interleaved in rounds so both see the same load.
    let status = json!({"path": "/objects/cutline-fb-n0", "property": "status"});
    let (mut rtt, mut hold, mut release) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..20 {
        qmp.execute_raw("qom-get", status.clone()).await?;
    }
    for _ in 0..10 {
        for _ in 0..CYCLES / 10 {
            let t = Instant::now();
            qmp.execute_raw("qom-get", status.clone()).await?;
            rtt.push(t.elapsed());
        }
        for _ in 0..CYCLES / 10 {
            let t = Instant::now();
            gate.hold().await?;
            hold.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(1)).await;
            let t = Instant::now();
            gate.release().await?;
            release.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    // Held packets: how long after `release` is called each one leaves the netdev.
    let (mut extra, mut first, mut last) = (Vec::new(), Vec::new(), Vec::new());
    let mut held_total = 0;
    for _ in 0..TIMED_HOLDS {
        let mark = relay.seen_len();
        gate.hold().await?;
        tokio::time::sleep(TIMED_HOLD).await;
        let t_release = Instant::now();
        let report = gate.release().await?.context("report")?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after: Vec<_> = relay.seen_from(mark).into_iter().filter(|(_, at)| *at >= t_release).collect();
        // The gate counts every frame it held; guest 0 sends nothing else but a rare ARP,
        // and the held frames leave first, in order.
        let held = &after[..(report.packets as usize).min(after.len())];
        anyhow::ensure!(held.windows(2).all(|w| w[1].0 == w[0].0 + 1), "held datagrams out of order");
        held_total += held.len();
        extra.extend(held.iter().map(|(_, at)| *at - t_release));
        if let (Some(f), Some(l)) = (held.first(), held.last()) {
            first.push(f.1 - t_release);
            last.push(l.1 - t_release);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gate.detach().await?;

    println!("output gate, QEMU filter-buffer backend, guest 0 sending 1000 UDP datagrams/s:");
    println!("  {:<44} {:>10} {:>10} {:>8}", "", "p50 µs", "p99 µs", "n");
    row("baseline: QMP round trip (qom-get status)", &mut rtt);
    row("hold() (mirror on + buffer on, pipelined)", &mut hold);
    row("release() (buffer off + mirror off + drain)", &mut release);
    println!(
        "held packets, {TIMED_HOLDS} holds of {} ms, {held_total} datagrams held in all (beyond the hold itself):",
        TIMED_HOLD.as_millis()
    );
    row("any held datagram: release call -> leaves QEMU", &mut extra);
    row("first held datagram of a hold", &mut first);
    row("last held datagram of a hold", &mut last);
    Ok(())
}
