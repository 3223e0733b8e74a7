//! What the coordinator is doing, as a pure state machine: idle, an epoch with typed
//! per-member progress and a deadline, a recovery with a step, a deadline and an attempt
//! count, or halted with a reason. [`Phase::step`] takes an event and returns the effects
//! for the actor to carry out; what a state does not allow is refused with a reason that
//! names the state, and the state is then left as it was.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sidecar::proto::{Msg, VectorClock};

/// When packets held for the cut are let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputCommit {
    /// As soon as every member has cut (no orphan messages; the shortest hold).
    Release,
    /// Only after the epoch commits (external clients never see output a failure could take back).
    Strict,
}

/// What the transitions depend on.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Longest a protocol step (or a recovery step) may take.
    pub step_timeout: Duration,
    /// When held output is released.
    pub output_commit: OutputCommit,
    /// Recovery attempts before the cluster halts.
    pub recovery_attempts: u32,
}

/// One member's progress in an epoch.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Prepare sent.
    Asked,
    /// Voted yes.
    Voted,
    /// Cut taken.
    Cut {
        /// Its checkpoint id.
        checkpoint: u64,
        /// The guest's pause.
        pause_ms: f64,
    },
    /// Stored durably.
    Durable {
        /// Its checkpoint id (the one of its cut).
        checkpoint: u64,
        /// The guest's pause.
        pause_ms: f64,
        /// sha256 of its manifest.
        digest: String,
        /// Bytes it added.
        bytes_stored: u64,
        /// Its clock on `Durable`.
        vt: VectorClock,
    },
}

/// A member's output release: (hold ms, packets).
pub type Released = (f64, u64);

/// A member in an epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// How far it got.
    pub stage: Stage,
    /// Its output gate opened again.
    pub released: Option<Released>,
}

/// Where an epoch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochStep {
    /// Waiting for votes.
    Preparing,
    /// Waiting for cuts.
    Cutting,
    /// Every member cut: waiting for releases and durables.
    Storing,
    /// The record is being written: the epoch's fate is that write's.
    Committing,
}

/// An epoch in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRun {
    /// Its number.
    pub epoch: u64,
    /// Where it is.
    pub step: EpochStep,
    /// The expected members and their progress.
    pub members: BTreeMap<String, Progress>,
    /// The current step must end by then.
    pub deadline: Instant,
    /// When it started.
    pub started: Instant,
    /// When the cut was asked for.
    pub cut_sent: Option<Instant>,
    /// Prepare to the last vote.
    pub prepare_ms: f64,
    /// Cut to the last cut.
    pub cut_ms: f64,
}

/// What a recovery target has done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetState {
    /// Restore sent.
    Restoring,
    /// Restored, paused.
    Restored,
    /// Running again.
    Resumed,
}

/// A member to roll back.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// Checkpoint to restore.
    pub checkpoint: u64,
    /// Its manifest digest in the record.
    pub digest: String,
    /// How far it got.
    pub state: TargetState,
}

/// What to roll back to: made by the actor from the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryPlan {
    /// The epoch rolled back to.
    pub epoch: u64,
    /// The members to restore: (checkpoint, digest).
    pub targets: BTreeMap<String, (u64, String)>,
    /// Why.
    pub reason: String,
    /// When the failure was detected.
    pub detected_at: Instant,
}

/// Where a recovery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryStep {
    /// Waiting for every target to be restored (paused).
    Restoring,
    /// Waiting for every target to run again.
    Resuming,
}

/// A rollback in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct Recovery {
    /// The epoch rolled back to.
    pub epoch: u64,
    /// Where it is.
    pub step: RecoveryStep,
    /// The targets.
    pub targets: BTreeMap<String, Target>,
    /// The current step must end by then.
    pub deadline: Instant,
    /// 1 for the first try.
    pub attempt: u32,
    /// Why it runs (and why the last attempt failed).
    pub reason: String,
    /// When the failure was detected.
    pub detected_at: Instant,
}

