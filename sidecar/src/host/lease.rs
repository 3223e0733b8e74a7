//! The host's lease, as a pure machine. A host holds its VMs only while it holds a lease
//! from the coordinator: heartbeat `seq` sent at `at` (this host's clock) and granted for
//! `ms` gives a lease until `at + ms`. When that passes without a later grant the host
//! fences: it stops every VM cutline protects on it, on its own. The coordinator restarts
//! the VMs elsewhere only after the lease plus a margin since it received the host's last
//! granted heartbeat, which was sent no later than it was received; so the fence comes
//! first as long as the two clocks' rates differ by less than the margin allows
//! (docs/HOSTS.md).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Heartbeats remembered while their grants may still arrive.
const IN_FLIGHT: usize = 64;

/// Where the lease stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// No grant since this host (re)registered: no VM of it can be moved by the coordinator
    /// either, since it has no lease to wait out.
    Unleased,
    /// Held until this instant.
    Held {
        /// The end of the lease.
        until: Instant,
    },
    /// Lost: the host fenced; only a new registration gives it a lease again.
    Fenced {
        /// Why.
        why: String,
    },
}

/// What happens to the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEvent {
    /// Heartbeat `seq` was sent at `at`.
    Sent {
        /// Its number.
        seq: u64,
        /// When (this host's clock).
        at: Instant,
    },
    /// The coordinator granted heartbeat `seq` a lease of `ms`.
    Granted {
        /// The heartbeat.
        seq: u64,
        /// The lease.
        ms: u64,
    },
    /// Time passes.
    Tick {
        /// Now.
        now: Instant,
    },
    /// The coordinator declared this host lost.
    Revoked {
        /// Its reason.
        why: String,
    },
    /// The host registered again (after fencing, or with a new coordinator session).
    Registered,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEffect {
    /// Stop every protected VM now.
    Fence {
        /// Why.
        why: String,
    },
}

/// An event the lease's state does not allow, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("lease {state}: {why}")]
pub struct LeaseRefused {
    /// The state it was in.
    pub state: &'static str,
    /// Why the event was refused.
    pub why: String,
}

/// The lease and the heartbeats whose grants may still come.
#[derive(Debug, Clone)]
pub struct Lease {
    state: LeaseState,
    sent: VecDeque<(u64, Instant)>,
}

impl Default for Lease {
    fn default() -> Self {
        Lease { state: LeaseState::Unleased, sent: VecDeque::new() }
    }
}

impl Lease {
    /// A lease already held until `until`: an earlier run of this host agent's, read back
    /// from the lease file, so that a restarted agent still fences on time.
    pub fn held_until(until: Instant) -> Lease {
        Lease { state: LeaseState::Held { until }, sent: VecDeque::new() }
    }

    /// Where it stands.
    pub fn state(&self) -> &LeaseState {
        &self.state
    }

    /// The end of the lease, while held.
    pub fn until(&self) -> Option<Instant> {
        match self.state {
            LeaseState::Held { until } => Some(until),
            _ => None,
        }
    }

