//! Tests of the store: commit, verify and gc, trust, locks, a root others can write.

use super::*;

#[test]
fn commit_list_verify_gc() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(d.path()).expect("open");
    let mut policy = Policy::new(Estimates::default());
    let shared = store.blocks().put(b"shared block", &mut policy).expect("put");
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let own = store.blocks().put(&[i; 100], &mut policy).expect("put");
        let mut m = manifest::tests::sample(store.next_id("vm").expect("id"));
        m.memory.blocks = vec![(shared.hash.clone(), 12), (own.hash.clone(), 100)];
        m.memory.bytes = 112;
        store.commit(&mut m).expect("commit");
        ids.push(m.id);
    }
    assert_eq!(store.ids("vm").expect("ids"), vec![1, 2, 3]);
    assert!(store.verify(Some("vm"), |_, _| {}).expect("verify").is_empty());

    // Damage the block only checkpoint 2 uses: verify names it and checkpoint 2 alone.
    let m2 = store.manifest("vm", 2).expect("m2");
    let own2 = m2.memory.blocks[1].0.clone();
    std::fs::write(store.blocks().path(&own2), b"\x00garbage").expect("damage");
    let damage = store.verify(Some("vm"), |_, _| {}).expect("verify");
    assert_eq!(damage.len(), 1);
    assert!(damage[0].item.contains(&own2));
    assert_eq!(damage[0].breaks, vec![("vm".to_owned(), 2)]);

    let report = store.gc("vm", 1).expect("gc");
    assert_eq!(report.removed, vec![1, 2]);
    assert_eq!(report.kept, vec![3]);
    assert_eq!(report.blocks_removed, 2);
    let m3 = store.manifest("vm", 3).expect("m3");
    for h in m3.blocks() {
        store.blocks().get(h).expect("kept blocks intact");
    }
}

#[test]
fn restore_trusts_only_a_signed_or_committed_manifest() {
    let d = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&d.path().join("s")).expect("open");
    let mut m = manifest::tests::sample(store.next_id("vm").expect("id"));
    store.commit(&mut m).expect("commit");
    let digest = store.manifest_digest("vm", m.id).expect("digest");
    assert_eq!(store.trusted_manifest("vm", m.id, Trust::Signed).expect("signed"), m);
    assert_eq!(store.trusted_manifest("vm", m.id, Trust::Committed(&digest)).expect("committed"), m);
    let path = store.manifest_path("vm", m.id);
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
    std::fs::copy(&path, store.manifest_path("vm2", m.id)).expect("copy");
    std::fs::copy(store.tag_path("vm", m.id), store.tag_path("vm2", m.id)).expect("copy");
    std::fs::copy(&path, store.manifest_path("vm", m.id + 1)).expect("copy");
    std::fs::copy(store.tag_path("vm", m.id), store.tag_path("vm", m.id + 1)).expect("copy");
    assert!(store.trusted_manifest("vm2", m.id, Trust::Signed).is_err());
    assert!(store.trusted_manifest("vm", m.id + 1, Trust::Signed).is_err());

    // Discarding takes the tag with the manifest.
    store.discard("vm", m.id).expect("discard");
    assert!(!store.tag_path("vm", m.id).exists());
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
