//! `cutline-workload`: the in-guest consistency oracle of cutline's checkpoint/restore tests.
//!
//! Runs as PID 1 in a tiny Linux guest, configured from `cutline.*` tokens on the kernel
//! command line (or `$CUTLINE_CMDLINE` when set, for local runs). It starts the configured
//! modes, prints `CUTLINE {json}` status lines to the console and the control channel, and
//! answers commands read from the control channel. It never exits: on a fatal error it prints
//! a `fatal` status line and sleeps forever.

mod config;
mod control;
mod dirtier;
mod journal;
mod ledger;
mod pacer;
mod status;
mod stream;

use config::{Config, Mode};
use control::{LineBuffer, MAX_LINE, Parsed, Verb};
use dirtier::Dirtier;
use journal::Journal;
use ledger::{Ledger, LedgerConfig};
use serde_json::Value;
use status::{Event, StatusWriter, fatal_forever, sleep_forever};
use std::fs::File;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};
use stream::{Stream, StreamConfig};

/// Spawns a named thread; failure to do so is reported as a `fatal` status.
pub fn spawn<F: FnOnce() + Send + 'static>(status: &StatusWriter, name: &str, f: F) {
    if let Err(e) = std::thread::Builder::new().name(name.to_string()).spawn(f) {
        status.emit(
            Event::new("fatal").with("what", "thread spawn failed").with("thread", name).with("error", e.to_string()),
        );
    }
}

/// The running modes.
#[derive(Clone)]
struct Modes {
    names: Vec<Mode>,
    ledger: Option<Arc<Ledger>>,
    journal: Option<Arc<Journal>>,
    dirtier: Option<Arc<Dirtier>>,
    stream: Option<Arc<Stream>>,
}

impl Modes {
    fn start(cfg: &Config, status: &Arc<StatusWriter>) -> Modes {
        let ledger = cfg.has(Mode::Ledger).then(|| {
            Ledger::start(
                LedgerConfig {
                    id: cfg.id as usize,
                    peers: cfg.peers as usize,
                    balance: cfg.balance,
                    rate: cfg.rate,
                    port: cfg.port,
                },
                Arc::clone(status),
            )
        });
        let journal = cfg.has(Mode::Journal).then(|| Journal::start(cfg.disk.clone(), cfg.jrate, Arc::clone(status)));
        let dirtier = cfg.has(Mode::Dirtier).then(|| Dirtier::start(cfg.mib, cfg.mibps, Arc::clone(status)));
        let stream = cfg.has(Mode::Stream).then(|| {
            Stream::start(
                StreamConfig {
                    id: cfg.id as usize,
                    peers: cfg.peers as usize,
                    port: cfg.sport,
                    rate: cfg.srate,
                    tcp_bps: cfg.tbps,
                },
                Arc::clone(status),
            )
        });
        Modes { names: cfg.modes.clone(), ledger, journal, dirtier, stream }
    }

    /// All counters of the running modes, flat.
    fn fields(&self) -> Vec<(String, Value)> {
        let mut f = Vec::new();
        if let Some(l) = &self.ledger {
            f.extend(l.snapshot().fields());
        }
        if let Some(j) = &self.journal {
            f.extend(j.fields());
        }
        if let Some(d) = &self.dirtier {
            f.extend(d.fields());
        }
        if let Some(s) = &self.stream {
            f.extend(s.fields());
        }
        f
    }

    fn names_value(&self) -> Value {
        self.names.iter().map(|m| m.name()).collect::<Vec<_>>().into()
    }
}

fn not_running(mode: &str, verb: &str, req: Option<&str>) -> Event {
    Event::new("error").with("what", format!("{mode} not running")).with("command", verb).req(req)
}

fn handle_line(line: &control::Line, modes: &Modes, status: &StatusWriter) {
    if line.truncated {
        let head = String::from_utf8_lossy(&line.bytes[..line.bytes.len().min(64)]).into_owned();
        status.emit(Event::new("error").with("what", "line too long").with("max", MAX_LINE).with("command", head));
        return;
    }
    match control::parse_command(&line.bytes) {
        Parsed::Empty => {}
        Parsed::Bad { what, command, req } => {
            status.emit(Event::new("error").with("what", what).with("command", command).req(req.as_deref()))
        }
        Parsed::Command { verb, req } => {
            let r = req.as_deref();
            match verb {
                Verb::Status => {
                    status.emit(Event::new("status").with("modes", modes.names_value()).extend(modes.fields()).req(r))
                }
                Verb::Quiesce => match &modes.ledger {
                    Some(l) => l.quiesce(req),
                    None => status.emit(not_running("ledger", "quiesce", r)),
                },
                Verb::Balance => match &modes.ledger {
                    Some(l) => status.emit(l.balance_event(r)),
                    None => status.emit(not_running("ledger", "balance", r)),
                },
                Verb::Resume => match &modes.ledger {
                    Some(l) => l.resume(r),
                    None => status.emit(not_running("ledger", "resume", r)),
                },
                Verb::Check => match &modes.journal {
                    Some(j) => j.check(req),
                    None => status.emit(not_running("journal", "check", r)),
                },
                Verb::StreamStop | Verb::StreamStart => match &modes.stream {
                    Some(s) => s.set_sending(verb == Verb::StreamStart, r),
                    None => status.emit(not_running("stream", "stream-stop/start", r)),
                },
            }
        }
    }
}

