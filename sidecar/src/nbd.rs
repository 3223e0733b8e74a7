//! Writing an image through its format driver without argv limits: `qemu-nbd` serves the
//! image on a unix socket and a minimal NBD client (fixed newstyle handshake, `NBD_OPT_GO`,
//! simple replies) sends writes, write-zeroes and a flush. Every request's range is
//! checked against the export's size before it is sent.
//!
//! Protocol: <https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_WRITE_ZEROES: u16 = 64;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_WRITE_ZEROES: u16 = 6;
/// Longest option reply accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Longest single request sent (qemu-nbd accepts 32 MiB).
pub const MAX_REQUEST: u32 = 8 << 20;

/// Errors of NBD writing.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("NBD connection to {socket}")]
    Io {
        /// The socket.
        socket: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol or refused.
    #[error("NBD server on {socket}: {why}")]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// A request falls outside the export.
    #[error("NBD request at {offset} (+{length}) is outside the export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u64,
        /// Export size.
        size: u64,
    },
    /// qemu-nbd did not start or failed.
    #[error("qemu-nbd on {image}: {why}")]
    Server {
        /// The image.
        image: PathBuf,
        /// What happened.
        why: String,
    },
}

/// A qemu-nbd process serving one image on a unix socket in a private (0700) directory of
/// its own, short enough for a socket path wherever the image lives; killed on drop
/// unless it was closed cleanly.
pub struct Server {
    child: Option<Child>,
    image: PathBuf,
    dir: PathBuf,
    socket: PathBuf,
}

