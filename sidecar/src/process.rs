//! Whether a process is gone: exited with every thread, so its files and locks are released.

/// True when process `pid` no longer runs: it does not exist, or it is a zombie whose
/// threads have all exited. (A zombie thread-group leader can outlive its other threads
/// for a moment, and those still hold QEMU's image locks.)
pub fn is_gone(pid: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return true };
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
    let zombie = field("State:").is_some_and(|s| s.starts_with('Z') || s.starts_with('X'));
    let threads: u32 = field("Threads:").and_then(|t| t.parse().ok()).unwrap_or(1);
    zombie && threads <= 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_not_gone_and_a_reaped_one_is() {
        assert!(!is_gone(std::process::id() as i32));
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        assert!(is_gone(pid));
    }
}

/// The start time of process `pid` (clock ticks since boot, field 22 of /proc/PID/stat):
/// with the pid, it names one process, never a later one that reuses the pid.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// True while the process `pid` that started at `start` (when known) runs.
pub fn runs(pid: i32, start: Option<u64>) -> bool {
    if is_gone(pid) {
        return false;
    }
    match start {
        Some(s) => start_time(pid) == Some(s),
        None => true,
    }
}

#[cfg(test)]
mod evidence_tests {
    use super::*;

    #[test]
    fn a_process_is_named_by_pid_and_start_time() {
        let me = std::process::id() as i32;
        let start = start_time(me).expect("own start time");
        assert!(runs(me, Some(start)));
        assert!(!runs(me, Some(start + 1)), "another start time is another process");
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id() as i32;
        child.wait().expect("wait");
        assert!(!runs(pid, None));
    }
}
