//! What a trusted manifest may still have a restore do: run a QEMU system emulator, and
//! write the VM's own disk images, nothing else.

use super::{RestoreError, resolve};
use crate::store::{Manifest, Store};

/// Refuses a manifest whose argv[0] is not a QEMU system emulator: an executable regular
/// file named `qemu-system-*` (after symlinks) that only its owner can write.
pub(super) fn check_program(m: &Manifest) -> Result<(), RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    let program = m.argv.first().cloned().unwrap_or_default();
    let refuse = |why: String| RestoreError::NotQemu { name: m.name.clone(), id: m.id, program: program.clone(), why };
    if program.is_empty() {
        return Err(refuse("the recorded argv is empty".into()));
    }
    let path = if program.contains('/') {
        resolve(m, &program)
    } else {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join(&program))
            .find(|p| p.is_file())
            .ok_or_else(|| refuse("not found in PATH".into()))?
    };
    let real = std::fs::canonicalize(&path).map_err(|e| refuse(format!("{}: {e}", path.display())))?;
    let named = real.file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with("qemu-system-"));
    if !named {
        return Err(refuse(format!("{} is not a qemu-system-* emulator", real.display())));
    }
    let meta = std::fs::metadata(&real).map_err(|e| refuse(format!("{}: {e}", real.display())))?;
    let mode = meta.permissions().mode();
    if !meta.is_file() || mode & 0o111 == 0 {
        return Err(refuse(format!("{} is not an executable file", real.display())));
    }
    if mode & 0o022 != 0 {
        return Err(refuse(format!("{} is writable by others (mode {:o})", real.display(), mode & 0o7777)));
    }
    Ok(())
}

/// Refuses a manifest that would have restore write anything but the VM's own disks: each
/// disk file must be named by the recorded QEMU command line, and lie outside the store.
pub(super) fn check_disks(m: &Manifest, store: &Store) -> Result<(), RestoreError> {
    let store_root = std::fs::canonicalize(store.root()).unwrap_or_else(|_| store.root().to_owned());
    for d in &m.disks {
        let refuse =
            |why: String| RestoreError::NotADisk { name: m.name.clone(), id: m.id, path: d.filename.clone(), why };
        if d.filename.is_empty() || !m.argv.iter().skip(1).any(|a| a.contains(&d.filename)) {
            return Err(refuse("the recorded QEMU command line does not name it".into()));
        }
        let path = resolve(m, &d.filename);
        let dir = path.parent().and_then(|p| std::fs::canonicalize(p).ok()).unwrap_or_else(|| path.clone());
        if dir.starts_with(&store_root) {
            return Err(refuse(format!("it lies inside the store {}", store_root.display())));
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|md| !md.file_type().is_file()) {
            return Err(refuse("it is not a regular file".into()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(argv: &[&str], disk: Option<&str>) -> Manifest {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "id": 1, "name": "vm", "parent": null, "created_unix_ms": 1,
            "mode": "background-snapshot", "mode_reason": null, "qemu_version": "10.0.2",
            "qemu_package": "", "machine": "pc", "ram_bytes": 1, "argv": argv, "cwd": null,
            "qmp": "/q.sock", "pidfile": null,
            "memory": {"layout": "stream", "bytes": 0, "blocks": [], "bytes_stored": 0},
            "disks": [], "timings": {"pause_ms": 0.0, "duration_ms": 0.0, "memory_ms": 0.0,
            "disks_ms": 0.0, "sync_ms": 0.0},
            "bytes_stored": 0, "checksum": ""
        }))
        .expect("manifest");
        if let Some(f) = disk {
            m.disks.push(
                serde_json::from_value(serde_json::json!({
                    "node": "disk0", "device": "dev0", "filename": f, "format": "qcow2",
                    "virtual_size": 65536, "cluster_size": 65536, "chunk_size": 65536, "backing": null,
                    "chunks": [], "full": true, "full_reason": null, "bytes_stored": 0, "bytes_copied": 0
                }))
                .expect("disk"),
            );
        }
        m
    }

    #[test]
    fn only_a_qemu_system_emulator_is_run() {
        let qemu = std::env::var("CUTLINE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
        assert!(check_program(&manifest(&[&qemu, "-m", "128"], None)).is_ok(), "{qemu}");
        for (argv0, why) in [
            ("/bin/sh", "not a qemu-system"),
            ("", "empty"),
            ("qemu-system-nonesuch", "not found"),
            ("/nonexistent/qemu-system-x86_64", "No such file"),
        ] {
            let err = check_program(&manifest(&[argv0], None)).expect_err(argv0);
            assert!(err.to_string().contains(why), "{argv0}: {err}");
        }
        // A file named like QEMU that others could have written.
        let d = tempfile::tempdir().expect("tempdir");
        let fake = d.path().join("qemu-system-x86_64");
        std::fs::write(&fake, b"#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        let err = check_program(&manifest(&[fake.to_str().expect("utf-8")], None)).expect_err("writable");
        assert!(err.to_string().contains("writable by others"), "{err}");
    }

    #[test]
    fn only_the_vms_own_disks_are_written() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("store")).expect("store");
        let disk = d.path().join("disk0.qcow2");
        std::fs::write(&disk, b"").expect("disk");
        let blockdev = format!("driver=file,node-name=file0,filename={}", disk.display());
        let ok = manifest(&["qemu-system-x86_64", "-blockdev", &blockdev], disk.to_str());
        assert!(check_disks(&ok, &store).is_ok());
        let not_named = manifest(&["qemu-system-x86_64"], Some("/etc/passwd"));
        let err = check_disks(&not_named, &store).expect_err("not named");
        assert!(err.to_string().contains("/etc/passwd") && err.to_string().contains("does not name"), "{err}");
        let key = store.root().join("key").display().to_string();
        let in_store = manifest(&["qemu-system-x86_64", "-drive", &format!("file={key}")], Some(&key));
        let err = check_disks(&in_store, &store).expect_err("in the store");
        assert!(err.to_string().contains("inside the store"), "{err}");
        let dir = d.path().display().to_string();
        let not_file = manifest(&["qemu-system-x86_64", "-drive", &format!("file={dir}")], Some(&dir));
        assert!(check_disks(&not_file, &store).expect_err("a directory").to_string().contains("regular file"));
    }
}
