//! The disk side of a checkpoint: `qemu-img map --output=json` of a backup target
//! (`parse_map`), folded over a chunk map (`fold_ranges`) reading from a small target
//! file into a temporary block store. The offsets and lengths come from qemu-img's
//! output: no overflow, no panic; a fold that succeeds maps only chunks inside the disk.
//!
//! Input: bytes 0..2: the disk's virtual size in 4 KiB units (at most 64 chunks: a fold
//! walks every chunk of the disk); the rest is qemu-img's JSON.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sidecar::disk::{CHUNK, fold_ranges, parse_map};
use sidecar::store::blocks::is_block_name;
use sidecar::store::manifest::ZERO;
use sidecar::store::{Estimates, Policy, Store, Writer};

struct Target {
    _dir: tempfile::TempDir,
    store: Store,
    path: std::path::PathBuf,
    file: std::fs::File,
}

/// A target file of 8 chunks: data, zeros, data...
fn target() -> &'static Target {
    static T: OnceLock<Target> = OnceLock::new();
    T.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("cutline-fuzz-disk").tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("store")).expect("store");
        let path = dir.path().join("target.qcow2");
        let data: Vec<u8> =
            (0..8 * CHUNK).map(|i| if (i / CHUNK) % 2 == 0 { (i % 251) as u8 + 1 } else { 0 }).collect();
        std::fs::write(&path, data).expect("write");
        let file = std::fs::File::open(&path).expect("open");
        Target { _dir: dir, store, path, file }
    })
}

fuzz_target!(|data: &[u8]| {
    let [a, b, json @ ..] = data else { return };
    let virtual_size = (u64::from(u16::from_le_bytes([*a, *b])) << 12) % (64 * CHUNK + 1);
    let Ok(ranges) = parse_map(json) else { return };
    let t = target();
    let mut base = BTreeMap::new();
    base.insert(0, ZERO.to_owned());
    let mut policy = Policy::new(Estimates::default());
    let writer = Writer::new(t.store.blocks().clone(), std::time::Duration::ZERO);
    let folded = fold_ranges("n", &ranges, &t.file, &t.path, &base, virtual_size, &writer, &mut policy);
    let _ = writer.finish();
    t.store.drop_packs(&writer.abort());
    let Ok(folded) = folded else { return };
    for (idx, hash) in &folded.map {
        assert!(*idx == 0 || idx.checked_mul(CHUNK).is_some_and(|s| s < virtual_size), "chunk {idx} inside the disk");
        assert!(hash == ZERO || is_block_name(hash));
    }
    assert_eq!(folded.copied, ranges.iter().fold(0u64, |a, r| a.saturating_add(r.length)));
});
