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
