//! A sidecar's one epoch slot, as a pure state machine: free, arming, armed, storing,
//! durable. Each state names the coordinator incarnation and epoch it belongs to, so that
//! work of an earlier incarnation or epoch never answers for a later one. [`Slot::step`]
//! returns the effects for the agent to carry out, or refuses with a reason naming the
//! state (and leaves it as it was).

/// An epoch of one coordinator incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag {
    /// The coordinator incarnation.
    pub inc: u64,
    /// The epoch.
    pub epoch: u64,
}

/// The slot.
#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// Nothing in flight.
    Free,
    /// Arming (targets, capabilities) in the background; `aborted` when its epoch went
    /// away meanwhile (the armed checkpoint is then dropped when it arrives).
    Arming {
        /// Its epoch.
        at: Tag,
        /// Its epoch is gone.
        aborted: bool,
        /// An epoch asked for while an aborted arming still ran: armed as soon as that
        /// one is done (arming is never run twice at once on one QEMU, and the new epoch
        /// is not refused for a delay that is the sidecar's own).
        then: Option<Tag>,
    },
    /// Armed and voted yes: waiting for the cut.
    Armed {
        /// Its epoch.
        at: Tag,
        /// The checkpoint id it will have.
        checkpoint: u64,
    },
    /// Cut taken; memory and disks are being stored.
    Storing {
        /// Its epoch.
        at: Tag,
        /// The checkpoint id.
        checkpoint: u64,
    },
    /// Stored durably; its fate is the coordinator's (commit, abort, or unknown after a
    /// lost connection until the next `Welcome` says).
    Durable {
        /// Its epoch.
        at: Tag,
        /// The checkpoint id.
        checkpoint: u64,
    },
}

/// What happens to the slot.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotEvent {
    /// The coordinator asks to arm.
    Prepare(Tag),
    /// Arming finished: the checkpoint id, or why not.
    Armed(Tag, Result<u64, String>),
    /// The coordinator asks for the cut.
    Cut(Tag),
    /// The cut finished: (checkpoint, pause ms), or why not.
    CutTaken(Tag, Result<(u64, f64), String>),
    /// Storing finished: (digest, bytes stored), or why not.
    Stored(Tag, Result<(String, u64), String>),
    /// The epoch committed.
    Commit(Tag),
    /// The epoch aborted.
    Abort(Tag),
    /// The connection to the coordinator is gone.
    SessionLost,
    /// A new coordinator session says which checkpoints were committed and which aborted.
    Welcome {
        /// Committed checkpoint ids.
        committed: Vec<u64>,
        /// Aborted checkpoint ids.
        aborted: Vec<u64>,
    },
}

/// What the agent does for a transition.
#[derive(Debug, Clone, PartialEq)]
pub enum SlotEffect {
    /// Arm in the background (after any store still running), then report `Armed`.
    Arm(Tag),
    /// Give up the armed checkpoint (the guest is untouched).
    DropArmed,
    /// Vote.
    Vote {
        /// For.
        at: Tag,
        /// Yes or no.
        yes: bool,
        /// Why not.
        reason: Option<String>,
    },
    /// Hold output and take the cut of the armed checkpoint, then report `CutTaken`.
    TakeCut(Tag),
    /// Tell the coordinator the cut is taken.
    SendCutDone {
        /// For.
        at: Tag,
        /// Checkpoint id.
        checkpoint: u64,
        /// Guest pause.
        pause_ms: f64,
    },
    /// Store the rest in the background, then report `Stored`.
    Store(Tag),
    /// Forget a store in flight: its checkpoint is discarded when it arrives.
    AbandonStore(Tag),
    /// Tell the coordinator the checkpoint is durable.
    SendDurable {
        /// For.
        at: Tag,
        /// Checkpoint id.
        checkpoint: u64,
        /// Manifest digest.
        digest: String,
        /// Bytes stored.
        bytes_stored: u64,
    },
    /// The durable checkpoint is final: retire the bitmaps it built on.
    Retire,
    /// The durable checkpoint is given up: its manifest and new bitmaps go.
    Discard,
    /// The durable checkpoint of unknown fate stays as it is (the store keeps it until a
    /// commit's keep list drops it).
    Keep,
    /// Open the output gate.
    ReleaseGate,
    /// Tell the coordinator a step failed.
    StepFailed {
        /// For.
        at: Tag,
        /// Why.
        reason: String,
    },
}

