//! The epoch slot's transition table, refused transitions included.

use super::*;

const A: Tag = Tag { inc: 1, epoch: 5 };
const B: Tag = Tag { inc: 1, epoch: 6 };
const OLD: Tag = Tag { inc: 0, epoch: 5 };

fn at(slot: Slot, ev: SlotEvent) -> (Slot, Vec<SlotEffect>) {
    let mut s = slot;
    let e = s.step(ev).expect("allowed");
    (s, e)
}

fn refused(slot: Slot, ev: SlotEvent) -> Refused {
    let mut s = slot.clone();
    let r = s.step(ev).expect_err("refused");
    assert_eq!(s, slot, "a refusal leaves the slot as it was");
    r
}

#[test]
fn a_whole_epoch_goes_free_arming_armed_storing_durable_free() {
    let (s, e) = at(Slot::Free, SlotEvent::Prepare(A));
    assert_eq!(e, vec![SlotEffect::Arm(A)]);
    let (s, e) = at(s, SlotEvent::Armed(A, Ok(9)));
    assert_eq!(s, Slot::Armed { at: A, checkpoint: 9 });
    assert_eq!(e, vec![SlotEffect::Vote { at: A, yes: true, reason: None }]);
    let (s, e) = at(s, SlotEvent::Cut(A));
    assert_eq!(e, vec![SlotEffect::TakeCut(A)]);
    let (s, e) = at(s, SlotEvent::CutTaken(A, Ok((9, 3.5))));
    assert_eq!(s, Slot::Storing { at: A, checkpoint: 9 });
    assert_eq!(e, vec![SlotEffect::SendCutDone { at: A, checkpoint: 9, pause_ms: 3.5 }, SlotEffect::Store(A)]);
    let (s, e) = at(s, SlotEvent::Stored(A, Ok(("d".into(), 100))));
    assert_eq!(s, Slot::Durable { at: A, checkpoint: 9 });
    assert_eq!(e, vec![SlotEffect::SendDurable { at: A, checkpoint: 9, digest: "d".into(), bytes_stored: 100 }]);
    let (s, e) = at(s, SlotEvent::Commit(A));
    assert_eq!((s, e), (Slot::Free, vec![SlotEffect::Retire]));
}

#[test]
fn aborts_undo_whatever_is_in_flight_and_always_open_the_gate() {
    let armed = Slot::Armed { at: A, checkpoint: 9 };
    assert_eq!(at(armed, SlotEvent::Abort(A)), (Slot::Free, vec![SlotEffect::DropArmed, SlotEffect::ReleaseGate]));
    let storing = Slot::Storing { at: A, checkpoint: 9 };
    assert_eq!(
        at(storing, SlotEvent::Abort(A)),
        (Slot::Free, vec![SlotEffect::AbandonStore(A), SlotEffect::ReleaseGate])
    );
    let durable = Slot::Durable { at: A, checkpoint: 9 };
    assert_eq!(
        at(durable.clone(), SlotEvent::Abort(A)),
        (Slot::Free, vec![SlotEffect::Discard, SlotEffect::ReleaseGate])
    );
    // An abort of another epoch touches nothing but the gate.
    assert_eq!(at(durable.clone(), SlotEvent::Abort(B)), (durable, vec![SlotEffect::ReleaseGate]));
    // Aborted while arming: the armed checkpoint is dropped when it arrives, with no vote.
    let (s, _) = at(Slot::Arming { at: A, aborted: false, then: None }, SlotEvent::Abort(A));
    assert_eq!(at(s.clone(), SlotEvent::Armed(A, Ok(9))), (Slot::Free, vec![SlotEffect::DropArmed]));
    assert_eq!(at(s, SlotEvent::Armed(A, Err("x".into()))), (Slot::Free, vec![]));
}

#[test]
fn work_of_another_epoch_or_incarnation_never_answers_for_this_one() {
    let arming = Slot::Arming { at: A, aborted: false, then: None };
    refused(arming.clone(), SlotEvent::Armed(OLD, Ok(3)));
    refused(arming.clone(), SlotEvent::Armed(B, Ok(3)));
    let storing = Slot::Storing { at: A, checkpoint: 9 };
    refused(storing.clone(), SlotEvent::Stored(OLD, Ok(("d".into(), 1))));
    let r = refused(Slot::Durable { at: A, checkpoint: 9 }, SlotEvent::Commit(OLD));
    assert!(r.to_string().contains("durable epoch 5 of incarnation 1"), "{r}");
    refused(Slot::Free, SlotEvent::Commit(A));
    refused(Slot::Free, SlotEvent::Stored(A, Ok(("d".into(), 1))));
    refused(Slot::Free, SlotEvent::CutTaken(A, Ok((1, 1.0))));
    refused(Slot::Armed { at: A, checkpoint: 9 }, SlotEvent::CutTaken(B, Ok((1, 1.0))));
}

