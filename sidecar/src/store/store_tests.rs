//! Tests of the store: commit, verify and gc, trust, locks, a root others can write.

use super::*;

/// Commits checkpoint `m` with `blocks` as its memory, written by a fresh writer.
fn commit_with(store: &Store, m: &mut Manifest, blocks: &[&[u8]]) {
    let mut policy = Policy::new(Estimates::default());
    let w = store.writer().expect("writer");
    m.memory.blocks.clear();
    m.memory.bytes = 0;
    for b in blocks {
        let put = w.put(b, &mut policy).expect("put");
        m.memory.blocks.push((put.hash, put.len));
        m.memory.bytes += put.len;
    }
    store.commit(m, &w).expect("commit");
}

#[test]
fn commit_list_verify_gc() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    for i in 0..3u8 {
        let mut m = manifest::tests::sample(store.next_id("vm").expect("id"));
        commit_with(&store, &mut m, &[b"shared block", &[i; 100]]);
        assert!(!m.packs.is_empty(), "a manifest names its packs");
    }
    assert_eq!(store.ids("vm").expect("ids"), vec![1, 2, 3]);
    assert!(store.verify(Some("vm"), |_, _| {}).expect("verify").is_empty());
    let m1 = store.manifest("vm", 1).expect("m1");
    let m2 = store.manifest("vm", 2).expect("m2");
    assert!(m2.packs.contains(&m1.packs[0]), "the shared block is deduplicated into checkpoint 1's pack");

    // Damage the block only checkpoint 2 uses: verify names it and checkpoint 2 alone.
    let own2 = m2.memory.blocks[1].0.clone();
    let pack = store.blocks().pack_of(&own2).expect("located");
    let entries = store.blocks().entries(&pack).expect("entries");
    let e = entries.iter().find(|e| blocks::hex(&e.hash) == own2).expect("entry");
    let path = d.path().join(blocks::pack_key(&pack));
    let mut raw = std::fs::read(&path).expect("read");
    raw[(e.offset + u64::from(e.stored) - 1) as usize] ^= 0x55;
    std::fs::write(&path, raw).expect("damage");
    let damage = store.verify(Some("vm"), |_, _| {}).expect("verify");
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert!(damage[0].item.contains(&own2));
    assert_eq!(damage[0].breaks, vec![("vm".to_owned(), 2)]);

    let report = store.gc("vm", 1).expect("gc");
    assert_eq!(report.removed, vec![1, 2]);
    assert_eq!(report.kept, vec![3]);
    assert_eq!(report.packs_removed, 1, "checkpoint 2's pack; checkpoint 1's holds a kept block");
    let m3 = store.manifest("vm", 3).expect("m3");
    let fresh = Store::open(d.path()).expect("reopen");
    fresh.blocks().load(&m3.packs).expect("load");
    for h in m3.blocks() {
        fresh.blocks().get(h).expect("kept blocks intact");
    }
    store.gc("vm", 0).expect("gc all");
    assert!(store.objects().list("packs/").expect("list").is_empty(), "no pack left");
    assert!(store.objects().list("index/").expect("list").is_empty(), "no index left");
}

#[test]
fn an_aborted_writer_leaves_no_pack() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    let mut m = manifest::tests::sample(1);
    commit_with(&store, &mut m, &[b"kept"]);
    let w = store.writer().expect("writer");
    let mut policy = Policy::new(Estimates::default());
    w.put(b"kept", &mut policy).expect("put");
    w.put(&[9u8; 5000], &mut policy).expect("put");
    w.finish().expect("finish");
    let stored = w.abort();
    assert_eq!(stored.len(), 1);
    store.drop_packs(&stored);
    assert_eq!(store.objects().list("packs/").expect("list").len(), 1, "only the committed pack");
}

#[test]
fn on_a_server_gc_hides_a_pack_first_and_deletes_it_a_window_later() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(d.path()).expect("open");
    let mut m = manifest::tests::sample(1);
    commit_with(&store, &mut m, &[b"first"]);
    let mut m2 = manifest::tests::sample(2);
    commit_with(&store, &mut m2, &[b"second"]);
    // The window only from here: the commits above must not count against it on a
    // loaded machine.
    let window = std::time::Duration::from_secs(2);
    store.window = window;
    let old = m.packs[0].clone();
    assert_eq!(store.gc("vm", 1).expect("gc").packs_hidden, 0, "too young to hide");
    std::thread::sleep(window + std::time::Duration::from_millis(100));
    let r = store.gc("vm", 1).expect("gc");
    assert_eq!((r.packs_hidden, r.packs_removed), (1, 0), "{r:?}");
    assert!(store.objects().head(&blocks::index_key(&old)).expect("head").is_none(), "its index went first");
    store.blocks().refresh().expect("refresh");
    assert!(!store.blocks().dedupable(&m.memory.blocks[0].0), "writers no longer see it");
    assert_eq!(store.gc("vm", 1).expect("gc").packs_removed, 0, "not a window yet");
    std::thread::sleep(window + std::time::Duration::from_millis(100));
    let r = store.gc("vm", 1).expect("gc");
    assert_eq!(r.packs_removed, 1, "{r:?}");
    assert!(store.objects().head(&blocks::pack_key(&old)).expect("head").is_none());
    assert!(store.verify(None, |_, _| {}).expect("verify").is_empty());
}