/// What the coordinator is doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Phase {
    /// Nothing: an epoch may start.
    Idle,
    /// An epoch.
    Epoch(EpochRun),
    /// A rollback.
    Recovery(Recovery),
    /// Recovery gave up: only an operator's restore goes on.
    Halted {
        /// Why.
        reason: String,
        /// VMs left restored and paused (the others are down or were never reached).
        paused: Vec<String>,
    },
}

/// What happens to the coordinator.
#[derive(Debug, Clone)]
pub enum Event {
    /// Start `epoch` with `members` (the actor checked they are all ready).
    Start {
        /// The epoch number (already persisted as used).
        epoch: u64,
        /// The expected members.
        members: Vec<String>,
    },
    /// A member's message, of the current incarnation.
    Member {
        /// Who.
        name: String,
        /// What.
        msg: Msg,
        /// Its clock.
        vt: VectorClock,
    },
    /// A member's sidecar connection dropped.
    Disconnected {
        /// Who.
        name: String,
    },
    /// A member's sidecar registered again.
    Registered {
        /// Who.
        name: String,
    },
    /// Roll back (a VM failed, or an operator asked).
    Recover(RecoveryPlan),
    /// The epoch's record is durable: the epoch is committed.
    RecordWritten {
        /// The epoch.
        epoch: u64,
    },
    /// The epoch's record could not be written.
    RecordFailed {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// Time passes.
    Tick,
}

/// A member's part of an epoch to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Commitment {
    /// Member name.
    pub name: String,
    /// Its checkpoint.
    pub checkpoint: u64,
    /// Its manifest digest.
    pub digest: String,
    /// Guest pause.
    pub pause_ms: f64,
    /// Output hold and packets held.
    pub released: Released,
    /// Bytes stored.
    pub bytes_stored: u64,
    /// Its clock on `Durable`.
    pub vt: VectorClock,
}

/// What the actor does for a transition.
#[derive(Debug, Clone)]
pub enum Effect {
    /// Send `msg` to each of `to` (clock-advancing messages advance the clock once).
    Send {
        /// Recipients.
        to: Vec<String>,
        /// The message.
        msg: Msg,
    },
    /// Write the epoch's record (off the actor), then report `RecordWritten`/`RecordFailed`.
    WriteRecord {
        /// The epoch.
        epoch: u64,
        /// Every expected member's part.
        members: Vec<Commitment>,
        /// Prepare to the last vote, cut to the last cut, cut to the last durable, whole.
        timings: [f64; 4],
    },
    /// The epoch committed: tell the members what to keep, answer waiters.
    Committed {
        /// The epoch.
        epoch: u64,
        /// Its members.
        members: Vec<String>,
    },
    /// The epoch aborted.
    Aborted {
        /// The epoch.
        epoch: u64,
        /// Why.
        reason: String,
    },
    /// The cluster runs again from `epoch`.
    Recovered {
        /// The epoch restored.
        epoch: u64,
        /// Detection to every member running.
        recovery_ms: f64,
        /// The members restored.
        members: Vec<String>,
        /// Why it ran.
        reason: String,
        /// Attempts it took.
        attempts: u32,
    },
    /// Recovery gave up.
    Halted {
        /// Why.
        reason: String,
    },
}

