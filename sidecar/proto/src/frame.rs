//! Newline-delimited JSON framing: bounded while reading (a line that never ends is cut
//! off at [`MAX_MESSAGE`] before it is buffered) and cancel-safe (a partly read line
//! stays in the [`FrameReader`] when a `select!` drops the read).

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

use crate::Envelope;

/// Largest message accepted, in bytes.
pub const MAX_MESSAGE: usize = 1 << 20;

/// Errors of reading a message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection.
    #[error("connection closed")]
    Closed,
    /// Reading failed.
    #[error("read failed")]
    Io(#[from] std::io::Error),
    /// The message exceeds [`MAX_MESSAGE`]; the rest of its line is skipped.
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    /// Not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
}

/// Reads messages from a stream, keeping a partial line across cancelled reads.
pub struct FrameReader<R> {
    inner: BufReader<R>,
    /// Largest message accepted ([`MAX_MESSAGE`] but in tests and fuzzing).
    limit: usize,
    line: Vec<u8>,
    /// Inside a line that passed the limit: drop bytes up to its end.
    skipping: bool,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Frames `inner`.
    pub fn new(inner: R) -> FrameReader<R> {
        FrameReader::with_limit(inner, MAX_MESSAGE)
    }

    /// Frames `inner`, refusing messages over `limit` bytes rather than [`MAX_MESSAGE`]
    /// (so that tests and fuzzing reach the limit with small inputs).
    #[doc(hidden)]
    pub fn with_limit(inner: R, limit: usize) -> FrameReader<R> {
        FrameReader { inner: BufReader::new(inner), limit, line: Vec::new(), skipping: false }
    }

    /// The next message. Cancel-safe: the only await is on filling the buffer, and what
    /// was taken from it is kept in `self`.
    pub async fn next(&mut self) -> Result<Envelope, FrameError> {
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                return Err(FrameError::Closed);
            }
            let (chunk, end) = match buf.iter().position(|&b| b == b'\n') {
                Some(i) => (&buf[..i], Some(i + 1)),
                None => (buf, None),
            };
            let used = end.unwrap_or(chunk.len());
            if !self.skipping {
                if self.line.len() + chunk.len() > self.limit {
                    self.skipping = true;
                    self.line = Vec::new();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            self.inner.consume(used);
            if end.is_some() {
                if std::mem::take(&mut self.skipping) {
                    return Err(FrameError::TooLarge);
                }
                let line = std::mem::take(&mut self.line);
                return serde_json::from_slice(&line).map_err(|e| FrameError::Malformed(e.to_string()));
            }
        }
    }
}

/// Reads one message from `r` (for one-shot conversations such as the CLI's).
pub async fn read<R: AsyncRead + Unpin>(r: R) -> Result<Envelope, FrameError> {
    FrameReader::new(r).next().await
}

/// Writes one message.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, env: &Envelope) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(env).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    w.flush().await
}

/// Compares two tokens in constant time over their full lengths: every byte of the
/// longer one is visited whatever the contents, and the lengths are compared as whole
/// `usize`s folded into the same result (a difference of 256 bytes is not lost to a
/// truncation). The time depends only on the longer length.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff: usize = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
        // Opaque to the optimizer, so the loop cannot stop at the first difference.
        diff = std::hint::black_box(diff | usize::from(x));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Msg, VectorClock};

    fn line(msg: Msg) -> Vec<u8> {
        let mut v = serde_json::to_vec(&Envelope { inc: 1, vt: VectorClock::default(), msg }).expect("json");
        v.push(b'\n');
        v
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_and_the_stream_goes_on() {
        let mut data = vec![b'x'; MAX_MESSAGE + 10];
        data.push(b'\n');
        data.extend(line(Msg::Heartbeat));
        let mut r = FrameReader::new(&data[..]);
        assert!(matches!(r.next().await, Err(FrameError::TooLarge)));
        assert_eq!(r.next().await.expect("next").msg, Msg::Heartbeat);
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_taken_one_more_is_refused() {
        let msg = line(Msg::Heartbeat);
        let len = msg.len() - 1;
        let mut data = msg.clone();
        data.extend(&msg);
        let mut r = FrameReader::with_limit(&data[..], len);
        assert_eq!(r.next().await.expect("at the limit").msg, Msg::Heartbeat);
        let mut r = FrameReader::with_limit(&data[..], len - 1);
        assert!(matches!(r.next().await, Err(FrameError::TooLarge)));
        assert!(matches!(r.next().await, Err(FrameError::TooLarge)));
        assert!(matches!(r.next().await, Err(FrameError::Closed)));
    }

    #[tokio::test]
    async fn a_line_that_never_ends_is_not_buffered_past_the_limit() {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let writer = tokio::spawn(async move {
            let chunk = vec![b'y'; 64 * 1024];
            for _ in 0..(3 * MAX_MESSAGE / chunk.len()) {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // The line never ends, and the peer never hangs up.
            std::future::pending::<()>().await;
            drop(w);
        });
        let mut r = FrameReader::new(r);
        let res = tokio::time::timeout(std::time::Duration::from_millis(500), r.next()).await;
        assert!(res.is_err(), "no message without a newline");
        assert!(r.line.len() <= MAX_MESSAGE, "buffered {} bytes", r.line.len());
        assert!(r.skipping);
        writer.abort();
    }

    #[tokio::test]
    async fn a_read_cancelled_mid_line_loses_nothing() {
        let (mut w, r) = tokio::io::duplex(1024);
        let msg = line(Msg::Prepare { epoch: 9 });
        let (a, b) = msg.split_at(10);
        let mut r = FrameReader::new(r);
        w.write_all(a).await.expect("write");
        // The read is dropped while half a line is in.
        let cancelled = tokio::time::timeout(std::time::Duration::from_millis(50), r.next()).await;
        assert!(cancelled.is_err());
        w.write_all(b).await.expect("write");
        assert_eq!(r.next().await.expect("whole").msg, Msg::Prepare { epoch: 9 });
    }

    #[test]
    fn tokens_compare_over_the_full_length() {
        assert!(same_token("secret", "secret"));
        assert!(same_token("", ""));
        assert!(!same_token("secret", "secreT"));
        assert!(!same_token("secret", "secret2"));
        assert!(!same_token("", "x"));
        // Lengths differing by 256 with equal bytes where both have them: only the
        // length tells them apart (the missing bytes count as NUL), and a length
        // difference truncated to a byte would be 0.
        let short = "tok";
        let long = format!("{short}{}", "\0".repeat(256));
        assert_eq!(long.len() - short.len(), 256);
        assert!(!same_token(short, &long));
        assert!(!same_token(&long, short));
        let a = "a".repeat(300);
        let b = "a".repeat(300 + 256);
        assert!(!same_token(&a, &b));
    }
}
