//! Stream mode: countable traffic to the next guest, for the output-gate tests.
//!
//! Guest `i` sends to guest `(i+1) % peers` and receives from guest `(i-1) % peers`:
//! - UDP datagrams on `port`, each carrying a sequence number (u64 big-endian, from 1), at
//!   `rate` per second; the receiver reports the highest number seen, how many arrived,
//!   which are missing, and how many came out of order or twice;
//! - one TCP connection on `port` carrying the byte pattern `offset % 251` at `tcp_bps`
//!   bytes per second; the receiver checks every byte and counts resets and closes.
//!
//! `stream-stop` stops both senders (the reply carries the send counters, final from
//! then on) and `stream-start` starts them again.

use crate::pacer::Pacer;
use crate::status::{Event, StatusWriter, lock};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Size of a UDP datagram's payload (the sequence number, then padding).
pub const DATAGRAM: usize = 64;
/// Modulus of the TCP byte pattern (prime, so it never lines up with buffer sizes).
pub const PATTERN: u64 = 251;
/// Bytes written per TCP write.
const CHUNK: usize = 1024;
/// Delay between TCP connection attempts.
const RETRY: Duration = Duration::from_millis(200);
/// Receive buffer asked for the UDP socket: a released hold arrives as one burst, faster
/// than the receiver thread runs, and the kernel's default (about 200 KiB, some 90 small
/// datagrams at the guest's buffer sizes) would drop the tail of it.
const UDP_RCVBUF: libc::c_int = 16 << 20;
/// Gaps larger than this are counted, not remembered one by one.
const MAX_REMEMBERED_GAP: u64 = 100_000;

/// Stream parameters.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// This guest's index.
    pub id: usize,
    /// Cluster size.
    pub peers: usize,
    /// UDP and TCP port.
    pub port: u16,
    /// UDP datagrams per second (0 = none).
    pub rate: u32,
    /// TCP bytes per second (0 = no TCP stream).
    pub tcp_bps: u64,
}

/// Receive-side bookkeeping of one sequence-numbered flow.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqTracker {
    /// Highest sequence number seen.
    pub highest: u64,
    /// Distinct sequence numbers received.
    pub received: u64,
    /// Arrivals below the highest number seen that filled a gap.
    pub out_of_order: u64,
    /// Arrivals of a number already received.
    pub duplicates: u64,
    missing: BTreeSet<u64>,
    /// Missing numbers not remembered individually (gaps beyond the limit).
    untracked: u64,
}

impl SeqTracker {
    /// Records the arrival of `seq` (numbers start at 1; 0 is ignored as malformed).
    pub fn record(&mut self, seq: u64) {
        if seq == 0 {
            return;
        }
        if seq > self.highest {
            let gap = seq - self.highest - 1;
            if gap > MAX_REMEMBERED_GAP {
                self.untracked += gap;
            } else {
                self.missing.extend(self.highest + 1..seq);
            }
            self.highest = seq;
            self.received += 1;
        } else if self.missing.remove(&seq) {
            self.received += 1;
            self.out_of_order += 1;
        } else {
            self.duplicates += 1;
        }
    }

    /// Numbers at or below the highest that have not arrived.
    pub fn missing(&self) -> u64 {
        self.missing.len() as u64 + self.untracked
    }

    /// The lowest missing numbers, at most `n`.
    pub fn first_missing(&self, n: usize) -> Vec<u64> {
        self.missing.iter().take(n).copied().collect()
    }
}

/// Checks a TCP byte stream against the pattern.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PatternCheck {
    /// Bytes checked.
    pub offset: u64,
    /// Bytes that differed from the pattern.
    pub bad: u64,
}

impl PatternCheck {
    /// Checks the next bytes of the stream.
    pub fn check(&mut self, data: &[u8]) {
        for &b in data {
            if u64::from(b) != self.offset % PATTERN {
                self.bad += 1;
            }
            self.offset += 1;
        }
    }
}

