//! The cluster protocol's framing and messages: arbitrary bytes through the real
//! `FrameReader` (in chunks the input chooses, reads cancelled mid-line), compared with
//! a model of the framing; every message that decodes re-encodes (through `write`) and
//! decodes equal.
//!
//! Input: byte 0 chooses the chunking (bit 7: stall, so every read is cancelled once;
//! bit 6: the real `MAX_MESSAGE`, else a limit of 4 × byte 1 bytes, so that the limit is
//! reached cheaply); the rest is the stream, where `FF FE n` stands for n × 8 KiB of
//! spaces (at most just past the limit), once, with the real limit (lines around and past
//! `MAX_MESSAGE` are reachable).
#![no_main]

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use cutline_fuzz::{Chunked, block_on, chunk_sizes};
use cutline_proto::{Envelope, FrameError, FrameReader, MAX_MESSAGE, Msg};
use libfuzzer_sys::fuzz_target;

const SPACES: usize = 8 << 10;

/// With `big`, the first `FF FE n` becomes n × 8 KiB of spaces (one long line at most:
/// each costs milliseconds).
fn expand(data: &[u8], big: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    let mut expanded = !big;
    while i < data.len() {
        if !expanded && data[i..].starts_with(&[0xff, 0xfe]) && i + 2 < data.len() {
            expanded = true;
            // Just past the limit at most: every pass over a long line costs milliseconds.
            let n = (usize::from(data[i + 2]) * SPACES).min(MAX_MESSAGE + SPACES);
            out.resize(out.len() + n, b' ');
            i += 3;
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

/// What a read gives, comparable.
#[derive(Debug, PartialEq)]
enum Got {
    Msg(Box<Envelope>),
    TooLarge,
    Malformed(String),
    Closed,
}

fn got(r: Result<Envelope, FrameError>) -> Got {
    match r {
        Ok(e) => Got::Msg(Box::new(e)),
        Err(FrameError::TooLarge) => Got::TooLarge,
        Err(FrameError::Malformed(m)) => Got::Malformed(m),
        Err(FrameError::Closed) => Got::Closed,
        Err(FrameError::Io(e)) => panic!("in-memory reads cannot fail: {e}"),
    }
}

/// The framing as documented: one message per newline-terminated line, lines longer
/// than MAX_MESSAGE refused, an unterminated tail lost at the close.
fn model(stream: &[u8], limit: usize) -> Vec<Got> {
    let mut out = Vec::new();
    let mut rest = stream;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..i];
        out.push(if line.len() > limit {
            Got::TooLarge
        } else {
            got(serde_json::from_slice::<Envelope>(line).map_err(|e| FrameError::Malformed(e.to_string())))
        });
        rest = &rest[i + 1..];
    }
    out.push(Got::Closed);
    out
}

/// The next message, the read dropped and retried while it waits (cancellation).
fn next_cancelled<R: tokio::io::AsyncRead + Unpin>(r: &mut FrameReader<R>) -> Result<Envelope, FrameError> {
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = pin!(r.next()).poll(&mut cx) {
            return v;
        }
    }
}

fn round_trip(env: &Envelope) {
    let _ = (env.msg.kind(), env.msg.epoch(), env.msg.ticks());
    let text = serde_json::to_vec(env).expect("a decoded message encodes");
    let back: Envelope = serde_json::from_slice(&text).expect("an encoded message decodes");
    assert_eq!(&back, env);
    let mut wire = Vec::new();
    block_on(cutline_proto::write(&mut wire, env)).expect("write to memory");
    assert_eq!(wire.iter().filter(|&&b| b == b'\n').count(), 1, "one line per message");
    let mut r = FrameReader::new(&wire[..]);
    assert_eq!(&block_on(r.next()).expect("written message reads back"), env);
    assert!(matches!(block_on(r.next()), Err(FrameError::Closed)));
}

fuzz_target!(|data: &[u8]| {
    let [mode, small, rest @ ..] = data else { return };
    let (mode, limit) = if mode & 0x40 != 0 { (*mode, MAX_MESSAGE) } else { (*mode, 4 * usize::from(*small)) };
    let stream = expand(rest, limit == MAX_MESSAGE);
    let expected = model(&stream, limit);

    // At most a few hundred reads per stream, however long: small chunks for small streams.
    let floor = stream.len() / 256;
    let sizes = chunk_sizes(mode).map(move |n| n.max(floor));
    let mut reader = FrameReader::with_limit(Chunked::new(stream.clone(), sizes, mode & 0x80 != 0), limit);
    let mut seen = Vec::new();
    loop {
        let g = got(next_cancelled(&mut reader));
        let closed = g == Got::Closed;
        seen.push(g);
        if closed || seen.len() > expected.len() {
            break;
        }
    }
    assert_eq!(seen, expected, "the reader disagrees with the framing");
    // Closed stays closed.
    assert_eq!(got(next_cancelled(&mut reader)), Got::Closed);

    // The one-shot read sees the first message.
    if limit == MAX_MESSAGE {
        assert_eq!(got(block_on(cutline_proto::read(&stream[..]))), expected[0]);
    }

    for g in &expected {
        if let Got::Msg(env) = g {
            round_trip(env);
        }
    }
    // The message alone (not framed), as JSON: the same decoder.
    if stream.len() <= 64 << 10
        && let Ok(msg) = serde_json::from_slice::<Msg>(&stream)
    {
        let env = Envelope::plain(msg);
        round_trip(&env);
    }
});
