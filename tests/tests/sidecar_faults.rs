//! Bad input and faults: each gets a clear error, the guest keeps running, and every
//! earlier checkpoint stays intact.

use std::process::Command;
use std::time::Duration;

use cutline_tests::mount::Tmpfs;
use cutline_tests::{DiskSpec, Guest, GuestSpec, TestEnv, workspace_bin};
use serde_json::Value;
use sidecar::checkpoint::{self, Options};
use sidecar::restore;
use sidecar::store::{Store, error_chain};

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

/// Runs `cutline-sidecar ARGS --json`; returns (exit code, parsed stdout).
fn cli(args: &[&str]) -> anyhow::Result<(i32, Value)> {
    let out = Command::new(workspace_bin("cutline-sidecar")?).args(args).arg("--json").output()?;
    let v = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{e}: stdout {:?} stderr {:?}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status.code().unwrap_or(-1), v))
}

async fn running(qmp: &qmp_client::Qmp) -> anyhow::Result<bool> {
    Ok(qmp.execute(qapi::qmp::query_status {}).await?.running)
}

#[test]
fn no_such_socket_and_a_socket_that_is_not_qemu() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let missing = dir.path().join("missing.sock");
    let (code, v) = cli(&[
        "checkpoint",
        "--qmp",
        missing.to_str().unwrap_or_default(),
        "--store",
        store.to_str().unwrap_or_default(),
        "--name",
        "vm",
    ])?;
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap_or("").contains("missing.sock"), "{v}");

    let fake = dir.path().join("fake.sock");
    let listener = std::os::unix::net::UnixListener::bind(&fake)?;
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = std::io::Write::write_all(&mut s, b"220 smtp.example ESMTP\r\n");
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let (code, v) = cli(&["attach", "--qmp", fake.to_str().unwrap_or_default()])?;
    assert_eq!(code, 1);
    let msg = v["error"].as_str().unwrap_or("");
    assert!(msg.contains("fake.sock") && msg.contains("not a QMP monitor"), "{v}");
    let _ = server.join();

    let (code, v) =
        cli(&["checkpoint", "--qmp", "/x", "--store", store.to_str().unwrap_or_default(), "--name", "../etc"])?;
    assert_eq!(code, 1);
    assert!(v["error"].as_str().unwrap_or("").contains("../etc"), "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_store_and_a_full_disk_abort_cleanly() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let spec = GuestSpec::new("full", &["dirtier"]).setting("mib", 24).setting("mibps", 24);
    let guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;

    let ro = Tmpfs::mount(&env.dir().join("ro"), 1, true)?;
    let err = Store::open(ro.path()).expect_err("read-only store");
    assert!(error_chain(&err).contains(&ro.path().display().to_string()), "{}", error_chain(&err));
    drop(ro);

    let fs = Tmpfs::mount(&env.dir().join("small"), 160, false)?;
    let store = Store::open(fs.path())?;
    let qmp = guest.qmp().await?;
    let first = checkpoint::checkpoint(&qmp, &store, "full", &Options::default(), &mut |_| {}).await?;
    // Leave less room than the next checkpoint needs (the dirtier rewrites 24 MiB).
    let free = nix::sys::statvfs::statvfs(fs.path())?;
    let avail = free.blocks_available() * free.fragment_size();
    let ballast = fs.path().join("ballast");
    std::fs::write(&ballast, vec![1u8; (avail.saturating_sub(4 << 20)) as usize])?;
    let used_before = du(fs.path());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let err =
        checkpoint::checkpoint(&qmp, &store, "full", &Options::default(), &mut |_| {}).await.expect_err("disk full");
    let msg = error_chain(&err);
    assert!(msg.contains("No space left") || msg.contains("os error 28"), "{msg}");
    assert!(running(&qmp).await?, "the guest runs after the aborted checkpoint");
    guest.control().request("status", T).await?;
    assert_eq!(store.ids("full")?, vec![first.id], "no manifest for the aborted checkpoint");
    assert!(store.verify(Some("full"), |_, _| {})?.is_empty(), "the earlier checkpoint is intact");
    assert!(du(fs.path()) <= used_before + (64 << 10), "the partial data was removed");
    assert!(std::fs::read_dir(fs.path().join("tmp"))?.next().is_none(), "no work files left");
    std::fs::remove_file(&ballast)?;
    // With room again, checkpoints work.
    checkpoint::checkpoint(&qmp, &store, "full", &Options::default(), &mut |_| {}).await?;
    drop(qmp);
    drop(store);
    drop(guest);
    drop(fs);
    Ok(())
}

