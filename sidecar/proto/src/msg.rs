//! The messages: one enum for the member and CLI conversations, each variant typed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::VectorClock;

/// The protocol version this code speaks; `Register` and `Welcome` carry it.
pub const PROTOCOL: u32 = 3;

/// What the CLI asks the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "what", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Members, health, last committed epoch, what runs now.
    Status,
    /// Take one epoch now and wait for it.
    Checkpoint,
    /// Committed epochs.
    List,
    /// Roll the cluster back to an epoch (the last committed one by default); pre-empts
    /// a recovery in flight and leaves the halted state.
    Restore {
        /// The epoch.
        epoch: Option<u64>,
    },
    /// Re-hash every block of an epoch's checkpoints (in the sidecars).
    Verify {
        /// The epoch.
        epoch: Option<u64>,
    },
    /// Remove a member from the cluster's membership (the only way one leaves).
    RemoveMember {
        /// The member.
        name: String,
    },
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// Sidecar → coordinator: join `cluster` as `name`.
    Register {
        /// The sidecar's [`PROTOCOL`].
        version: u32,
        /// Cluster name.
        cluster: String,
        /// Member (VM) name.
        name: String,
        /// The VM's QMP socket.
        qmp: String,
        /// The sidecar's store.
        store: String,
        /// QEMU's pid, when the VM runs.
        pid: Option<i32>,
        /// QEMU's start time (clock ticks since boot, /proc/PID/stat field 22): with the
        /// pid, the evidence of whether this very process still runs.
        pid_start: Option<u64>,
        /// Checkpoint ids in the sidecar's store, oldest first.
        checkpoints: Vec<u64>,
        /// Pre-shared token for TCP.
        token: Option<String>,
        /// The host (as its host agent registered it) this sidecar runs on; none for a
        /// sidecar started by hand.
        #[serde(default)]
        host: Option<String>,
        /// The VM's RAM, when its QEMU runs: what placing it on another host must fit.
        #[serde(default)]
        ram_bytes: Option<u64>,
    },
    /// Host agent → coordinator: this host joins `cluster`.
    HostRegister {
        /// The agent's [`PROTOCOL`].
        version: u32,
        /// Cluster name.
        cluster: String,
        /// The host's name.
        host: String,
        /// The host's address, for operators and placement logs.
        address: String,
        /// CPU cores.
        cores: u32,
        /// Memory in all, bytes.
        mem_total: u64,
        /// Memory available now, bytes (MemAvailable).
        mem_available: u64,
        /// The QEMU system emulators it has (`qemu-system-x86_64`, ...).
        qemu: Vec<String>,
        /// The VMs whose sidecars it runs now.
        vms: Vec<String>,
        /// Pre-shared token for TCP.
        token: Option<String>,
    },
    /// Coordinator → host agent: registered; heartbeats renew a lease of `lease_ms`.
    HostWelcome {
        /// The coordinator's [`PROTOCOL`].
        version: u32,
        /// The coordinator's incarnation.
        incarnation: u64,
        /// Heartbeat period in ms.
        heartbeat_ms: u64,
        /// The lease a granted heartbeat buys, in ms from when the host sent it.
        lease_ms: u64,
    },
    /// Host agent → coordinator: alive; renew the lease (`seq` numbers the heartbeats).
    HostHeartbeat {
        /// This heartbeat's number.
        seq: u64,
        /// Memory available now, bytes.
        mem_available: u64,
        /// The VMs whose sidecars it runs now.
        vms: Vec<String>,
    },
    /// Coordinator → host agent: heartbeat `seq` is granted: the host holds its lease until
    /// `ms` after it sent that heartbeat (by its own clock).
    Lease {
        /// The heartbeat granted.
        seq: u64,
        /// The lease, ms.
        ms: u64,
    },
    /// Coordinator → host agent: run a sidecar for VM `name` here (it attaches to the VM's
    /// QEMU if one runs, else waits to restore it).
    Run {
        /// VM name.
        name: String,
        /// The VM's QMP socket.
        qmp: String,
    },
    /// Coordinator → host agent: VM `name` is not this host's: stop its sidecar, kill its
    /// QEMU if one runs here.
    Evict {
        /// VM name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Coordinator → host agent: this host was declared lost; it must fence now and
    /// register again.
    Revoked {
        /// Why.
        reason: String,
    },
    /// Coordinator → sidecar: registered.
    Welcome {
        /// The coordinator's [`PROTOCOL`].
        version: u32,
        /// The coordinator's incarnation: every later message carries it.
        incarnation: u64,
        /// Heartbeat period in ms.
        heartbeat_ms: u64,
        /// This member's checkpoint ids in committed epochs.
        committed: Vec<u64>,
        /// Checkpoint ids (of those the sidecar listed) that no epoch committed and none
        /// will: the sidecar discards exactly these, nothing else.
        aborted: Vec<u64>,
    },
    /// Sidecar → coordinator: alive.
    Heartbeat,
    /// Coordinator → sidecar: arm for epoch `epoch`.
    Prepare {
        /// Epoch.
        epoch: u64,
    },
    /// Sidecar → coordinator: ready for the cut, or not (with why).
    Vote {
        /// Epoch.
        epoch: u64,
        /// Yes or no.
        yes: bool,
        /// Why not.
        reason: Option<String>,
    },
    /// Coordinator → sidecar: hold output, take the cut.
    Cut {
        /// Epoch.
        epoch: u64,
    },
    /// Sidecar → coordinator: cut taken; the guest runs again, output held.
    CutDone {
        /// Epoch.
        epoch: u64,
        /// The local checkpoint's id.
        checkpoint: u64,
        /// The guest's pause.
        pause_ms: f64,
    },
    /// Coordinator → sidecar: every member has cut: open the gate.
    Release {
        /// Epoch.
        epoch: u64,
    },
    /// Sidecar → coordinator: gate open again.
    Released {
        /// Epoch.
        epoch: u64,
        /// How long output was held.
        hold_ms: f64,
        /// Packets held.
        packets: u64,
        /// A bound released the gate early: the epoch must abort.
        breach: Option<String>,
    },
    /// Sidecar → coordinator: the checkpoint is complete and fsynced.
    Durable {
        /// Epoch.
        epoch: u64,
        /// Checkpoint id.
        checkpoint: u64,
        /// sha256 of its manifest.
        digest: String,
        /// Bytes it added to the store.
        bytes_stored: u64,
    },
    /// Coordinator → sidecar: epoch committed; keep these checkpoints, prune the rest.
    Commit {
        /// Epoch.
        epoch: u64,
        /// Checkpoint ids to keep.
        keep: Vec<u64>,
    },
    /// Coordinator → sidecar: epoch aborted; drop its tentative data, open the gate.
    Abort {
        /// Epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Sidecar → coordinator: a step of `epoch` failed here.
    StepFailed {
        /// Epoch.
        epoch: u64,
        /// What failed.
        reason: String,
    },
    /// Sidecar → coordinator: the VM failed (QEMU exited, guest shutdown, panic, watchdog).
    VmFailed {
        /// What happened.
        reason: String,
    },
    /// Coordinator → sidecar: restore checkpoint `checkpoint` paused (cluster rollback).
    Restore {
        /// The epoch rolled back to.
        epoch: u64,
        /// The checkpoint to restore.
        checkpoint: u64,
        /// sha256 of its manifest, as the commit record holds it.
        digest: String,
    },
    /// Sidecar → coordinator: restored and paused, ready to resume.
    Restored {
        /// The epoch.
        epoch: u64,
        /// New QEMU pid.
        pid: i32,
        /// Its start time (see `Register::pid_start`).
        pid_start: Option<u64>,
        /// How long the restore took.
        restore_ms: f64,
        /// Of that, reading the checkpoint from the store and rebuilding its files
        /// (disks, memory file, base images) before the old QEMU was stopped.
        #[serde(default)]
        fetch_ms: f64,
    },
    /// Coordinator → sidecar: resume the guest restored for `epoch`.
    Resume {
        /// The epoch restored.
        epoch: u64,
    },
    /// Sidecar → coordinator: running again.
    Resumed {
        /// The epoch restored.
        epoch: u64,
    },
    /// Coordinator → sidecar: re-hash checkpoint `checkpoint` (of `epoch`) in your store.
    Verify {
        /// The epoch.
        epoch: u64,
        /// The checkpoint.
        checkpoint: u64,
        /// sha256 of its manifest, as the commit record holds it.
        digest: String,
    },
    /// Sidecar → coordinator: what verifying found (empty: intact).
    Verified {
        /// The epoch.
        epoch: u64,
        /// Each problem found, naming the item.
        damage: Vec<String>,
    },
    /// CLI → coordinator.
    Ask {
        /// Cluster name.
        cluster: String,
        /// Pre-shared token for TCP.
        token: Option<String>,
        /// The request.
        request: Request,
    },
    /// Coordinator → CLI.
    Answer {
        /// The result, or the error.
        result: Result<Value, String>,
    },
    /// Either way: the message could not be taken.
    Error {
        /// Why.
        what: String,
    },
}

impl Msg {
    /// The message's type name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Msg::Register { .. } => "register",
            Msg::Welcome { .. } => "welcome",
            Msg::HostRegister { .. } => "host_register",
            Msg::HostWelcome { .. } => "host_welcome",
            Msg::HostHeartbeat { .. } => "host_heartbeat",
            Msg::Lease { .. } => "lease",
            Msg::Run { .. } => "run",
            Msg::Evict { .. } => "evict",
            Msg::Revoked { .. } => "revoked",
            Msg::Heartbeat => "heartbeat",
            Msg::Prepare { .. } => "prepare",
            Msg::Vote { .. } => "vote",
            Msg::Cut { .. } => "cut",
            Msg::CutDone { .. } => "cut_done",
            Msg::Release { .. } => "release",
            Msg::Released { .. } => "released",
            Msg::Durable { .. } => "durable",
            Msg::Commit { .. } => "commit",
            Msg::Abort { .. } => "abort",
            Msg::StepFailed { .. } => "step_failed",
            Msg::VmFailed { .. } => "vm_failed",
            Msg::Restore { .. } => "restore",
            Msg::Restored { .. } => "restored",
            Msg::Resume { .. } => "resume",
            Msg::Resumed { .. } => "resumed",
            Msg::Verify { .. } => "verify",
            Msg::Verified { .. } => "verified",
            Msg::Ask { .. } => "ask",
            Msg::Answer { .. } => "answer",
            Msg::Error { .. } => "error",
        }
    }

    /// The epoch a message belongs to, for those that belong to one.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            Msg::Prepare { epoch }
            | Msg::Vote { epoch, .. }
            | Msg::Cut { epoch }
            | Msg::CutDone { epoch, .. }
            | Msg::Release { epoch }
            | Msg::Released { epoch, .. }
            | Msg::Durable { epoch, .. }
            | Msg::Commit { epoch, .. }
            | Msg::Abort { epoch, .. }
            | Msg::StepFailed { epoch, .. }
            | Msg::Restore { epoch, .. }
            | Msg::Restored { epoch, .. }
            | Msg::Resume { epoch }
            | Msg::Resumed { epoch }
            | Msg::Verify { epoch, .. }
            | Msg::Verified { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// True for the messages that advance the clocks on send and receive.
    pub fn ticks(&self) -> bool {
        matches!(self, Msg::Cut { .. } | Msg::CutDone { .. } | Msg::Release { .. })
    }
}