/// Fills `buf` with the pattern from stream offset `offset`.
pub fn fill_pattern(buf: &mut [u8], offset: u64) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = ((offset + i as u64) % PATTERN) as u8;
    }
}

/// The sequence number of a datagram, if it is one of ours.
pub fn datagram_seq(payload: &[u8]) -> Option<u64> {
    (payload.len() == DATAGRAM).then(|| u64::from_be_bytes(payload[..8].try_into().unwrap_or([0; 8])))
}

/// Raises the socket's receive buffer to [`UDP_RCVBUF`] (past `rmem_max`: the workload
/// runs as root) and returns the size the kernel granted, 0 if unknown.
fn grow_receive_buffer(sock: &UdpSocket) -> i64 {
    use std::os::fd::AsRawFd;
    let fd = sock.as_raw_fd();
    let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let want: libc::c_int = UDP_RCVBUF;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: fd is an open socket; the value is a c_int of the given length.
        let r = unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&raw const want).cast(), len) };
        if r == 0 {
            break;
        }
    }
    let mut got: libc::c_int = 0;
    let mut got_len = len;
    // SAFETY: as above; `got` and `got_len` are valid for writes.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&raw mut got).cast(), &mut got_len) };
    if r == 0 { i64::from(got) } else { 0 }
}

/// A running stream.
pub struct Stream {
    cfg: StreamConfig,
    sending: AtomicBool,
    udp_sent: AtomicU64,
    udp_send_errors: AtomicU64,
    udp: Mutex<SeqTracker>,
    udp_foreign: AtomicU64,
    tcp_sent: AtomicU64,
    tcp_send_errors: AtomicU64,
    tcp_received: AtomicU64,
    tcp_bad: AtomicU64,
    tcp_resets: AtomicU64,
    tcp_closed: AtomicU64,
    tcp_conns: AtomicU64,
    status: Arc<StatusWriter>,
}

fn peer_addr(i: usize) -> Ipv4Addr {
    crate::ledger::guest_addr(i)
}

