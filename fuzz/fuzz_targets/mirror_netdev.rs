//! netfilter's decoders: the frames QEMU's `filter-mirror` writes to its chardev
//! (`MirrorDecoder`, `u32` big-endian length then the frame), pushed in chunks the input
//! chooses and compared with a model; and the `-netdev` options of a recorded QEMU
//! command line (`NetdevSpec::parse`, key=value or JSON; `netdevs_of_argv`).
//!
//! Input: byte 0: even, a mirror stream (chunking from byte 0); odd, a command line
//! (arguments separated by NUL).
#![no_main]

use cutline_fuzz::chunk_sizes;
use libfuzzer_sys::fuzz_target;
use netfilter::{MAX_FRAME, MirrorDecoder, NetdevSpec, netdevs_of_argv};

/// Frame lengths announced, and whether the stream ends at a boundary or on a length
/// too large (then nothing after it counts).
fn model(s: &[u8]) -> (Vec<usize>, Result<bool, usize>) {
    let mut lens = Vec::new();
    let mut rest = s;
    loop {
        if rest.is_empty() {
            return (lens, Ok(true));
        }
        if rest.len() < 4 {
            return (lens, Ok(false));
        }
        let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len > MAX_FRAME {
            return (lens, Err(len));
        }
        lens.push(len);
        if rest.len() - 4 < len {
            return (lens, Ok(false));
        }
        rest = &rest[4 + len..];
    }
}

fn mirror(mode: u8, s: &[u8]) {
    let (want, end) = model(s);
    let mut d = MirrorDecoder::default();
    let mut got = Vec::new();
    let mut sizes = chunk_sizes(mode >> 1);
    let mut rest = s;
    let mut failed = None;
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(usize::MAX).clamp(1, rest.len());
        if let Err(netfilter::FrameError::TooLarge(len)) = d.push(&rest[..n], |len| got.push(len)) {
            failed = Some(len);
            break;
        }
        rest = &rest[n..];
    }
    assert_eq!(got, want);
    match end {
        Ok(boundary) => assert_eq!((failed, d.at_boundary()), (None, boundary)),
        Err(len) => assert_eq!(failed, Some(len)),
    }
}

fn netdev(s: &[u8]) {
    let text = String::from_utf8_lossy(s);
    if let Some(spec) = NetdevSpec::parse(&text) {
        let _ = spec.refusal();
    }
    let argv: Vec<String> = text.split('\0').map(str::to_owned).collect();
    for spec in netdevs_of_argv(&argv) {
        let _ = spec.refusal().map(|r| r.to_string());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 { mirror(mode, rest) } else { netdev(rest) }
});
