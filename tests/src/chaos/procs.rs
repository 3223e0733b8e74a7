//! The real processes of a chaos run: daemons (`cutline serve`, `cutline-sidecar serve`)
//! that can be killed and restarted, each in its own process group, killed with the
//! runner (PDEATHSIG), stderr appended to a log; and a scan of /proc for the QEMUs of the
//! run, including those a sidecar relaunched in their own session.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// The environment variable that makes a daemon kill itself at a named step.
pub const FAILPOINT_ENV: &str = "CUTLINE_FAILPOINT";

/// A daemon the runner supervises.
pub struct Daemon {
    /// Its name in reports: `coordinator`, `sidecar vm0`.
    pub name: String,
    argv: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// The failpoint it was started with, if any.
    pub failpoint: Option<&'static str>,
    /// How many times it was started.
    pub starts: u32,
    env: Vec<(String, String)>,
}

impl Daemon {
    /// A daemon that runs `argv`, logging to `log`; not started yet.
    pub fn new(name: &str, argv: Vec<String>, log: PathBuf) -> Daemon {
        Daemon { name: name.to_owned(), argv, log, child: None, failpoint: None, starts: 0, env: Vec::new() }
    }

    /// The same daemon, started with `env` in its environment.
    pub fn with_env(mut self, env: Vec<(String, String)>) -> Daemon {
        self.env = env;
        self
    }

    /// Starts it (it must not run), with `failpoint` in its environment if given.
    pub fn start(&mut self, failpoint: Option<&'static str>) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "{} already runs", self.name);
        self.starts += 1;
        let mut log = OpenOptions::new().create(true).append(true).open(&self.log)?;
        writeln!(
            log,
            "=== chaos: start #{} of {}{} at unix {} ms ===",
            self.starts,
            self.name,
            failpoint.map(|f| format!(" with {FAILPOINT_ENV}={f}")).unwrap_or_default(),
            super::unix_ms()
        )?;
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.env("NO_COLOR", "1");
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        match failpoint {
            Some(f) => cmd.env(FAILPOINT_ENV, f),
            None => cmd.env_remove(FAILPOINT_ENV),
        };
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to kill the daemon
        // when the runner's thread dies, so a crashed runner leaves no daemon behind.
        unsafe {
            cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from));
        }
        self.child = Some(cmd.spawn()?);
        self.failpoint = failpoint;
        Ok(())
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// True while it runs (as far as the runner has noticed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Its exit status if it has exited since the last look (it then counts as stopped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL to its process group, then reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = Pid::from_raw(c.id() as i32);
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = kill(pid, Signal::SIGKILL);
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while self.child.is_some() && Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How an exit reads in a report.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {}", Signal::try_from(s).map_or(s.to_string(), |s| s.to_string())),
        _ => status.to_string(),
    }
}

/// True when the exit was a SIGKILL (what a failpoint does).
pub fn killed(status: ExitStatus) -> bool {
    status.signal() == Some(Signal::SIGKILL as i32)
}

/// The last `n` lines of a file, without terminal colours.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    strip_ansi(&lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A process seen in /proc.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its pid.
    pub pid: i32,
    /// Its parent's pid.
    pub ppid: i32,
    /// A zombie (exited, not reaped).
    pub zombie: bool,
    /// Its command line.
    pub cmdline: Vec<String>,
}

fn read_proc(pid: i32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let cmdline = raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned());
    Some(Proc { pid, ppid, zombie: state == "Z" || state == "X", cmdline: cmdline.collect() })
}

/// Every process, as far as /proc shows them.
pub fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).filter_map(read_proc).collect()
}

/// The live (not zombie) QEMU processes whose command line mentions `dir`.
pub fn qemus_under(dir: &Path) -> Vec<Proc> {
    let needle = dir.display().to_string();
    processes()
        .into_iter()
        .filter(|p| {
            !p.zombie
                && p.cmdline.first().is_some_and(|a| a.rsplit('/').next().is_some_and(|b| b.starts_with("qemu-system")))
                && p.cmdline.iter().any(|a| a.contains(&needle))
        })
        .collect()
}

/// Reaps zombies the runner inherited (QEMUs relaunched by a sidecar that died, which a
/// child subreaper adopts), except `keep` (children that others will wait for).
pub fn reap_orphans(keep: &[i32]) {
    let me = std::process::id() as i32;
    for p in processes() {
        if p.zombie && p.ppid == me && !keep.contains(&p.pid) {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(p.pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        }
    }
}

/// SIGKILLs every QEMU of the run (found by `dir` in its command line) and waits until
/// each is gone (reaping those that are the runner's children).
pub fn kill_qemus_under(dir: &Path) -> Vec<i32> {
    let victims: Vec<i32> = qemus_under(dir).iter().map(|p| p.pid).collect();
    for pid in &victims {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    for pid in &victims {
        for _ in 0..250 {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(*pid), Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            if sidecar::process::is_gone(*pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    victims
}

/// Creates a file holding `bytes` (allocated, so that it takes the space at once).
pub fn ballast(path: &Path, bytes: u64) -> std::io::Result<()> {
    let f = File::create(path)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| std::io::Error::other("ballast too large"))?;
    // SAFETY: posix_fallocate on an fd we own; no memory is passed.
    let rc = unsafe { libc::posix_fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, len) };
    if rc == 0 {
        return Ok(());
    }
    // No fallocate here: write zeros until it is as large or the disk is full.
    let mut f = f;
    let chunk = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        match f.write_all(&chunk[..n]) {
            Ok(()) => left -= n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e),
        }
    }
    f.sync_all()
}

/// Free bytes on the file system holding `path`.
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
}

/// Runs `cutline --state STATE ARGS --json` (the real CLI) and reads its answer; an
/// answer that is an error is an `Err` naming the command.
pub async fn cutline_json(cutline: &Path, state: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let mut cmd = tokio::process::Command::new(cutline);
    cmd.arg("--state").arg(state).args(args).arg("--json").kill_on_drop(true);
    cmd.env("RUST_LOG", "error");
    let out = tokio::time::timeout(Duration::from_secs(15), cmd.output())
        .await
        .with_context(|| format!("cutline {} took over 15 s", args.join(" ")))??;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("cutline {}: not JSON: {text} {}", args.join(" "), out.stderr.len()))?;
    if !out.status.success() {
        anyhow::bail!("cutline {}: {}", args.join(" "), v.get("error").unwrap_or(&v));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped_and_this_process_is_seen() {
        assert_eq!(strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"), "2026  WARN x");
        let me = std::process::id() as i32;
        let p = processes().into_iter().find(|p| p.pid == me).expect("this process in /proc");
        assert!(!p.zombie && !p.cmdline.is_empty());
    }
}
