//! A sidecar's view of its VM, as a pure state machine: detached, running, failed,
//! restoring, restored and paused. [`VmState::step`] returns the effects for the agent,
//! or refuses with a reason naming the state (and leaves it as it was).

use crate::slot::Tag;

/// The VM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmState {
    /// Not attached (QMP unreachable); not known to have failed.
    Detached,
    /// Attached to a running (or operator-paused) QEMU.
    Running {
        /// QEMU's pid.
        pid: Option<i32>,
    },
    /// QEMU is gone.
    Failed {
        /// What happened.
        reason: String,
    },
    /// Being restored for a rollback.
    Restoring(Tag),
    /// Restored for a rollback and paused, waiting for `Resume`.
    RestoredPaused {
        /// The rollback.
        at: Tag,
        /// The new QEMU's pid.
        pid: i32,
    },
}

/// What happens to the VM.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEvent {
    /// QMP attached.
    Attached {
        /// QEMU's pid.
        pid: Option<i32>,
    },
    /// QEMU exited (QMP closed and the process is gone), or is proven not to run.
    Exited {
        /// What happened.
        reason: String,
    },
    /// The coordinator asks for a restore.
    Restore(Tag),
    /// The restore finished: the new pid, or why not.
    Restored(Tag, Result<i32, String>),
    /// The coordinator asks to resume.
    Resume(Tag),
    /// `cont` finished.
    Resumed(Tag, Result<(), String>),
}

/// What the agent does.
#[derive(Debug, Clone, PartialEq)]
pub enum VmEffect {
    /// Tell the coordinator the VM failed.
    ReportFailed(String),
    /// Let go of QMP (the restore must reach QEMU) and restore in the background.
    StartRestore(Tag),
    /// Tell the coordinator the VM is restored and paused.
    SendRestored(Tag, i32),
    /// `cont` the guest.
    Cont(Tag),
    /// Tell the coordinator the VM runs again.
    SendResumed(Tag),
    /// Tell the coordinator a recovery step failed here.
    StepFailed(Tag, String),
}

/// A transition the VM state does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("VM {state}: {why}")]
pub struct Refused {
    /// The state, named.
    pub state: String,
    /// Why.
    pub why: String,
}

impl VmState {
    /// The state named.
    pub fn name(&self) -> String {
        match self {
            VmState::Detached => "detached".into(),
            VmState::Running { pid } => format!("running (pid {})", pid.map_or("?".into(), |p| p.to_string())),
            VmState::Failed { reason } => format!("failed ({reason})"),
            VmState::Restoring(t) => format!("restoring for epoch {}", t.epoch),
            VmState::RestoredPaused { at, pid } => format!("restored for epoch {} and paused (pid {pid})", at.epoch),
        }
    }

    /// The rollback this state belongs to, while restoring or restored and paused.
    pub fn rollback(&self) -> Option<Tag> {
        match self {
            VmState::Restoring(t) | VmState::RestoredPaused { at: t, .. } => Some(*t),
            _ => None,
        }
    }

    /// True when a checkpoint may be taken.
    pub fn can_checkpoint(&self) -> bool {
        matches!(self, VmState::Running { .. })
    }

