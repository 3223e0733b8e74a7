//! Who is on the other end of a unix QMP socket: the QEMU process and how it was launched.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::QmpError;

/// The QEMU process behind a unix QMP socket, read from SO_PEERCRED and /proc.
///
/// A sidecar uses it to relaunch a guest that something else started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Process id of QEMU.
    pub pid: i32,
    /// User id QEMU runs as.
    pub uid: u32,
    /// QEMU's command line, `argv[0]` first.
    pub argv: Vec<String>,
    /// QEMU's working directory, against which relative paths in `argv` resolve.
    pub cwd: Option<PathBuf>,
    /// The executable QEMU runs (`/proc/PID/exe`), when readable.
    pub exe: Option<PathBuf>,
}

/// The pid and uid of the process that holds the other end of `sock`.
pub(crate) fn peer_credentials(sock: &impl AsFd) -> std::io::Result<(i32, u32)> {
    let cred =
        nix::sys::socket::getsockopt(sock, nix::sys::socket::sockopt::PeerCredentials).map_err(std::io::Error::from)?;
    Ok((cred.pid(), cred.uid()))
}

impl PeerIdentity {
    /// Reads the identity of process `pid` (whose uid is already known) from /proc.
    pub fn of_pid(pid: i32, uid: u32) -> Result<PeerIdentity, QmpError> {
        let proc = PathBuf::from(format!("/proc/{pid}"));
        let cmdline = proc.join("cmdline");
        let raw = std::fs::read(&cmdline).map_err(|source| QmpError::Peer { pid, path: cmdline, source })?;
        Ok(PeerIdentity {
            pid,
            uid,
            argv: split_cmdline(&raw),
            cwd: std::fs::read_link(proc.join("cwd")).ok(),
            exe: std::fs::read_link(proc.join("exe")).ok(),
        })
    }

    /// The value of the first `-name`-style option `opt` in argv (`-opt VALUE` or `-opt=VALUE`).
    pub fn option(&self, opt: &str) -> Option<&str> {
        option_value(&self.argv, opt)
    }

    /// Resolves a path from argv against QEMU's working directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        match &self.cwd {
            Some(cwd) if Path::new(path).is_relative() => cwd.join(path),
            _ => PathBuf::from(path),
        }
    }
}

fn split_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .skip_while(String::is_empty)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

fn option_value<'a>(argv: &'a [String], opt: &str) -> Option<&'a str> {
    let dash = format!("-{}", opt.trim_start_matches('-'));
    let ddash = format!("-{dash}");
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if *a == dash || *a == ddash {
            return it.next().map(String::as_str);
        }
        for prefix in [&dash, &ddash] {
            if let Some(v) = a.strip_prefix(prefix.as_str()).and_then(|r| r.strip_prefix('=')) {
                return Some(v);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_nul_separated_cmdline() {
        let argv = split_cmdline(b"qemu-system-x86_64\x00-m\x00256\x00-name\x00vm a\x00");
        assert_eq!(argv, ["qemu-system-x86_64", "-m", "256", "-name", "vm a"]);
    }

    #[test]
    fn finds_options_in_both_spellings() {
        let argv: Vec<String> = ["qemu", "-m", "256", "--name=x", "-pidfile", "/p"].map(String::from).into();
        assert_eq!(option_value(&argv, "m"), Some("256"));
        assert_eq!(option_value(&argv, "name"), Some("x"));
        assert_eq!(option_value(&argv, "-pidfile"), Some("/p"));
        assert_eq!(option_value(&argv, "smp"), None);
    }
}
