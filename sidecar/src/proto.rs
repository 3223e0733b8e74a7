//! The cluster protocol between the coordinator, the sidecars and the CLI: messages,
//! vector timestamps, and newline-delimited JSON framing with a size limit.
//!
//! Per epoch (seed 003's two-phase commit, with seed 000's vector timestamps):
//! `Prepare` → `Vote`; `Cut` → `CutDone`; `Release` → `Released`; `Durable`;
//! `Commit` (after the coordinator's record is on disk) or `Abort`. Seed 000's events
//! advance the clocks: the checkpoint request (`Cut`), the local checkpoint, the
//! acknowledgement (`CutDone`), the checkpoint-done message (`Release`) and the local
//! store, so a member's own component advances by 5 per round. The other messages carry
//! the sender's clock and are merged on receipt without advancing it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest message accepted, in bytes.
pub const MAX_MESSAGE: u64 = 1 << 20;
/// The coordinator's own component in vector timestamps.
pub const COORDINATOR: &str = "coordinator";

/// A vector timestamp: one counter per member and one for the coordinator.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VectorClock(pub BTreeMap<String, u64>);

impl VectorClock {
    /// The component of `who`.
    pub fn get(&self, who: &str) -> u64 {
        self.0.get(who).copied().unwrap_or(0)
    }

    /// An event of `me`: its own component advances.
    pub fn tick(&mut self, me: &str) {
        *self.0.entry(me.to_owned()).or_insert(0) += 1;
    }

    /// Takes the component-wise maximum with `other`.
    pub fn merge(&mut self, other: &VectorClock) {
        for (k, v) in &other.0 {
            let e = self.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
    }

    /// A receive by `me` of a message stamped `other`: maximum, then advance.
    pub fn receive(&mut self, me: &str, other: &VectorClock) {
        self.merge(other);
        self.tick(me);
    }

    /// The clock as a vector in `order` (members, then the coordinator).
    pub fn to_vec(&self, order: &[&str]) -> Vec<u64> {
        order.iter().map(|k| self.get(k)).collect()
    }
}

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
    /// Roll the cluster back to an epoch (the last committed one by default).
    Restore {
        /// The epoch.
        epoch: Option<u64>,
    },
    /// Re-hash every block of an epoch's checkpoints.
    Verify {
        /// The epoch.
        epoch: Option<u64>,
    },
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Msg {
    /// Sidecar → coordinator: join `cluster` as `name`.
    Register {
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
        /// Pre-shared token for TCP.
        token: Option<String>,
    },
    /// Coordinator → sidecar: registered; `committed` are this member's checkpoints in
    /// committed epochs (any newer one is tentative and must go).
    Welcome {
        /// Checkpoint ids of committed epochs.
        committed: Vec<u64>,
        /// Heartbeat period in ms.
        heartbeat_ms: u64,
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
    },
    /// Sidecar → coordinator: restored and paused, ready to resume.
    Restored {
        /// The epoch.
        epoch: u64,
        /// New QEMU pid.
        pid: i32,
        /// How long the restore took.
        restore_ms: f64,
    },
    /// Coordinator → sidecar: resume the guest.
    Resume,
    /// Sidecar → coordinator: running again.
    Resumed,
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
            Msg::Resume => "resume",
            Msg::Resumed => "resumed",
            Msg::Ask { .. } => "ask",
            Msg::Answer { .. } => "answer",
            Msg::Error { .. } => "error",
        }
    }

    /// True for seed 000's messages, which advance the clocks on send and receive.
    pub fn ticks(&self) -> bool {
        matches!(self, Msg::Cut { .. } | Msg::CutDone { .. } | Msg::Release { .. })
    }
}

/// A message with its sender's vector timestamp.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// The sender's vector timestamp at sending.
    pub vt: VectorClock,
    /// The message.
    pub msg: Msg,
}

