//! The CLI's requests: status, checkpoint, list, restore, verify, remove-member.

use serde_json::{Value, json};
use sidecar::proto::Request;

use super::{Actor, Reply};
use crate::phase::Phase;

impl Actor {
    /// Answers the CLI.
    pub(super) async fn on_ask(&mut self, request: Request, reply: Reply) {
        match request {
            Request::Status => {
                let _ = reply.send(Ok(self.status()));
            }
            Request::Checkpoint => match self.start_epoch().await {
                Ok(epoch) => self.epoch_waiters.entry(epoch).or_default().push(reply),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Request::List => {
                let records = self.catalog.newest(usize::MAX);
                let _ = reply.send(Ok(json!({"epochs": records})));
            }
            Request::Restore { epoch } => {
                let pre_empted: Vec<Reply> = self.recovery_waiters.drain(..).collect();
                match self.recover(epoch, "requested by an operator".into()) {
                    Ok(()) => {
                        for w in pre_empted {
                            let _ = w.send(Err("pre-empted by another restore".into()));
                        }
                        self.recovery_waiters.push(reply);
                    }
                    Err(e) => {
                        self.recovery_waiters = pre_empted;
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Request::Verify { epoch } => self.verify(epoch, reply),
            Request::RemoveMember { name } => {
                let r = self.remove_member(&name).await;
                let _ = reply.send(r);
            }
        }
    }

    async fn remove_member(&mut self, name: &str) -> Result<Value, String> {
        if !matches!(self.phase, Phase::Idle | Phase::Halted { .. }) {
            return Err(format!("cannot remove {name} now: {}", self.phase.name()));
        }
        if !self.durable.members.contains_key(name) {
            return Err(format!("{name} is not a member"));
        }
        let mut next = self.durable.clone();
        next.members.remove(name);
        self.save(next).await?;
        self.members.remove(name);
        tracing::warn!(vm = %name, "member removed by an operator");
        Ok(json!({"removed": name}))
    }
}
