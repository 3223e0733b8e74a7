//! A chaos runner of real processes: a cluster of guests with the real `cutline serve`
//! and `cutline-sidecar serve` daemons (or, with `hosts`, host agents that run the
//! sidecars), and a seeded series of faults (QEMU, sidecar and coordinator killed,
//! failpoints, a full store; with hosts, a host lost and a partition), each followed by
//! checks that the cluster recovered and that no invariant broke. `cutline-chaos` is its
//! command line.

pub mod checks;
pub mod cluster;
pub mod faults;
pub mod procs;
pub mod report;
pub mod rng;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use cluster::Cluster;
use faults::{FAILPOINTS, Failpoint, Kind};
use report::{Report, Violation};
use rng::{Deck, Rng};

/// What a chaos run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seed of every random choice.
    pub seed: u64,
    /// Faults to inject.
    pub faults: usize,
    /// Guests in the cluster.
    pub guests: usize,
    /// The coordinator's checkpoint interval; faults come 0..2x this apart.
    pub interval: Duration,
    /// The members' heartbeat period.
    pub heartbeat: Duration,
    /// Missing heartbeats for this long fail a member.
    pub timeout: Duration,
    /// Longest a recovery may take.
    pub deadline: Duration,
    /// Longest a failpoint may take to be reached.
    pub reach: Duration,
    /// Kinds of faults to draw from.
    pub kinds: Vec<Kind>,
    /// Record violations and go on rather than stop at the first.
    pub keep_going: bool,
    /// Size of the store's tmpfs, in MiB.
    pub store_mib: u64,
    /// Keep checkpoints and commit records on a three-node Garage cluster.
    pub garage: bool,
    /// Copy the daemons' logs here at the end.
    pub logs: Option<PathBuf>,
    /// Host agents (`cutline-sidecar host`), the guests spread over them; 0 runs one
    /// sidecar per guest directly, without hosts.
    pub hosts: usize,
    /// The hosts' lease.
    pub lease: Duration,
    /// The coordinator's margin beyond a lost host's lease.
    pub lease_margin: Duration,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            seed: 1,
            faults: 10,
            guests: 2,
            interval: Duration::from_secs(2),
            heartbeat: Duration::from_millis(300),
            timeout: Duration::from_secs(3),
            deadline: Duration::from_secs(120),
            reach: Duration::from_secs(15),
            kinds: Kind::CLASSIC.to_vec(),
            keep_going: false,
            store_mib: 768,
            garage: false,
            logs: None,
            hosts: 0,
            lease: Duration::from_secs(2),
            lease_margin: Duration::from_secs(1),
        }
    }
}

impl Options {
    /// The command that replays this run's first `faults` faults (the same seed draws
    /// the same faults, targets and delays; only the timing of the system differs).
    pub fn replay(&self, faults: usize) -> String {
        let d = Options::default();
        let kinds: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
        let mut cmd = format!(
            "cargo run -p cutline-tests --bin cutline-chaos -- --seed {} --faults {faults} --guests {} --interval {}ms --kinds {}",
            self.seed,
            self.guests,
            self.interval.as_millis(),
            kinds.join(",")
        );
        for (flag, value, default) in [
            ("--heartbeat", self.heartbeat, d.heartbeat),
            ("--timeout", self.timeout, d.timeout),
            ("--deadline", self.deadline, d.deadline),
            ("--reach", self.reach, d.reach),
        ] {
            if value != default {
                cmd.push_str(&format!(" {flag} {}ms", value.as_millis()));
            }
        }
        if self.store_mib != d.store_mib {
            cmd.push_str(&format!(" --store-mib {}", self.store_mib));
        }
        if self.keep_going {
            cmd.push_str(" --keep-going");
        }
        if self.garage {
            cmd.push_str(" --garage");
        }
        if self.hosts > 0 {
            cmd.push_str(&format!(" --hosts {}", self.hosts));
            for (flag, value, default) in
                [("--lease", self.lease, d.lease), ("--lease-margin", self.lease_margin, d.lease_margin)]
            {
                if value != default {
                    cmd.push_str(&format!(" {flag} {}ms", value.as_millis()));
                }
            }
        }
        cmd
    }
}

/// Parses `2s`, `500ms`, `1.5s`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("not a duration: {s}"))?;
    let scale = match unit {
        "ms" => 0.001,
        "s" | "" => 1.0,
        "m" | "min" => 60.0,
        _ => return Err(format!("unknown unit in {s} (ms, s, m)")),
    };
    Ok(Duration::from_secs_f64(n * scale))
}

