//! The output gate of one VM: hold, release, state and counters, and a watchdog that
//! releases by itself when a bound is reached.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qmp_client::Qmp;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bounds::{Bound, Bounds, BoundsError, Breach};
use crate::counter::Counter;
use crate::filter_buffer::{FilterBuffer, FilterBufferConfig, FilterBufferError};
use crate::plug::{Plug, PlugConfig, PlugError};

/// How long a plug detach waits for released packets to leave before removing the ifb.
const PLUG_DETACH_DRAIN: Duration = Duration::from_secs(2);
/// Pause before the watchdog retries a forced release that failed.
const RETRY_FORCED: Duration = Duration::from_millis(100);

/// Whether a VM's outgoing packets flow or are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// Packets flow to the network.
    Open,
    /// Packets are queued on the host until release.
    Held,
}

/// Errors of a gate.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The bounds cannot be used.
    #[error("invalid gate bounds")]
    Bounds(#[from] BoundsError),
    /// The QEMU filter-buffer backend failed.
    #[error("QEMU filter-buffer backend")]
    FilterBuffer(#[from] FilterBufferError),
    /// The plug qdisc backend failed.
    #[error("plug qdisc backend")]
    Plug(#[from] PlugError),
    /// The gate was detached.
    #[error("the gate of {vm} is detached")]
    Detached {
        /// The VM.
        vm: String,
    },
}

/// What `hold` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldOutcome {
    /// A new hold began.
    Started {
        /// The hold's number (1 for the gate's first).
        epoch: u64,
    },
    /// The gate was already held; nothing changed.
    AlreadyHeld {
        /// The hold in progress.
        epoch: u64,
    },
}

/// The account of one hold, given when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldReport {
    /// The hold's number.
    pub epoch: u64,
    /// Packets held. With the filter-buffer backend, every frame the guest sent while the
    /// mirror was on: never fewer than were held, and a few more only if the guest sent
    /// some in the instant between the two commands that start (or end) a hold.
    pub packets: u64,
    /// Bytes held (Ethernet frames), counted like `packets`.
    pub bytes: u64,
    /// Packets the host dropped during the hold, as far as the backend can see (the plug
    /// qdisc's drop counter; the filter-buffer backend's bound keeps QEMU's queue from dropping).
    pub dropped: u64,
    /// From the start of `hold` to the end of the release.
    pub held_for: Duration,
    /// Set when a bound released the gate by itself: abort the checkpoint.
    pub breach: Option<Breach>,
    /// The hold was found in progress at attach (a previous process died holding); its
    /// counts cover only what was sent after the attach.
    pub adopted: bool,
}

/// A snapshot of a gate's state and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateStats {
    /// Open or held.
    pub state: GateState,
    /// The current hold's number, or the last one's when open.
    pub epoch: u64,
    /// Packets held so far in the current hold (0 when open).
    pub packets: u64,
    /// Bytes held so far in the current hold (0 when open).
    pub bytes: u64,
    /// How long the current hold has lasted.
    pub held_for: Option<Duration>,
    /// Holds started since attach.
    pub holds: u64,
    /// Releases a bound forced.
    pub forced_releases: u64,
    /// The last finished hold.
    pub last: Option<HoldReport>,
}

/// The backend that holds the packets.
#[derive(Debug)]
enum Backend {
    FilterBuffer(FilterBuffer),
    Plug(Plug),
}