/// A transition the slot does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("epoch slot {state}: {why}")]
pub struct Refused {
    /// The state, named.
    pub state: String,
    /// Why.
    pub why: String,
}

impl Slot {
    /// The state named.
    pub fn name(&self) -> String {
        let t = |at: &Tag| format!("epoch {} of incarnation {}", at.epoch, at.inc);
        match self {
            Slot::Free => "free".into(),
            Slot::Arming { at, aborted, then } => format!(
                "arming {}{}{}",
                t(at),
                if *aborted { " (aborted)" } else { "" },
                then.map(|n| format!(", then {}", t(&n))).unwrap_or_default()
            ),
            Slot::Armed { at, checkpoint } => format!("armed {} (checkpoint {checkpoint})", t(at)),
            Slot::Storing { at, checkpoint } => format!("storing {} (checkpoint {checkpoint})", t(at)),
            Slot::Durable { at, checkpoint } => format!("durable {} (checkpoint {checkpoint})", t(at)),
        }
    }

    /// The epoch the slot belongs to, if any.
    pub fn tag(&self) -> Option<Tag> {
        match self {
            Slot::Free => None,
            Slot::Arming { at, .. } | Slot::Armed { at, .. } | Slot::Storing { at, .. } | Slot::Durable { at, .. } => {
                Some(*at)
            }
        }
    }

    /// Applies `event`; on `Err` the slot is unchanged.
    pub fn step(&mut self, event: SlotEvent) -> Result<Vec<SlotEffect>, Refused> {
        let (next, effects) = transition(self, event)?;
        *self = next;
        Ok(effects)
    }
}

/// A slot arming `at`, live, nothing queued.
fn arming(at: Tag) -> Slot {
    Slot::Arming { at, aborted: false, then: None }
}

fn refuse<T>(slot: &Slot, why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused { state: slot.name(), why: why.into() })
}