static START: OnceLock<Instant> = OnceLock::new();

/// Prints a progress line on stderr, stamped with the time since the run started.
pub fn progress(msg: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[chaos +{t:7.1}s] {msg}");
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// A run in progress: the cluster, the random choices, the daemons to restart.
pub struct Runner<'a> {
    opts: &'a Options,
    c: Cluster,
    rng: Rng,
    failpoints: Deck<Failpoint>,
    /// Daemons to start again at a time: (name, when).
    pending: Vec<(String, Instant)>,
    /// Daemons that exited on their own since the last look.
    unexpected: Vec<String>,
    /// The newest committed epoch seen.
    committed: Option<u64>,
    report: Report,
}

impl Runner<'_> {
    /// Notices exits (a failpoint reached, or a daemon that died on its own), restarts
    /// the daemons that are due, reaps inherited zombies. Returns the daemons that
    /// reached their failpoint, with when it was noticed.
    fn supervise(&mut self) -> HashMap<String, Instant> {
        let now = Instant::now();
        let mut reached = HashMap::new();
        let mut exited = Vec::new();
        for d in self.c.daemons() {
            if let Some(st) = d.exited() {
                exited.push((d.name.clone(), d.failpoint, st));
            }
        }
        for (name, failpoint, st) in exited {
            match failpoint {
                Some(f) if procs::killed(st) => {
                    progress(&format!("{name} reached failpoint {f} and died; restarting it without"));
                    reached.insert(name.clone(), now);
                }
                _ => {
                    let msg = format!(
                        "{name} exited on its own ({}){}",
                        procs::describe(st),
                        failpoint.map(|f| format!(" while armed with failpoint {f}")).unwrap_or_default()
                    );
                    progress(&format!("{msg}; restarting it"));
                    self.unexpected.push(msg);
                }
            }
            self.pending.push((name, now));
        }
        let (due, later): (Vec<_>, Vec<_>) = self.pending.drain(..).partition(|(_, at)| *at <= now);
        self.pending = later;
        for (name, _) in due {
            if let Some(d) = self.c.daemon(&name).filter(|d| !d.running())
                && let Err(e) = d.start(None)
            {
                self.unexpected.push(format!("cannot restart {name}: {e:#}"));
            }
        }
        self.c.reap();
        reached
    }

    /// Restarts daemon `name` after `delay`.
    fn schedule(&mut self, name: &str, delay: Duration) {
        self.pending.push((name.to_owned(), Instant::now() + delay));
    }

    /// Remembers the newest committed epoch seen.
    fn note_commit(&mut self, epoch: Option<u64>) {
        self.committed = self.committed.max(epoch);
    }

    /// Lets `d` pass while supervising the daemons.
    async fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while Instant::now() < end {
            self.supervise();
            tokio::time::sleep(Duration::from_millis(100).min(end.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// Records a violation and prints it with the logs' tails.
    fn violation(&mut self, fault: usize, kind: &str, target: &str, what: String) {
        let replay = self.opts.replay(fault.max(1));
        eprintln!("\n=== VIOLATION at fault {fault} ({kind}: {target}) ===\n{what}");
        eprintln!("seed {}; replay with:\n  {replay}\n", self.opts.seed);
        eprintln!("{}", self.c.logs(60));
        if self.report.violations.is_empty() {
            self.report.replay = replay;
        }
        self.report.violations.push(Violation { fault, kind: kind.to_owned(), target: target.to_owned(), what });
    }

    async fn faults(&mut self) -> anyhow::Result<()> {
        let t0 = Instant::now();
        progress("waiting for the cluster to be healthy and to commit an epoch");
        match self.first_commit().await {
            Ok(s) => progress(&format!("cluster up in {:.1} s: {}", t0.elapsed().as_secs_f64(), s.summary())),
            Err(what) => {
                self.violation(0, "startup", "cluster", what);
                return Ok(());
            }
        }
        self.report.startup_s = t0.elapsed().as_secs_f64();
        let mut kinds = Deck::new(self.opts.kinds.iter().flat_map(|k| std::iter::repeat_n(*k, k.weight())).collect());
        if self.opts.hosts > 0 {
            // A host agent runs every sidecar of its host with one environment: only the
            // coordinator's failpoints can be armed.
            self.failpoints =
                Deck::new(FAILPOINTS.iter().copied().filter(|f| f.side == faults::Side::Coordinator).collect());
        }
        for i in 1..=self.opts.faults {
            let kind = kinds.draw(&mut self.rng).ok_or_else(|| anyhow::anyhow!("no fault kinds"))?;
            let delay = self.rng.duration(self.opts.interval * 2);
            self.idle(delay).await;
            if let Ok(s) = self.c.status().await {
                self.note_commit(s.last_committed);
            }
            let inj = self.inject(kind).await?;
            self.report.run = i;
            progress(&format!("fault {i}/{}: {} {}", self.opts.faults, kind.name(), inj.target));
            let outcome = self.recover(&inj).await;
            let stats = self.report.kind(kind);
            stats.injected += 1;
            stats.not_reached += u64::from(!inj.reached);
            if let Ok(r) = &outcome {
                stats.survived += 1;
                stats.rollbacks += u64::from(!r.adopted.is_empty());
                if inj.reached {
                    stats.recover_ms.push(r.took.as_secs_f64() * 1000.0);
                }
            }
            if let Some(fs) = inj.failpoint.and_then(|f| self.report.failpoint(f)) {
                fs.injected += 1;
                fs.not_reached += u64::from(!inj.reached);
                if let Ok(r) = &outcome {
                    fs.survived += 1;
                    fs.rollbacks += u64::from(!r.adopted.is_empty());
                    if inj.reached {
                        fs.recover_ms.push(r.took.as_secs_f64() * 1000.0);
                    }
                }
            }
            match outcome {
                Ok(r) => progress(&format!(
                    "fault {i}: {} in {:.1} s, epoch {} committed{}; checks took {:.1} s",
                    if inj.reached { "recovered" } else { "failpoint not reached; recovered" },
                    r.took.as_secs_f64(),
                    r.epoch,
                    if r.adopted.is_empty() { String::new() } else { format!(", relaunched {:?}", r.adopted) },
                    r.checks.as_secs_f64()
                )),
                Err(what) => {
                    self.violation(i, kind.name(), &inj.target, what);
                    if !self.opts.keep_going {
                        return Ok(());
                    }
                    // Go on only from a cluster that is back.
                    if let Err(why) = self.resettle().await {
                        progress(&format!("the cluster did not come back after the violation: {why}; stopping"));
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }
}

/// Boots the cluster, injects `opts.faults` faults, checks after each, and reports.
/// `Err` is a failure of the runner itself (the report's violations are the system's).
pub async fn run(opts: &Options) -> anyhow::Result<Report> {
    let started = *START.get_or_init(Instant::now);
    anyhow::ensure!(opts.guests >= 1 && !opts.kinds.is_empty(), "need at least one guest and one fault kind");
    if let Some(k) = opts.kinds.iter().find(|k| k.needs_hosts()).filter(|_| opts.hosts == 0) {
        anyhow::bail!("fault kind {} needs host agents: run with --hosts 2 or more", k.name());
    }
    anyhow::ensure!(opts.hosts != 1, "--hosts 1 leaves no host to restart a lost host's VMs on: use 0 or 2+");
    let c = Cluster::start(opts).await?;
    let report = Report {
        seed: opts.seed,
        planned: opts.faults,
        guests: opts.guests,
        accel: c.accel().to_owned(),
        replay: opts.replay(opts.faults),
        ..Report::default()
    };
    let mut r = Runner {
        opts,
        c,
        rng: Rng::new(opts.seed),
        failpoints: Deck::new(FAILPOINTS.to_vec()),
        pending: Vec::new(),
        unexpected: Vec::new(),
        committed: None,
        report,
    };
    let result = r.faults().await;
    if let Err(e) = &result {
        eprintln!("chaos runner failed: {e:#}\n{}", r.c.logs(60));
    }
    if let Some(dir) = &opts.logs {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(&r.c.dir)?.flatten() {
            if entry.path().extension().is_some_and(|e| e == "log") {
                std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
            }
        }
    }
    result?;
    r.report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(r.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2h").is_err());
    }

    #[test]
    fn the_replay_names_only_what_differs_from_the_defaults() {
        let opts = Options { seed: 9, reach: Duration::from_secs(20), ..Options::default() };
        assert_eq!(
            opts.replay(3),
            "cargo run -p cutline-tests --bin cutline-chaos -- --seed 9 --faults 3 --guests 2 --interval 2000ms \
             --kinds qemu,sidecar,coordinator,failpoint,full-store --reach 20000ms"
        );
    }
}