    fn name(&self) -> &'static str {
        match self.state {
            LeaseState::Unleased => "unleased",
            LeaseState::Held { .. } => "held",
            LeaseState::Fenced { .. } => "fenced",
        }
    }

    fn refuse(&self, why: impl Into<String>) -> LeaseRefused {
        LeaseRefused { state: self.name(), why: why.into() }
    }

    /// Applies `event`; returns what the host must do, or why the event is refused.
    pub fn step(&mut self, event: LeaseEvent) -> Result<Vec<LeaseEffect>, LeaseRefused> {
        match event {
            LeaseEvent::Sent { seq, at } => {
                if self.sent.back().is_some_and(|&(s, _)| s >= seq) {
                    return Err(self.refuse(format!("heartbeat {seq} is not newer than the last one sent")));
                }
                self.sent.push_back((seq, at));
                if self.sent.len() > IN_FLIGHT {
                    self.sent.pop_front();
                }
                Ok(vec![])
            }
            LeaseEvent::Granted { seq, ms } => {
                if let LeaseState::Fenced { .. } = self.state {
                    return Err(self.refuse("a grant after the lease was lost does not revive it: register again"));
                }
                let Some(&(_, at)) = self.sent.iter().find(|(s, _)| *s == seq) else {
                    return Err(self.refuse(format!("no heartbeat {seq} in flight")));
                };
                let until = at + Duration::from_millis(ms);
                // Grants may arrive out of order: a lease only grows.
                if self.until().is_none_or(|u| until > u) {
                    self.state = LeaseState::Held { until };
                }
                self.sent.retain(|(s, _)| *s > seq);
                Ok(vec![])
            }
            LeaseEvent::Tick { now } => match self.state {
                LeaseState::Held { until } if now >= until => {
                    let why = "the lease expired before the coordinator renewed it".to_owned();
                    self.state = LeaseState::Fenced { why: why.clone() };
                    self.sent.clear();
                    Ok(vec![LeaseEffect::Fence { why }])
                }
                _ => Ok(vec![]),
            },
            LeaseEvent::Revoked { why } => {
                if let LeaseState::Fenced { .. } = self.state {
                    return Ok(vec![]);
                }
                let why = format!("the coordinator revoked the lease: {why}");
                self.state = LeaseState::Fenced { why: why.clone() };
                self.sent.clear();
                Ok(vec![LeaseEffect::Fence { why }])
            }
            LeaseEvent::Registered => {
                if let LeaseState::Held { .. } = self.state {
                    // A new session keeps a lease still running: it was granted and holds.
                    return Ok(vec![]);
                }
                self.state = LeaseState::Unleased;
                self.sent.clear();
                Ok(vec![])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_grant_runs_from_when_its_heartbeat_was_sent_and_only_grows() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.step(LeaseEvent::Sent { seq: 1, at: t0 }).expect("sent");
        l.step(LeaseEvent::Sent { seq: 2, at: t0 + ms(1000) }).expect("sent");
        l.step(LeaseEvent::Granted { seq: 2, ms: 5000 }).expect("granted");
        assert_eq!(l.until(), Some(t0 + ms(6000)));
        // The older grant arrives late: it was forgotten with its heartbeat.
        let late = l.step(LeaseEvent::Granted { seq: 1, ms: 5000 }).expect_err("late");
        assert!(late.why.contains("no heartbeat 1"), "{late}");
        assert_eq!(l.until(), Some(t0 + ms(6000)));
    }

    #[test]
    fn an_expired_lease_fences_once_and_a_late_grant_does_not_revive_it() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.step(LeaseEvent::Sent { seq: 1, at: t0 }).expect("sent");
        l.step(LeaseEvent::Granted { seq: 1, ms: 3000 }).expect("granted");
        assert_eq!(l.step(LeaseEvent::Tick { now: t0 + ms(2999) }).expect("tick"), vec![]);
        l.step(LeaseEvent::Sent { seq: 2, at: t0 + ms(2000) }).expect("sent");
        let fx = l.step(LeaseEvent::Tick { now: t0 + ms(3000) }).expect("tick");
        assert!(matches!(&fx[..], [LeaseEffect::Fence { .. }]), "{fx:?}");
        assert_eq!(l.step(LeaseEvent::Tick { now: t0 + ms(4000) }).expect("tick"), vec![], "fences once");
        let e = l.step(LeaseEvent::Granted { seq: 2, ms: 3000 }).expect_err("fenced");
        assert_eq!(e.state, "fenced");
        l.step(LeaseEvent::Registered).expect("register again");
        assert_eq!(l.state(), &LeaseState::Unleased);
    }

    #[test]
    fn an_unleased_host_never_fences_on_time_and_a_revocation_fences_at_once() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        assert_eq!(l.step(LeaseEvent::Tick { now: t0 + Duration::from_secs(3600) }).expect("tick"), vec![]);
        let fx = l.step(LeaseEvent::Revoked { why: "host lost".into() }).expect("revoked");
        assert!(matches!(&fx[..], [LeaseEffect::Fence { why }] if why.contains("host lost")));
    }

    #[test]
    fn a_lease_read_back_still_expires() {
        let t0 = Instant::now();
        let mut l = Lease::held_until(t0 + ms(100));
        assert_eq!(l.step(LeaseEvent::Tick { now: t0 }).expect("tick"), vec![]);
        assert!(matches!(
            &l.step(LeaseEvent::Tick { now: t0 + ms(100) }).expect("tick")[..],
            [LeaseEffect::Fence { .. }]
        ));
    }

    #[test]
    fn heartbeats_are_numbered_upwards() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.step(LeaseEvent::Sent { seq: 5, at: t0 }).expect("sent");
        assert!(l.step(LeaseEvent::Sent { seq: 5, at: t0 }).is_err());
    }

    #[test]
    fn a_new_session_keeps_a_running_lease() {
        let t0 = Instant::now();
        let mut l = Lease::default();
        l.step(LeaseEvent::Sent { seq: 1, at: t0 }).expect("sent");
        l.step(LeaseEvent::Granted { seq: 1, ms: 5000 }).expect("granted");
        l.step(LeaseEvent::Registered).expect("again");
        assert_eq!(l.until(), Some(t0 + ms(5000)));
    }
}