impl Stream {
    /// Starts the receivers and the senders.
    pub fn start(cfg: StreamConfig, status: Arc<StatusWriter>) -> Arc<Stream> {
        let s = Arc::new(Stream {
            cfg,
            sending: AtomicBool::new(true),
            udp_sent: AtomicU64::new(0),
            udp_send_errors: AtomicU64::new(0),
            udp: Mutex::new(SeqTracker::default()),
            udp_foreign: AtomicU64::new(0),
            tcp_sent: AtomicU64::new(0),
            tcp_send_errors: AtomicU64::new(0),
            tcp_received: AtomicU64::new(0),
            tcp_bad: AtomicU64::new(0),
            tcp_resets: AtomicU64::new(0),
            tcp_closed: AtomicU64::new(0),
            tcp_conns: AtomicU64::new(0),
            status,
        });
        let st = &s.status;
        let sock = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, s.cfg.port)) {
            Ok(u) => Arc::new(u),
            Err(e) => crate::status::fatal_forever(
                st,
                Event::new("fatal").with("what", "stream udp bind failed").with("error", e.to_string()),
            ),
        };
        let rcvbuf = grow_receive_buffer(&sock);
        let (a, u) = (Arc::clone(&s), Arc::clone(&sock));
        crate::spawn(st, "stream-udp-recv", move || a.udp_receive(&u));
        let a = Arc::clone(&s);
        crate::spawn(st, "stream-tcp-listen", move || a.tcp_listen());
        if s.cfg.peers > 1 {
            if s.cfg.rate > 0 {
                let a = Arc::clone(&s);
                crate::spawn(st, "stream-udp-send", move || a.udp_send(&sock));
            }
            if s.cfg.tcp_bps > 0 {
                let a = Arc::clone(&s);
                crate::spawn(st, "stream-tcp-send", move || a.tcp_send());
            }
        }
        s.status.emit(
            Event::new("ready")
                .with("mode", "stream")
                .with("to", (s.cfg.id + 1) % s.cfg.peers)
                .with("rate", s.cfg.rate)
                .with("tcp_bps", s.cfg.tcp_bps)
                .with("udp_rcvbuf", rcvbuf),
        );
        s
    }

    /// Counters for ticks and status replies.
    pub fn fields(&self) -> Vec<(String, Value)> {
        let u = lock(&self.udp).clone();
        let l = |a: &AtomicU64| Value::from(a.load(Ordering::Relaxed));
        vec![
            ("stream_sending".into(), self.sending.load(Ordering::Relaxed).into()),
            ("udp_sent".into(), l(&self.udp_sent)),
            ("udp_send_errors".into(), l(&self.udp_send_errors)),
            ("udp_received".into(), u.received.into()),
            ("udp_highest".into(), u.highest.into()),
            ("udp_missing".into(), u.missing().into()),
            ("udp_first_missing".into(), u.first_missing(5).into()),
            ("udp_ooo".into(), u.out_of_order.into()),
            ("udp_dup".into(), u.duplicates.into()),
            ("udp_foreign".into(), l(&self.udp_foreign)),
            ("tcp_sent".into(), l(&self.tcp_sent)),
            ("tcp_send_errors".into(), l(&self.tcp_send_errors)),
            ("tcp_received".into(), l(&self.tcp_received)),
            ("tcp_bad".into(), l(&self.tcp_bad)),
            ("tcp_resets".into(), l(&self.tcp_resets)),
            ("tcp_closed".into(), l(&self.tcp_closed)),
            ("tcp_conns".into(), l(&self.tcp_conns)),
        ]
    }

    /// Handles `stream-stop` / `stream-start`.
    pub fn set_sending(&self, on: bool, req: Option<&str>) {
        self.sending.store(on, Ordering::SeqCst);
        // Let a send in progress finish so that the counters in the reply are final.
        std::thread::sleep(Duration::from_millis(50));
        let name = if on { "stream_started" } else { "stream_stopped" };
        self.status.emit(Event::new(name).extend(self.fields()).req(req));
    }

    fn udp_send(&self, sock: &UdpSocket) {
        let to = SocketAddr::from((peer_addr((self.cfg.id + 1) % self.cfg.peers), self.cfg.port));
        let mut pacer = Pacer::per_second(u64::from(self.cfg.rate));
        let mut seq: u64 = 1;
        let mut buf = [0u8; DATAGRAM];
        loop {
            pacer.wait();
            if !self.sending.load(Ordering::SeqCst) {
                continue;
            }
            buf[..8].copy_from_slice(&seq.to_be_bytes());
            match sock.send_to(&buf, to) {
                Ok(_) => {
                    seq += 1;
                    self.udp_sent.fetch_add(1, Ordering::SeqCst);
                }
                Err(_) => {
                    self.udp_send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn udp_receive(&self, sock: &UdpSocket) {
        let from = peer_addr((self.cfg.id + self.cfg.peers - 1) % self.cfg.peers);
        let mut buf = [0u8; 2048];
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, SocketAddr::V4(a))) if *a.ip() == from => match datagram_seq(&buf[..n]) {
                    Some(seq) => lock(&self.udp).record(seq),
                    None => {
                        self.udp_foreign.fetch_add(1, Ordering::Relaxed);
                    }
                },
                Ok(_) => {
                    self.udp_foreign.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.status.emit(
                        Event::new("error").with("what", "stream udp receive failed").with("error", e.to_string()),
                    );
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    fn tcp_send(&self) {
        let to = SocketAddr::from((peer_addr((self.cfg.id + 1) % self.cfg.peers), self.cfg.port));
        let chunks_per_sec = (self.cfg.tcp_bps / CHUNK as u64).max(1);
        let mut buf = [0u8; CHUNK];
        loop {
            let mut stream = match TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                Ok(s) => s,
                Err(_) => {
                    std::thread::sleep(RETRY);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let mut offset: u64 = 0;
            let mut pacer = Pacer::per_second(chunks_per_sec);
            let err = loop {
                pacer.wait();
                if !self.sending.load(Ordering::SeqCst) {
                    continue;
                }
                fill_pattern(&mut buf, offset);
                if let Err(e) = stream.write_all(&buf) {
                    break e;
                }
                offset += CHUNK as u64;
                self.tcp_sent.fetch_add(CHUNK as u64, Ordering::SeqCst);
            };
            self.tcp_send_errors.fetch_add(1, Ordering::Relaxed);
            self.status.emit(Event::new("error").with("what", "stream tcp send failed").with("error", err.to_string()));
            std::thread::sleep(RETRY);
        }
    }

    fn tcp_listen(self: Arc<Self>) {
        let listener = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, self.cfg.port)) {
            Ok(l) => l,
            Err(e) => crate::status::fatal_forever(
                &self.status,
                Event::new("fatal").with("what", "stream tcp listen failed").with("error", e.to_string()),
            ),
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    self.tcp_conns.fetch_add(1, Ordering::Relaxed);
                    let s = Arc::clone(&self);
                    crate::spawn(&self.status, "stream-tcp-in", move || s.tcp_receive(stream));
                }
                Err(_) => std::thread::sleep(RETRY),
            }
        }
    }

    fn tcp_receive(&self, mut stream: TcpStream) {
        let mut check = PatternCheck::default();
        let mut buf = [0u8; 8192];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    self.tcp_closed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(n) => {
                    let bad = check.bad;
                    check.check(&buf[..n]);
                    self.tcp_bad.fetch_add(check.bad - bad, Ordering::Relaxed);
                    self.tcp_received.fetch_add(n as u64, Ordering::SeqCst);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    if e.kind() == ErrorKind::ConnectionReset {
                        self.tcp_resets.fetch_add(1, Ordering::Relaxed);
                    } else {
                        self.tcp_closed.fetch_add(1, Ordering::Relaxed);
                    }
                    self.status.emit(
                        Event::new("error").with("what", "stream tcp receive failed").with("error", e.to_string()),
                    );
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_flow_has_nothing_missing() {
        let mut t = SeqTracker::default();
        for s in 1..=100 {
            t.record(s);
        }
        assert_eq!((t.highest, t.received, t.missing(), t.out_of_order, t.duplicates), (100, 100, 0, 0, 0));
    }

    #[test]
    fn gaps_reordering_and_duplicates_are_told_apart() {
        let mut t = SeqTracker::default();
        for s in [1, 2, 5, 3, 3, 7] {
            t.record(s);
        }
        assert_eq!(t.highest, 7);
        assert_eq!(t.received, 5);
        assert_eq!(t.first_missing(10), vec![4, 6]);
        assert_eq!(t.missing(), 2);
        assert_eq!(t.out_of_order, 1, "3 filled a gap");
        assert_eq!(t.duplicates, 1, "the second 3");
        t.record(0);
        assert_eq!(t.received, 5, "0 is malformed and ignored");
    }

    #[test]
    fn huge_gaps_are_counted_not_stored() {
        let mut t = SeqTracker::default();
        t.record(1);
        t.record(MAX_REMEMBERED_GAP + 10);
        assert_eq!(t.missing(), MAX_REMEMBERED_GAP + 8);
        assert!(t.first_missing(3).is_empty());
    }

    #[test]
    fn pattern_round_trips_across_chunks() {
        let mut c = PatternCheck::default();
        let mut buf = [0u8; 300];
        for i in 0..10u64 {
            fill_pattern(&mut buf, i * 300);
            c.check(&buf);
        }
        assert_eq!((c.offset, c.bad), (3000, 0));
        c.check(&[0, 0]);
        assert_eq!(c.bad, 2, "3000 % 251 = 239 and 240, not 0");
    }

    #[test]
    fn datagrams_carry_their_number() {
        let mut d = [0u8; DATAGRAM];
        d[..8].copy_from_slice(&42u64.to_be_bytes());
        assert_eq!(datagram_seq(&d), Some(42));
        assert_eq!(datagram_seq(&d[..10]), None);
    }
}
