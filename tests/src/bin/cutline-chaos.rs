//! `cutline-chaos`: boots a cluster of test guests with the real cutline daemons, injects
//! a seeded series of faults (QEMU, sidecar and coordinator SIGKILLed, failpoints, a full
//! store) and checks after each that the cluster recovered with its invariants intact.
//! Exits 0 when every check held, 1 on a violation, 2 when the runner itself failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use cutline_tests::chaos::{self, Options, faults::Kind};

/// Chaos runner of real processes for cutline.
#[derive(Parser)]
struct Cli {
    /// Seed of every random choice (faults, targets, delays).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Number of faults to inject.
    #[arg(long, default_value_t = 10)]
    faults: usize,
    /// Number of guests.
    #[arg(long, default_value_t = 2)]
    guests: usize,
    /// The coordinator's checkpoint interval (faults come 0..2x this apart).
    #[arg(long, default_value = "2s", value_parser = chaos::parse_duration)]
    interval: Duration,
    /// The members' heartbeat period.
    #[arg(long, default_value = "300ms", value_parser = chaos::parse_duration)]
    heartbeat: Duration,
    /// Missing heartbeats for this long fail a member.
    #[arg(long, default_value = "3s", value_parser = chaos::parse_duration)]
    timeout: Duration,
    /// Longest a recovery may take.
    #[arg(long, default_value = "120s", value_parser = chaos::parse_duration)]
    deadline: Duration,
    /// Longest a failpoint may take to be reached.
    #[arg(long, default_value = "15s", value_parser = chaos::parse_duration)]
    reach: Duration,
    /// Fault kinds, comma-separated: qemu, sidecar, coordinator, failpoint, full-store;
    /// with --hosts also host and partition.
    #[arg(long, default_value = "qemu,sidecar,coordinator,failpoint,full-store")]
    kinds: String,
    /// Go on after a violation (and report them all).
    #[arg(long)]
    keep_going: bool,
    /// Size of the store's tmpfs, in MiB.
    #[arg(long, default_value_t = 768)]
    store_mib: u64,
    /// Keep checkpoints and commit records on a three-node Garage cluster the runner
    /// starts (needs `garage`; the full-store kind does not apply).
    #[arg(long)]
    garage: bool,
    /// Run the sidecars under this many host agents (`cutline-sidecar host`), guests
    /// dealt round-robin; needed by the host and partition kinds. 0: no host agents.
    #[arg(long, default_value_t = 0)]
    hosts: usize,
    /// The hosts' lease.
    #[arg(long, default_value = "2s", value_parser = chaos::parse_duration)]
    lease: Duration,
    /// The coordinator's margin beyond a lost host's lease.
    #[arg(long, default_value = "1s", value_parser = chaos::parse_duration)]
    lease_margin: Duration,
    /// Copy the daemons' logs into this directory at the end.
    #[arg(long)]
    logs: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr: stdout carries only the report.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let mut kinds = Vec::new();
    for k in cli.kinds.split(',').filter(|k| !k.trim().is_empty()) {
        match Kind::parse(k) {
            Some(k) if !kinds.contains(&k) => kinds.push(k),
            Some(_) => {}
            None => {
                eprintln!("cutline-chaos: unknown fault kind {k:?}");
                return ExitCode::from(2);
            }
        }
    }
    let opts = Options {
        seed: cli.seed,
        faults: cli.faults,
        guests: cli.guests,
        interval: cli.interval,
        heartbeat: cli.heartbeat,
        timeout: cli.timeout,
        deadline: cli.deadline,
        reach: cli.reach,
        kinds,
        keep_going: cli.keep_going,
        store_mib: cli.store_mib,
        garage: cli.garage,
        logs: cli.logs,
        hosts: cli.hosts,
        lease: cli.lease,
        lease_margin: cli.lease_margin,
    };
    if opts.garage && opts.kinds.contains(&Kind::FullStore) {
        eprintln!("cutline-chaos: --garage keeps the store on Garage: leave full-store out of --kinds");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cutline-chaos: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // The run future is dropped on SIGINT/SIGTERM, and with it every process it started.
    let result = rt.block_on(async {
        tokio::select! {
            r = chaos::run(&opts) => Some(r),
            _ = sidecar::shutdown_signal() => None,
        }
    });
    match result {
        None => {
            eprintln!("cutline-chaos: interrupted; everything it started was stopped");
            ExitCode::from(2)
        }
        Some(Err(e)) => {
            eprintln!("cutline-chaos: {e:#}");
            ExitCode::from(2)
        }
        Some(Ok(report)) => {
            if cli.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
    }
}