/// Reads commands forever from `input`.
fn control_loop(mut input: impl Read, modes: &Modes, status: &StatusWriter) -> ! {
    let mut lines = LineBuffer::new(MAX_LINE);
    let mut buf = [0u8; 512];
    let mut last_error: Option<String> = None;
    loop {
        match input.read(&mut buf) {
            Ok(0) => std::thread::sleep(Duration::from_millis(100)),
            Ok(n) => {
                last_error = None;
                for line in lines.push(&buf[..n]) {
                    handle_line(&line, modes, status);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(msg.as_str()) {
                    status.emit(Event::new("error").with("what", "control read failed").with("error", msg.as_str()));
                    last_error = Some(msg);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn ticker(modes: Modes, status: Arc<StatusWriter>) {
    let mut pacer = pacer::Pacer::every(Duration::from_secs(1));
    let mut seq: u64 = 0;
    loop {
        pacer.wait();
        seq += 1;
        status.emit(Event::new("tick").with("seq", seq).extend(modes.fields()));
    }
}

fn read_cmdline() -> std::io::Result<String> {
    match std::env::var("CUTLINE_CMDLINE") {
        Ok(s) => Ok(s),
        Err(_) => std::fs::read_to_string("/proc/cmdline"),
    }
}

fn run(start: Instant) -> ! {
    let cmdline = read_cmdline();
    let parsed = cmdline.as_ref().map_err(|e| e.to_string()).map(|c| config::parse(c));
    let control_path = match (&parsed, &cmdline) {
        (Ok(Ok(cfg)), _) => cfg.control.clone(),
        (_, Ok(c)) => config::control_path(c),
        (_, Err(_)) => config::DEFAULT_CONTROL.to_string(),
    };
    let control = match control_path.as_str() {
        "stdio" | "none" => Ok(None),
        path => control::open_control(path).map(|f| Some(Arc::new(f))),
    };
    let id = match &parsed {
        Ok(Ok(cfg)) => cfg.id,
        _ => 0,
    };
    let status = Arc::new(StatusWriter::new(id, start, control.as_ref().ok().cloned().flatten()));
    status.install_global();
    let control: Option<Arc<File>> = match control {
        Ok(c) => c,
        Err(e) => fatal_forever(
            &status,
            Event::new("fatal")
                .with("what", "control open failed")
                .with("path", control_path.as_str())
                .with("error", e.to_string()),
        ),
    };
    let cfg = match parsed {
        Ok(Ok(cfg)) => cfg,
        Ok(Err(e)) => fatal_forever(
            &status,
            Event::new("fatal")
                .with("what", "bad config")
                .with("key", e.key)
                .with("value", e.value)
                .with("reason", e.reason),
        ),
        Err(e) => {
            fatal_forever(&status, Event::new("fatal").with("what", "cannot read kernel command line").with("error", e))
        }
    };
    status.emit(
        Event::new("start")
            .with("modes", cfg.modes.iter().map(|m| m.name()).collect::<Vec<_>>())
            .with("peers", cfg.peers)
            .with("version", env!("CARGO_PKG_VERSION"))
            .with("balance", cfg.balance)
            .with("rate", cfg.rate)
            .with("port", cfg.port)
            .with("disk", cfg.disk.as_str())
            .with("jrate", cfg.jrate)
            .with("mib", cfg.mib)
            .with("mibps", cfg.mibps)
            .with("srate", cfg.srate)
            .with("sport", cfg.sport)
            .with("tbps", cfg.tbps)
            .with("control", cfg.control.as_str()),
    );
    let modes = Modes::start(&cfg, &status);
    {
        let (m, s) = (modes.clone(), Arc::clone(&status));
        spawn(&status, "ticker", move || ticker(m, s));
    }
    match (cfg.control.as_str(), control) {
        ("stdio", _) => control_loop(std::io::stdin().lock(), &modes, &status),
        (_, Some(file)) => control_loop(&*file, &modes, &status),
        _ => sleep_forever(),
    }
}

fn main() {
    let start = Instant::now();
    status::install_panic_hook();
    // A panic on the main thread was already reported by the hook; PID 1 must not exit.
    let _ = std::panic::catch_unwind(|| run(start));
    sleep_forever();
}
