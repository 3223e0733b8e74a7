//! Sending a file descriptor to QEMU with SCM_RIGHTS alongside a command.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::OwnedWriteHalf;

/// Writes `buf` to the socket, attaching `fd` to the first bytes sent. QEMU keeps
/// the descriptor for the command those bytes belong to (`getfd`, `add-fd`).
pub(crate) async fn write_with_fd(w: &mut OwnedWriteHalf, buf: &[u8], fd: RawFd) -> std::io::Result<()> {
    let stream = w.as_ref();
    let sock = stream.as_raw_fd();
    let sent = loop {
        stream.writable().await?;
        let fds = [fd];
        let attempt = stream.try_io(Interest::WRITABLE, || {
            sendmsg::<()>(sock, &[IoSlice::new(buf)], &[ControlMessage::ScmRights(&fds)], MsgFlags::MSG_NOSIGNAL, None)
                .map_err(std::io::Error::from)
        });
        match attempt {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    w.write_all(&buf[sent..]).await
}
