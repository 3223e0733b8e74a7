//! `cutline verify`: the sidecars re-hash an epoch's checkpoints; their answers are
//! gathered until all came or the deadline passed.

use std::collections::BTreeSet;
use std::time::Instant;

use serde_json::json;
use sidecar::proto::Msg;

use super::{Actor, PendingVerify, Reply};

impl Actor {
    /// Asks every member of `epoch` (the last committed one by default) to verify.
    pub(super) fn verify(&mut self, epoch: Option<u64>, reply: Reply) {
        let Some(epoch) = epoch.or_else(|| self.catalog.epochs().last().copied()) else {
            let _ = reply.send(Err("no committed epoch".into()));
            return;
        };
        let record = match self.catalog.read(epoch) {
            Ok(r) => r,
            Err(e) => {
                let _ = reply.send(Err(e.to_string()));
                return;
            }
        };
        let mut v = PendingVerify {
            epoch,
            waiting: BTreeSet::new(),
            damage: Vec::new(),
            reply,
            deadline: Instant::now() + self.cfg.verify_timeout,
        };
        for m in &record.members {
            if self.members.get(&m.name).is_some_and(|x| x.conn.is_some()) {
                v.waiting.insert(m.name.clone());
                let msg = Msg::Verify { epoch, checkpoint: m.checkpoint, digest: m.manifest_digest.clone() };
                self.send_one(&m.name, msg);
            } else {
                v.damage.push(json!({"member": m.name, "why": "no sidecar connected to verify it"}));
            }
        }
        self.verifies.push(v);
        self.finish_verifies();
    }

    /// Answers the verifications that are complete or past their deadline.
    pub(super) fn finish_verifies(&mut self) {
        let now = Instant::now();
        let (done, open): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.verifies).into_iter().partition(|v| v.waiting.is_empty() || now > v.deadline);
        self.verifies = open;
        for mut v in done {
            for n in &v.waiting {
                v.damage.push(json!({"member": n, "why": "its sidecar did not answer in time"}));
            }
            let _ = v.reply.send(Ok(json!({"epoch": v.epoch, "ok": v.damage.is_empty(), "damage": v.damage})));
        }
    }
}
