//! The coordinator phase's transition table, refused transitions included.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::*;

fn settings() -> Settings {
    Settings { step_timeout: Duration::from_secs(10), output_commit: OutputCommit::Release, recovery_attempts: 2 }
}

const D: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn member(name: &str, msg: Msg) -> Event {
    Event::Member { name: name.into(), msg, vt: VectorClock::default() }
}

fn started(now: Instant) -> Phase {
    let mut p = Phase::Idle;
    p.step(Event::Start { epoch: 7, members: vec!["a".into(), "b".into()] }, now, &settings()).expect("start");
    p
}

fn sends(effects: &[Effect]) -> Vec<(Vec<String>, &'static str)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { to, msg } => Some((to.clone(), msg.kind())),
            _ => None,
        })
        .collect()
}

/// Drives epoch 7 of members a and b to the point where both are durable.
fn durable(now: Instant) -> (Phase, Vec<Effect>) {
    let s = settings();
    let mut p = started(now);
    for n in ["a", "b"] {
        p.step(member(n, Msg::Vote { epoch: 7, yes: true, reason: None }), now, &s).expect("vote");
    }
    for (n, c) in [("a", 3), ("b", 4)] {
        p.step(member(n, Msg::CutDone { epoch: 7, checkpoint: c, pause_ms: 1.0 }), now, &s).expect("cut");
    }
    for n in ["a", "b"] {
        p.step(member(n, Msg::Released { epoch: 7, hold_ms: 2.0, packets: 1, breach: None }), now, &s)
            .expect("released");
    }
    p.step(member("a", Msg::Durable { epoch: 7, checkpoint: 3, digest: D.into(), bytes_stored: 1 }), now, &s)
        .expect("a");
    let e = p
        .step(member("b", Msg::Durable { epoch: 7, checkpoint: 4, digest: D.into(), bytes_stored: 1 }), now, &s)
        .expect("b");
    (p, e)
}

#[test]
fn an_epoch_runs_prepare_cut_release_durable_record_commit() {
    let now = Instant::now();
    let s = settings();
    let mut p = Phase::Idle;
    let e = p.step(Event::Start { epoch: 7, members: vec!["a".into(), "b".into()] }, now, &s).expect("start");
    assert_eq!(sends(&e), vec![(vec!["a".into(), "b".into()], "prepare")]);
    let e = p.step(member("a", Msg::Vote { epoch: 7, yes: true, reason: None }), now, &s).expect("vote");
    assert!(e.is_empty());
    let e = p.step(member("b", Msg::Vote { epoch: 7, yes: true, reason: None }), now, &s).expect("vote");
    assert_eq!(sends(&e), vec![(vec!["a".into(), "b".into()], "cut")]);
    let (mut p, e) = durable(now);
    assert!(
        matches!(&e[..], [Effect::WriteRecord { epoch: 7, members, .. }] if members.len() == 2 && members[1].checkpoint == 4)
    );
    assert!(matches!(&p, Phase::Epoch(r) if r.step == EpochStep::Committing));
    let e = p.step(Event::RecordWritten { epoch: 7 }, now, &s).expect("written");
    assert!(matches!(&e[..], [Effect::Committed { epoch: 7, .. }]));
    assert_eq!(p, Phase::Idle);
}

#[test]
fn a_fast_member_may_be_durable_before_the_others_cut() {
    let now = Instant::now();
    let s = settings();
    let mut p = started(now);
    for n in ["a", "b"] {
        p.step(member(n, Msg::Vote { epoch: 7, yes: true, reason: None }), now, &s).expect("vote");
    }
    p.step(member("a", Msg::CutDone { epoch: 7, checkpoint: 3, pause_ms: 1.0 }), now, &s).expect("cut a");
    p.step(member("a", Msg::Durable { epoch: 7, checkpoint: 3, digest: D.into(), bytes_stored: 1 }), now, &s)
        .expect("a");
    let e = p.step(member("b", Msg::CutDone { epoch: 7, checkpoint: 4, pause_ms: 1.0 }), now, &s).expect("cut b");
    assert_eq!(sends(&e), vec![(vec!["a".into(), "b".into()], "release")], "every member has cut");
}

