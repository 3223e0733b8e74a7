//! The test L2 switch as a process of its own, for a host container: guests on other
//! containers reach it over UDP, and each port learns its guest's address from the frames
//! it receives (a guest restored on another host is reached again after its first frame).
//!
//! `cutline-switch --bind 0.0.0.0 --ports N --base-port P` listens on UDP ports
//! `P..P+N`, prints `{"event":"ready","ports":[…]}` on stdout, one line per learned
//! address, and runs until SIGTERM or SIGINT.

use std::net::IpAddr;

use clap::Parser;
use cutline_tests::switch::{ServeConfig, serve};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};

/// A learning L2 switch over UDP for test guests' `-netdev dgram`.
#[derive(Parser)]
struct Args {
    /// The address every port listens on.
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// How many ports (one per guest).
    #[arg(long)]
    ports: usize,
    /// The first UDP port; port `i` listens on `base-port + i` (0: any free ports).
    #[arg(long)]
    base_port: u16,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs to stderr: stdout carries only the JSON lines.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    // Blocked here, before any thread starts, so that every thread inherits the mask and
    // the waiting thread below is the one that receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)?;
    let (stop, shutdown) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = signals.wait();
        let _ = stop.send(());
    });
    let config = ServeConfig { bind: args.bind, ports: args.ports, base_port: args.base_port };
    serve(&config, &mut std::io::stdout().lock(), &shutdown)?;
    Ok(())
}
