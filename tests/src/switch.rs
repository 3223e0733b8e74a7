//! A small learning L2 switch on UDP, so that 2..N test guests share one Ethernet
//! segment without multicast.
//!
//! Each guest gets a port: QEMU's `-netdev dgram` sends its frames to the port's UDP
//! socket, and the switch forwards them by destination MAC (flooding broadcasts and
//! unknown destinations) to the other guests' UDP addresses. A port's guest address is
//! learned from the source of the frames received on it, so a guest relaunched
//! elsewhere (another local port, another host) is reached again after its first frame.
//!
//! [`L2Switch::start`] is the in-process switch on loopback whose guest addresses are
//! chosen up front; [`L2Switch::bind`] listens on given ports of any address and learns
//! every guest address (what `cutline-switch` runs inside a host container); [`serve`]
//! is that binary's loop.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One port of the switch.
#[derive(Debug, Clone, Copy)]
pub struct SwitchPort {
    /// The switch's end: the guest sends here (`remote` of its netdev).
    pub switch_addr: SocketAddr,
    /// The guest's end: QEMU binds it (`local` of its netdev). For a switch made by
    /// [`L2Switch::bind`] it is the unspecified address until learned: see
    /// [`L2Switch::learned`].
    pub guest_addr: SocketAddr,
}

impl SwitchPort {
    /// The `-netdev` argument that wires a guest to this port.
    pub fn netdev_arg(&self, id: &str) -> String {
        format!(
            "dgram,id={id},local.type=inet,local.host={},local.port={},remote.type=inet,remote.host={},remote.port={}",
            self.guest_addr.ip(),
            self.guest_addr.port(),
            self.switch_addr.ip(),
            self.switch_addr.port()
        )
    }
}

struct State {
    sockets: Vec<UdpSocket>,
    /// Where each port's guest receives: set up front or learned from its frames.
    guests: Mutex<Vec<Option<SocketAddr>>>,
    macs: Mutex<HashMap<[u8; 6], usize>>,
    stop: AtomicBool,
    forwarded: AtomicU64,
}

/// A running switch; its threads stop when it is dropped.
pub struct L2Switch {
    ports: Vec<SwitchPort>,
    state: Arc<State>,
    threads: Vec<JoinHandle<()>>,
}

/// A free UDP port on 127.0.0.1 for QEMU to bind (released before QEMU binds it).
fn free_udp_port() -> std::io::Result<SocketAddr> {
    UdpSocket::bind("127.0.0.1:0")?.local_addr()
}

