//! Attaching to guests started in other ways than cutline's tests usually do: legacy
//! `-drive`, virtio-scsi and IDE disks, a qcow2 overlay on a read-only base, an e1000
//! NIC, the `pc` machine, `-daemonize` with `-pidfile`; and a guest whose configuration
//! blocks migration.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cutline_tests::{GuestSpec, TestEnv};
use sidecar::checkpoint::{self, Options};
use sidecar::store::Store;
use sidecar::{attach, restore};

const T: Duration = Duration::from_secs(30);

fn qemu_img(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("qemu-img").args(args).output()?;
    anyhow::ensure!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn qemu_io(fmt: &str, file: &Path, cmd: &str) -> anyhow::Result<String> {
    let mut c = Command::new("qemu-io");
    if cmd.starts_with("read") {
        c.args(["-r", "-U"]); // the guest may hold the image open
    }
    let out = c.args(["-f", fmt, "-c", cmd]).arg(file).output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(
        out.status.success() && !text.contains("fail"),
        "qemu-io {cmd}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaches_to_legacy_drives_scsi_ide_overlay_e1000_pc_daemonized() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let d = env.dir().join("images");
    std::fs::create_dir_all(&d)?;
    let base = d.join("base.qcow2");
    let overlay = d.join("overlay.qcow2");
    let scsi = d.join("scsi.qcow2");
    let ide = d.join("ide.raw");
    qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap_or_default(), "8M"])?;
    qemu_io("qcow2", &base, "write -q -P 0x11 0 1M")?;
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap_or_default(),
        "-F",
        "qcow2",
        overlay.to_str().unwrap_or_default(),
    ])?;
    qemu_io("qcow2", &overlay, "write -q -P 0x22 1M 1M")?;
    qemu_img(&["create", "-q", "-f", "qcow2", scsi.to_str().unwrap_or_default(), "8M"])?;
    qemu_io("qcow2", &scsi, "write -q -P 0x33 0 64k")?;
    qemu_img(&["create", "-q", "-f", "raw", ide.to_str().unwrap_or_default(), "4M"])?;
    qemu_io("raw", &ide, "write -q -P 0x44 4096 4096")?;
    // The base is read-only from here: its hash is recorded, it is never copied.
    std::fs::set_permissions(&base, std::os::unix::fs::PermissionsExt::from_mode(0o444))?;

    let pidfile = env.dir().join("qemu.pid");
    let dead_port = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut spec = GuestSpec::new("legacy", &["idle"]);
    spec.machine = "pc".into();
    spec.extra_args = vec![
        "-drive".into(),
        format!("file={},format=qcow2,if=virtio", overlay.display()),
        "-device".into(),
        "virtio-scsi-pci,id=scsi0".into(),
        "-blockdev".into(),
        format!("driver=qcow2,node-name=scsidisk,file.driver=file,file.filename={}", scsi.display()),
        "-device".into(),
        "scsi-hd,drive=scsidisk,bus=scsi0.0,id=sd0".into(),
        "-drive".into(),
        format!("file={},format=raw,if=ide,index=1", ide.display()),
        "-netdev".into(),
        format!(
            "dgram,id=e0,local.type=inet,local.host=127.0.0.1,local.port=0,remote.type=inet,remote.host=127.0.0.1,remote.port={dead_port}"
        ),
        "-device".into(),
        "e1000,netdev=e0".into(),
        "-daemonize".into(),
        "-pidfile".into(),
        pidfile.display().to_string(),
    ];
    let mut guest = env.guest(&spec).await?;
    guest.control().wait_event("start", Duration::from_secs(60)).await?;

    let qmp = attach::connect(&guest.qmp_path).await?;
    let ident = attach::identify(&qmp, &guest.qmp_path).await?;
    assert!(ident.machine.starts_with("pc-i440fx"), "{}", ident.machine);
    assert!(ident.daemonize);
    assert_eq!(ident.pidfile.as_deref(), Some(pidfile.to_str().unwrap_or_default()));
    assert_eq!(ident.pid, guest.pid());
    assert!(ident.netdevs.iter().any(|(id, kind)| id == "e0" && kind == "dgram"), "{:?}", ident.netdevs);
    let formats: Vec<(&str, &str)> = ident.disks.iter().map(|d| (d.filename.as_str(), d.format.as_str())).collect();
    assert_eq!(ident.disks.len(), 3, "{formats:?}");
    let ov = ident.disks.iter().find(|d| d.filename == overlay.display().to_string()).expect("overlay disk");
    assert_eq!(ov.backing.as_ref().map(|b| b.0.clone()), Some(base.display().to_string()));
    assert!(ident.disks.iter().any(|d| d.device == "sd0" && d.node == "scsidisk"));
    assert!(ident.disks.iter().any(|d| d.format == "raw" && d.filename == ide.display().to_string()));
    drop(qmp);

    let store = Store::open(&env.dir().join("store"))?;
    let q = guest.qmp().await?;
    let m = checkpoint::checkpoint(&q, &store, "legacy", &Options::default(), &mut |_| {}).await?;
    drop(q);
    let ovd = m.disks.iter().find(|d| d.filename == overlay.display().to_string()).expect("overlay in manifest");
    assert!(ovd.backing.is_some(), "the base is recorded, not copied");
    assert!(ovd.bytes_copied <= 2 << 20, "only the overlay's own clusters are copied: {}", ovd.bytes_copied);
    let base_hash = std::fs::read(&base)?;
    guest.kill();
    // Damage what the guest had so that only a real restore brings it back.
    qemu_io("qcow2", &overlay, "write -q -P 0x66 1M 1M")?;
    qemu_io("raw", &ide, "write -q -P 0x66 4096 4096")?;

    let r = restore::restore(&store, "legacy", Some(m.id), false, &mut |_| {}).await?;
    let restored = guest.adopt(r.pid).await?;
    assert_eq!(
        std::fs::read_to_string(&pidfile)?.trim(),
        r.pid.to_string(),
        "the daemonized QEMU's pid comes from its pidfile"
    );
    restored.control().request("status", T).await?;
    qemu_io("qcow2", &overlay, "read -q -P 0x11 0 1M")?;
    qemu_io("qcow2", &overlay, "read -q -P 0x22 1M 1M")?;
    qemu_io("qcow2", &scsi, "read -q -P 0x33 0 64k")?;
    qemu_io("raw", &ide, "read -q -P 0x44 4096 4096")?;
    assert_eq!(std::fs::read(&base)?, base_hash, "the base image is never written");
    drop(restored);
    Ok(())
}

#[tokio::test]
async fn a_guest_whose_configuration_blocks_migration_gets_a_clear_error_and_keeps_running() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let vdi = env.dir().join("d.vdi");
    qemu_img(&["create", "-q", "-f", "vdi", vdi.to_str().unwrap_or_default(), "4M"])?;
    let mut spec = GuestSpec::new("blocked", &["idle"]);
    spec.extra_args = vec!["-drive".into(), format!("file={},format=vdi,if=virtio,id=vdidisk", vdi.display())];
    let guest = env.guest(&spec).await?;
    guest.control().wait_event("start", Duration::from_secs(60)).await?;
    let qmp = guest.qmp().await?;
    let store = Store::open(&env.dir().join("store"))?;
    let err =
        checkpoint::checkpoint(&qmp, &store, "blocked", &Options::default(), &mut |_| {}).await.expect_err("blocked");
    let msg = sidecar::store::error_chain(&err);
    assert!(msg.contains("migration is blocked") && msg.contains("vdidisk"), "{msg}");
    assert!(qmp.execute(qapi::qmp::query_status {}).await?.running, "the guest is left running");
    assert!(store.ids("blocked")?.is_empty());
    Ok(())
}
