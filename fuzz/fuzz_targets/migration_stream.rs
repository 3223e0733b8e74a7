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
//! - mode 2: a stored chunk (codec byte, then raw or zstd payload) in a pack, decoded by
//!   `Blocks::get`, compared with a direct decoding.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sha2::Digest;
use sidecar::memory::{self, MAPPED_BLOCK};
use sidecar::store::blocks::{MAX_BLOCK, index_bytes, index_key, pack_key, sha256_hex};
use sidecar::store::manifest::{Stream, ZERO};
use sidecar::store::pack::PackBuilder;
use sidecar::store::{Blocks, Estimates, Policy, Writer};

const NO_WINDOW: std::time::Duration = std::time::Duration::ZERO;

struct Store {
    dir: tempfile::TempDir,
    store: sidecar::store::Store,
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
        let store = sidecar::store::Store::open(&dir.path().join("store")).expect("store");
        let blocks = store.blocks().clone();
        let writer = Writer::new(blocks.clone(), NO_WINDOW);
        let mut known = Vec::new();
        for (i, c) in known_contents().into_iter().enumerate() {
            // Alternate raw and zstd chunks.
            let ratio = if i % 2 == 0 { 0.1 } else { 1.0 };
            let mut p = Policy::new(Estimates { ratio, ..Estimates::default() });
            let put = writer.put(&c, &mut p).expect("put");
            known.push((put.hash, c));
        }
        writer.finish().expect("stored");
        writer.publish();
        // Chunks that are damaged, in every way `get` tells apart.
        let damaged: Vec<(&[u8], &[u8])> = vec![
            (b"damaged", b"\x00not the content"),
            (b"zstd", b"\x01\x28\xb5\x2f\xfd garbage"),
            (b"codec", b"\x07codec"),
        ];
        let mut b = PackBuilder::new();
        for (content, stored) in damaged {
            let hash: [u8; 32] = sha2::Sha256::digest(content).into();
            b.push(hash, stored[0], &stored[1..], content.len() as u32);
        }
        put_pack(&blocks, b);
        Store { dir, store, blocks, known }
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

/// Stores a pack built by hand (chunks a writer would never write) and makes it readable.
fn put_pack(blocks: &Blocks, b: PackBuilder) -> String {
    let sealed = b.finish();
    blocks.objects().put(&pack_key(&sealed.name), &sealed.bytes).expect("pack");
    let index = index_bytes(sealed.bytes.len() as u64, sealed.trailer());
    blocks.objects().put(&index_key(&sealed.name), &index).expect("index");
    blocks.load(std::slice::from_ref(&sealed.name)).expect("load");
    sealed.name
}

/// Deletes the packs a round trip stored.
fn remove(s: &Store, writer: &Writer) {
    s.store.drop_packs(&writer.abort());
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
    let writer = Writer::new(s.blocks.clone(), NO_WINDOW);
    let stream = memory::save_stream_from(&data[..], &writer, &mut policy, tx).expect("save stream");
    writer.finish().expect("stored");
    writer.publish();
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
    remove(s, &writer);

    let file = s.dir.path().join("mapped-ram");
    std::fs::write(&file, &data).expect("write file");
    let writer = Writer::new(s.blocks.clone(), NO_WINDOW);
    let stream = memory::save_file(&file, &writer, &mut policy).expect("save file");
    writer.finish().expect("stored");
    writer.publish();
    stream.check().expect("a saved file is consistent");
    assert!(stream.blocks.iter().all(|(_, l)| *l <= MAPPED_BLOCK as u64));
    let back = s.dir.path().join("restored");
    memory::restore_file(&back, &s.blocks, &stream).expect("restore file");
    assert!(std::fs::read(&back).expect("read") == data, "the file comes back");
    remove(s, &writer);
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
    let path = s.dir.path().join("described");
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
    let Some((&codec, payload)) = rest.split_first() else { return };
    // The name the chunk would have if it decodes.
    let decoded = match codec {
        0 => Some(payload.to_vec()),
        1 => zstd::bulk::decompress(payload, MAX_BLOCK).ok(),
        _ => None,
    };
    let content = decoded.as_deref().unwrap_or(rest);
    let name = sha256_hex(content);
    if s.known.iter().any(|(h, _)| *h == name) || s.blocks.dedupable(&name) {
        return;
    }
    let mut b = PackBuilder::new();
    let hash: [u8; 32] = sha2::Sha256::digest(content).into();
    b.push(hash, codec, payload, content.len() as u32);
    let pack = put_pack(&s.blocks, b);
    let got = s.blocks.get(&name);
    s.store.drop_packs(&[pack]);
    match (got, decoded) {
        (Ok(data), Some(d)) => assert!(data == d),
        (Ok(_), None) => panic!("an undecodable chunk was read"),
        (Err(e), Some(_)) => panic!("a decodable chunk was refused: {e}"),
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
