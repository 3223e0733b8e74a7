//! Ledger mode: money transfers between guests over TCP; the cluster total is the oracle.
//!
//! Wire protocol (one TCP connection per ordered pair sender→receiver, opened by the sender):
//! sender writes `T <seq> <amount>\n`, receiver credits and answers `A <seq>\n` on the same
//! connection. The sender debits before sending and keeps the amount as `unacked` until the ack.
//! A broken connection turns that peer's unacked transfers into `lost` (never re-credited).

use crate::control::LineBuffer;
use crate::pacer::Pacer;
use crate::status::{Event, StatusWriter, fatal_forever, lock};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Delay between connection attempts to a peer.
const RETRY: Duration = Duration::from_millis(200);
/// Longest accepted protocol line.
const MAX_WIRE_LINE: usize = 256;

/// IPv4 address of guest `i` (10.0.0.(i+1)).
pub fn guest_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, u8::try_from(i + 1).unwrap_or(u8::MAX))
}

/// Guest index of a peer address when it is one of ours (10.0.0.1..=10.0.0.peers).
pub fn guest_of(addr: &SocketAddr, peers: usize) -> Option<usize> {
    match addr {
        SocketAddr::V4(a) => {
            let o = a.ip().octets();
            let last = usize::from(o[3]);
            (o[..3] == [10, 0, 0] && (1..=peers).contains(&last)).then(|| last - 1)
        }
        SocketAddr::V6(_) => None,
    }
}

/// Outgoing-link state of one peer.
#[derive(Debug)]
struct Slot<L> {
    link: Option<L>,
    generation: u64,
    pending: HashMap<u64, u64>,
    ever_connected: bool,
}

/// Result of [`Book::connect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connected {
    /// Generation of this connection (acks and losses are matched against it).
    pub generation: u64,
    /// The peer had been connected before.
    pub reconnect: bool,
    /// This connection completed the set of outgoing links for the first time.
    pub became_ready: bool,
}

/// Transfers written off when a connection broke.
#[derive(Debug)]
pub struct Lost<L> {
    /// Sum of the amounts.
    pub amount: u64,
    /// Number of transfers.
    pub count: u64,
    /// The broken link (to shut down).
    pub link: L,
}

/// A transfer that was debited and must now be sent.
#[derive(Debug)]
pub struct Transfer<L> {
    /// Receiver's guest index.
    pub peer: usize,
    /// Connection generation it was booked on.
    pub generation: u64,
    /// Sender-unique sequence number.
    pub seq: u64,
    /// Amount debited.
    pub amount: u64,
    /// The link to send it on.
    pub link: L,
}

/// Why an ack was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckError {
    /// The ack came on a connection that is no longer current.
    Stale,
    /// No pending transfer has this sequence number.
    UnknownSeq,
}

/// Counters of the ledger at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Current balance.
    pub balance: u64,
    /// Sum of sent but unacknowledged amounts.
    pub unacked: u64,
    /// Number of sent but unacknowledged transfers.
    pub unacked_count: u64,
    /// Transfers sent.
    pub sent: u64,
    /// Transfers received (credited).
    pub received: u64,
    /// Transfers acknowledged.
    pub acked: u64,
    /// Sum of amounts written off on broken connections.
    pub lost: u64,
    /// Number of transfers written off.
    pub lost_count: u64,
    /// Whether new transfers are stopped.
    pub quiesced: bool,
    /// Outgoing links currently up.
    pub connected: u64,
    /// All outgoing links were established at least once.
    pub ready: bool,
}

impl Snapshot {
    /// The counters as status-line fields.
    pub fn fields(&self) -> Vec<(String, Value)> {
        vec![
            ("balance".into(), self.balance.into()),
            ("unacked".into(), self.unacked.into()),
            ("unacked_count".into(), self.unacked_count.into()),
            ("sent".into(), self.sent.into()),
            ("received".into(), self.received.into()),
            ("acked".into(), self.acked.into()),
            ("lost".into(), self.lost.into()),
            ("lost_count".into(), self.lost_count.into()),
            ("quiesced".into(), self.quiesced.into()),
            ("connected".into(), self.connected.into()),
            ("ledger_ready".into(), self.ready.into()),
        ]
    }
}

/// Pure ledger bookkeeping, generic over the link type (a TCP stream in production).
#[derive(Debug)]
pub struct Book<L> {
    me: usize,
    balance: u64,
    unacked: u64,
    unacked_count: u64,
    sent: u64,
    received: u64,
    acked: u64,
    lost: u64,
    lost_count: u64,
    quiesced: bool,
    ready: bool,
    next_seq: u64,
    slots: Vec<Slot<L>>,
    waiters: Vec<Option<String>>,
}