#[test]
fn a_commit_needs_every_member_with_the_checkpoint_of_its_cut_and_a_real_digest() {
    let now = Instant::now();
    let s = settings();
    let mut p = started(now);
    for n in ["a", "b"] {
        p.step(member(n, Msg::Vote { epoch: 7, yes: true, reason: None }), now, &s).expect("vote");
    }
    p.step(member("a", Msg::CutDone { epoch: 7, checkpoint: 3, pause_ms: 1.0 }), now, &s).expect("cut");
    let mut other = p.clone();
    let e = p
        .step(member("a", Msg::Durable { epoch: 7, checkpoint: 2, digest: D.into(), bytes_stored: 1 }), now, &s)
        .expect("x");
    assert!(matches!(&e[..], [_, Effect::Aborted { reason, .. }] if reason.contains("its cut was 3")), "{e:?}");
    let e = other
        .step(member("a", Msg::Durable { epoch: 7, checkpoint: 3, digest: String::new(), bytes_stored: 1 }), now, &s)
        .expect("x");
    assert!(matches!(&e[..], [_, Effect::Aborted { reason, .. }] if reason.contains("not a sha256")), "{e:?}");
    // Durable from a member that never cut in this epoch.
    let mut q = started(now);
    let e = q
        .step(member("b", Msg::Durable { epoch: 7, checkpoint: 4, digest: D.into(), bytes_stored: 1 }), now, &s)
        .expect("x");
    assert!(matches!(&e[..], [_, Effect::Aborted { .. }]));
}

#[test]
fn messages_of_other_epochs_or_members_are_refused_and_change_nothing() {
    let now = Instant::now();
    let s = settings();
    let p = started(now);
    for (ev, why) in [
        (member("a", Msg::Vote { epoch: 6, yes: true, reason: None }), "for epoch Some(6)"),
        (member("z", Msg::Vote { epoch: 7, yes: true, reason: None }), "not a member"),
        (member("a", Msg::CutDone { epoch: 7, checkpoint: 1, pause_ms: 1.0 }), "does not fit"),
        (member("a", Msg::Resumed { epoch: 7 }), "does not fit"),
        (Event::Start { epoch: 8, members: vec!["a".into()] }, "only when idle"),
        (Event::RecordWritten { epoch: 7 }, "no record"),
        (Event::Registered { name: "a".into() }, "nothing to resend"),
    ] {
        let mut q = p.clone();
        let r = q.step(ev, now, &s).expect_err("refused");
        assert!(r.why.contains(why), "{r} should say {why}");
        assert!(r.state.starts_with("epoch 7"), "{r}");
        assert_eq!(q, p);
    }
    let mut idle = Phase::Idle;
    let r =
        idle.step(member("a", Msg::Durable { epoch: 7, checkpoint: 3, digest: D.into(), bytes_stored: 1 }), now, &s);
    assert!(r.expect_err("idle").state == "idle");
    assert!(Phase::Idle.step(Event::Start { epoch: 1, members: vec![] }, now, &s).is_err());
}

#[test]
fn aborts_no_vote_breach_step_failure_disconnect_vm_failure_and_deadline() {
    let now = Instant::now();
    let s = settings();
    for ev in [
        member("a", Msg::Vote { epoch: 7, yes: false, reason: Some("full".into()) }),
        member("a", Msg::StepFailed { epoch: 7, reason: "x".into() }),
        member("a", Msg::VmFailed { reason: "gone".into() }),
        Event::Disconnected { name: "b".into() },
    ] {
        let mut p = started(now);
        let e = p.step(ev, now, &s).expect("abort");
        assert_eq!(sends(&e), vec![(vec!["a".into(), "b".into()], "abort")]);
        assert_eq!(p, Phase::Idle);
    }
    let mut p = started(now);
    assert!(p.step(Event::Tick, now + Duration::from_secs(5), &s).expect("tick").is_empty());
    let e = p.step(Event::Tick, now + Duration::from_secs(11), &s).expect("tick");
    assert!(matches!(&e[..], [_, Effect::Aborted { reason, .. }] if reason.contains("timed out")));
}

#[test]
fn while_the_record_is_written_nothing_but_its_outcome_decides() {
    let now = Instant::now();
    let s = settings();
    let (p, _) = durable(now);
    let mut q = p.clone();
    assert!(q.step(Event::Disconnected { name: "a".into() }, now, &s).is_err());
    assert!(q.step(Event::Tick, now + Duration::from_secs(60), &s).expect("tick").is_empty(), "no deadline");
    // A VM failure or a failed step while the record is written cannot abort the epoch:
    // the record may be on disk already.
    for ev in [
        member("a", Msg::VmFailed { reason: "gone".into() }),
        member("b", Msg::StepFailed { epoch: 7, reason: "late".into() }),
        member("a", Msg::Released { epoch: 7, hold_ms: 1.0, packets: 0, breach: Some("bound".into()) }),
    ] {
        let r = q.step(ev, now, &s).expect_err("the record decides");
        assert!(r.why.contains("record being written"), "{r}");
    }
    assert_eq!(q, p);
    let plan = RecoveryPlan { epoch: 6, targets: BTreeMap::new(), reason: "x".into(), detected_at: now };
    assert!(q.step(Event::Recover(plan), now, &s).is_err(), "recovery waits for the record");
    let e = q.step(Event::RecordFailed { epoch: 7, reason: "disk full".into() }, now, &s).expect("failed");
    assert!(matches!(&e[..], [_, Effect::Aborted { reason, .. }] if reason.contains("disk full")));
}