/// Quits QEMU cleanly and waits for it to exit.
async fn quit(g: &mut Guest) -> anyhow::Result<()> {
    let qmp = g.qmp().await?;
    qmp.execute_raw("quit", serde_json::json!({})).await?;
    qmp.closed().await;
    for _ in 0..250 {
        if !g.is_running() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    g.kill();
    Ok(())
}

fn du(p: &std::path::Path) -> u64 {
    nix::sys::statvfs::statvfs(p).map(|s| (s.blocks() - s.blocks_free()) * s.fragment_size()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_block_is_named_and_restore_refuses() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut spec = GuestSpec::new("corrupt", &["journal"]);
    spec.disks.push(DiskSpec::qcow2(16));
    let guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let store_dir = env.dir().join("store");
    let store = Store::open(&store_dir)?;
    let qmp = guest.qmp().await?;
    let m = checkpoint::checkpoint(&qmp, &store, "corrupt", &Options::default(), &mut |_| {}).await?;
    let victim = m.memory.blocks.iter().map(|(h, _)| h.clone()).filter(|h| h != "zero").nth(3).expect("a block");
    // Flip the last byte of the victim's bytes inside its pack.
    let pack = store.blocks().pack_of(&victim).expect("located");
    let entry =
        *store.blocks().entries(&pack)?.iter().find(|e| sidecar::store::blocks::hex(&e.hash) == victim).expect("entry");
    let path = store_dir.join(sidecar::store::blocks::pack_key(&pack));
    let mut raw = std::fs::read(&path)?;
    raw[(entry.offset + u64::from(entry.stored) - 1) as usize] ^= 0x55;
    std::fs::write(&path, raw)?;
    // A fresh process reads the pack from disk, not from this one's cache.
    let store = Store::open(&store_dir)?;

    let (code, v) = cli(&["verify", "--store", store_dir.to_str().unwrap_or_default()])?;
    assert_eq!(code, 3, "{v}");
    let damage = v["damage"].as_array().cloned().unwrap_or_default();
    assert_eq!(damage.len(), 1, "{v}");
    assert!(damage[0]["item"].as_str().unwrap_or("").contains(&victim), "{v}");
    assert_eq!(damage[0]["breaks"], serde_json::json!([["corrupt", m.id]]));

    let err = restore::restore(&store, "corrupt", Some(m.id), false, &mut |_| {}).await.expect_err("damaged");
    assert!(error_chain(&err).contains(&victim), "{}", error_chain(&err));
    assert!(running(&qmp).await?, "a refused restore leaves the running guest alone");
    assert_eq!(qmp.peer()?.pid, guest.pid());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_checkpoint_commits_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let spec = GuestSpec::new("killed", &["dirtier"]).setting("mib", 16).setting("mibps", 8);
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let store = Store::open(&env.dir().join("store"))?;
    let qmp = guest.qmp().await?;
    let first = checkpoint::checkpoint(&qmp, &store, "killed", &Options::default(), &mut |_| {}).await?;
    let pid = guest.pid();
    let (tx, rx) = std::sync::mpsc::channel();
    let killer = std::thread::spawn(move || {
        // Kill QEMU once the cut is done and memory is being saved.
        if rx.recv_timeout(Duration::from_secs(60)).is_ok() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    });
    let err = checkpoint::checkpoint(&qmp, &store, "killed", &Options::default(), &mut |m| {
        if m.starts_with("cut done") {
            let _ = tx.send(());
        }
    })
    .await
    .expect_err("QEMU was killed");
    let _ = killer.join();
    let msg = error_chain(&err);
    assert!(msg.contains("QEMU exited") || msg.contains("closed"), "{msg}");
    assert_eq!(store.ids("killed")?, vec![first.id], "nothing half-written became a checkpoint");
    assert!(store.verify(Some("killed"), |_, _| {})?.is_empty());
    guest.kill();
    // The earlier checkpoint still restores.
    let r = restore::restore(&store, "killed", Some(first.id), false, &mut |_| {}).await?;
    let restored = guest.adopt(r.pid).await?;
    restored.control().request("status", T).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inconsistent_bitmap_gives_a_full_copy_and_a_restore_starts_a_fresh_one() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut spec = GuestSpec::new("bitmap", &["journal"]);
    spec.disks.push(DiskSpec::qcow2(16));
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let store = Store::open(&env.dir().join("store"))?;
    let m1 = checkpoint::checkpoint(&guest.qmp().await?, &store, "bitmap", &Options::default(), &mut |_| {}).await?;
    assert!(m1.disks[0].full);
    // A clean exit stores the persistent bitmap in the qcow2: the next QEMU builds on it.
    quit(&mut guest).await?;
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let m = checkpoint::checkpoint(&guest.qmp().await?, &store, "bitmap", &Options::default(), &mut |_| {}).await?;
    assert!(!m.disks[0].full, "a persistent bitmap survives a clean restart: {:?}", m.disks[0].full_reason);
    quit(&mut guest).await?;
    // A QEMU that loaded the bitmap (marking it in use in the image) dies uncleanly:
    // the next one finds the bitmap inconsistent.
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    guest.kill();
    let guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let m2 = checkpoint::checkpoint(&guest.qmp().await?, &store, "bitmap", &Options::default(), &mut |_| {}).await?;
    assert!(m2.disks[0].full, "an inconsistent bitmap must not yield an incremental copy");
    assert!(m2.disks[0].full_reason.as_deref().unwrap_or("").contains("inconsistent"), "{:?}", m2.disks[0].full_reason);
    // The restore stops the running guest itself.
    let r = restore::restore(&store, "bitmap", Some(m2.id), false, &mut |_| {}).await?;
    let restored = guest.adopt(r.pid).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let m3 = checkpoint::checkpoint(&restored.qmp().await?, &store, "bitmap", &Options::default(), &mut |_| {}).await?;
    assert!(!m3.disks[0].full, "after a restore the next copy is incremental: {:?}", m3.disks[0].full_reason);
    assert_eq!(m3.parent, Some(m2.id));
    let c = restored.control().request("check", T).await?;
    assert_eq!(c["ok"], true, "{c}");
    Ok(())
}
