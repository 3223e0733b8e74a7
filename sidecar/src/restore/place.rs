//! Making a host ready for a checkpoint's relaunch when the VM last ran elsewhere: the
//! directories its recorded paths need, and its base images (kernel, initrd, firmware,
//! backing images) fetched from the store by hash when this host lacks them. A path that
//! cannot exist here is refused, naming it.

use std::path::{Path, PathBuf};

use super::{RestoreError, resolve};
use crate::store::{Manifest, Store, bases};

/// The directories the relaunch writes into or QEMU opens files in: those of the disks,
/// the bases, the QMP socket, the pidfile, and every `path=`, `file=`, `logfile=` or
/// `file:` value of the command line.
pub(super) fn needed_dirs(m: &Manifest) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    files.extend(m.disks.iter().map(|d| resolve(m, &d.filename)));
    files.extend(m.bases.iter().map(|b| resolve(m, &b.path)));
    files.push(resolve(m, &m.qmp));
    if let Some(p) = &m.pidfile {
        files.push(resolve(m, p));
    }
    for a in m.argv.iter().skip(1) {
        for part in a.split(',') {
            let value = match part.split_once('=') {
                Some(("path" | "file" | "filename" | "logfile", v)) => v,
                _ => part,
            };
            let value = value.strip_prefix("file:").or_else(|| value.strip_prefix("unix:")).unwrap_or(value);
            if value.starts_with('/') {
                files.push(PathBuf::from(value));
            }
        }
    }
    let mut dirs: Vec<PathBuf> = files.iter().filter_map(|f| f.parent().map(Path::to_owned)).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Creates the directories the relaunch needs; refuses, naming it, one that cannot be.
pub(super) fn make_dirs(m: &Manifest) -> Result<(), RestoreError> {
    for d in needed_dirs(m) {
        if d.is_dir() {
            continue;
        }
        std::fs::create_dir_all(&d).map_err(|e| RestoreError::Path {
            name: m.name.clone(),
            id: m.id,
            path: d.display().to_string(),
            why: format!("the recorded command line needs this directory, and it cannot be made here: {e}"),
        })?;
    }
    Ok(())
}

/// Fetches each base this host lacks from the store (its packs already loaded); returns
/// the paths fetched. A base present with another content is left to the checks after
/// (a backing image must match; a kernel may have been updated in place).
pub(super) fn fetch_bases(m: &Manifest, store: &Store) -> Result<Vec<PathBuf>, RestoreError> {
    let mut fetched = Vec::new();
    for b in &m.bases {
        let path = resolve(m, &b.path);
        match std::fs::symlink_metadata(&path) {
            Ok(_) => {
                if b.role != "backing" && bases::hash_cached(&path).is_ok_and(|h| h != b.sha256) {
                    tracing::warn!(vm = %m.name, path = %path.display(), role = %b.role, "base differs from the checkpoint's; using the one here");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                store.restore_base(b, &path).map_err(|source| RestoreError::Path {
                    name: m.name.clone(),
                    id: m.id,
                    path: path.display().to_string(),
                    why: format!(
                        "cannot fetch the {} image from the store: {}",
                        b.role,
                        crate::store::error_chain(&source)
                    ),
                })?;
                fetched.push(path);
            }
            Err(e) => {
                return Err(RestoreError::Path {
                    name: m.name.clone(),
                    id: m.id,
                    path: path.display().to_string(),
                    why: format!("cannot look at the {} image: {e}", b.role),
                });
            }
        }
    }
    Ok(fetched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directories_a_command_line_needs_are_found() {
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "id": 1, "name": "vm", "parent": null, "created_unix_ms": 1,
            "mode": "background-snapshot", "mode_reason": null, "qemu_version": "10.0.2",
            "qemu_package": "", "machine": "pc", "ram_bytes": 1,
            "argv": ["qemu-system-x86_64", "-chardev", "socket,id=c,path=/run/vm/control.sock,server=on",
                     "-serial", "file:/var/log/vm/console.log", "-pidfile", "/run/vm/pid", "-m", "128"],
            "cwd": "/srv/vm", "qmp": "qmp.sock", "pidfile": "/run/vm/pid",
            "memory": {"layout": "stream", "bytes": 0, "blocks": [], "bytes_stored": 0},
            "disks": [], "timings": {"pause_ms": 0.0, "duration_ms": 0.0, "memory_ms": 0.0,
            "disks_ms": 0.0, "sync_ms": 0.0},
            "bytes_stored": 0, "checksum": ""
        }))
        .expect("manifest");
        m.bases.push(bases::Base {
            role: "kernel".into(),
            path: "boot/vmlinuz".into(),
            sha256: "0".repeat(64),
            size: 0,
            blocks: vec![],
        });
        let dirs = needed_dirs(&m);
        for want in ["/run/vm", "/var/log/vm", "/srv/vm", "/srv/vm/boot"] {
            assert!(dirs.contains(&PathBuf::from(want)), "{want} in {dirs:?}");
        }
    }

    #[test]
    fn a_directory_that_cannot_be_made_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let blocker = d.path().join("file");
        std::fs::write(&blocker, b"x").expect("write");
        let mut m: Manifest = serde_json::from_value(serde_json::json!({
            "format": 1, "id": 3, "name": "vm", "parent": null, "created_unix_ms": 1,
            "mode": "background-snapshot", "mode_reason": null, "qemu_version": "10.0.2",
            "qemu_package": "", "machine": "pc", "ram_bytes": 1, "argv": ["qemu-system-x86_64"],
            "cwd": null, "qmp": "/q.sock", "pidfile": null,
            "memory": {"layout": "stream", "bytes": 0, "blocks": [], "bytes_stored": 0},
            "disks": [], "timings": {"pause_ms": 0.0, "duration_ms": 0.0, "memory_ms": 0.0,
            "disks_ms": 0.0, "sync_ms": 0.0},
            "bytes_stored": 0, "checksum": ""
        }))
        .expect("manifest");
        m.qmp = blocker.join("sub").join("qmp.sock").display().to_string();
        let e = make_dirs(&m).expect_err("under a file");
        let text = e.to_string();
        assert!(text.contains(&blocker.join("sub").display().to_string()), "{text}");
    }
}
