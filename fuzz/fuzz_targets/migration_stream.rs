//! The store's side of QEMU's migration stream. The store does not parse the stream
//! (nor the mapped-ram file's header): it chunks it and rebuilds it. So this target
//! fuzzes what the store does decode:
//!
//! - mode 0 (flags = byte 0 / 3: 1 + flags % 3 repetitions, bit 2 compresses): the
//!   chunk/rebuild round trip of arbitrary bytes: `save_stream_from`
//!   (content-defined chunks, fastcdc) then `feed_stream_to`, and `save_file`
//!   (fixed mapped-ram blocks, holes as `zero`) then `restore_file`, give back the same
//!   bytes, over a temporary block store;
//! - mode 1: a `Stream` description (manifest JSON) driving `restore_file` and
//!   `feed_stream_to` over a block store holding known, damaged and undecodable blocks:
//!   no panic, and what is rebuilt is exactly the described blocks;
//! - mode 2: block files (codec byte, then raw or zstd payload) decoded by `Blocks::get`,
//!   compared with a direct decoding.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sidecar::memory::{self, MAPPED_BLOCK};
use sidecar::store::blocks::{MAX_BLOCK, sha256_hex};
use sidecar::store::manifest::{Stream, ZERO};
use sidecar::store::{Blocks, Estimates, Policy};

struct Store {
    dir: tempfile::TempDir,
    blocks: Blocks,
    /// Contents stored under their names.
    known: Vec<(String, Vec<u8>)>,
}

/// Contents the store holds; the seed corpus names them by hash.
fn known_contents() -> Vec<Vec<u8>> {
    let mut noise = Vec::with_capacity(20_000);
    let mut x = 0x9e37_79b9u32;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        noise.push(x as u8);
    }
    vec![b"QEVM\0\0\0\x03".to_vec(), vec![0x5a; 4096], noise, vec![1; 65536], b"tail".to_vec()]
}

fn store() -> &'static Store {
    static S: OnceLock<Store> = OnceLock::new();
    S.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("cutline-fuzz-store").tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("tmp");
        let blocks = Blocks::new(dir.path().join("blocks"), dir.path().join("tmp"));
        let mut known = Vec::new();
        for (i, c) in known_contents().into_iter().enumerate() {
            // Alternate raw and zstd block files.
            let ratio = if i % 2 == 0 { 0.1 } else { 1.0 };
            let mut p = Policy::new(Estimates { ratio, ..Estimates::default() });
            let put = blocks.put(&c, &mut p).expect("put");
            known.push((put.hash, c));
        }
        // Blocks whose files are damaged, in every way `get` tells apart.
        for (content, file) in [
            (&b"damaged"[..], &b"\x00not the content"[..]),
            (b"zstd", b"\x01\x28\xb5\x2f\xfd garbage"),
            (b"codec", b"\x07codec"),
            (b"empty", b""),
        ] {
            let path = blocks.path(&sha256_hex(content));
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            std::fs::write(path, file).expect("write");
        }
        Store { dir, blocks, known }
    })
}

fn noise(seed: &[u8], len: usize) -> Vec<u8> {
    let mut x = seed.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Runs of zeros now and then: holes in mapped-ram, cut points in the stream.
            if (x >> 40) % 16 == 0 { 0 } else { (x >> 24) as u8 }
        })
        .collect()
}

fn remove(s: &Store, created: &[String]) {
    for h in created {
        s.blocks.remove(h).expect("remove block");
    }
}

