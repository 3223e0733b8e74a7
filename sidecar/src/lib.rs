//! The per-VM sidecar: attaches to a running QEMU over QMP and takes, stores and
//! restores its point-in-time checkpoints (memory, device state and every writable
//! disk at one instant).

pub mod agent;
pub mod attach;
pub mod checkpoint;
pub mod disk;
pub mod failpoint;
pub mod host;
pub mod leftovers;
pub mod mapped_ram;
pub mod memory;
pub mod nbd;
pub mod process;
pub use cutline_proto as proto;
pub use cutline_transport as transport;
pub mod restore;
pub mod slot;
pub mod store;
pub mod vm;

/// Resolves on SIGINT or SIGTERM: the shutdown signal of cutline's daemons.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
}

/// The name under which a VM's checkpoints are kept in a store: non-empty, made of
/// ASCII letters, digits, `-`, `_` and `.`, not starting with a dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VmName(String);

impl VmName {
    /// Validates `name`; the error says what is wrong with it.
    pub fn new(name: &str) -> Result<VmName, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        if name.is_empty() || name.len() > 64 {
            return Err(format!("VM name {name:?} must have 1 to 64 characters"));
        }
        if name.starts_with('.') || !name.chars().all(ok_char) {
            return Err(format!(
                "VM name {name:?} may hold only letters, digits, '-', '_', '.', and not start with '.'"
            ));
        }
        Ok(VmName(name.to_owned()))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(VmName::new("vm-0.a_b").is_ok());
        assert!(VmName::new("").is_err());
        assert!(VmName::new("../etc").is_err());
        assert!(VmName::new(".hidden").is_err());
    }
}