impl<L: Clone> Book<L> {
    /// Book of guest `me` in a cluster of `peers` guests, starting with `balance`.
    pub fn new(me: usize, peers: usize, balance: u64) -> Self {
        Book {
            me,
            balance,
            unacked: 0,
            unacked_count: 0,
            sent: 0,
            received: 0,
            acked: 0,
            lost: 0,
            lost_count: 0,
            quiesced: false,
            ready: peers <= 1,
            next_seq: 1,
            slots: (0..peers)
                .map(|_| Slot { link: None, generation: 0, pending: HashMap::new(), ever_connected: false })
                .collect(),
            waiters: Vec::new(),
        }
    }

    fn all_connected(&self) -> bool {
        self.slots.iter().enumerate().all(|(j, s)| j == self.me || s.link.is_some())
    }

    /// Installs a new outgoing link to `peer`.
    pub fn connect(&mut self, peer: usize, link: L) -> Connected {
        let slot = &mut self.slots[peer];
        slot.generation += 1;
        slot.link = Some(link);
        let reconnect = std::mem::replace(&mut slot.ever_connected, true);
        let generation = slot.generation;
        let became_ready = !self.ready && self.all_connected();
        if became_ready {
            self.ready = true;
        }
        Connected { generation, reconnect, became_ready }
    }

    /// Drops the link `generation` to `peer` (if still current) and writes off its pending transfers.
    pub fn disconnect(&mut self, peer: usize, generation: u64) -> Option<Lost<L>> {
        let slot = self.slots.get_mut(peer)?;
        if slot.generation != generation {
            return None;
        }
        let link = slot.link.take()?;
        let count = slot.pending.len() as u64;
        let amount: u64 = slot.pending.drain().map(|(_, a)| a).sum();
        self.unacked -= amount;
        self.unacked_count -= count;
        self.lost += amount;
        self.lost_count += count;
        Some(Lost { amount, count, link })
    }

    /// Starts a transfer if allowed (ready, not quiesced, money left, some link up):
    /// random peer, random amount in 1..=max(1, balance/10), debited now.
    pub fn pick(&mut self, rng: &mut fastrand::Rng) -> Option<Transfer<L>> {
        if !self.ready || self.quiesced || self.balance == 0 {
            return None;
        }
        let up: Vec<usize> = (0..self.slots.len()).filter(|&j| j != self.me && self.slots[j].link.is_some()).collect();
        if up.is_empty() {
            return None;
        }
        let peer = up[rng.usize(..up.len())];
        let link = self.slots[peer].link.clone()?;
        let amount = rng.u64(1..=(self.balance / 10).max(1));
        let seq = self.next_seq;
        self.next_seq += 1;
        self.balance -= amount;
        self.unacked += amount;
        self.unacked_count += 1;
        self.sent += 1;
        let slot = &mut self.slots[peer];
        slot.pending.insert(seq, amount);
        Some(Transfer { peer, generation: slot.generation, seq, amount, link })
    }

    /// Applies an ack for `seq` received on link `generation` of `peer`.
    pub fn ack(&mut self, peer: usize, generation: u64, seq: u64) -> Result<(), AckError> {
        let slot = self.slots.get_mut(peer).ok_or(AckError::UnknownSeq)?;
        if slot.generation != generation || slot.link.is_none() {
            return Err(AckError::Stale);
        }
        let amount = slot.pending.remove(&seq).ok_or(AckError::UnknownSeq)?;
        self.unacked -= amount;
        self.unacked_count -= 1;
        self.acked += 1;
        Ok(())
    }

    /// Credits an incoming transfer; false (and nothing changed) on overflow.
    pub fn credit(&mut self, amount: u64) -> bool {
        match self.balance.checked_add(amount) {
            Some(b) => {
                self.balance = b;
                self.received += 1;
                true
            }
            None => false,
        }
    }

    /// Stops new transfers; returns the waiters to answer now (all of them once nothing is unacked).
    pub fn quiesce(&mut self, req: Option<String>) -> Vec<Option<String>> {
        self.quiesced = true;
        self.waiters.push(req);
        self.drain_waiters()
    }

    /// Restarts transfers; returns quiesce waiters that never got their answer.
    pub fn resume(&mut self) -> Vec<Option<String>> {
        self.quiesced = false;
        std::mem::take(&mut self.waiters)
    }

