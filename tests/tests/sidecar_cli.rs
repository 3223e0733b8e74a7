//! The `cutline-sidecar` command line: JSON of every command, gc killed midway, and the
//! stop-and-copy fallback for memory that background-snapshot cannot protect.

use std::process::Command;
use std::time::Duration;

use cutline_tests::{DiskSpec, GuestSpec, TestEnv, workspace_bin};
use serde_json::Value;
use sidecar::store::Store;

const BOOT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(30);

fn cli(args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new(workspace_bin("cutline-sidecar")?).args(args).arg("--json").output()?;
    anyhow::ensure!(
        out.status.success(),
        "cutline-sidecar {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_speaks_json_and_gc_survives_kill_9() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut spec = GuestSpec::new("cli", &["journal", "dirtier"]).setting("mib", 8).setting("mibps", 4);
    spec.disks.push(DiskSpec::qcow2(16));
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready" && v["mode"] == "journal", BOOT).await?;
    let store = env.dir().join("store");
    let (qmp, st) = (guest.qmp_path.display().to_string(), store.display().to_string());

    let a = cli(&["attach", "--qmp", &qmp])?;
    assert_eq!(a["pid"], guest.pid());
    assert_eq!(a["disks"][0]["format"], "qcow2");
    let mut ids = Vec::new();
    for _ in 0..4 {
        let c = cli(&["checkpoint", "--qmp", &qmp, "--store", &st, "--name", "cli"])?;
        for key in ["id", "name", "mode", "pause_ms", "duration_ms", "ram_bytes", "bytes_stored"] {
            assert!(c.get(key).is_some(), "checkpoint JSON lacks {key}: {c}");
        }
        assert!(c["disks"][0]["node"].is_string() && c["disks"][0]["bytes_stored"].is_u64(), "{c}");
        ids.push(c["id"].as_u64().unwrap_or(0));
    }
    let l = cli(&["list", "--store", &st, "--name", "cli"])?;
    assert_eq!(l["checkpoints"].as_array().map(Vec::len), Some(4));
    let v = cli(&["verify", "--store", &st])?;
    assert_eq!(v["ok"], true);

    // gc killed with SIGKILL at several points: every kept checkpoint stays whole.
    let bin = workspace_bin("cutline-sidecar")?;
    for (i, delay_ms) in [0u64, 2, 5, 10].iter().enumerate() {
        let keep = 4 - i.min(2);
        let mut child =
            Command::new(&bin).args(["gc", "--store", &st, "--name", "cli", "--keep", &keep.to_string()]).spawn()?;
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
        let s = Store::open_existing(&store)?;
        let damage = s.verify(Some("cli"), |_, _| {})?;
        assert!(damage.is_empty(), "after gc was killed at {delay_ms} ms: {damage:?}");
    }
    let g = cli(&["gc", "--store", &st, "--name", "cli", "--keep", "2"])?;
    assert_eq!(g["kept"], serde_json::json!([ids[2], ids[3]]));
    assert_eq!(cli(&["verify", "--store", &st])?["ok"], true);

    guest.kill();
    let r = cli(&["restore", "--store", &st, "--name", "cli", "--checkpoint", &ids[2].to_string()])?;
    for key in ["id", "name", "duration_ms", "pid"] {
        assert!(r.get(key).is_some(), "restore JSON lacks {key}: {r}");
    }
    let restored = guest.adopt(r["pid"].as_i64().unwrap_or(0) as i32).await?;
    let c = restored.control().request("check", T).await?;
    assert_eq!(c["ok"], true, "{c}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_backed_memory_falls_back_to_stop_and_copy() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // A shared mapping of a regular file on a disk filesystem: userfaultfd cannot
    // write-protect it (anonymous, shmem and hugetlbfs memory it can).
    let dir = tempfile::Builder::new()
        .prefix("cutline-ram-")
        .tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/../target"))?;
    let ram = dir.path().join("ram");
    let mut spec = GuestSpec::new("filemem", &["dirtier"]).setting("mib", 4).setting("mibps", 2);
    spec.extra_args = vec![
        "-object".into(),
        format!("memory-backend-file,id=mem,size=128M,mem-path={},share=on", ram.display()),
        "-machine".into(),
        "memory-backend=mem".into(),
    ];
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_from(0, "ready", |v| v["event"] == "ready", BOOT).await?;
    let store = Store::open(&env.dir().join("store"))?;
    let qmp = guest.qmp().await?;
    let m = sidecar::checkpoint::checkpoint(&qmp, &store, "filemem", &Default::default(), &mut |_| {}).await?;
    drop(qmp);
    let fs_is_tmpfs = nix::sys::statfs::statfs(dir.path())?.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC;
    if !fs_is_tmpfs {
        assert_eq!(m.mode, "stop-and-copy");
        assert!(m.mode_reason.as_deref().unwrap_or("").contains("ackground-snapshot"), "{:?}", m.mode_reason);
    }
    eprintln!("mode {} ({:?}), pause {:.0} ms", m.mode, m.mode_reason, m.timings.pause_ms);
    guest.kill();
    let r = sidecar::restore::restore(&store, "filemem", Some(m.id), false, &mut |_| {}).await?;
    let restored = guest.adopt(r.pid).await?;
    restored.control().request("status", T).await?;
    Ok(())
}
