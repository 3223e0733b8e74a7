//! The agent's effects: what the slot and VM machines' transitions mean for QEMU, the
//! store and the coordinator, and the results of background work fed back as events.

use std::collections::VecDeque;
use std::time::Instant;

use serde_json::json;

use super::{Agent, Done};
use crate::checkpoint::{self, Options};
use crate::proto::Msg;
use crate::slot::{SlotEffect, SlotEvent};
use crate::store::error_chain;
use crate::vm::{VmEffect, VmEvent};
use crate::{failpoint, restore};

impl Agent {
    /// Applies `event` to the slot and runs the effects (and the events they lead to).
    pub(super) async fn slot_event(&mut self, event: SlotEvent) {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let effects = match self.slot.step(ev) {
                Ok(e) => e,
                Err(r) => {
                    tracing::info!(vm = %self.cfg.name, "discarded: {r}");
                    continue;
                }
            };
            for e in effects {
                if let Some(next) = self.slot_effect(e).await {
                    queue.push_back(next);
                }
            }
        }
    }

    async fn slot_effect(&mut self, effect: SlotEffect) -> Option<SlotEvent> {
        match effect {
            SlotEffect::Arm(at) => {
                let Some(qmp) = self.qmp.clone() else {
                    return Some(SlotEvent::Armed(at, Err("VM not attached".into())));
                };
                let (store, name, done, previous) =
                    (self.store.clone(), self.cfg.name.clone(), self.done_tx.clone(), self.busy.take());
                tokio::spawn(async move {
                    if let Some(h) = previous {
                        let _ = h.await;
                    }
                    let r = checkpoint::prepare(&qmp, &store, &name, &Options::default(), &mut |_| {})
                        .await
                        .map(Box::new)
                        .map_err(|e| error_chain(&e));
                    let _ = done.send(Done::Armed(at, r));
                });
            }
            SlotEffect::DropArmed => {
                if let Some(p) = self.prepared.take() {
                    p.abort().await;
                }
            }
            SlotEffect::Vote { at, yes, reason } => {
                self.send_for(at, Msg::Vote { epoch: at.epoch, yes, reason });
                failpoint::hit("sidecar-after-vote");
            }
            SlotEffect::TakeCut(at) => return Some(SlotEvent::CutTaken(at, self.take_cut().await)),
            SlotEffect::SendCutDone { at, checkpoint, pause_ms } => {
                failpoint::hit("sidecar-after-cut");
                self.clock.tick(&self.cfg.name); // the local checkpoint
                self.send_for(at, Msg::CutDone { epoch: at.epoch, checkpoint, pause_ms });
            }
            SlotEffect::Store(at) => {
                if let Some(p) = self.pending.take() {
                    let done = self.done_tx.clone();
                    self.busy = Some(tokio::spawn(async move {
                        let r = p.finish(&mut |_| {}).await.map(Box::new).map_err(|e| error_chain(&e));
                        let _ = done.send(Done::Stored(at, r));
                    }));
                }
            }
            SlotEffect::AbandonStore(at) => {
                self.abandoned.insert((at.inc, at.epoch));
            }
            SlotEffect::SendDurable { at, checkpoint, digest, bytes_stored } => {
                self.clock.tick(&self.cfg.name); // the checkpoint is stored
                self.send_for(at, Msg::Durable { epoch: at.epoch, checkpoint, digest, bytes_stored });
                failpoint::hit("sidecar-after-durable");
            }
            SlotEffect::Retire => {
                if let (Some(d), Some(q)) = (self.durable.take(), &self.qmp) {
                    d.retire(q).await;
                }
            }
            SlotEffect::Discard => {
                if let Some(d) = self.durable.take() {
                    let r = match &self.qmp {
                        Some(q) => d.discard(q, &self.store).await,
                        None => self.store.discard_async(&self.cfg.name, d.manifest.id).await,
                    };
                    if let Err(e) = r {
                        tracing::warn!(vm = %self.cfg.name, "cannot discard checkpoint {}: {e}", d.manifest.id);
                    }
                }
            }
            SlotEffect::Keep => {
                if let Some(d) = self.durable.take() {
                    tracing::info!(vm = %self.cfg.name, id = d.manifest.id, "keeping a checkpoint whose fate no coordinator told");
                }
            }
            SlotEffect::ReleaseGate => {
                if let Some(g) = &self.gate {
                    let _ = g.release().await;
                }
                self.hold_started = None;
            }
            SlotEffect::StepFailed { at, reason } => {
                tracing::warn!(vm = %self.cfg.name, epoch = at.epoch, "step failed: {reason}");
                self.send_for(at, Msg::StepFailed { epoch: at.epoch, reason });
            }
        }
        None
    }

    /// Holds output and takes the cut of the armed checkpoint.
    async fn take_cut(&mut self) -> Result<(u64, f64), String> {
        let armed = self.prepared.take().ok_or("cut without an armed checkpoint")?;
        if let Some(g) = &self.gate {
            if let Err(e) = g.hold().await {
                armed.abort().await;
                return Err(format!("output gate: {e}"));
            }
            self.hold_started = Some(Instant::now());
        }
        let p = armed.cut(&mut |_| {}).await.map_err(|e| error_chain(&e))?;
        let r = (p.id(), p.pause_ms());
        self.pending = Some(p);
        Ok(r)
    }

    /// Applies `event` to the VM and runs the effects.
    pub(super) async fn vm_event(&mut self, event: VmEvent) {
        let mut queue = VecDeque::from([event]);
        while let Some(ev) = queue.pop_front() {
            let effects = match self.vm.step(ev) {
                Ok(e) => e,
                Err(r) => {
                    tracing::info!(vm = %self.cfg.name, "discarded: {r}");
                    continue;
                }
            };
            for e in effects {
                if let Some(next) = self.vm_effect(e).await {
                    queue.push_back(next);
                }
            }
        }
    }

    async fn vm_effect(&mut self, effect: VmEffect) -> Option<VmEvent> {
        match effect {
            VmEffect::ReportFailed(reason) => self.send(Msg::VmFailed { reason }),
            VmEffect::StartRestore(at) => {
                // Our QMP connection would keep the restore from reaching QEMU; an armed
                // checkpoint belongs to an epoch the rollback ended.
                if let Some(p) = self.prepared.take() {
                    p.abort().await;
                }
                let running = self.qmp.as_ref().and_then(|q| q.peer_pid()).map(|p| (p, self.pid_start));
                self.gate = None;
                self.qmp = None;
                let Some((checkpoint, digest)) = self.restore_for.take() else {
                    return Some(VmEvent::Restored(at, Err("no checkpoint named for the restore".into())));
                };
                let opts = restore::Options { id: Some(checkpoint), paused: true, digest: Some(digest), running };
                let (store, name, done, previous) =
                    (self.store.clone(), self.cfg.name.clone(), self.done_tx.clone(), self.busy.take());
                self.busy = Some(tokio::spawn(async move {
                    // A checkpoint still being stored holds the VM's lock: let it end.
                    if let Some(h) = previous {
                        let _ = h.await;
                    }
                    let r = restore::restore_with(&store, &name, &opts, &mut |_| {}).await.map_err(|e| error_chain(&e));
                    let _ = done.send(Done::Restored(at, r));
                }));
            }
            VmEffect::SendRestored(at, pid) => {
                let pid_start = crate::process::start_time(pid);
                let (restore_ms, fetch_ms) = self.restore_times.take().unwrap_or_default();
                self.send_for(at, Msg::Restored { epoch: at.epoch, pid, pid_start, restore_ms, fetch_ms });
            }
            VmEffect::Cont(at) => {
                let r = match &self.qmp {
                    Some(q) => q.execute_raw("cont", json!({})).await.map(|_| ()).map_err(|e| e.to_string()),
                    None => Err("VM not attached".into()),
                };
                return Some(VmEvent::Resumed(at, r));
            }
            VmEffect::SendResumed(at) => self.send_for(at, Msg::Resumed { epoch: at.epoch }),
            VmEffect::StepFailed(at, reason) => {
                tracing::warn!(vm = %self.cfg.name, epoch = at.epoch, "recovery step failed: {reason}");
                self.send_for(at, Msg::StepFailed { epoch: at.epoch, reason });
            }
        }
        None
    }

    /// Background work finished.
    pub(super) async fn on_done(&mut self, done: Done) {
        match done {
            Done::Armed(at, Ok(p)) => {
                let id = p.id();
                if let Some(old) = self.prepared.replace(*p) {
                    old.abort().await;
                }
                self.slot_event(SlotEvent::Armed(at, Ok(id))).await;
                // Refused (another epoch by now): the armed checkpoint is not wanted.
                if !matches!(self.slot, crate::slot::Slot::Armed { .. })
                    && let Some(p) = self.prepared.take()
                {
                    p.abort().await;
                }
            }
            Done::Armed(at, Err(reason)) => self.slot_event(SlotEvent::Armed(at, Err(reason))).await,
            Done::Stored(at, Ok(d)) if self.abandoned.remove(&(at.inc, at.epoch)) => {
                tracing::info!(vm = %self.cfg.name, epoch = at.epoch, id = d.manifest.id, "stored after its epoch ended: discarded");
                let r = match &self.qmp {
                    Some(q) => d.discard(q, &self.store).await,
                    None => self.store.discard_async(&self.cfg.name, d.manifest.id).await,
                };
                if let Err(e) = r {
                    tracing::warn!(vm = %self.cfg.name, "cannot discard checkpoint {}: {e}", d.manifest.id);
                }
            }
            Done::Stored(at, Ok(d)) => {
                let digest: Result<String, String> = Ok(d.digest.clone());
                let bytes = d.manifest.bytes_stored;
                self.durable = Some(*d);
                self.slot_event(SlotEvent::Stored(at, digest.map(|g| (g, bytes)))).await;
            }
            Done::Stored(at, Err(reason)) => {
                self.abandoned.remove(&(at.inc, at.epoch));
                self.slot_event(SlotEvent::Stored(at, Err(reason))).await;
            }
            Done::Restored(at, r) => {
                self.restore_times = r.as_ref().ok().map(|rep| (rep.duration_ms, rep.fetch_ms));
                let r = r.map(|report| report.pid);
                self.vm_event(VmEvent::Restored(at, r.clone())).await;
                if r.is_ok() {
                    self.attach().await;
                }
            }
            Done::Verified(epoch, damage) => self.send(Msg::Verified { epoch, damage }),
        }
    }
}