    /// Quiesce waiters that can be answered now (quiesced and nothing unacked).
    pub fn drain_waiters(&mut self) -> Vec<Option<String>> {
        if self.quiesced && self.unacked_count == 0 { std::mem::take(&mut self.waiters) } else { Vec::new() }
    }

    /// Current counters.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            balance: self.balance,
            unacked: self.unacked,
            unacked_count: self.unacked_count,
            sent: self.sent,
            received: self.received,
            acked: self.acked,
            lost: self.lost,
            lost_count: self.lost_count,
            quiesced: self.quiesced,
            connected: self.slots.iter().filter(|s| s.link.is_some()).count() as u64,
            ready: self.ready,
        }
    }
}

/// Ledger parameters.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// This guest's index.
    pub id: usize,
    /// Cluster size.
    pub peers: usize,
    /// Initial balance.
    pub balance: u64,
    /// Transfers per second (0 = none).
    pub rate: u32,
    /// TCP port.
    pub port: u16,
}

/// A running ledger.
pub struct Ledger {
    cfg: LedgerConfig,
    book: Mutex<Book<Arc<TcpStream>>>,
    status: Arc<StatusWriter>,
}

/// Parses `T <seq> <amount>` / `A <seq>` wire lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// A transfer.
    Transfer {
        /// Sequence number.
        seq: u64,
        /// Amount.
        amount: u64,
    },
    /// An acknowledgement.
    Ack {
        /// Sequence number acknowledged.
        seq: u64,
    },
}

impl Wire {
    /// Parses one line (without newline); None when malformed.
    pub fn parse(line: &[u8]) -> Option<Wire> {
        let text = std::str::from_utf8(line).ok()?;
        let mut w = text.split(' ');
        let kind = w.next()?;
        let seq = w.next()?.parse().ok()?;
        let msg = match kind {
            "T" => Wire::Transfer { seq, amount: w.next()?.parse().ok().filter(|&a| a > 0)? },
            "A" => Wire::Ack { seq },
            _ => return None,
        };
        w.next().is_none().then_some(msg)
    }
}

fn wire_text(line: &[u8]) -> String {
    String::from_utf8_lossy(&line[..line.len().min(80)]).into_owned()
}

impl Ledger {
    /// Starts the listener, one connector per peer and the transfer loop.
    pub fn start(cfg: LedgerConfig, status: Arc<StatusWriter>) -> Arc<Ledger> {
        let ledger = Arc::new(Ledger { book: Mutex::new(Book::new(cfg.id, cfg.peers, cfg.balance)), cfg, status });
        if ledger.cfg.peers <= 1 {
            ledger.emit_ready();
        }
        let l = Arc::clone(&ledger);
        crate::spawn(&ledger.status, "ledger-listen", move || l.listen());
        for j in (0..ledger.cfg.peers).filter(|&j| j != ledger.cfg.id) {
            let l = Arc::clone(&ledger);
            crate::spawn(&ledger.status, &format!("ledger-peer{j}"), move || l.run_peer(j));
        }
        let l = Arc::clone(&ledger);
        crate::spawn(&ledger.status, "ledger-send", move || l.send_loop());
        ledger
    }

    fn emit_ready(&self) {
        self.status.emit(Event::new("ready").with("mode", "ledger").with("peers", self.cfg.peers));
    }

    /// Current counters.
    pub fn snapshot(&self) -> Snapshot {
        lock(&self.book).snapshot()
    }

    /// Handles `quiesce`: answers now or once the last unacked transfer is acked.
    pub fn quiesce(&self, req: Option<String>) {
        let (done, balance) = {
            let mut b = lock(&self.book);
            let done = b.quiesce(req);
            (done, b.snapshot().balance)
        };
        self.answer_quiesced(done, balance);
    }

    /// Handles `resume`: restarts transfers; pending quiesce requests get an error.
    pub fn resume(&self, req: Option<&str>) {
        let cancelled = lock(&self.book).resume();
        for r in cancelled {
            self.status.emit(Event::new("error").with("what", "quiesce cancelled by resume").req(r.as_deref()));
        }
        self.status.emit(Event::new("resumed").req(req));
    }

    /// The `balance` reply.
    pub fn balance_event(&self, req: Option<&str>) -> Event {
        let s = self.snapshot();
        Event::new("balance")
            .with("balance", s.balance)
            .with("unacked", s.unacked)
            .with("sent", s.sent)
            .with("received", s.received)
            .with("quiesced", s.quiesced)
            .with("unacked_count", s.unacked_count)
            .with("lost", s.lost)
            .with("lost_count", s.lost_count)
            .req(req)
    }

