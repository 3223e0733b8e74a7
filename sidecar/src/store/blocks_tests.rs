use std::time::Duration;

use super::*;
use crate::store::Writer;
use crate::store::compress::{Estimates, Policy};

/// Blocks on a local object store in a temp dir.
pub(crate) fn temp_blocks() -> (tempfile::TempDir, Blocks) {
    let d = tempfile::tempdir().expect("tempdir");
    let objects = Objects::Local(cutline_objects::Local::open(&d.path().join("objects")).expect("objects"));
    (d, Blocks::new(objects, None))
}

fn incompressible(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8).collect()
}

#[test]
fn blocks_go_to_packs_and_read_back() {
    let (_d, b) = temp_blocks();
    let mut p = Policy::new(Estimates { compress_bps: 500e6, write_bps: 100e6, ratio: 0.3 });
    let w = Writer::new(b.clone(), Duration::ZERO);
    let data = vec![7u8; 40_000];
    let first = w.put(&data, &mut p).expect("put");
    assert!(first.stored > 0 && first.stored < 1000, "compressible data is compressed: {first:?}");
    assert_eq!(w.put(&data, &mut p).expect("put").stored, 0, "stored once per writer");
    let other = w.put(&incompressible(20_000, 1), &mut p).expect("put");
    w.finish().expect("finish");
    let packs = w.packs_of([first.hash.as_str(), other.hash.as_str(), "zero"]).expect("packs");
    assert_eq!(packs.len(), 1, "both blocks in one pack");
    w.publish();
    assert_eq!(b.get(&first.hash).expect("get"), data);
    // Another writer after a refresh sees the pack and stores nothing again.
    b.refresh().expect("refresh");
    let w2 = Writer::new(b.clone(), Duration::ZERO);
    assert_eq!(w2.put(&data, &mut p).expect("put").stored, 0);
    w2.finish().expect("finish");
    assert!(w2.stored().is_empty(), "no pack for a writer that stored nothing");
}

#[test]
fn a_writer_fills_several_packs_and_stores_each_before_its_index() {
    let (_d, b) = temp_blocks();
    let mut p = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
    let w = Writer::new(b.clone(), Duration::ZERO);
    let puts: Vec<Put> = (0..40).map(|i| w.put(&incompressible(512 << 10, i), &mut p).expect("put")).collect();
    w.finish().expect("finish");
    let packs = w.packs_of(puts.iter().map(|p| p.hash.as_str())).expect("packs");
    assert!(packs.len() >= 2, "{} packs for 20 MiB", packs.len());
    for name in &packs {
        assert!(b.objects().head(&pack_key(name)).expect("head").is_some());
        let index = b.objects().get(&index_key(name)).expect("index");
        let entries = parse_index(name, &index).expect("parse");
        assert_eq!(*b.trailer(name).expect("trailer"), entries, "the index is the pack's own trailer");
    }
    // A reader that only has the manifest's pack names (another process) reads them all.
    let (reader, _) = (Blocks::new(b.objects().clone(), None), ());
    reader.load(&packs).expect("load");
    for put in &puts {
        assert_eq!(reader.get(&put.hash).expect("get").len(), 512 << 10);
    }
}

#[test]
fn an_unpublished_writer_is_invisible_and_its_packs_are_its_own() {
    let (_d, b) = temp_blocks();
    let mut p = Policy::new(Estimates::default());
    let w = Writer::new(b.clone(), Duration::ZERO);
    let put = w.put(&incompressible(10_000, 3), &mut p).expect("put");
    w.finish().expect("finish");
    // Not published: another writer of this process must not depend on it.
    let w2 = Writer::new(b.clone(), Duration::ZERO);
    assert!(w2.put(&incompressible(10_000, 3), &mut p).expect("put").stored > 0);
    assert!(matches!(b.get(&put.hash), Err(BlockError::Missing { .. })));
    assert_eq!(w.abort().len(), 1);
}

#[test]
fn damage_is_found_by_the_hash_and_names_the_block() {
    let (d, b) = temp_blocks();
    let mut p = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
    let w = Writer::new(b.clone(), Duration::ZERO);
    let put = w.put(b"hello world, this is a block", &mut p).expect("put");
    w.finish().expect("finish");
    w.publish();
    let name = w.stored().remove(0);
    let path = d.path().join("objects").join(pack_key(&name));
    let mut raw = std::fs::read(&path).expect("read");
    raw[5] ^= 0xff;
    std::fs::write(&path, raw).expect("write");
    let fresh = Blocks::new(b.objects().clone(), None);
    fresh.load(std::slice::from_ref(&name)).expect("the index is intact");
    let err = fresh.get(&put.hash).expect_err("damaged");
    assert!(matches!(&err, BlockError::Damaged { hash, .. } if *hash == put.hash), "{err}");
}

#[test]
fn names_that_are_not_sha256_are_refused_not_opened() {
    let (_d, b) = temp_blocks();
    for bad in ["é", "../../etc/passwd", "/etc/passwd", "zero", "", &"A".repeat(64), &"a".repeat(63)] {
        assert!(matches!(b.get(bad), Err(BlockError::Damaged { .. })), "{bad:?}");
        assert!(b.load(&[bad.to_owned()]).is_err(), "{bad:?}");
    }
    assert!(is_block_name(&sha256_hex(b"x")));
}

#[test]
fn a_hidden_pack_leaves_the_view_at_the_next_refresh() {
    let (_d, b) = temp_blocks();
    let mut p = Policy::new(Estimates::default());
    let w = Writer::new(b.clone(), Duration::ZERO);
    let put = w.put(&incompressible(10_000, 9), &mut p).expect("put");
    w.finish().expect("finish");
    w.publish();
    assert!(b.dedupable(&put.hash));
    let name = w.stored().remove(0);
    b.objects().delete(&index_key(&name)).expect("hide");
    b.refresh().expect("refresh");
    assert!(!b.dedupable(&put.hash), "a writer no longer deduplicates against it");
    // Still readable through its own trailer by a manifest that names it.
    b.load(std::slice::from_ref(&name)).expect("load from the trailer");
    assert_eq!(b.get(&put.hash).expect("get").len(), 10_000);
}

#[test]
fn a_writer_past_half_the_window_does_not_finish() {
    let (_d, b) = temp_blocks();
    let w = Writer::new(b, Duration::from_millis(10));
    std::thread::sleep(Duration::from_millis(20));
    assert!(matches!(w.finish(), Err(BlockError::TooSlow { .. })));
}
