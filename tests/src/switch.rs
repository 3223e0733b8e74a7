//! A small learning L2 switch on loopback UDP, so that 2..N test guests share one
//! Ethernet segment without multicast and without leaving 127.0.0.1.
//!
//! Each guest gets a port: QEMU's `-netdev dgram` sends its frames to the port's UDP
//! socket, and the switch forwards them by destination MAC (flooding broadcasts and
//! unknown destinations) to the other guests' UDP addresses.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// One port of the switch.
#[derive(Debug, Clone, Copy)]
pub struct SwitchPort {
    /// The switch's end: the guest sends here (`remote` of its netdev).
    pub switch_addr: SocketAddr,
    /// The guest's end: QEMU binds it (`local` of its netdev).
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
    guests: Mutex<Vec<SocketAddr>>,
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
    /// Starts a switch with `n` ports.
    pub fn start(n: usize) -> std::io::Result<L2Switch> {
        let mut sockets = Vec::with_capacity(n);
        let mut ports = Vec::with_capacity(n);
        for _ in 0..n {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let port = SwitchPort { switch_addr: s.local_addr()?, guest_addr: free_udp_port()? };
            ports.push(port);
            sockets.push(s);
        }
        let state = Arc::new(State {
            sockets,
            guests: Mutex::new(ports.iter().map(|p| p.guest_addr).collect()),
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
        // A relaunched guest may bind another port: follow where it sends from.
        if let Ok(mut g) = st.guests.lock() {
            g[i] = from;
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
            if st.sockets[j].send_to(frame, guests[j]).is_ok() {
                st.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
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
}