    /// Applies `event`; on `Err` the state is unchanged.
    pub fn step(&mut self, event: VmEvent) -> Result<Vec<VmEffect>, Refused> {
        let refuse = |why: String| Err(Refused { state: self.name(), why });
        let (next, effects) = match (&*self, event) {
            (VmState::Restoring(_), VmEvent::Attached { .. }) => return refuse("attached while restoring".into()),
            // Attached to the restored QEMU: it stays paused until `Resume`.
            (VmState::RestoredPaused { .. }, VmEvent::Attached { .. }) => (self.clone(), vec![]),
            (_, VmEvent::Attached { pid }) => (VmState::Running { pid }, vec![]),
            (VmState::Running { .. } | VmState::Detached, VmEvent::Exited { reason }) => {
                (VmState::Failed { reason: reason.clone() }, vec![VmEffect::ReportFailed(reason)])
            }
            (_, VmEvent::Exited { reason }) => return refuse(format!("exit ({reason}) changes nothing here")),
            // A restore of an earlier coordinator incarnation is superseded: the new one
            // runs after it (the agent chains them) and the old one's result is refused.
            (VmState::Restoring(t), VmEvent::Restore(at)) if t.inc != at.inc => {
                (VmState::Restoring(at), vec![VmEffect::StartRestore(at)])
            }
            (VmState::Restoring(t), VmEvent::Restore(at)) => {
                return refuse(format!("restore for epoch {} asked while one for epoch {} runs", at.epoch, t.epoch));
            }
            (_, VmEvent::Restore(at)) => (VmState::Restoring(at), vec![VmEffect::StartRestore(at)]),
            (VmState::Restoring(t), VmEvent::Restored(at, Ok(pid))) if *t == at => {
                (VmState::RestoredPaused { at, pid }, vec![VmEffect::SendRestored(at, pid)])
            }
            (VmState::Restoring(t), VmEvent::Restored(at, Err(reason))) if *t == at => {
                (VmState::Failed { reason: reason.clone() }, vec![VmEffect::StepFailed(at, reason)])
            }
            (_, VmEvent::Restored(at, _)) => return refuse(format!("a restore for epoch {} is not awaited", at.epoch)),
            (VmState::RestoredPaused { .. } | VmState::Running { .. }, VmEvent::Resume(at)) => {
                (self.clone(), vec![VmEffect::Cont(at)])
            }
            (_, VmEvent::Resume(at)) => {
                let why = format!("cannot resume: VM {}", self.name());
                (self.clone(), vec![VmEffect::StepFailed(at, why)])
            }
            (VmState::RestoredPaused { pid, .. }, VmEvent::Resumed(at, Ok(()))) => {
                (VmState::Running { pid: Some(*pid) }, vec![VmEffect::SendResumed(at)])
            }
            (VmState::Running { .. }, VmEvent::Resumed(at, Ok(()))) => (self.clone(), vec![VmEffect::SendResumed(at)]),
            (_, VmEvent::Resumed(at, Err(reason))) => (self.clone(), vec![VmEffect::StepFailed(at, reason)]),
            (_, VmEvent::Resumed(at, Ok(()))) => return refuse(format!("resumed for epoch {} unexpectedly", at.epoch)),
        };
        *self = next;
        Ok(effects)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Tag = Tag { inc: 1, epoch: 4 };

    #[test]
    fn a_rollback_restores_pauses_and_resumes() {
        let mut v = VmState::Running { pid: Some(10) };
        assert_eq!(v.step(VmEvent::Restore(T)), Ok(vec![VmEffect::StartRestore(T)]));
        assert!(!v.can_checkpoint());
        assert_eq!(v.step(VmEvent::Restored(T, Ok(11))), Ok(vec![VmEffect::SendRestored(T, 11)]));
        assert_eq!(v.step(VmEvent::Resume(T)), Ok(vec![VmEffect::Cont(T)]));
        assert_eq!(v.step(VmEvent::Resumed(T, Ok(()))), Ok(vec![VmEffect::SendResumed(T)]));
        assert_eq!(v, VmState::Running { pid: Some(11) });
    }

    #[test]
    fn an_exit_is_reported_once_and_a_failed_restore_says_so() {
        let mut v = VmState::Running { pid: Some(10) };
        assert_eq!(
            v.step(VmEvent::Exited { reason: "killed".into() }),
            Ok(vec![VmEffect::ReportFailed("killed".into())])
        );
        assert!(v.step(VmEvent::Exited { reason: "again".into() }).is_err());
        v.step(VmEvent::Restore(T)).expect("restore from failed");
        assert_eq!(v.step(VmEvent::Restored(T, Err("disk".into()))), Ok(vec![VmEffect::StepFailed(T, "disk".into())]));
        assert!(matches!(v, VmState::Failed { .. }));
    }

    #[test]
    fn refused_transitions_name_the_state() {
        let mut v = VmState::Restoring(T);
        let e = v.step(VmEvent::Restore(Tag { inc: 1, epoch: 5 })).expect_err("one restore at a time");
        assert!(e.to_string().contains("restoring for epoch 4"), "{e}");
        assert!(v.step(VmEvent::Attached { pid: Some(3) }).is_err());
        assert!(v.step(VmEvent::Restored(Tag { inc: 2, epoch: 4 }, Ok(3))).is_err(), "another incarnation's restore");
        assert_eq!(v, VmState::Restoring(T));
        // A new coordinator incarnation's restore supersedes the old one's.
        let new = Tag { inc: 2, epoch: 3 };
        assert_eq!(v.step(VmEvent::Restore(new)), Ok(vec![VmEffect::StartRestore(new)]));
        assert!(v.step(VmEvent::Restored(T, Ok(3))).is_err(), "the superseded restore's result is refused");
        assert_eq!(v.rollback(), Some(new));
        let mut d = VmState::Detached;
        assert_eq!(
            d.step(VmEvent::Resume(T)),
            Ok(vec![VmEffect::StepFailed(T, "cannot resume: VM detached".into())]),
            "a resume that cannot happen answers with its epoch"
        );
        assert!(VmState::Failed { reason: "x".into() }.step(VmEvent::Resumed(T, Ok(()))).is_err());
    }
}