#[test]
fn a_hidden_pack_a_manifest_names_gets_its_index_back() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(d.path()).expect("open");
    let mut m = manifest::tests::sample(1);
    commit_with(&store, &mut m, &[b"block"]);
    store.window = std::time::Duration::from_millis(100);
    let pack = m.packs[0].clone();
    // A pack hidden while a writer that saw it was still at work, which then committed.
    store.objects().put(&format!("condemned/{}/{pack}", &pack[..2]), b"").expect("mark");
    store.objects().delete(&blocks::index_key(&pack)).expect("hide");
    std::thread::sleep(std::time::Duration::from_millis(150));
    store.gc("vm", 5).expect("gc");
    assert!(store.objects().head(&blocks::index_key(&pack)).expect("head").is_some(), "index back");
    assert!(store.objects().list("condemned/").expect("list").is_empty());
    assert!(store.verify(None, |_, _| {}).expect("verify").is_empty());
}

#[test]
fn restore_trusts_only_a_signed_or_committed_manifest() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&d.path().join("s")).expect("open");
    let mut m = manifest::tests::sample(store.next_id("vm").expect("id"));
    commit_with(&store, &mut m, &[]);
    let digest = store.manifest_digest("vm", m.id).expect("digest");
    assert_eq!(store.trusted_manifest("vm", m.id, Trust::Signed).expect("signed"), m);
    assert_eq!(store.trusted_manifest("vm", m.id, Trust::Committed(&digest)).expect("committed"), m);
    let at = |name: &str, id: u64, ext: &str| d.path().join("s").join(format!("vms/{name}/{id:010}.{ext}"));
    let path = at("vm", m.id, "json");
    let genuine = std::fs::read(&path).expect("read");

    // A forged manifest with a valid checksum of its own.
    let mut forged = m.clone();
    forged.argv = vec!["/bin/sh".into(), "-c".into(), "id".into()];
    forged.seal();
    std::fs::write(&path, forged.to_bytes()).expect("forge");
    assert!(store.manifest("vm", m.id).is_ok(), "its checksum alone passes");
    for trust in [Trust::Signed, Trust::Committed(&digest)] {
        let err = store.trusted_manifest("vm", m.id, trust).expect_err("forged");
        assert!(matches!(err, StoreError::Untrusted { .. }), "{err}");
    }

    // A genuine manifest and tag moved to another id, or another VM, are refused.
    std::fs::write(&path, &genuine).expect("restore");
    let vm2 = store.vm_dir("vm2");
    private::create_dir_all(&vm2).expect("mkdir");
    std::fs::copy(&path, at("vm2", m.id, "json")).expect("copy");
    std::fs::copy(at("vm", m.id, "hmac"), at("vm2", m.id, "hmac")).expect("copy");
    std::fs::copy(&path, at("vm", m.id + 1, "json")).expect("copy");
    std::fs::copy(at("vm", m.id, "hmac"), at("vm", m.id + 1, "hmac")).expect("copy");
    assert!(store.trusted_manifest("vm2", m.id, Trust::Signed).is_err());
    assert!(store.trusted_manifest("vm", m.id + 1, Trust::Signed).is_err());

    // Discarding takes the tag with the manifest.
    store.discard("vm", m.id).expect("discard");
    assert!(!at("vm", m.id, "hmac").exists());
}

#[test]
fn a_store_others_can_write_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().expect("tempdir");
    let root = d.path().join("s");
    Store::open(&root).expect("open");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o757)).expect("chmod");
    for err in [Store::open(&root).expect_err("exposed"), Store::open_existing(&root).expect_err("exposed")] {
        assert!(matches!(err, StoreError::Exposed { .. }), "{err}");
        assert!(err.to_string().contains(&root.display().to_string()), "{err}");
    }
}