/// A transition the state does not allow.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{state}: {why}")]
pub struct Refused {
    /// The state, named.
    pub state: String,
    /// Why the event does not apply.
    pub why: String,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A sha256 in hex, as `Durable` must carry.
fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Phase {
    /// The state named, for refusals and status.
    pub fn name(&self) -> String {
        match self {
            Phase::Idle => "idle".into(),
            Phase::Epoch(r) => format!("epoch {} ({:?})", r.epoch, r.step).to_lowercase(),
            Phase::Recovery(r) => {
                format!("recovery to epoch {} ({:?}, attempt {})", r.epoch, r.step, r.attempt).to_lowercase()
            }
            Phase::Halted { reason, .. } => format!("halted ({reason})"),
        }
    }

    /// Applies `event` at `now`. On `Err` the phase is unchanged.
    pub fn step(&mut self, event: Event, now: Instant, s: &Settings) -> Result<Vec<Effect>, Refused> {
        let (next, effects) = transition(self, event, now, s)?;
        *self = next;
        Ok(effects)
    }
}

fn refuse<T>(phase: &Phase, why: impl Into<String>) -> Result<T, Refused> {
    Err(Refused { state: phase.name(), why: why.into() })
}

type Next = Result<(Phase, Vec<Effect>), Refused>;

fn transition(phase: &Phase, event: Event, now: Instant, s: &Settings) -> Next {
    match (phase, event) {
        (Phase::Idle, Event::Start { epoch, members }) => {
            if members.is_empty() {
                return refuse(phase, "no members");
            }
            let run = EpochRun {
                epoch,
                step: EpochStep::Preparing,
                members: members
                    .iter()
                    .map(|n| (n.clone(), Progress { stage: Stage::Asked, released: None }))
                    .collect(),
                deadline: now + s.step_timeout,
                started: now,
                cut_sent: None,
                prepare_ms: 0.0,
                cut_ms: 0.0,
            };
            Ok((Phase::Epoch(run), vec![Effect::Send { to: members, msg: Msg::Prepare { epoch } }]))
        }
        (_, Event::Start { .. }) => refuse(phase, "an epoch starts only when idle"),
        (Phase::Epoch(run), Event::Member { name, msg, vt }) => epoch_member(phase, run.clone(), name, msg, vt, now, s),
        (Phase::Recovery(r), Event::Member { name, msg, .. }) => recovery_member(phase, r.clone(), name, msg, now, s),
        (_, Event::Member { msg, .. }) => refuse(phase, format!("{} belongs to no epoch in flight", msg.kind())),
        (Phase::Epoch(run), Event::Disconnected { name }) => {
            if !run.members.contains_key(&name) {
                return refuse(phase, format!("{name} is not in epoch {}", run.epoch));
            }
            if run.step == EpochStep::Committing {
                // The record decides; the member learns the outcome when it registers again.
                return refuse(phase, format!("{name} left while the record is written"));
            }
            Ok(abort(run, format!("{name}: its sidecar disconnected mid-epoch")))
        }
        (_, Event::Disconnected { name }) => refuse(phase, format!("{name} disconnected; nothing waits on it")),
        (Phase::Recovery(r), Event::Registered { name }) => {
            let Some(t) = r.targets.get(&name) else {
                return refuse(phase, format!("{name} is not a target"));
            };
            let msg = match (r.step, t.state) {
                (_, TargetState::Restoring) => {
                    Msg::Restore { epoch: r.epoch, checkpoint: t.checkpoint, digest: t.digest.clone() }
                }
                (RecoveryStep::Resuming, TargetState::Restored) => Msg::Resume { epoch: r.epoch },
                _ => return refuse(phase, format!("{name} has nothing left to do")),
            };
            Ok((phase.clone(), vec![Effect::Send { to: vec![name], msg }]))
        }
        (_, Event::Registered { name }) => refuse(phase, format!("{name} registered; nothing to resend")),
        (Phase::Epoch(run), Event::Recover(_)) if run.step == EpochStep::Committing => {
            refuse(phase, "the record being written decides first")
        }
        (_, Event::Recover(plan)) => {
            let mut effects = Vec::new();
            if let Phase::Epoch(run) = phase {
                effects = abort(run, format!("recovery: {}", plan.reason)).1;
            }
            let (next, more) = start_recovery(plan, 1, now, s);
            effects.extend(more);
            Ok((next, effects))
        }
        (Phase::Epoch(run), Event::RecordWritten { epoch })
            if run.epoch == epoch && run.step == EpochStep::Committing =>
        {
            let members: Vec<String> = run.members.keys().cloned().collect();
            let mut effects = vec![Effect::Committed { epoch, members: members.clone() }];
            if s.output_commit == OutputCommit::Strict {
                effects.push(Effect::Send { to: members, msg: Msg::Release { epoch } });
            }
            Ok((Phase::Idle, effects))
        }
        (Phase::Epoch(run), Event::RecordFailed { epoch, reason }) if run.epoch == epoch => {
            Ok(abort(run, format!("commit record: {reason}")))
        }
        (_, Event::RecordWritten { epoch } | Event::RecordFailed { epoch, .. }) => {
            refuse(phase, format!("no record of epoch {epoch} is being written"))
        }
        (Phase::Epoch(run), Event::Tick) if now > run.deadline && run.step != EpochStep::Committing => {
            Ok(abort(run, format!("{:?} timed out after {:?}", run.step, s.step_timeout).to_lowercase()))
        }
        (Phase::Recovery(r), Event::Tick) if now > r.deadline => {
            let late: Vec<String> = r
                .targets
                .iter()
                .filter(|(_, t)| match r.step {
                    RecoveryStep::Restoring => t.state == TargetState::Restoring,
                    RecoveryStep::Resuming => t.state != TargetState::Resumed,
                })
                .map(|(n, _)| n.clone())
                .collect();
            Ok(retry(r, format!("{:?} timed out waiting for {}", r.step, late.join(", ")).to_lowercase(), now, s))
        }
        (_, Event::Tick) => Ok((phase.clone(), Vec::new())),
    }
}

/// The member's cut is taken (it may be durable already).
fn has_cut(stage: &Stage) -> bool {
    matches!(stage, Stage::Cut { .. } | Stage::Durable { .. })
}

/// Aborts `run`: every member is told, the epoch is reported aborted.
fn abort(run: &EpochRun, reason: String) -> (Phase, Vec<Effect>) {
    let to: Vec<String> = run.members.keys().cloned().collect();
    (
        Phase::Idle,
        vec![
            Effect::Send { to, msg: Msg::Abort { epoch: run.epoch, reason: reason.clone() } },
            Effect::Aborted { epoch: run.epoch, reason },
        ],
    )
}

fn epoch_member(
    phase: &Phase,
    mut run: EpochRun,
    name: String,
    msg: Msg,
    vt: VectorClock,
    now: Instant,
    s: &Settings,
) -> Next {
    if msg.epoch().is_some_and(|e| e != run.epoch) {
        return refuse(phase, format!("{} from {name} is for epoch {:?}", msg.kind(), msg.epoch()));
    }
    let Some(p) = run.members.get_mut(&name) else {
        return refuse(phase, format!("{name} is not a member of epoch {}", run.epoch));
    };
    // Once the record is being written only its outcome decides: an abort now could tell
    // members to drop checkpoints that a record on disk names.
    if run.step == EpochStep::Committing {
        return refuse(phase, format!("{} from {name}: the record being written decides the epoch", msg.kind()));
    }
    let stage = p.stage.clone();
    match msg {
        Msg::Vote { yes: false, reason, .. } => {
            Ok(abort(&run, format!("{name} voted no: {}", reason.unwrap_or_default())))
        }
        Msg::Vote { yes: true, .. } if stage == Stage::Asked => {
            p.stage = Stage::Voted;
            if run.members.values().all(|p| p.stage == Stage::Voted) {
                run.step = EpochStep::Cutting;
                run.prepare_ms = ms(now - run.started);
                run.cut_sent = Some(now);
                run.deadline = now + s.step_timeout;
                let to = run.members.keys().cloned().collect();
                let epoch = run.epoch;
                return Ok((Phase::Epoch(run), vec![Effect::Send { to, msg: Msg::Cut { epoch } }]));
            }
            Ok((Phase::Epoch(run), Vec::new()))
        }
        Msg::CutDone { checkpoint, pause_ms, .. } if stage == Stage::Voted && run.step == EpochStep::Cutting => {
            p.stage = Stage::Cut { checkpoint, pause_ms };
            let mut effects = Vec::new();
            if run.members.values().all(|p| has_cut(&p.stage)) {
                run.step = EpochStep::Storing;
                run.cut_ms = run.cut_sent.map_or(0.0, |t| ms(now - t));
                run.deadline = now + s.step_timeout;
                if s.output_commit == OutputCommit::Release {
                    let to = run.members.keys().cloned().collect();
                    effects.push(Effect::Send { to, msg: Msg::Release { epoch: run.epoch } });
                }
            }
            Ok((Phase::Epoch(run), effects))
        }
        Msg::Released { breach: Some(b), .. } => Ok(abort(&run, format!("{name}'s output gate released early: {b}"))),
        Msg::Released { hold_ms, packets, .. } if run.step == EpochStep::Storing && p.released.is_none() => {
            p.released = Some((hold_ms, packets));
            Ok(maybe_commit(run, now, s))
        }
        Msg::Durable { checkpoint, digest, bytes_stored, .. } => {
            let Stage::Cut { checkpoint: cut, pause_ms } = stage else {
                return Ok(abort(&run, format!("{name} reported durable without a cut of this epoch")));
            };
            if checkpoint != cut {
                return Ok(abort(&run, format!("{name} made checkpoint {checkpoint} durable, but its cut was {cut}")));
            }
            if !is_digest(&digest) {
                return Ok(abort(&run, format!("{name}'s manifest digest {digest:?} is not a sha256")));
            }
            p.stage = Stage::Durable { checkpoint, pause_ms, digest, bytes_stored, vt };
            Ok(maybe_commit(run, now, s))
        }
        Msg::StepFailed { reason, .. } => Ok(abort(&run, format!("{name}: {reason}"))),
        Msg::VmFailed { reason } => Ok(abort(&run, format!("{name}: its VM failed: {reason}"))),
        other => refuse(phase, format!("{} from {name} does not fit its stage {stage:?}", other.kind())),
    }
}

/// Commits once every expected member is durable with the checkpoint of its cut (and,
/// with `release`, has opened its gate).
fn maybe_commit(mut run: EpochRun, now: Instant, s: &Settings) -> (Phase, Vec<Effect>) {
    let released = s.output_commit == OutputCommit::Strict || run.members.values().all(|p| p.released.is_some());
    let durable = run.members.values().all(|p| matches!(p.stage, Stage::Durable { .. }));
    if !(released && durable && run.step == EpochStep::Storing) {
        return (Phase::Epoch(run), Vec::new());
    }
    let members = run
        .members
        .iter()
        .filter_map(|(n, p)| match &p.stage {
            Stage::Durable { checkpoint, pause_ms, digest, bytes_stored, vt } => Some(Commitment {
                name: n.clone(),
                checkpoint: *checkpoint,
                digest: digest.clone(),
                pause_ms: *pause_ms,
                released: p.released.unwrap_or((0.0, 0)),
                bytes_stored: *bytes_stored,
                vt: vt.clone(),
            }),
            _ => None,
        })
        .collect();
    run.step = EpochStep::Committing;
    let durable_ms = run.cut_sent.map_or(0.0, |t| ms(now - t));
    let timings = [run.prepare_ms, run.cut_ms, durable_ms, ms(now - run.started)];
    let epoch = run.epoch;
    (Phase::Epoch(run), vec![Effect::WriteRecord { epoch, members, timings }])
}

fn start_recovery(plan: RecoveryPlan, attempt: u32, now: Instant, s: &Settings) -> (Phase, Vec<Effect>) {
    let targets: BTreeMap<String, Target> = plan
        .targets
        .into_iter()
        .map(|(n, (checkpoint, digest))| (n, Target { checkpoint, digest, state: TargetState::Restoring }))
        .collect();
    let effects = targets
        .iter()
        .map(|(n, t)| Effect::Send {
            to: vec![n.clone()],
            msg: Msg::Restore { epoch: plan.epoch, checkpoint: t.checkpoint, digest: t.digest.clone() },
        })
        .collect();
    let r = Recovery {
        epoch: plan.epoch,
        step: RecoveryStep::Restoring,
        targets,
        deadline: now + s.step_timeout,
        attempt,
        reason: plan.reason,
        detected_at: plan.detected_at,
    };
    (Phase::Recovery(r), effects)
}

/// A recovery attempt failed: try again from the start, or halt after the last attempt.
fn retry(r: &Recovery, why: String, now: Instant, s: &Settings) -> (Phase, Vec<Effect>) {
    if r.attempt >= s.recovery_attempts {
        let reason = format!("recovery to epoch {} failed {} times; last: {why}", r.epoch, r.attempt);
        let paused =
            r.targets.iter().filter(|(_, t)| t.state == TargetState::Restored).map(|(n, _)| n.clone()).collect();
        return (Phase::Halted { reason: reason.clone(), paused }, vec![Effect::Halted { reason }]);
    }
    let plan = RecoveryPlan {
        epoch: r.epoch,
        targets: r.targets.iter().map(|(n, t)| (n.clone(), (t.checkpoint, t.digest.clone()))).collect(),
        reason: format!("{} (retry after: {why})", r.reason),
        detected_at: r.detected_at,
    };
    start_recovery(plan, r.attempt + 1, now, s)
}

fn recovery_member(phase: &Phase, mut r: Recovery, name: String, msg: Msg, now: Instant, s: &Settings) -> Next {
    if msg.epoch().is_some_and(|e| e != r.epoch) {
        return refuse(phase, format!("{} from {name} is for epoch {:?}", msg.kind(), msg.epoch()));
    }
    let Some(t) = r.targets.get_mut(&name) else {
        return refuse(phase, format!("{name} is not a target of this recovery"));
    };
    match msg {
        Msg::Restored { .. } if t.state == TargetState::Restoring && r.step == RecoveryStep::Restoring => {
            t.state = TargetState::Restored;
            if r.targets.values().all(|t| t.state == TargetState::Restored) {
                r.step = RecoveryStep::Resuming;
                r.deadline = now + s.step_timeout;
                let to = r.targets.keys().cloned().collect();
                let epoch = r.epoch;
                return Ok((Phase::Recovery(r), vec![Effect::Send { to, msg: Msg::Resume { epoch } }]));
            }
            Ok((Phase::Recovery(r), Vec::new()))
        }
        Msg::Resumed { .. } if t.state == TargetState::Restored && r.step == RecoveryStep::Resuming => {
            t.state = TargetState::Resumed;
            if r.targets.values().all(|t| t.state == TargetState::Resumed) {
                let effects = vec![Effect::Recovered {
                    epoch: r.epoch,
                    recovery_ms: ms(now - r.detected_at),
                    members: r.targets.keys().cloned().collect(),
                    reason: r.reason.clone(),
                    attempts: r.attempt,
                }];
                return Ok((Phase::Idle, effects));
            }
            Ok((Phase::Recovery(r), Vec::new()))
        }
        Msg::StepFailed { reason, .. } => Ok(retry(&r, format!("{name}: {reason}"), now, s)),
        // The sidecar stops its old QEMU to restore it: that exit is expected.
        Msg::VmFailed { .. } if t.state == TargetState::Restoring => refuse(phase, format!("{name} is being restored")),
        Msg::VmFailed { reason } => Ok(retry(&r, format!("{name}'s VM failed: {reason}"), now, s)),
        other => refuse(phase, format!("{} from {name} does not fit its state {:?}", other.kind(), t.state)),
    }
}

#[cfg(test)]
#[path = "phase_tests.rs"]
mod tests;