fn transition(slot: &Slot, event: SlotEvent) -> Result<(Slot, Vec<SlotEffect>), Refused> {
    use SlotEffect as E;
    use SlotEvent as Ev;
    let same = |at: &Tag| slot.tag().as_ref() == Some(at);
    Ok(match (slot, event) {
        (Slot::Free, Ev::Prepare(at)) => (arming(at), vec![E::Arm(at)]),
        // A checkpoint whose fate no one could tell stays; a new epoch goes on.
        (Slot::Durable { .. }, Ev::Prepare(at)) => (arming(at), vec![E::Keep, E::Arm(at)]),
        // The abort of the armed epoch was missed (a lost message): drop it, arm anew.
        (Slot::Armed { .. }, Ev::Prepare(at)) => (arming(at), vec![E::DropArmed, E::ReleaseGate, E::Arm(at)]),
        // A store still running belongs to an epoch that is over: let it finish, then discard.
        (Slot::Storing { at: old, .. }, Ev::Prepare(at)) => (arming(at), vec![E::AbandonStore(*old), E::Arm(at)]),
        // The arming of an epoch that is over still runs: arm the new one right after it.
        (Slot::Arming { at: old, aborted: true, .. }, Ev::Prepare(at)) => {
            (Slot::Arming { at: *old, aborted: true, then: Some(at) }, vec![])
        }
        (Slot::Arming { .. }, Ev::Prepare(at)) => {
            return Ok((
                slot.clone(),
                vec![E::Vote { at, yes: false, reason: Some(format!("still {}", slot.name())) }],
            ));
        }
        (Slot::Arming { at, aborted: false, .. }, Ev::Armed(t, Ok(checkpoint))) if *at == t => {
            (Slot::Armed { at: t, checkpoint }, vec![E::Vote { at: t, yes: true, reason: None }])
        }
        (Slot::Arming { at, aborted: true, then }, Ev::Armed(t, Ok(_))) if *at == t => match then {
            Some(next) => (arming(*next), vec![E::DropArmed, E::Arm(*next)]),
            None => (Slot::Free, vec![E::DropArmed]),
        },
        (Slot::Arming { at, aborted: true, then: Some(next) }, Ev::Armed(t, Err(_))) if *at == t => {
            (arming(*next), vec![E::Arm(*next)])
        }
        (Slot::Arming { at, aborted, .. }, Ev::Armed(t, Err(reason))) if *at == t => {
            let vote = if *aborted { vec![] } else { vec![E::Vote { at: t, yes: false, reason: Some(reason) }] };
            (Slot::Free, vote)
        }
        (Slot::Armed { at, .. }, Ev::Cut(t)) if *at == t => (slot.clone(), vec![E::TakeCut(t)]),
        (_, Ev::Cut(t)) => {
            return Ok((
                slot.clone(),
                vec![E::StepFailed { at: t, reason: format!("cut asked while {}", slot.name()) }],
            ));
        }
        (Slot::Armed { at, .. }, Ev::CutTaken(t, Ok((checkpoint, pause_ms)))) if *at == t => {
            (Slot::Storing { at: t, checkpoint }, vec![E::SendCutDone { at: t, checkpoint, pause_ms }, E::Store(t)])
        }
        (Slot::Armed { at, .. }, Ev::CutTaken(t, Err(reason))) if *at == t => {
            (Slot::Free, vec![E::ReleaseGate, E::StepFailed { at: t, reason }])
        }
        (Slot::Storing { at, checkpoint }, Ev::Stored(t, Ok((digest, bytes_stored)))) if *at == t => (
            Slot::Durable { at: t, checkpoint: *checkpoint },
            vec![E::SendDurable { at: t, checkpoint: *checkpoint, digest, bytes_stored }],
        ),
        (Slot::Storing { at, .. }, Ev::Stored(t, Err(reason))) if *at == t => {
            (Slot::Free, vec![E::StepFailed { at: t, reason }])
        }
        (Slot::Durable { at, .. }, Ev::Commit(t)) if *at == t => (Slot::Free, vec![E::Retire]),
        (_, Ev::Commit(t)) => return refuse(slot, format!("commit of epoch {} is not this slot's", t.epoch)),
        (Slot::Arming { at, .. }, Ev::Abort(t)) if *at == t => {
            (Slot::Arming { at: t, aborted: true, then: None }, vec![E::ReleaseGate])
        }
        (Slot::Arming { at, aborted, then: Some(next) }, Ev::Abort(t)) if *next == t => {
            (Slot::Arming { at: *at, aborted: *aborted, then: None }, vec![E::ReleaseGate])
        }
        (Slot::Armed { .. }, Ev::Abort(t)) if same(&t) => (Slot::Free, vec![E::DropArmed, E::ReleaseGate]),
        (Slot::Storing { .. }, Ev::Abort(t)) if same(&t) => (Slot::Free, vec![E::AbandonStore(t), E::ReleaseGate]),
        (Slot::Durable { .. }, Ev::Abort(t)) if same(&t) => (Slot::Free, vec![E::Discard, E::ReleaseGate]),
        // The gate is released whatever the slot: an abort never leaves output held.
        (_, Ev::Abort(_)) => (slot.clone(), vec![E::ReleaseGate]),
        (Slot::Arming { at, .. }, Ev::SessionLost) => {
            (Slot::Arming { at: *at, aborted: true, then: None }, vec![E::ReleaseGate])
        }
        (Slot::Armed { .. }, Ev::SessionLost) => (Slot::Free, vec![E::DropArmed, E::ReleaseGate]),
        // Storing goes on; the checkpoint's fate comes with the next Welcome.
        (_, Ev::SessionLost) => (slot.clone(), vec![E::ReleaseGate]),
        (Slot::Durable { checkpoint, .. }, Ev::Welcome { committed, aborted }) => {
            if committed.contains(checkpoint) {
                (Slot::Free, vec![E::Retire])
            } else if aborted.contains(checkpoint) {
                (Slot::Free, vec![E::Discard])
            } else {
                (slot.clone(), vec![])
            }
        }
        (_, Ev::Welcome { .. }) => (slot.clone(), vec![]),
        (_, ev) => return refuse(slot, format!("{ev:?} does not apply")),
    })
}

#[cfg(test)]
#[path = "slot_tests.rs"]
mod tests;