#[test]
fn a_cut_without_its_armed_checkpoint_fails_the_step() {
    let e = at(Slot::Free, SlotEvent::Cut(A)).1;
    assert!(matches!(&e[..], [SlotEffect::StepFailed { at, .. }] if *at == A));
    let e = at(Slot::Armed { at: A, checkpoint: 9 }, SlotEvent::Cut(B)).1;
    assert!(matches!(&e[..], [SlotEffect::StepFailed { at, .. }] if *at == B));
    let (s, e) = at(Slot::Armed { at: A, checkpoint: 9 }, SlotEvent::CutTaken(A, Err("stop failed".into())));
    assert_eq!(s, Slot::Free);
    assert_eq!(e, vec![SlotEffect::ReleaseGate, SlotEffect::StepFailed { at: A, reason: "stop failed".into() }]);
}

#[test]
fn a_new_prepare_settles_what_the_slot_holds() {
    assert_eq!(
        at(Slot::Durable { at: A, checkpoint: 9 }, SlotEvent::Prepare(B)).1,
        vec![SlotEffect::Keep, SlotEffect::Arm(B)]
    );
    assert_eq!(
        at(Slot::Armed { at: A, checkpoint: 9 }, SlotEvent::Prepare(B)).1,
        vec![SlotEffect::DropArmed, SlotEffect::ReleaseGate, SlotEffect::Arm(B)]
    );
    assert_eq!(
        at(Slot::Storing { at: A, checkpoint: 9 }, SlotEvent::Prepare(B)).1,
        vec![SlotEffect::AbandonStore(A), SlotEffect::Arm(B)]
    );
    let (s, e) = at(Slot::Arming { at: A, aborted: false, then: None }, SlotEvent::Prepare(B));
    assert_eq!(s, Slot::Arming { at: A, aborted: false, then: None });
    assert!(matches!(&e[..], [SlotEffect::Vote { at, yes: false, .. }] if *at == B));
}

#[test]
fn a_lost_session_keeps_stored_work_and_the_welcome_decides_it() {
    let (s, e) = at(Slot::Armed { at: A, checkpoint: 9 }, SlotEvent::SessionLost);
    assert_eq!((s, e), (Slot::Free, vec![SlotEffect::DropArmed, SlotEffect::ReleaseGate]));
    let storing = Slot::Storing { at: A, checkpoint: 9 };
    assert_eq!(at(storing.clone(), SlotEvent::SessionLost).0, storing);
    let durable = Slot::Durable { at: A, checkpoint: 9 };
    let welcome = |c: Vec<u64>, a: Vec<u64>| SlotEvent::Welcome { committed: c, aborted: a };
    assert_eq!(at(durable.clone(), welcome(vec![9], vec![])), (Slot::Free, vec![SlotEffect::Retire]));
    assert_eq!(at(durable.clone(), welcome(vec![8], vec![9])), (Slot::Free, vec![SlotEffect::Discard]));
    // Neither committed nor named aborted (an unknown or empty catalog): nothing is deleted.
    assert_eq!(at(durable.clone(), welcome(vec![], vec![])), (durable, vec![]));
}

#[test]
fn an_epoch_asked_for_while_an_aborted_arming_runs_is_armed_right_after_it() {
    let aborted = Slot::Arming { at: A, aborted: true, then: None };
    // Not refused: queued behind the arming still on the QEMU.
    let (s, e) = at(aborted.clone(), SlotEvent::Prepare(B));
    assert_eq!((s.clone(), e), (Slot::Arming { at: A, aborted: true, then: Some(B) }, vec![]));
    assert!(s.name().contains("then epoch 6"), "{}", s.name());
    // The old arming's checkpoint is dropped and the new epoch armed.
    let (next, e) = at(s.clone(), SlotEvent::Armed(A, Ok(9)));
    assert_eq!(
        (next.clone(), e),
        (Slot::Arming { at: B, aborted: false, then: None }, vec![SlotEffect::DropArmed, SlotEffect::Arm(B)])
    );
    // Which then votes yes as usual.
    let (_, e) = at(next, SlotEvent::Armed(B, Ok(10)));
    assert_eq!(e, vec![SlotEffect::Vote { at: B, yes: true, reason: None }]);
    // A failed old arming arms the new epoch too.
    assert_eq!(
        at(s.clone(), SlotEvent::Armed(A, Err("x".into()))),
        (Slot::Arming { at: B, aborted: false, then: None }, vec![SlotEffect::Arm(B)])
    );
    // The queued epoch aborted before its turn: nothing is armed for it.
    let (s, e) = at(s, SlotEvent::Abort(B));
    assert_eq!((s.clone(), e), (aborted, vec![SlotEffect::ReleaseGate]));
    assert_eq!(at(s, SlotEvent::Armed(A, Ok(9))), (Slot::Free, vec![SlotEffect::DropArmed]));
    // A lost session forgets the queued epoch.
    let queued = Slot::Arming { at: A, aborted: true, then: Some(B) };
    assert_eq!(at(queued, SlotEvent::SessionLost).0, Slot::Arming { at: A, aborted: true, then: None });
}
