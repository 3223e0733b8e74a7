//! The invariants of the ledger and journal workloads across a cluster of guests:
//! quiesce every ledger, sum the balances (the total must be conserved), check every
//! journal against its disk, resume. Guests on this machine ([`Guest`]) and guests in
//! host containers ([`crate::hosts::HostGuest`]) alike: anything with a [`Workload`].

use std::time::Duration;

use serde_json::{Value, json};

use crate::Guest;
use crate::control::Control;

/// How long one control request may take.
const T: Duration = Duration::from_secs(30);

/// The invariants of the ledger and the journals, checked once.
#[derive(Debug, Clone)]
pub struct Invariants {
    /// Ledger total conserved.
    pub ledger_ok: bool,
    /// Every journal's memory matches its disk.
    pub journals_ok: bool,
    /// Details, for a report.
    pub detail: Value,
}

impl Invariants {
    /// Both invariants held.
    pub fn ok(&self) -> bool {
        self.ledger_ok && self.journals_ok
    }
}

/// A guest running the ledger and journal workloads, as the oracle reaches it.
pub trait Workload {
    /// The guest's (VM's) name.
    fn name(&self) -> &str;
    /// Its workload's control channel.
    fn control(&self) -> &Control;
    /// Where it runs, when that is worth reporting (a host container's name).
    fn host(&self) -> Option<&str> {
        None
    }
}

impl Workload for Guest {
    fn name(&self) -> &str {
        &self.name
    }
    fn control(&self) -> &Control {
        Guest::control(self)
    }
}

impl<W: Workload + ?Sized> Workload for &W {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn control(&self) -> &Control {
        (**self).control()
    }
    fn host(&self) -> Option<&str> {
        (**self).host()
    }
}

/// Quiesces every guest's ledger, sums the balances (each guest started with `balance`),
/// checks every journal, and resumes the ledgers (also when a request fails).
pub async fn check<W: Workload>(guests: &[W], balance: u64) -> anyhow::Result<Invariants> {
    let result = measure(guests, balance).await;
    let mut resumed = Ok(());
    for g in guests {
        if let Err(e) = g.control().request("resume", T).await {
            resumed = Err(anyhow::anyhow!("resume {}: {e}", who(g)));
        }
    }
    let inv = result?;
    resumed?;
    Ok(inv)
}

/// `vm0`, or `vm0 on HOST`.
fn who<W: Workload>(g: &W) -> String {
    match g.host() {
        Some(h) => format!("{} on {h}", g.name()),
        None => g.name().to_owned(),
    }
}

/// Asks `g` for `verb`, once more if no answer came: every request of the oracle is
/// idempotent, and one answer lost on the serial line (seen once in 40 chaos faults on a
/// loaded machine, the guest ticking on) must not read as a broken invariant. A guest that
/// does not answer twice is reported.
async fn ask<W: Workload>(g: &W, verb: &str) -> anyhow::Result<Value> {
    match g.control().request(verb, T).await {
        Err(crate::control::ControlError::Timeout { .. }) => {
            tracing::warn!(vm = %g.name(), "no answer to `{verb}`: asking again");
            g.control().request(verb, T).await.map_err(|e| anyhow::anyhow!("{verb} {} (asked twice): {e}", who(g)))
        }
        r => r.map_err(|e| anyhow::anyhow!("{verb} {}: {e}", who(g))),
    }
}

async fn measure<W: Workload>(guests: &[W], balance: u64) -> anyhow::Result<Invariants> {
    for g in guests {
        ask(g, "quiesce").await?;
    }
    let (mut total, mut balances, mut journals) = (0, Vec::new(), Vec::new());
    for g in guests {
        let b = ask(g, "balance").await?;
        total += b["balance"].as_u64().unwrap_or(0);
        let mut entry = json!({"vm": g.name(), "balance": b["balance"], "sent": b["sent"], "received": b["received"]});
        if let Some(h) = g.host() {
            entry["host"] = h.into();
        }
        balances.push(entry);
        let c = ask(g, "check").await?;
        journals.push(json!({"vm": g.name(), "ok": c["ok"], "count": c["count"], "disk_last": c["disk_last"]}));
    }
    let expected = balance * guests.len() as u64;
    let journals_ok = journals.iter().all(|j| j["ok"] == true);
    Ok(Invariants {
        ledger_ok: total == expected,
        journals_ok,
        detail: json!({
            "ledger": {"ok": total == expected, "total": total, "expected": expected, "balances": balances},
            "journals": {"ok": journals_ok, "guests": journals},
        }),
    })
}
