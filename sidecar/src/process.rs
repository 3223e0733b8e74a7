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

/// Sends SIGKILL to process `pid` only if it is still the one that started at `start`.
/// The process is pinned with a pidfd before its start time is read, and signalled
/// through that pidfd: a pid reused between the check and the signal is never hit.
/// Returns false when `pid` is gone or is another process now.
pub fn kill_checked(pid: i32, start: u64) -> std::io::Result<bool> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
    }
    // SAFETY: fd is a new pidfd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    if start_time(pid) != Some(start) {
        return Ok(false);
    }
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    // SAFETY: pidfd_send_signal on a pidfd we own, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, raw, libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ESRCH) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

#[cfg(test)]
mod kill_tests {
    use super::*;

    #[test]
    fn only_the_process_that_started_then_is_killed() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().expect("spawn");
        let pid = child.id() as i32;
        let start = start_time(pid).expect("start time");
        assert!(!kill_checked(pid, start + 1).expect("kill"), "another start time: not this process");
        assert!(!is_gone(pid), "left running");
        assert!(kill_checked(pid, start).expect("kill"));
        let status = child.wait().expect("wait");
        assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));
        assert!(!kill_checked(pid, start).expect("kill"), "gone");
    }
}