    fn answer_quiesced(&self, waiters: Vec<Option<String>>, balance: u64) {
        for r in waiters {
            self.status.emit(Event::new("quiesced").with("balance", balance).req(r.as_deref()));
        }
    }

    fn listen(self: Arc<Self>) {
        let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, self.cfg.port)) {
            Ok(l) => l,
            Err(e) => fatal_forever(
                &self.status,
                Event::new("fatal")
                    .with("what", "ledger listen failed")
                    .with("port", self.cfg.port)
                    .with("error", e.to_string()),
            ),
        };
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    let l = Arc::clone(&self);
                    crate::spawn(&self.status, &format!("ledger-in-{addr}"), move || l.serve(stream, addr));
                }
                Err(e) => {
                    self.status
                        .emit(Event::new("error").with("what", "ledger accept failed").with("error", e.to_string()));
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    fn peer_value(&self, addr: &SocketAddr) -> Value {
        match guest_of(addr, self.cfg.peers) {
            Some(i) => i.into(),
            None => addr.to_string().into(),
        }
    }

    /// Serves one incoming connection: credit transfers, ack them.
    fn serve(self: Arc<Self>, stream: TcpStream, addr: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let peer = self.peer_value(&addr);
        let mut lines = LineBuffer::new(MAX_WIRE_LINE);
        let mut buf = [0u8; 4096];
        let reason = 'conn: loop {
            let n = match (&stream).read(&mut buf) {
                Ok(0) => break "closed by peer".to_string(),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => break format!("read: {e}"),
            };
            let mut acks = String::new();
            for line in lines.push(&buf[..n]) {
                let msg = if line.truncated { None } else { Wire::parse(&line.bytes) };
                let Some(Wire::Transfer { seq, amount }) = msg else {
                    self.status.emit(
                        Event::new("error")
                            .with("what", "ledger protocol error")
                            .with("peer", peer.clone())
                            .with("line", wire_text(&line.bytes)),
                    );
                    let _ = stream.shutdown(Shutdown::Both);
                    break 'conn "protocol error".to_string();
                };
                if !lock(&self.book).credit(amount) {
                    self.status.emit(
                        Event::new("error")
                            .with("what", "ledger balance overflow")
                            .with("peer", peer.clone())
                            .with("amount", amount),
                    );
                    let _ = stream.shutdown(Shutdown::Both);
                    break 'conn "balance overflow".to_string();
                }
                acks.push_str(&format!("A {seq}\n"));
            }
            let written = if acks.is_empty() { Ok(()) } else { (&stream).write_all(acks.as_bytes()) };
            if let Err(e) = written {
                break format!("write: {e}");
            }
        };
        self.status.emit(
            Event::new("error")
                .with("what", "ledger incoming connection lost")
                .with("peer", peer)
                .with("reason", reason),
        );
    }

    /// Keeps the outgoing connection to `peer` up and reads its acks.
    fn run_peer(self: Arc<Self>, peer: usize) {
        let addr = SocketAddr::from((guest_addr(peer), self.cfg.port));
        loop {
            let stream = loop {
                match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
                    Ok(s) => break s,
                    Err(_) => std::thread::sleep(RETRY),
                }
            };
            let _ = stream.set_nodelay(true);
            let stream = Arc::new(stream);
            let c = lock(&self.book).connect(peer, Arc::clone(&stream));
            if c.reconnect {
                self.status.emit(Event::new("info").with("what", "ledger peer reconnected").with("peer", peer));
            }
            if c.became_ready {
                self.emit_ready();
            }
            let reason = self.read_acks(peer, c.generation, &stream);
            self.link_lost(peer, c.generation, &reason);
            std::thread::sleep(RETRY);
        }
    }

    fn read_acks(&self, peer: usize, generation: u64, stream: &TcpStream) -> String {
        let mut lines = LineBuffer::new(MAX_WIRE_LINE);
        let mut buf = [0u8; 4096];
        loop {
            let n = match (&*stream).read(&mut buf) {
                Ok(0) => return "closed by peer".to_string(),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return format!("read: {e}"),
            };
            let mut events = Vec::new();
            let mut drained = Vec::new();
            let mut balance = 0;
            {
                let mut book = lock(&self.book);
                for line in lines.push(&buf[..n]) {
                    let msg = if line.truncated { None } else { Wire::parse(&line.bytes) };
                    let Some(Wire::Ack { seq }) = msg else {
                        drop(book);
                        for ev in events {
                            self.status.emit(ev);
                        }
                        self.status.emit(
                            Event::new("error")
                                .with("what", "ledger protocol error")
                                .with("peer", peer)
                                .with("line", wire_text(&line.bytes)),
                        );
                        return "protocol error".to_string();
                    };
                    match book.ack(peer, generation, seq) {
                        Ok(()) => {}
                        Err(AckError::Stale) => {}
                        Err(AckError::UnknownSeq) => events.push(
                            Event::new("error")
                                .with("what", "ledger unexpected ack")
                                .with("peer", peer)
                                .with("seq", seq),
                        ),
                    }
                }
                drained.extend(book.drain_waiters());
                if !drained.is_empty() {
                    balance = book.snapshot().balance;
                }
            }
            for ev in events {
                self.status.emit(ev);
            }
            self.answer_quiesced(drained, balance);
        }
    }

    /// Handles a broken outgoing link (from the reader or the sender; reported once).
    fn link_lost(&self, peer: usize, generation: u64, reason: &str) {
        let (lost, drained, balance) = {
            let mut book = lock(&self.book);
            let lost = book.disconnect(peer, generation);
            let drained = book.drain_waiters();
            (lost, drained, book.snapshot().balance)
        };
        if let Some(lost) = lost {
            let _ = lost.link.shutdown(Shutdown::Both);
            self.status.emit(
                Event::new("error")
                    .with("what", "ledger connection lost")
                    .with("peer", peer)
                    .with("reason", reason)
                    .with("lost", lost.amount)
                    .with("lost_count", lost.count),
            );
        }
        self.answer_quiesced(drained, balance);
    }

    fn send_loop(self: Arc<Self>) {
        if self.cfg.rate == 0 {
            crate::status::sleep_forever();
        }
        let mut rng = fastrand::Rng::new();
        let mut pacer = Pacer::per_second(u64::from(self.cfg.rate));
        loop {
            pacer.wait();
            let Some(t) = lock(&self.book).pick(&mut rng) else {
                continue;
            };
            let line = format!("T {} {}\n", t.seq, t.amount);
            if let Err(e) = (&*t.link).write_all(line.as_bytes()) {
                self.link_lost(t.peer, t.generation, &format!("write: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(balance: u64) -> (Book<()>, Book<()>) {
        let mut a = Book::new(0, 2, balance);
        let mut b = Book::new(1, 2, balance);
        assert!(a.connect(1, ()).became_ready);
        assert!(b.connect(0, ()).became_ready);
        (a, b)
    }

    #[test]
    fn round_trips_conserve_money() {
        let (mut a, mut b) = pair(1000);
        let mut rng = fastrand::Rng::with_seed(7);
        for i in 0..500 {
            let (from, to) = if i % 3 == 0 { (&mut b, &mut a) } else { (&mut a, &mut b) };
            let Some(t) = from.pick(&mut rng) else {
                continue;
            };
            assert!(t.amount >= 1);
            let s = from.snapshot();
            assert_eq!(s.balance + s.unacked + to.snapshot().balance, 2000);
            assert!(to.credit(t.amount));
            from.ack(t.peer, t.generation, t.seq).expect("ack");
        }
        let (sa, sb) = (a.snapshot(), b.snapshot());
        assert_eq!(sa.balance + sb.balance, 2000);
        assert_eq!((sa.unacked, sb.unacked, sa.unacked_count), (0, 0, 0));
        assert_eq!(sa.sent, sb.received);
        assert_eq!(sb.sent, sa.received);
        assert_eq!(sa.acked, sa.sent);
    }

    #[test]
    fn amount_bounds() {
        let mut a: Book<()> = Book::new(0, 2, 5);
        a.connect(1, ());
        let mut rng = fastrand::Rng::with_seed(1);
        // balance/10 == 0 -> amount is exactly 1
        let t = a.pick(&mut rng).expect("transfer");
        assert_eq!(t.amount, 1);
        let mut a: Book<()> = Book::new(0, 2, 1_000_000);
        a.connect(1, ());
        for _ in 0..50 {
            let before = a.snapshot().balance;
            let t = a.pick(&mut rng).expect("transfer");
            assert!((1..=(before / 10).max(1)).contains(&t.amount));
        }
    }

    #[test]
    fn no_transfer_unless_ready_unquiesced_and_funded() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut a: Book<()> = Book::new(0, 3, 100);
        a.connect(1, ());
        assert!(a.pick(&mut rng).is_none(), "not all peers connected yet");
        assert!(a.connect(2, ()).became_ready);
        assert!(a.pick(&mut rng).is_some());
        a.quiesce(None);
        assert!(a.pick(&mut rng).is_none());
        a.resume();
        let mut z: Book<()> = Book::new(0, 2, 0);
        z.connect(1, ());
        assert!(z.pick(&mut rng).is_none());
        let mut solo: Book<()> = Book::new(0, 1, 10);
        assert!(solo.snapshot().ready);
        assert!(solo.pick(&mut rng).is_none());
    }

    #[test]
    fn quiesce_waits_for_acks() {
        let (mut a, _b) = pair(1000);
        let mut rng = fastrand::Rng::with_seed(5);
        let t1 = a.pick(&mut rng).expect("t1");
        let t2 = a.pick(&mut rng).expect("t2");
        assert!(a.quiesce(Some("q".into())).is_empty());
        a.ack(t1.peer, t1.generation, t1.seq).expect("ack1");
        assert!(a.drain_waiters().is_empty());
        a.ack(t2.peer, t2.generation, t2.seq).expect("ack2");
        assert_eq!(a.drain_waiters(), vec![Some("q".to_string())]);
        // Already drained: a new quiesce answers at once.
        assert_eq!(a.quiesce(None), vec![None]);
        assert!(a.snapshot().quiesced);
    }

    #[test]
    fn resume_cancels_waiters() {
        let (mut a, _b) = pair(1000);
        let mut rng = fastrand::Rng::with_seed(5);
        a.pick(&mut rng).expect("t");
        assert!(a.quiesce(Some("x".into())).is_empty());
        assert_eq!(a.resume(), vec![Some("x".to_string())]);
        assert!(!a.snapshot().quiesced);
    }

    #[test]
    fn disconnect_writes_off_pending_once() {
        let (mut a, _b) = pair(1000);
        let mut rng = fastrand::Rng::with_seed(9);
        let t1 = a.pick(&mut rng).expect("t1");
        let t2 = a.pick(&mut rng).expect("t2");
        a.quiesce(None);
        let lost = a.disconnect(1, t1.generation).expect("lost");
        assert_eq!(lost.count, 2);
        assert_eq!(lost.amount, t1.amount + t2.amount);
        assert!(a.disconnect(1, t1.generation).is_none(), "reported once");
        assert_eq!(a.ack(1, t1.generation, t1.seq), Err(AckError::Stale));
        let s = a.snapshot();
        assert_eq!(s.balance + s.lost, 1000);
        assert_eq!((s.unacked, s.unacked_count, s.connected), (0, 0, 0));
        assert_eq!(a.drain_waiters(), vec![None]);
        let c = a.connect(1, ());
        assert!(c.reconnect && !c.became_ready);
        assert_eq!(a.ack(1, c.generation, t1.seq), Err(AckError::UnknownSeq));
        assert!(a.disconnect(1, t1.generation).is_none(), "old generation");
    }

    #[test]
    fn credit_overflow_rejected() {
        let mut a: Book<()> = Book::new(0, 2, u64::MAX - 1);
        assert!(a.credit(1));
        assert!(!a.credit(1));
        assert_eq!(a.snapshot().received, 1);
    }

    #[test]
    fn wire_parsing() {
        assert_eq!(Wire::parse(b"T 5 17"), Some(Wire::Transfer { seq: 5, amount: 17 }));
        assert_eq!(Wire::parse(b"A 5"), Some(Wire::Ack { seq: 5 }));
        assert_eq!(Wire::parse(b"T 5 0"), None);
        assert_eq!(Wire::parse(b"T 5"), None);
        assert_eq!(Wire::parse(b"A 5 1"), None);
        assert_eq!(Wire::parse(b"X 1"), None);
        assert_eq!(Wire::parse(b"A -1"), None);
        assert_eq!(Wire::parse(&[0xff]), None);
    }

    #[test]
    fn addresses() {
        assert_eq!(guest_addr(0), Ipv4Addr::new(10, 0, 0, 1));
        let a: SocketAddr = "10.0.0.3:5555".parse().expect("addr");
        assert_eq!(guest_of(&a, 3), Some(2));
        assert_eq!(guest_of(&a, 2), None);
        let b: SocketAddr = "192.168.0.1:1".parse().expect("addr");
        assert_eq!(guest_of(&b, 3), None);
    }
}
