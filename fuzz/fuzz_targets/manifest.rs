//! Checkpoint manifests: `Manifest::from_bytes` on arbitrary bytes, and, since the
//! fuzzer cannot forge a sha256, the same JSON sealed so that it passes the checksum and
//! reaches the checks behind it (format, block names, lengths, chunk offsets). Whatever
//! is accepted re-encodes and parses equal, and the arithmetic its consumers do on its
//! offsets and lengths (restore, gc, reports) holds without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::disk::CHUNK;
use sidecar::store::blocks::{MAX_BLOCK, is_block_name};
use sidecar::store::manifest::{FORMAT, ZERO};
use sidecar::store::{Manifest, ManifestError};

/// What consumers compute from an accepted manifest, with the arithmetic checked.
fn consume(m: &Manifest) {
    m.check().expect("an accepted manifest passes its checks");
    for h in m.blocks() {
        assert!(is_block_name(h), "gc and restore open {h:?} as a block file");
    }
    // restore_file / feed_stream: offsets of the memory stream.
    let mut off = 0u64;
    for (hash, len) in &m.memory.blocks {
        assert!(*len <= MAX_BLOCK as u64);
        assert!(hash != ZERO || m.memory.layout == "mapped-ram");
        off = off.checked_add(*len).expect("stream offsets do not overflow");
    }
    assert_eq!(off, m.memory.bytes);
    // write_image: every chunk inside its disk, in order.
    for d in &m.disks {
        let mut prev_end = 0;
        for (idx, _) in &d.chunks {
            let (start, len) = d.chunk_extent(*idx).expect("chunks lie inside the disk");
            let end = start.checked_add(len).expect("chunk end");
            assert!(start >= prev_end && end <= d.virtual_size && len <= CHUNK && len > 0);
            prev_end = end;
        }
    }
    let argv = sidecar::restore::relaunch_argv(&m.argv);
    assert!(argv.ends_with(&["-incoming".to_owned(), "defer".to_owned(), "-S".to_owned()]));
    let report = sidecar::checkpoint::Report::of(m);
    serde_json::to_vec(&report).expect("report");
}

fuzz_target!(|data: &[u8]| {
    // The parser as the store runs it.
    if let Ok(m) = Manifest::from_bytes(data) {
        consume(&m);
        assert_eq!(Manifest::from_bytes(&m.to_bytes()).expect("re-encoded manifest parses"), m);
    }
    // Past the checksum: the same JSON, sealed.
    if let Ok(mut m) = serde_json::from_slice::<Manifest>(data) {
        m.seal();
        match Manifest::from_bytes(&m.to_bytes()) {
            Ok(back) => {
                assert_eq!(back, m, "a sealed manifest round-trips");
                consume(&back);
                let mut again = back.clone();
                again.seal();
                assert_eq!(again.checksum, m.checksum, "sealing is stable");
            }
            Err(ManifestError::Format { found }) => assert!(found != FORMAT && found == m.format),
            Err(ManifestError::Invalid(_)) => assert!(m.check().is_err()),
            Err(e) => panic!("a sealed manifest was refused: {e}"),
        }
    }
});