/// A message with its sender's vector timestamp and the coordinator incarnation it
/// belongs to (0 before a sidecar has been welcomed, and on the CLI's conversation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The coordinator incarnation.
    #[serde(default)]
    pub inc: u64,
    /// The sender's vector timestamp at sending.
    pub vt: VectorClock,
    /// The message.
    pub msg: Msg,
}

impl Envelope {
    /// `msg` outside any incarnation, with an empty clock (CLI and refusals).
    pub fn plain(msg: Msg) -> Envelope {
        Envelope { inc: 0, vt: VectorClock::default(), msg }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let env = Envelope { inc: 7, vt: VectorClock::default(), msg: Msg::Cut { epoch: 3 } };
        let text = serde_json::to_string(&env).expect("json");
        assert_eq!(serde_json::from_str::<Envelope>(&text).expect("parse"), env);
        assert!(serde_json::from_str::<Envelope>(r#"{"vt":{},"msg":{"type":"cut","epoch":3,"x":1}}"#).is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"vt":{},"msg":{"type":"launch_missiles"}}"#).is_err());
    }

    #[test]
    fn epoch_messages_name_their_epoch() {
        assert_eq!(Msg::Resume { epoch: 4 }.epoch(), Some(4));
        assert_eq!(Msg::Verified { epoch: 5, damage: vec![] }.epoch(), Some(5));
        assert_eq!(Msg::Heartbeat.epoch(), None);
    }
}
