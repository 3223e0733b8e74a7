//! The store closed to others and restore trusting only what the store signed, against
//! real QEMU.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use cutline_tests::{DiskSpec, GuestSpec, TestEnv};
use sidecar::checkpoint::{self, Options};
use sidecar::restore;
use sidecar::store::{Manifest, Store, error_chain};

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

/// Every directory and regular file under `root` whose mode is not 0700 / 0600.
fn exposed(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let (p, Ok(m)) = (e.path(), e.metadata()) else { continue };
            let mode = m.permissions().mode() & 0o777;
            if m.is_dir() {
                if mode != 0o700 {
                    out.push(format!("{} {mode:o}", p.display()));
                }
                stack.push(p);
            } else if m.is_file() && mode != 0o600 {
                out.push(format!("{} {mode:o}", p.display()));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_private_and_restore_runs_only_signed_manifests() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut spec = GuestSpec::new("harden", &["journal"]);
    spec.disks.push(DiskSpec::qcow2(16));
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    // The user's image: someone else's, with their mode.
    let image = guest.dir.join("disk0.qcow2");
    std::os::unix::fs::chown(&image, Some(1234), Some(4321))?;
    std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o640))?;

    let store_dir = env.dir().join("store");
    let store = Store::open(&store_dir)?;
    let qmp = guest.qmp().await?;
    let m = checkpoint::checkpoint(&qmp, &store, &guest.name, &Options::default(), &mut |_| {}).await?;
    assert_eq!(exposed(&store_dir), Vec::<String>::new(), "everything in the store is its owner's alone");
    assert_eq!(std::fs::metadata(&store_dir)?.permissions().mode() & 0o777, 0o700);

    // Someone who can write the store but not read its key points argv[0] elsewhere and
    // fixes up the manifest's own checksum: restore refuses and leaves the guest alone.
    let manifest = store_dir.join("vms").join(&guest.name).join(format!("{:010}.json", m.id));
    let original = std::fs::read(&manifest)?;
    let mut forged: Manifest = serde_json::from_slice(&original)?;
    forged.argv[0] = "/bin/sh".into();
    forged.seal();
    std::fs::write(&manifest, forged.to_bytes())?;
    let err = restore::restore(&store, &guest.name, Some(m.id), false, &mut |_| {}).await.expect_err("forged");
    assert!(error_chain(&err).contains("signature"), "{}", error_chain(&err));
    assert!(qmp.execute_raw("query-status", serde_json::json!({})).await.is_ok(), "the guest still runs");

    // Without its signature the genuine manifest is refused too.
    std::fs::write(&manifest, &original)?;
    let tag = manifest.with_extension("hmac");
    let saved_tag = std::fs::read(&tag)?;
    std::fs::remove_file(&tag)?;
    let err = restore::restore(&store, &guest.name, Some(m.id), false, &mut |_| {}).await.expect_err("unsigned");
    assert!(error_chain(&err).contains("no signature"), "{}", error_chain(&err));

    // Signed and whole: restored, and the image is still the user's.
    std::fs::write(&tag, saved_tag)?;
    guest.kill();
    let r = restore::restore(&store, &guest.name, Some(m.id), false, &mut |_| {}).await?;
    let restored = guest.adopt(r.pid).await?;
    let c = restored.control().request("check", T).await?;
    assert_eq!(c["ok"], true, "{c}");
    let meta = std::fs::metadata(&image)?;
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (1234, 4321, 0o640), "owner and mode kept");
    drop(restored);

    // A store root others can write is refused, by name.
    std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o777))?;
    let err = Store::open(&store_dir).expect_err("exposed");
    assert!(err.to_string().contains(store_dir.to_str().unwrap_or_default()), "{err}");
    std::fs::set_permissions(&store_dir, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}