fn round_trip(flags: u8, rest: &[u8]) {
    let s = store();
    // The input, then noise it seeds, repeated: dedup within the stream.
    // Up to 64 KiB of noise, up to 3 times: a dozen content-defined chunks at most, which
    // keeps an execution at a few milliseconds (every block is a file).
    let extra = if rest.len() >= 2 { usize::from(u16::from_le_bytes([rest[0], rest[1]])) } else { 0 };
    let mut segment = rest.to_vec();
    segment.extend(noise(rest, extra));
    let data = segment.repeat(1 + usize::from(flags % 3));
    let ratio = if flags & 4 != 0 { 0.1 } else { 1.0 };
    let mut policy = Policy::new(Estimates { ratio, ..Estimates::default() });

    let (tx, rx) = tokio::sync::watch::channel(0);
    let mut created = Vec::new();
    let stream = memory::save_stream_from(&data[..], &s.blocks, &mut policy, tx, &mut created).expect("save stream");
    assert_eq!(*rx.borrow(), data.len() as u64, "progress counts every byte");
    stream.check().expect("a saved stream is consistent");
    assert_eq!(stream.bytes, data.len() as u64);
    if let Some((_, init)) = stream.blocks.split_last() {
        assert!(init.iter().all(|(_, l)| (4 << 10..=64 << 10).contains(l)), "chunk sizes");
    }
    let mut out = Vec::new();
    let fed = memory::feed_stream_to(&mut out, &s.blocks, &stream).expect("feed");
    assert_eq!(fed, data.len() as u64);
    assert!(out == data, "the stream comes back");
    remove(s, &created);

    let file = s.dir.path().join("tmp").join("mapped-ram");
    std::fs::write(&file, &data).expect("write file");
    let mut created = Vec::new();
    let stream = memory::save_file(&file, &s.blocks, &mut policy, &mut created).expect("save file");
    stream.check().expect("a saved file is consistent");
    assert!(stream.blocks.iter().all(|(_, l)| *l <= MAPPED_BLOCK as u64));
    let back = s.dir.path().join("tmp").join("restored");
    memory::restore_file(&back, &s.blocks, &stream).expect("restore file");
    assert!(std::fs::read(&back).expect("read") == data, "the file comes back");
    remove(s, &created);
}

fn described(rest: &[u8]) {
    let s = store();
    let Ok(stream) = serde_json::from_slice::<Stream>(rest) else { return };
    let content = |hash: &str, len: u64| -> Vec<u8> {
        if hash == ZERO {
            return vec![0; len as usize];
        }
        s.known.iter().find(|(h, _)| h == hash).map(|(_, c)| c.clone()).expect("only known blocks verify")
    };
    let small = stream.bytes <= 4 << 20;
    let path = s.dir.path().join("tmp").join("described");
    if memory::restore_file(&path, &s.blocks, &stream).is_ok() {
        assert_eq!(std::fs::metadata(&path).expect("stat").len(), stream.bytes);
        if small {
            let want: Vec<u8> = stream.blocks.iter().flat_map(|(h, l)| content(h, *l)).collect();
            assert!(std::fs::read(&path).expect("read") == want, "the file is the described blocks");
        }
    }
    let _ = std::fs::remove_file(&path);
    let mut out = Vec::new();
    if let Ok(n) = memory::feed_stream_to(&mut out, &s.blocks, &stream) {
        assert_eq!(n, stream.bytes);
        assert_eq!(out.len() as u64, n);
        if small {
            let want: Vec<u8> = stream.blocks.iter().flat_map(|(h, l)| content(h, *l)).collect();
            assert!(out == want, "the stream is the described blocks");
        }
    }
}

fn block_file(rest: &[u8]) {
    let s = store();
    // The name the block would have if its file decodes.
    let decoded = match rest.split_first() {
        Some((0, payload)) => Some(payload.to_vec()),
        Some((1, payload)) => zstd::bulk::decompress(payload, MAX_BLOCK).ok(),
        _ => None,
    };
    let name = sha256_hex(decoded.as_deref().unwrap_or(rest));
    let path = s.blocks.path(&name);
    if s.known.iter().any(|(h, _)| *h == name) || path.exists() {
        return;
    }
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(&path, rest).expect("write");
    let got = s.blocks.get(&name);
    std::fs::remove_file(&path).expect("remove");
    match (got, decoded) {
        (Ok(data), Some(d)) => assert!(data == d),
        (Ok(_), None) => panic!("an undecodable block file was read"),
        (Err(e), Some(_)) => panic!("a decodable block file was refused: {e}"),
        (Err(_), None) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => round_trip(mode / 3, rest),
        1 => described(rest),
        _ => block_file(rest),
    }
});