/// Errors of reading a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading failed.
    #[error("read failed")]
    Io(#[from] std::io::Error),
    /// The message exceeds [`MAX_MESSAGE`].
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// Not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Reads one message.
pub async fn read<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<Envelope, FrameError> {
    let mut line = Vec::new();
    let n = (&mut *r).take(MAX_MESSAGE + 1).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Err(FrameError::Closed);
    }
    if n as u64 > MAX_MESSAGE {
        // Skip the rest of the oversized line so the connection stays usable.
        let mut sink = Vec::new();
        let _ = r.read_until(b'\n', &mut sink).await;
        return Err(FrameError::TooLarge);
    }
    serde_json::from_slice(&line).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Writes one message.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, env: &Envelope) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(env).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Compares two tokens in constant time (for the TCP pre-shared token).
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = (a.len() ^ b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 000's worked example: a VMM and four VMs, vectors (VM1..VM4, VMM). The VMM
    /// sends the request, each VM receives it, checkpoints, acks; the VMM takes the acks
    /// one by one and answers each with "done"; each VM then stores.
    #[test]
    fn seed_000_worked_example() {
        let vms = ["vm1", "vm2", "vm3", "vm4"];
        let order = ["vm1", "vm2", "vm3", "vm4", COORDINATOR];
        let mut vmm = VectorClock::default();
        let mut vm: Vec<VectorClock> = vec![VectorClock::default(); 4];
        vmm.tick(COORDINATOR); // before sending the request
        let request = vmm.clone();
        let mut acks = Vec::new();
        for (i, name) in vms.iter().enumerate() {
            vm[i].receive(name, &request);
            vm[i].tick(name); // checkpoint
            vm[i].tick(name); // before sending the ack
            acks.push(vm[i].clone());
        }
        assert_eq!(vm[0].to_vec(&order), [3, 0, 0, 0, 1]);
        assert_eq!(vm[1].to_vec(&order), [0, 3, 0, 0, 1]);
        for (i, name) in vms.iter().enumerate() {
            vmm.receive(COORDINATOR, &acks[i]);
            vmm.tick(COORDINATOR); // before sending "done"
            let done = vmm.clone();
            vm[i].receive(name, &done);
            vm[i].tick(name); // store
        }
        assert_eq!(vm[0].to_vec(&order), [5, 0, 0, 0, 3]);
        assert_eq!(vm[1].to_vec(&order), [3, 5, 0, 0, 5]);
        assert_eq!(vm[2].to_vec(&order), [3, 3, 5, 0, 7]);
        assert_eq!(vm[3].to_vec(&order), [3, 3, 3, 5, 9]);
        assert_eq!(vmm.to_vec(&order), [3, 3, 3, 3, 9]);
        for (i, name) in vms.iter().enumerate() {
            assert_eq!(vm[i].get(name), 5, "each VM's own component reaches 5 in the round");
        }
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let env = Envelope { vt: VectorClock::default(), msg: Msg::Cut { epoch: 3 } };
        let text = serde_json::to_string(&env).expect("json");
        assert_eq!(serde_json::from_str::<Envelope>(&text).expect("parse"), env);
        assert!(serde_json::from_str::<Envelope>(r#"{"vt":{},"msg":{"type":"cut","epoch":3,"x":1}}"#).is_err());
        assert!(serde_json::from_str::<Envelope>(r#"{"vt":{},"msg":{"type":"launch_missiles"}}"#).is_err());
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_and_the_stream_goes_on() {
        let mut data = vec![b'x'; (MAX_MESSAGE + 10) as usize];
        data.push(b'\n');
        let ok = serde_json::to_vec(&Envelope { vt: VectorClock::default(), msg: Msg::Heartbeat }).expect("json");
        data.extend_from_slice(&ok);
        data.push(b'\n');
        let mut r = tokio::io::BufReader::new(&data[..]);
        assert!(matches!(read(&mut r).await, Err(FrameError::TooLarge)));
        assert_eq!(read(&mut r).await.expect("next").msg, Msg::Heartbeat);
        assert!(matches!(read(&mut r).await, Err(FrameError::Closed)));
    }

    #[test]
    fn tokens_compare() {
        assert!(same_token("secret", "secret"));
        assert!(!same_token("secret", "secreT"));
        assert!(!same_token("secret", "secret2"));
    }
}