fn plan(now: Instant) -> RecoveryPlan {
    let targets = [("a".to_owned(), (3, D.to_owned())), ("b".to_owned(), (4, D.to_owned()))].into_iter().collect();
    RecoveryPlan { epoch: 6, targets, reason: "b failed".into(), detected_at: now }
}

#[test]
fn a_recovery_restores_every_target_then_resumes_them_together() {
    let now = Instant::now();
    let s = settings();
    let mut p = started(now);
    let e = p.step(Event::Recover(plan(now)), now, &s).expect("recover");
    let kinds: Vec<_> = sends(&e).into_iter().map(|(_, k)| k).collect();
    assert_eq!(kinds, vec!["abort", "restore", "restore"], "the epoch in flight aborts first");
    let restored =
        |n: &str| member(n, Msg::Restored { epoch: 6, pid: 1, pid_start: None, restore_ms: 1.0, fetch_ms: 0.5 });
    assert!(p.step(restored("a"), now, &s).expect("a").is_empty());
    let e = p.step(restored("b"), now, &s).expect("b");
    assert_eq!(sends(&e), vec![(vec!["a".into(), "b".into()], "resume")]);
    p.step(member("a", Msg::Resumed { epoch: 6 }), now, &s).expect("a");
    let e = p.step(member("b", Msg::Resumed { epoch: 6 }), now, &s).expect("b");
    assert!(matches!(&e[..], [Effect::Recovered { epoch: 6, attempts: 1, .. }]));
    assert_eq!(p, Phase::Idle);
}

#[test]
fn a_failing_recovery_retries_then_halts_and_an_operator_restore_leaves_halted() {
    let now = Instant::now();
    let s = settings();
    let mut p = Phase::Idle;
    p.step(Event::Recover(plan(now)), now, &s).expect("recover");
    // The old QEMU's exit while it is being restored is expected.
    assert!(p.step(member("a", Msg::VmFailed { reason: "stopped".into() }), now, &s).is_err());
    let e = p.step(member("a", Msg::StepFailed { epoch: 6, reason: "disk".into() }), now, &s).expect("retry");
    assert_eq!(sends(&e).len(), 2, "every target restores again");
    assert!(matches!(&p, Phase::Recovery(r) if r.attempt == 2));
    // A registration resends what that target still owes.
    let e = p.step(Event::Registered { name: "b".into() }, now, &s).expect("resend");
    assert_eq!(sends(&e), vec![(vec!["b".into()], "restore")]);
    let e = p.step(Event::Tick, now + Duration::from_secs(11), &s).expect("deadline");
    assert!(
        matches!(&e[..], [Effect::Halted { reason }] if reason.contains("failed 2 times") && reason.contains("timed out"))
    );
    assert!(matches!(&p, Phase::Halted { .. }));
    let r = p.step(Event::Start { epoch: 8, members: vec!["a".into()] }, now, &s).expect_err("halted");
    assert!(r.state.starts_with("halted"), "{r}");
    assert!(p.step(Event::Tick, now + Duration::from_secs(99), &s).expect("tick").is_empty());
    p.step(Event::Recover(plan(now)), now, &s).expect("an operator's restore");
    assert!(matches!(&p, Phase::Recovery(r) if r.attempt == 1));
}

#[test]
fn recovery_refuses_other_epochs_and_strangers() {
    let now = Instant::now();
    let s = settings();
    let mut p = Phase::Idle;
    p.step(Event::Recover(plan(now)), now, &s).expect("recover");
    let q = p.clone();
    for ev in [
        member("a", Msg::Restored { epoch: 5, pid: 1, pid_start: None, restore_ms: 1.0, fetch_ms: 0.5 }),
        member("z", Msg::Restored { epoch: 6, pid: 1, pid_start: None, restore_ms: 1.0, fetch_ms: 0.5 }),
        member("a", Msg::Resumed { epoch: 6 }),
        Event::Registered { name: "z".into() },
    ] {
        let r = p.step(ev, now, &s).expect_err("refused");
        assert!(r.state.starts_with("recovery to epoch 6"), "{r}");
        assert_eq!(p, q);
    }
}