impl L2Switch {
    /// Starts a switch with `n` ports on 127.0.0.1, each with a guest address chosen
    /// up front (still followed if the guest sends from elsewhere).
    pub fn start(n: usize) -> std::io::Result<L2Switch> {
        let mut sockets = Vec::with_capacity(n);
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            let port = SwitchPort { switch_addr: s.local_addr()?, guest_addr: free_udp_port()? };
            ports.push(port);
            sockets.push(s);
        }
        let guests = ports.iter().map(|p| Some(p.guest_addr)).collect();
        L2Switch::run(sockets, ports, guests)
    }

    /// Starts a switch with `n` ports on `ip`, UDP ports `base_port..base_port + n`
    /// (any free ports when `base_port` is 0). No guest address is known up front: each
    /// port's is learned from the first frame received on it, and frames for a port whose
    /// guest has not sent yet are dropped.
    pub fn bind(ip: IpAddr, base_port: u16, n: usize) -> std::io::Result<L2Switch> {
        let mut sockets = Vec::with_capacity(n);
        let mut ports = Vec::with_capacity(n);
        for i in 0..n {
            let port = if base_port == 0 {
                0
            } else {
                u16::try_from(i).ok().and_then(|i| base_port.checked_add(i)).ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{n} ports from {base_port} overflow"),
                    )
                })?
            };
            let s = UdpSocket::bind(SocketAddr::new(ip, port))
                .map_err(|e| std::io::Error::new(e.kind(), format!("cannot bind switch port {ip}:{port}: {e}")))?;
            let unknown = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0);
            ports.push(SwitchPort { switch_addr: s.local_addr()?, guest_addr: unknown });
            sockets.push(s);
        }
        L2Switch::run(sockets, ports, vec![None; n])
    }

    fn run(
        sockets: Vec<UdpSocket>,
        ports: Vec<SwitchPort>,
        guests: Vec<Option<SocketAddr>>,
    ) -> std::io::Result<L2Switch> {
        for s in &sockets {
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
        }
        let n = sockets.len();
        let state = Arc::new(State {
            sockets,
            guests: Mutex::new(guests),
            macs: Mutex::default(),
            stop: AtomicBool::new(false),
            forwarded: AtomicU64::new(0),
        });
        let threads = (0..n)
            .map(|i| {
                let st = state.clone();
                std::thread::Builder::new().name(format!("l2switch-{i}")).spawn(move || port_loop(&st, i))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(L2Switch { ports, state, threads })
    }

    /// The ports, one per guest.
    pub fn ports(&self) -> &[SwitchPort] {
        &self.ports
    }

    /// Frames forwarded so far (each delivery to one port counts once).
    pub fn forwarded(&self) -> u64 {
        self.state.forwarded.load(Ordering::Relaxed)
    }

    /// Where each port's guest receives now: its last source address, `None` for a port
    /// of a [`L2Switch::bind`] switch whose guest has not sent yet.
    pub fn learned(&self) -> Vec<Option<SocketAddr>> {
        self.state.guests.lock().map(|g| g.clone()).unwrap_or_else(|e| e.into_inner().clone())
    }
}

fn port_loop(st: &State, i: usize) {
    let mut buf = vec![0u8; 65536];
    while !st.stop.load(Ordering::Relaxed) {
        let (n, from) = match st.sockets[i].recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) => {
                tracing::debug!(port = i, %e, "switch port receive error");
                continue;
            }
        };
        if n < 14 {
            continue;
        }
        let frame = &buf[..n];
        // A relaunched guest may bind another port or live on another host: follow
        // where it sends from.
        if let Ok(mut g) = st.guests.lock() {
            g[i] = Some(from);
        }
        let mut src = [0u8; 6];
        src.copy_from_slice(&frame[6..12]);
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&frame[..6]);
        let out = {
            let mut macs = st.macs.lock().unwrap_or_else(|e| e.into_inner());
            if src[0] & 1 == 0 {
                macs.insert(src, i);
            }
            if dst[0] & 1 == 0 { macs.get(&dst).copied() } else { None }
        };
        let guests = st.guests.lock().map(|g| g.clone()).unwrap_or_default();
        let targets: Vec<usize> = match out {
            Some(j) if j != i => vec![j],
            Some(_) => vec![],
            None => (0..guests.len()).filter(|&j| j != i).collect(),
        };
        for j in targets {
            let Some(to) = guests[j] else { continue };
            if st.sockets[j].send_to(frame, to).is_ok() {
                st.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// What `cutline-switch` serves.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The address every port listens on.
    pub bind: IpAddr,
    /// How many ports.
    pub ports: usize,
    /// The first UDP port; port `i` listens on `base_port + i` (0: any free ports).
    pub base_port: u16,
}

/// Runs a [`L2Switch::bind`] switch until `shutdown` yields (or its sender is dropped),
/// writing JSON lines to `out`: `{"event":"ready","ports":[…]}` once every port listens,
/// `{"event":"learned","port":I,"addr":"IP:PORT"}` whenever a port's guest address is
/// learned or changes, and `{"event":"stopped","forwarded":N}` at the end.
pub fn serve(config: &ServeConfig, out: &mut impl Write, shutdown: &Receiver<()>) -> std::io::Result<()> {
    let switch = L2Switch::bind(config.bind, config.base_port, config.ports)?;
    let ports: Vec<u16> = switch.ports().iter().map(|p| p.switch_addr.port()).collect();
    let mut line = |v: serde_json::Value| -> std::io::Result<()> {
        writeln!(out, "{v}")?;
        out.flush()
    };
    line(serde_json::json!({"event": "ready", "bind": config.bind.to_string(), "ports": ports}))?;
    let mut known = vec![None; config.ports];
    loop {
        for (i, (now, was)) in switch.learned().into_iter().zip(known.iter_mut()).enumerate() {
            if now != *was {
                if let Some(addr) = now {
                    line(serde_json::json!({"event": "learned", "port": i, "addr": addr.to_string()}))?;
                }
                *was = now;
            }
        }
        match shutdown.recv_timeout(Duration::from_millis(200)) {
            Err(RecvTimeoutError::Timeout) => continue,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    let forwarded = switch.forwarded();
    drop(switch);
    line(serde_json::json!({"event": "stopped", "forwarded": forwarded}))
}

impl Drop for L2Switch {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn floods_broadcast_then_forwards_learned_unicast() {
        let sw = L2Switch::start(3).expect("switch");
        let guests: Vec<UdpSocket> = sw
            .ports()
            .iter()
            .map(|p| {
                let s = UdpSocket::bind(p.guest_addr).expect("bind guest end");
                s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
                s
            })
            .collect();
        let a = [0x52, 0x54, 0, 0, 0, 1];
        let b = [0x52, 0x54, 0, 0, 0, 2];
        let mut buf = [0u8; 1500];
        // Broadcast from guest 0 reaches 1 and 2.
        guests[0].send_to(&frame([0xff; 6], a, b"hello"), sw.ports()[0].switch_addr).expect("send");
        for g in &guests[1..] {
            let n = g.recv(&mut buf).expect("flooded frame");
            assert_eq!(&buf[14..n], b"hello");
        }
        // Guest 1 answers guest 0 by unicast: only guest 0 receives it.
        guests[1].send_to(&frame(a, b, b"reply"), sw.ports()[1].switch_addr).expect("send");
        let n = guests[0].recv(&mut buf).expect("unicast frame");
        assert_eq!(&buf[14..n], b"reply");
        guests[2].set_read_timeout(Some(Duration::from_millis(300))).expect("timeout");
        assert!(guests[2].recv(&mut buf).is_err(), "a learned unicast must not be flooded");
    }

    #[test]
    fn a_bound_switch_learns_guest_addresses_and_follows_a_moved_guest() {
        let sw = L2Switch::bind(IpAddr::from([127, 0, 0, 1]), 0, 2).expect("switch");
        assert_eq!(sw.learned(), vec![None, None]);
        let socket = || {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind guest end");
            s.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
            s
        };
        let (g0, g1) = (socket(), socket());
        let a = [0x52, 0x54, 0, 0, 0, 1];
        let b = [0x52, 0x54, 0, 0, 0, 2];
        let mut buf = [0u8; 1500];
        // Guest 1 has not sent: guest 0's broadcast reaches nobody, but teaches the switch.
        g0.send_to(&frame([0xff; 6], a, b"hello"), sw.ports()[0].switch_addr).expect("send");
        // Each port has its own thread: guest 1's broadcast must come after the switch
        // learned guest 0, or it floods to nobody.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while sw.learned()[0].is_none() {
            assert!(std::time::Instant::now() < deadline, "guest 0 was never learned");
            std::thread::sleep(Duration::from_millis(5));
        }
        g1.send_to(&frame([0xff; 6], b, b"here"), sw.ports()[1].switch_addr).expect("send");
        let n = g0.recv(&mut buf).expect("guest 0 learned");
        assert_eq!(&buf[14..n], b"here");
        assert_eq!(sw.learned(), vec![Some(g0.local_addr().expect("addr")), Some(g1.local_addr().expect("addr"))]);
        // Guest 0 moves (a restore elsewhere): after its first frame it is reached there.
        let moved = socket();
        moved.send_to(&frame(b, a, b"back"), sw.ports()[0].switch_addr).expect("send");
        let n = g1.recv(&mut buf).expect("unicast to guest 1");
        assert_eq!(&buf[14..n], b"back");
        g1.send_to(&frame(a, b, b"welcome"), sw.ports()[1].switch_addr).expect("send");
        let n = moved.recv(&mut buf).expect("reached at the new address");
        assert_eq!(&buf[14..n], b"welcome");
    }

    #[test]
    fn serve_reports_ready_learned_and_stopped() {
        let config = ServeConfig { bind: IpAddr::from([127, 0, 0, 1]), ports: 1, base_port: 0 };
        let (stop, shutdown) = std::sync::mpsc::channel();
        let (lines_tx, lines) = std::sync::mpsc::channel::<serde_json::Value>();
        struct Lines(std::sync::mpsc::Sender<serde_json::Value>, Vec<u8>);
        impl Write for Lines {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.1.extend_from_slice(b);
                while let Some(i) = self.1.iter().position(|&c| c == b'\n') {
                    let line: Vec<u8> = self.1.drain(..=i).collect();
                    let _ = self.0.send(serde_json::from_slice(&line).expect("a JSON line"));
                }
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let server = std::thread::spawn(move || serve(&config, &mut Lines(lines_tx, Vec::new()), &shutdown));
        let t = Duration::from_secs(5);
        let ready = lines.recv_timeout(t).expect("ready line");
        assert_eq!(ready["event"], "ready");
        let port = ready["ports"][0].as_u64().expect("a port") as u16;
        let guest = UdpSocket::bind("127.0.0.1:0").expect("bind");
        guest.send_to(&frame([0xff; 6], [0x52, 0x54, 0, 0, 0, 1], b"hi"), ("127.0.0.1", port)).expect("send");
        let learned = lines.recv_timeout(t).expect("learned line");
        assert_eq!(learned["event"], "learned");
        assert_eq!(learned["addr"], guest.local_addr().expect("addr").to_string());
        stop.send(()).expect("stop");
        let stopped = lines.recv_timeout(t).expect("stopped line");
        assert_eq!(stopped["event"], "stopped");
        server.join().expect("join").expect("serve");
    }
}