#[test]
fn a_busy_vm_is_refused() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    let _held = store.lock_vm("vm").expect("lock");
    assert!(matches!(store.lock_vm("vm"), Err(StoreError::Busy { .. })));
}

#[test]
fn an_unwritable_store_is_named() {
    let err = Store::open(Path::new("/proc/cutline-store")).expect_err("unwritable");
    assert!(err.to_string().contains("/proc/cutline-store"), "{err}");
}

#[test]
fn many_writers_may_replace_one_file_at_once() {
    // Three VMs of one process stored the same kernel's base index at once: a shared temp
    // name made the others' rename fail.
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("same.json");
    std::thread::scope(|s| {
        for i in 0..8u8 {
            let path = &path;
            s.spawn(move || {
                for _ in 0..20 {
                    write_atomically(path, &[i; 64]).expect("concurrent replace");
                }
            });
        }
    });
    assert_eq!(std::fs::read(&path).expect("read").len(), 64);
    assert_eq!(std::fs::read_dir(d.path()).expect("ls").count(), 1, "no temp file left");
}

fn distinct(n: usize, seed: u8) -> Vec<Vec<u8>> {
    (0..n).map(|i| (0..10_000u32).map(|j| (j as u8).wrapping_mul(31).wrapping_add(i as u8 ^ seed)).collect()).collect()
}

#[test]
fn a_mostly_dead_pack_is_repacked_and_old_manifests_follow_its_forward() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    let a = distinct(10, 1);
    let refs: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
    let mut m1 = manifest::tests::sample(1);
    commit_with(&store, &mut m1, &refs);
    let old = m1.packs[0].clone();
    let b = distinct(1, 2);
    let mut m2 = manifest::tests::sample(2);
    commit_with(&store, &mut m2, &[&a[0], &b[0]]);
    assert!(m2.packs.contains(&old), "block a0 is deduplicated into checkpoint 1's pack");

    let r = store.gc("vm", 1).expect("gc");
    assert_eq!(r.packs_repacked, 1, "{r:?}");
    assert!(store.objects().head(&blocks::pack_key(&old)).expect("head").is_none(), "the old pack went");
    assert_eq!(store.objects().list("moved/").expect("list").len(), 1);
    // Checkpoint 2's manifest is unchanged (signed, committed by digest) and still restores.
    let fresh = Store::open(d.path()).expect("reopen");
    let m2 = fresh.trusted_manifest("vm", 2, Trust::Signed).expect("signed as before");
    fresh.blocks().load(&m2.packs).expect("load through the forward");
    assert_eq!(fresh.blocks().get(&m2.memory.blocks[0].0).expect("a0"), a[0]);
    assert!(fresh.verify(None, |_, _| {}).expect("verify").is_empty());
    // The process that ran gc reads it too (its view dropped the old pack).
    store.blocks().load(&m2.packs).expect("load");
    assert_eq!(store.blocks().get(&m2.memory.blocks[0].0).expect("a0"), a[0]);

    // Once nothing names the old pack, its forward and the new pack go too.
    let mut m3 = manifest::tests::sample(3);
    commit_with(&store, &mut m3, &[&b[0]]);
    store.gc("vm", 1).expect("gc");
    assert!(store.objects().list("moved/").expect("list").is_empty());
    assert_eq!(store.objects().list("packs/").expect("list").len(), 1, "checkpoint 2's own pack, which 3 uses");
}

#[test]
fn on_a_server_a_repacked_pack_is_hidden_then_deleted_when_its_forward_covers_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open(d.path()).expect("open");
    let a = distinct(10, 3);
    let refs: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
    let mut m1 = manifest::tests::sample(1);
    commit_with(&store, &mut m1, &refs);
    let old = m1.packs[0].clone();
    let mut m2 = manifest::tests::sample(2);
    commit_with(&store, &mut m2, &[&a[0]]);
    store.window = std::time::Duration::from_millis(200);
    let r = store.gc("vm", 1).expect("gc");
    assert_eq!((r.packs_repacked, r.packs_removed), (1, 0), "{r:?}");
    assert!(store.objects().head(&blocks::pack_key(&old)).expect("head").is_some(), "hidden, not deleted");
    std::thread::sleep(std::time::Duration::from_millis(250));
    let r = store.gc("vm", 1).expect("gc");
    assert_eq!(r.packs_removed, 1, "{r:?}");
    let fresh = Store::open(d.path()).expect("reopen");
    fresh.blocks().load(&m2.packs).expect("load through the forward");
    assert_eq!(fresh.blocks().get(&m2.memory.blocks[0].0).expect("a0"), a[0]);
}