impl Backend {
    fn kind(&self) -> &'static str {
        match self {
            Backend::FilterBuffer(_) => "filter-buffer",
            Backend::Plug(_) => "plug",
        }
    }

    async fn hold(&mut self) -> Result<(), GateError> {
        match self {
            Backend::FilterBuffer(b) => Ok(b.hold().await?),
            Backend::Plug(p) => Ok(p.hold().await?),
        }
    }

    /// Releases; returns the drops seen during the hold.
    async fn release(&mut self, counter: &Counter) -> Result<u64, GateError> {
        match self {
            Backend::FilterBuffer(b) => {
                b.release().await?;
                Ok(0)
            }
            Backend::Plug(p) => {
                let before = p.backlog().await?;
                counter.set(before.packets, before.bytes);
                p.release().await?;
                Ok(p.drops_since_hold(&before))
            }
        }
    }

    async fn detach(self) -> Result<(), GateError> {
        match self {
            Backend::FilterBuffer(b) => Ok(b.detach().await?),
            Backend::Plug(p) => Ok(p.detach(PLUG_DETACH_DRAIN).await?),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Current {
    epoch: u64,
    since: Instant,
    adopted: bool,
}

#[derive(Debug, Default)]
struct State {
    held: Option<Current>,
    epoch: u64,
    holds: u64,
    forced: u64,
    /// The report of a forced release nobody has asked for yet.
    unclaimed: Option<HoldReport>,
    last: Option<HoldReport>,
}

/// What the watchdog watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    Held { epoch: u64, deadline: tokio::time::Instant },
}

#[derive(Debug)]
struct Shared {
    vm: String,
    bounds: Bounds,
    counter: Arc<Counter>,
    backend: tokio::sync::Mutex<Option<Backend>>,
    state: Mutex<State>,
    phase: watch::Sender<Phase>,
    breach: watch::Sender<Option<Breach>>,
    /// A copy of the plug backend for sampling its backlog while holding.
    sampler: Option<(Plug, Duration)>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every critical section is a few field updates: a panic cannot leave it half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The output gate of one VM, covering every netdev (or tap) of the guest.
///
/// [`hold`](Gate::hold) queues everything the guest sends from the moment it returns;
/// [`release`](Gate::release) lets it all go, in order. Bounds on time, packets and bytes
/// are enforced by a watchdog task that releases on its own and reports a [`Breach`].
/// Dropping a `Gate` leaves QEMU's filters installed (a restarted process finds them again
/// by id); [`detach`](Gate::detach) removes them.
#[derive(Debug)]
pub struct Gate {
    shared: Arc<Shared>,
    watchdog: JoinHandle<()>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl Gate {
    /// Attaches the QEMU filter-buffer backend to the guest behind `qmp`: installs a
    /// filter-buffer (and its counting mirror) on every netdev, or finds them again.
    /// A guest found holding (a previous process died mid-hold) starts held.
    pub async fn attach_qemu(
        vm: &str,
        qmp: Qmp,
        config: &FilterBufferConfig,
        bounds: Bounds,
    ) -> Result<Gate, GateError> {
        bounds.validate()?;
        let counter = Arc::new(Counter::new(bounds));
        let (backend, found) = FilterBuffer::attach(qmp, config, &bounds, counter.clone()).await?;
        tracing::info!(vm, netdevs = ?backend.netdevs(), filters = ?backend.buffer_ids(), adopted = found.adopted,
            holding = found.holding, "output gate attached (filter-buffer)");
        Ok(Gate::start(vm, bounds, counter, Backend::FilterBuffer(backend), found.holding, None))
    }

    /// Attaches the plug qdisc backend to the guest's taps.
    pub async fn attach_plug(vm: &str, config: &PlugConfig, bounds: Bounds) -> Result<Gate, GateError> {
        bounds.validate()?;
        let counter = Arc::new(Counter::new(bounds));
        let (plug, holding) = Plug::attach(config, &bounds).await?;
        tracing::info!(vm, taps = ?plug.taps(), netns = ?config.netns, holding, "output gate attached (plug qdisc)");
        let sampler = Some((plug.clone(), config.sample_every));
        Ok(Gate::start(vm, bounds, counter, Backend::Plug(plug), holding, sampler))
    }

    fn start(
        vm: &str,
        bounds: Bounds,
        counter: Arc<Counter>,
        backend: Backend,
        holding: bool,
        sampler: Option<(Plug, Duration)>,
    ) -> Gate {
        let mut state = State::default();
        let mut phase = Phase::Open;
        if holding {
            let since = Instant::now();
            state.epoch = 1;
            state.holds = 1;
            state.held = Some(Current { epoch: 1, since, adopted: true });
            phase = Phase::Held { epoch: 1, deadline: tokio::time::Instant::from_std(since + bounds.max_hold) };
            tracing::warn!(vm, "the guest's packets were being held at attach: adopted that hold; release it");
        }
        let (phase_tx, phase_rx) = watch::channel(phase);
        let shared = Arc::new(Shared {
            vm: vm.to_owned(),
            bounds,
            counter,
            backend: tokio::sync::Mutex::new(Some(backend)),
            state: Mutex::new(state),
            phase: phase_tx,
            breach: watch::channel(None).0,
            sampler,
        });
        let watchdog = tokio::spawn(watchdog(shared.clone(), phase_rx));
        Gate { shared, watchdog }
    }

    /// Starts holding the guest's outgoing packets. Holding a held gate is harmless: it
    /// says so in the log and returns [`HoldOutcome::AlreadyHeld`].
    pub async fn hold(&self) -> Result<HoldOutcome, GateError> {
        let sh = &self.shared;
        let mut backend = sh.backend.lock().await;
        let b = backend.as_mut().ok_or_else(|| GateError::Detached { vm: sh.vm.clone() })?;
        if let Some(cur) = lock(&sh.state).held {
            tracing::info!(vm = %sh.vm, epoch = cur.epoch, "hold of a gate already held: nothing to do");
            return Ok(HoldOutcome::AlreadyHeld { epoch: cur.epoch });
        }
        let since = Instant::now();
        if let Err(e) = b.hold().await {
            // Do not leave half a hold behind (a mirror on, a buffer on).
            if let Err(undo) = b.release(&sh.counter).await {
                tracing::warn!(vm = %sh.vm, %undo, "cannot undo a failed hold");
            }
            return Err(e);
        }
        let epoch = {
            let mut st = lock(&sh.state);
            st.epoch += 1;
            st.holds += 1;
            if let Some(old) = st.unclaimed.take() {
                tracing::debug!(vm = %sh.vm, epoch = old.epoch, "a forced release was never claimed by release()");
            }
            st.held = Some(Current { epoch: st.epoch, since, adopted: false });
            st.epoch
        };
        let deadline = tokio::time::Instant::from_std(since + sh.bounds.max_hold);
        sh.phase.send_replace(Phase::Held { epoch, deadline });
        tracing::debug!(vm = %sh.vm, epoch, backend = b.kind(), "holding");
        Ok(HoldOutcome::Started { epoch })
    }

    /// Releases everything held, in order. Returns the hold's report; when a bound had
    /// already released the gate, the report of that release (with its [`Breach`]), once.
    /// Releasing an open gate is harmless: it says so in the log and returns `None`.
    pub async fn release(&self) -> Result<Option<HoldReport>, GateError> {
        self.shared.release(None, None).await
    }

    /// Open or held.
    pub fn state(&self) -> GateState {
        if lock(&self.shared.state).held.is_some() { GateState::Held } else { GateState::Open }
    }

    /// State and counters.
    pub fn stats(&self) -> GateStats {
        let st = lock(&self.shared.state);
        let (packets, bytes) = if st.held.is_some() { self.shared.counter.get() } else { (0, 0) };
        GateStats {
            state: if st.held.is_some() { GateState::Held } else { GateState::Open },
            epoch: st.epoch,
            packets,
            bytes,
            held_for: st.held.map(|c| c.since.elapsed()),
            holds: st.holds,
            forced_releases: st.forced,
            last: st.last,
        }
    }

    /// The bounds in force.
    pub fn bounds(&self) -> Bounds {
        self.shared.bounds
    }

    /// The last breach, updated when a bound forces a release: a coordinator may watch it
    /// to abort a checkpoint early instead of waiting for `release`.
    pub fn breaches(&self) -> watch::Receiver<Option<Breach>> {
        self.shared.breach.subscribe()
    }

    /// Releases if held, then removes the filters (or the plugs and their redirects).
    pub async fn detach(self) -> Result<(), GateError> {
        let sh = self.shared.clone();
        if lock(&sh.state).held.is_some() {
            sh.release(None, None).await?;
        }
        let backend = sh.backend.lock().await.take().ok_or_else(|| GateError::Detached { vm: sh.vm.clone() })?;
        self.watchdog.abort();
        let kind = backend.kind();
        backend.detach().await?;
        tracing::info!(vm = %sh.vm, backend = kind, "output gate detached");
        Ok(())
    }
}

impl Shared {
    /// Releases hold `only_epoch` (any when `None`); `bound` marks a forced release.
    async fn release(&self, only_epoch: Option<u64>, bound: Option<Bound>) -> Result<Option<HoldReport>, GateError> {
        let mut backend = self.backend.lock().await;
        let b = backend.as_mut().ok_or_else(|| GateError::Detached { vm: self.vm.clone() })?;
        let cur = {
            let mut st = lock(&self.state);
            match st.held {
                Some(cur) if only_epoch.is_none_or(|e| e == cur.epoch) => cur,
                Some(_) => return Ok(None),
                None if only_epoch.is_some() => return Ok(None),
                None => {
                    let unclaimed = st.unclaimed.take();
                    match &unclaimed {
                        Some(r) => tracing::info!(vm = %self.vm, epoch = r.epoch,
                            "release of a gate a bound already released: reporting that release"),
                        None => tracing::info!(vm = %self.vm, "release of an open gate: nothing to do"),
                    }
                    return Ok(unclaimed);
                }
            }
        };
        let (packets_at_bound, bytes_at_bound) = self.counter.get();
        let dropped = b.release(&self.counter).await?;
        let held_for = cur.since.elapsed();
        let (packets, bytes) = self.counter.get();
        let breach = bound.map(|bound| Breach {
            bound,
            epoch: cur.epoch,
            packets: packets_at_bound,
            bytes: bytes_at_bound,
            held_for,
        });
        let report = HoldReport { epoch: cur.epoch, packets, bytes, dropped, held_for, breach, adopted: cur.adopted };
        {
            let mut st = lock(&self.state);
            st.held = None;
            st.last = Some(report);
            if breach.is_some() {
                st.forced += 1;
                st.unclaimed = Some(report);
            }
        }
        self.phase.send_replace(Phase::Open);
        if dropped > 0 {
            tracing::error!(vm = %self.vm, epoch = cur.epoch, dropped, "the host dropped held packets");
        }
        match breach {
            Some(br) => {
                tracing::warn!(vm = %self.vm, %br, "bound reached: released early; the checkpoint must be aborted");
                self.breach.send_replace(Some(br));
            }
            None => tracing::debug!(vm = %self.vm, epoch = cur.epoch, packets, bytes, ?held_for, "released"),
        }
        Ok(Some(report))
    }
}

/// Releases a hold when it reaches a bound; samples the plug's backlog meanwhile.
async fn watchdog(shared: Arc<Shared>, mut phase: watch::Receiver<Phase>) {
    let mut failures = 0u32;
    loop {
        let current = *phase.borrow_and_update();
        let Phase::Held { epoch, deadline } = current else {
            if phase.changed().await.is_err() {
                return;
            }
            continue;
        };
        let bound = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => Some(Bound::Time),
            _ = shared.counter.tripped.notified() => shared.counter.exceeded(),
            b = sample_until_bound(&shared) => b,
            r = phase.changed() => {
                if r.is_err() {
                    return;
                }
                None
            }
        };
        let Some(bound) = bound else { continue };
        match shared.release(Some(epoch), Some(bound)).await {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::error!(vm = %shared.vm, epoch, %bound, error = %e, "forced release failed; retrying");
                }
                tokio::time::sleep(RETRY_FORCED).await;
            }
        }
    }
}

/// For the plug backend, samples the backlog into the counter until a bound is reached;
/// never returns for the filter-buffer backend, whose mirror counts by itself.
async fn sample_until_bound(shared: &Shared) -> Option<Bound> {
    let Some((plug, every)) = &shared.sampler else {
        return std::future::pending().await;
    };
    let mut tick = tokio::time::interval(*every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match plug.backlog().await {
            Ok(b) => {
                shared.counter.set(b.packets, b.bytes);
                if let Some(bound) = shared.counter.exceeded() {
                    return Some(bound);
                }
            }
            Err(e) => tracing::debug!(vm = %shared.vm, %e, "cannot sample the plug backlog"),
        }
    }
}
