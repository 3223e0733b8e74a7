//! Foundation figures: test guest boot time, and QMP round-trip latency of
//! qmp-client beside a baseline measured in the same run (a bare blocking
//! write-then-read loop on a second QMP socket of the same QEMU).
//!
//! `cargo bench -p cutline-tests --bench foundation`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use cutline_tests::{GuestSpec, TestEnv};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The baseline: one blocking client, no concurrency machinery, no JSON parsing of replies.
fn raw_round_trips(path: &std::path::Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = UnixStream::connect(path)?;
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?; // greeting
    s.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    line.clear();
    r.read_line(&mut line)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(b"{\"execute\":\"query-status\"}\n")?;
        loop {
            line.clear();
            r.read_line(&mut line)?;
            if line.contains("\"return\"") {
                break;
            }
        }
        out.push(t.elapsed());
    }
    Ok(out)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    const N: usize = 1000;
    let env = TestEnv::new().await?;
    println!("accelerator: {}", env.accel.as_arg());

    let mut boots = Vec::new();
    for i in 0..3 {
        let guest = env.guest(&GuestSpec::new(&format!("boot{i}"), &["idle"])).await?;
        guest.control().wait_event("start", Duration::from_secs(60)).await?;
        boots.push(guest.started.elapsed());
    }
    boots.sort();
    println!(
        "test guest boot to workload start (3 boots): median {:.2} s, min {:.2} s, max {:.2} s",
        boots[1].as_secs_f64(),
        boots[0].as_secs_f64(),
        boots[2].as_secs_f64()
    );

    let mut spec = GuestSpec::new("rtt", &["idle"]);
    let raw_sock = env.dir().join("rtt-raw.sock");
    spec.extra_args = vec!["-qmp".into(), format!("unix:{},server=on,wait=off", raw_sock.display())];
    let guest = env.guest(&spec).await?;
    guest.control().wait_event("start", Duration::from_secs(60)).await?;
    let qmp = guest.qmp().await?;
    // Warm up both paths, then interleave rounds so both see the same machine load.
    let mut client = Vec::with_capacity(N);
    let mut raw = Vec::with_capacity(N);
    for _ in 0..50 {
        qmp.execute(qapi::qmp::query_status {}).await?;
    }
    raw_round_trips(&raw_sock, 50)?;
    for _ in 0..10 {
        for _ in 0..N / 10 {
            let t = Instant::now();
            qmp.execute(qapi::qmp::query_status {}).await?;
            client.push(t.elapsed());
        }
        let sock = raw_sock.clone();
        raw.extend(tokio::task::spawn_blocking(move || raw_round_trips(&sock, N / 10)).await??);
    }
    client.sort();
    raw.sort();
    let (c50, c99, r50, r99) =
        (percentile(&client, 0.5), percentile(&client, 0.99), percentile(&raw, 0.5), percentile(&raw, 0.99));
    println!("QMP query-status round trip over {N} calls:");
    println!("  {:<28} {:>10} {:>10}", "", "p50 µs", "p99 µs");
    println!("  {:<28} {:>10.1} {:>10.1}", "qmp-client (typed, async)", us(c50), us(c99));
    println!("  {:<28} {:>10.1} {:>10.1}", "baseline (raw blocking)", us(r50), us(r99));
    println!("  {:<28} {:>10.2} {:>10.2}", "ratio client/baseline", us(c50) / us(r50), us(c99) / us(r99));
    Ok(())
}