impl Server {
    /// Serves `image` (of `format`) writable, waiting until it accepts.
    pub fn start(image: &Path, format: &str) -> Result<Server, NbdError> {
        let fail = |why: String| NbdError::Server { image: image.to_owned(), why };
        let dir = private_dir().map_err(|e| fail(format!("cannot make its socket directory: {e}")))?;
        let socket = dir.join("nbd.sock");
        let spawned = Command::new("qemu-nbd")
            .arg(format!("--format={format}"))
            .arg("--socket")
            .arg(&socket)
            .arg("--cache=writeback")
            .arg("--aio=threads")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(fail(format!("cannot run qemu-nbd: {e}")));
            }
        };
        let mut server = Server { child: Some(child), image: image.to_owned(), dir, socket: socket.clone() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            if let Some(c) = server.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                let err = server.stderr();
                server.child = None;
                return Err(fail(format!("exited with {status}: {err}")));
            }
            if Instant::now() > deadline {
                return Err(fail("its socket did not appear within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(server)
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(e) = self.child.as_mut().and_then(|c| c.stderr.as_mut()) {
            let _ = e.read_to_string(&mut s);
        }
        s.trim().to_owned()
    }

    /// Connects its one client. The socket file appears when qemu-nbd binds it, a moment
    /// before it listens: a refused connection is retried while qemu-nbd runs, up to 30 s.
    /// (A probe connection would be that one client.)
    pub fn connect(&mut self) -> Result<Client, NbdError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(stream) => return Client::handshake(stream, &self.socket),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && Instant::now() < deadline => {
                    if let Some(c) = self.child.as_mut()
                        && let Ok(Some(status)) = c.try_wait()
                    {
                        let err = self.stderr();
                        self.child = None;
                        return Err(NbdError::Server {
                            image: self.image.clone(),
                            why: format!("exited with {status}: {err}"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(source) => return Err(NbdError::Io { socket: self.socket.clone(), source }),
            }
        }
    }

    /// Waits for qemu-nbd to exit after its client disconnected; an error if it failed.
    pub fn finish(mut self) -> Result<(), NbdError> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => {
                    self.child = Some(child);
                    let err = self.stderr();
                    self.child = None;
                    return Err(NbdError::Server { image: self.image.clone(), why: format!("{status}: {err}") });
                }
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    self.child = Some(child);
                    return Err(NbdError::Server { image: self.image.clone(), why: "did not exit".into() });
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A new directory of ours alone (0700, created exclusively) under the system temp dir.
fn private_dir() -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    loop {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("cutline-nbd.{}.{seq}.{nanos:x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            r => return r.map(|()| dir),
        }
    }
}

/// A connected NBD client with the export negotiated.
pub struct Client {
    stream: UnixStream,
    socket: PathBuf,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl Client {
    /// The fixed newstyle handshake over `stream`, negotiating the default export with
    /// `NBD_OPT_GO`.
    pub fn handshake(stream: UnixStream, socket: &Path) -> Result<Client, NbdError> {
        let mut c = Client { stream, socket: socket.to_owned(), size: 0, flags: 0, cookie: 0 };
        if c.u64()? != NBDMAGIC || c.u64()? != IHAVEOPT {
            return Err(c.protocol("not a newstyle NBD server".into()));
        }
        let server_flags = c.u16()?;
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(c.protocol("the server does not speak fixed newstyle".into()));
        }
        let client_flags = u32::from(server_flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
        // NBD_OPT_GO for the default export (""), no information requests.
        let mut opt = Vec::with_capacity(26);
        opt.extend(IHAVEOPT.to_be_bytes());
        opt.extend(OPT_GO.to_be_bytes());
        opt.extend(6u32.to_be_bytes());
        opt.extend(0u32.to_be_bytes());
        opt.extend(0u16.to_be_bytes());
        let mut hello = client_flags.to_be_bytes().to_vec();
        hello.extend(opt);
        c.send(&hello)?;
        loop {
            if c.u64()? != REPLY_MAGIC {
                return Err(c.protocol("bad option reply magic".into()));
            }
            let (option, kind, len) = (c.u32()?, c.u32()?, c.u32()?);
            if option != OPT_GO {
                return Err(c.protocol(format!("reply to option {option}, not NBD_OPT_GO")));
            }
            if len > MAX_OPTION_REPLY {
                return Err(c.protocol(format!("option reply of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            c.read(&mut data)?;
            match kind {
                REP_ACK => break,
                REP_INFO => {
                    if let [t0, t1, rest @ ..] = data.as_slice()
                        && u16::from_be_bytes([*t0, *t1]) == INFO_EXPORT
                        && rest.len() == 10
                    {
                        let mut size = [0u8; 8];
                        size.copy_from_slice(&rest[..8]);
                        c.size = u64::from_be_bytes(size);
                        c.flags = u16::from_be_bytes([rest[8], rest[9]]);
                    }
                }
                k if k & 0x8000_0000 != 0 => {
                    return Err(
                        c.protocol(format!("refused the export (error {k:#x}): {}", String::from_utf8_lossy(&data)))
                    );
                }
                _ => {}
            }
        }
        if c.flags & TFLAG_READ_ONLY != 0 {
            return Err(c.protocol("the export is read-only".into()));
        }
        Ok(c)
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let length = self.check(offset, data.len() as u64)?;
        self.request(CMD_WRITE, offset, length, data)
    }

    /// Writes `length` zero bytes at `offset` (as zero clusters: they read as zeros, not
    /// as the backing image).
    pub fn write_zeroes(&mut self, offset: u64, length: u64) -> Result<(), NbdError> {
        let length = self.check(offset, length)?;
        if self.flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            return Err(self.protocol("the server cannot write zeroes".into()));
        }
        self.request(CMD_WRITE_ZEROES, offset, length, &[])
    }

    /// Flushes what was written to stable storage, then disconnects.
    pub fn flush_and_close(mut self) -> Result<(), NbdError> {
        if self.flags & TFLAG_SEND_FLUSH != 0 {
            self.request(CMD_FLUSH, 0, 0, &[])?;
        }
        self.send_request(CMD_DISC, 0, 0, &[])
    }

    fn check(&self, offset: u64, length: u64) -> Result<u32, NbdError> {
        let out = || NbdError::OutOfRange { offset, length, size: self.size };
        let end = offset.checked_add(length).ok_or_else(out)?;
        if end > self.size || length > u64::from(MAX_REQUEST) {
            return Err(out());
        }
        u32::try_from(length).map_err(|_| out())
    }

    fn send_request(&mut self, kind: u16, offset: u64, length: u32, data: &[u8]) -> Result<(), NbdError> {
        self.cookie += 1;
        let mut head = Vec::with_capacity(28);
        head.extend(REQUEST_MAGIC.to_be_bytes());
        head.extend(0u16.to_be_bytes());
        head.extend(kind.to_be_bytes());
        head.extend(self.cookie.to_be_bytes());
        head.extend(offset.to_be_bytes());
        head.extend(length.to_be_bytes());
        self.send(&head)?;
        self.send(data)
    }

    fn request(&mut self, kind: u16, offset: u64, length: u32, data: &[u8]) -> Result<(), NbdError> {
        self.send_request(kind, offset, length, data)?;
        if self.u32()? != SIMPLE_REPLY_MAGIC {
            return Err(self.protocol("bad reply magic".into()));
        }
        let error = self.u32()?;
        let cookie = self.u64()?;
        if cookie != self.cookie {
            return Err(self.protocol(format!("reply to request {cookie}, expected {}", self.cookie)));
        }
        if error != 0 {
            return Err(self.protocol(format!("request {kind} at {offset} (+{length}) failed with error {error}")));
        }
        Ok(())
    }

    fn protocol(&self, why: String) -> NbdError {
        NbdError::Protocol { socket: self.socket.clone(), why }
    }

    fn send(&mut self, data: &[u8]) -> Result<(), NbdError> {
        self.stream.write_all(data).map_err(|source| NbdError::Io { socket: self.socket.clone(), source })
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        self.stream.read_exact(buf).map_err(|source| NbdError::Io { socket: self.socket.clone(), source })
    }

    fn u16(&mut self) -> Result<u16, NbdError> {
        let mut b = [0u8; 2];
        self.read(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, NbdError> {
        let mut b = [0u8; 4];
        self.read(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, NbdError> {
        let mut b = [0u8; 8];
        self.read(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_and_zeroes_reach_the_image_and_ranges_are_checked() {
        let d = tempfile::tempdir().expect("tempdir");
        let img = d.path().join("i.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("4M")
            .output()
            .expect("qemu-img");
        assert!(out.status.success());
        let mut server = Server::start(&img, "qcow2").expect("start");
        let dir = server.dir.clone();
        assert_eq!(std::fs::metadata(&dir).expect("stat").permissions().mode() & 0o777, 0o700);
        let mut c = server.connect().expect("connect");
        assert_eq!(c.size(), 4 << 20);
        c.write(65536, &[0x5a; 65536]).expect("write");
        c.write(0, &[0x11; 4096]).expect("write");
        c.write_zeroes(0, 2048).expect("zeroes");
        assert!(matches!(c.write(4 << 20, &[1]), Err(NbdError::OutOfRange { .. })));
        assert!(matches!(c.write_zeroes(u64::MAX, 2), Err(NbdError::OutOfRange { .. })));
        c.flush_and_close().expect("close");
        server.finish().expect("qemu-nbd exits cleanly");
        assert!(!dir.exists(), "its socket directory goes with it");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -q -P 0x5a 65536 65536", "-c", "read -q -P 0 0 2048"])
            .args(["-c", "read -q -P 0x11 2048 2048"])
            .arg(&img)
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("fail"), "{text}");
    }

    #[test]
    fn a_server_that_is_not_nbd_is_named() {
        let (a, mut b) = UnixStream::pair().expect("pair");
        b.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").expect("write");
        let err = Client::handshake(a, Path::new("/x.sock")).err().expect("refused");
        assert!(err.to_string().contains("/x.sock"), "{err}");
    }
}
