//! Base images stored once by hash (seed 001): the read-only files a VM's command line
//! names (kernel, initrd, firmware, device tree, read-only pflash) and the backing images
//! of its disks. A checkpoint then holds everything a relaunch on another host reads.
//!
//! A base is stored as 1 MiB blocks (zero blocks not stored) in the checkpoint's packs,
//! and its block list is part of the manifest, so the manifest alone (with the packs it
//! names) rebuilds it: there is no shared object a gc could take from under a writer.
//! A base is read and hashed in one pass, so the list describes exactly the bytes stored
//! even if the file changed meanwhile. A file this process has seen with the same device,
//! inode, size and modification time, whose blocks the store's view still holds, is not
//! read again.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::ZERO;
use super::{Hash, Policy, Store, StoreError, Writer, blocks, private};

/// Block size of base images: they are large and read-only, so big blocks (few files).
pub const BASE_BLOCK: usize = 1 << 20;
/// What a [`StoreError::Io`] says when a base image cannot be read (gone, unreadable).
pub const UNREADABLE: &str = "cannot read base image";

/// A read-only file a checkpoint's relaunch needs, stored by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Base {
    /// What QEMU uses it as: `kernel`, `initrd`, `bios`, `dtb`, `pflash` or `backing`.
    pub role: String,
    /// Its path, as QEMU opens it (relative paths resolved against QEMU's directory).
    pub path: String,
    /// sha256 of its content.
    pub sha256: Hash,
    /// Its size.
    pub size: u64,
    /// Its blocks in order: (hash, length); [`ZERO`] for zeros.
    #[serde(default)]
    pub blocks: Vec<(Hash, u64)>,
}

/// The read-only files `argv` names, with their roles, resolved against `cwd`.
pub fn named_in_argv(argv: &[String], cwd: Option<&Path>) -> Vec<(String, PathBuf)> {
    let resolve = |p: &str| match cwd {
        Some(c) if Path::new(p).is_relative() => c.join(p),
        _ => PathBuf::from(p),
    };
    let mut out = Vec::new();
    let mut args = argv.iter().skip(1);
    while let Some(a) = args.next() {
        let opt = a.trim_start_matches('-');
        if !a.starts_with('-') {
            continue;
        }
        match opt {
            "kernel" | "initrd" | "bios" | "dtb" => {
                if let Some(v) = args.next() {
                    out.push((opt.to_owned(), resolve(v)));
                }
            }
            "drive" => {
                let Some(v) = args.next() else { continue };
                let props: HashMap<&str, &str> = v.split(',').filter_map(|kv| kv.split_once('=')).collect();
                let read_only = matches!(props.get("readonly"), Some(&("on" | "true" | "yes")));
                if props.get("if") == Some(&"pflash")
                    && read_only
                    && let Some(file) = props.get("file")
                {
                    out.push(("pflash".to_owned(), resolve(file)));
                }
            }
            _ => {}
        }
    }
    out
}

type SeenKey = (u64, u64, u64, i64, i64);

fn seen() -> &'static Mutex<HashMap<SeenKey, Hash>> {
    static SEEN: OnceLock<Mutex<HashMap<SeenKey, Hash>>> = OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

/// Bases this process stored: their hash and blocks, by file identity.
type SeenBase = (Hash, Vec<(Hash, u64)>);

fn seen_bases() -> &'static Mutex<HashMap<SeenKey, SeenBase>> {
    static SEEN: OnceLock<Mutex<HashMap<SeenKey, SeenBase>>> = OnceLock::new();
    SEEN.get_or_init(Mutex::default)
}

fn seen_key(path: &Path) -> std::io::Result<SeenKey> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// sha256 of a file, remembered by device, inode, size and modification time.
pub fn hash_cached(path: &Path) -> std::io::Result<Hash> {
    let key = seen_key(path)?;
    if let Some(h) = seen().lock().ok().and_then(|s| s.get(&key).cloned()) {
        return Ok(h);
    }
    let h = super::hash_file(path)?;
    if let Ok(mut s) = seen().lock() {
        s.insert(key, h.clone());
    }
    Ok(h)
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { what, path, source }
}

impl Store {
    /// Stores the file at `path` as a base of the checkpoint `writer` writes, in role
    /// `role`; returns it and the bytes newly stored. Its blocks are not read again when
    /// this process saw the same file before and the view still holds its blocks.
    pub fn put_base(
        &self,
        role: &str,
        path: &Path,
        writer: &Writer,
        policy: &mut Policy,
    ) -> Result<(Base, u64), StoreError> {
        let path_text = path.display().to_string();
        if let Ok(key) = seen_key(path)
            && let Some((sha256, list)) = seen_bases().lock().ok().and_then(|s| s.get(&key).cloned())
            && list.iter().all(|(h, _)| h == ZERO || self.blocks().dedupable(h))
        {
            return Ok((Base { role: role.to_owned(), path: path_text, sha256, size: key.2, blocks: list }, 0));
        }
        let key = seen_key(path).map_err(io(UNREADABLE, path))?;
        let mut f = File::open(path).map_err(io(UNREADABLE, path))?;
        let mut hasher = Sha256::new();
        let mut base =
            Base { role: role.to_owned(), path: path_text, sha256: String::new(), size: 0, blocks: Vec::new() };
        let mut stored = 0;
        let mut buf = vec![0u8; BASE_BLOCK];
        loop {
            let n = crate::memory::read_full(&mut f, &mut buf).map_err(io(UNREADABLE, path))?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            hasher.update(data);
            base.size += n as u64;
            if data.iter().all(|b| *b == 0) {
                base.blocks.push((ZERO.to_owned(), n as u64));
                continue;
            }
            let put = writer.put(data, policy)?;
            stored += put.stored;
            base.blocks.push((put.hash, put.len));
        }
        base.sha256 = blocks::hex(&hasher.finalize());
        if let Ok(mut s) = seen_bases().lock() {
            s.insert(key, (base.sha256.clone(), base.blocks.clone()));
        }
        Ok((base, stored))
    }

    /// Writes base `base` of a checkpoint whose packs are loaded (see
    /// [`super::Blocks::load`]) to `dest`: a temp file beside it, checked against the
    /// base's hash, then renamed into place. A relaunch on a host that lacks it.
    pub fn restore_base(&self, base: &Base, dest: &Path) -> Result<(), StoreError> {
        let sha256 = &base.sha256;
        if !blocks::is_block_name(sha256) || base.blocks.iter().map(|(_, n)| *n).sum::<u64>() != base.size {
            return Err(io("the manifest's base does not describe a file:", dest)(
                std::io::ErrorKind::InvalidData.into(),
            ));
        }
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // Restores of two VMs on one host may fetch the same base at once: each its own temp.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dest.with_file_name(format!(".{name}.{}.{n}.cutline-tmp", std::process::id()));
        let result = (|| {
            let f = private::create(&tmp).map_err(io("cannot create", &tmp))?;
            let mut hasher = Sha256::new();
            let mut off = 0u64;
            for (hash, len) in &base.blocks {
                let data = if hash == ZERO { vec![0u8; *len as usize] } else { self.blocks().get(hash)? };
                if data.len() as u64 != *len {
                    return Err(io("a block of the wrong length in", &tmp)(std::io::ErrorKind::InvalidData.into()));
                }
                hasher.update(&data);
                if hash != ZERO {
                    std::os::unix::fs::FileExt::write_all_at(&f, &data, off).map_err(io("cannot write", &tmp))?;
                }
                off += len;
            }
            f.set_len(off).map_err(io("cannot write", &tmp))?;
            f.sync_all().map_err(io("cannot sync", &tmp))?;
            if &blocks::hex(&hasher.finalize()) != sha256 {
                return Err(io("rebuilt base does not match its hash:", &tmp)(std::io::ErrorKind::InvalidData.into()));
            }
            std::fs::rename(&tmp, dest).map_err(io("cannot rename into place", dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn the_read_only_files_of_a_command_line_are_found() {
        let argv = args(
            "qemu-system-x86_64 -m 256 -kernel vmlinuz --initrd /boot/initrd.img -append console=ttyS0 \
             -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE.fd \
             -drive if=pflash,format=raw,file=vars.fd -drive file=disk.qcow2,if=virtio -dtb board.dtb",
        );
        let got = named_in_argv(&argv, Some(Path::new("/vm")));
        let want: Vec<(String, PathBuf)> = [
            ("kernel", "/vm/vmlinuz"),
            ("initrd", "/boot/initrd.img"),
            ("pflash", "/usr/share/OVMF/OVMF_CODE.fd"),
            ("dtb", "/vm/board.dtb"),
        ]
        .iter()
        .map(|(r, p)| (r.to_string(), PathBuf::from(p)))
        .collect();
        assert_eq!(got, want, "writable pflash (vars) and disks are not bases");
        assert!(named_in_argv(&args("qemu -kernel"), None).is_empty(), "a flag without its value");
    }

    #[test]
    fn a_base_is_stored_once_and_rebuilt_exactly() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("store")).expect("store");
        let file = d.path().join("kernel");
        let mut content: Vec<u8> = (0..(BASE_BLOCK as u32 * 2 + 4097)).map(|i| (i % 253) as u8).collect();
        content[BASE_BLOCK..2 * BASE_BLOCK].fill(0);
        std::fs::write(&file, &content).expect("write");
        let mut policy = Policy::new(Default::default());
        let w = store.writer().expect("writer");
        let (base, stored) = store.put_base("kernel", &file, &w, &mut policy).expect("put");
        assert_eq!(base.sha256, blocks::sha256_hex(&content));
        assert_eq!(base.size, content.len() as u64);
        assert!(stored > 0);
        assert_eq!(base.blocks[1].0, ZERO, "zero blocks are not stored");
        let mut m = crate::store::manifest::tests::sample(1);
        m.memory.blocks.clear();
        m.memory.bytes = 0;
        m.bases = vec![base.clone()];
        store.commit(&mut m, &w).expect("commit");
        // The next checkpoint does not read it again, and stores nothing for it.
        let w2 = store.writer().expect("writer");
        let (again, stored_again) = store.put_base("kernel", &file, &w2, &mut policy).expect("again");
        assert_eq!((again.sha256.as_str(), stored_again), (base.sha256.as_str(), 0), "stored once");
        w2.finish().expect("finish");
        // Another process with only the manifest rebuilds it.
        let other = Store::open(&d.path().join("store")).expect("reopen");
        let m = other.manifest("vm", 1).expect("manifest");
        other.blocks().load(&m.packs).expect("load");
        let dest = d.path().join("elsewhere");
        other.restore_base(&m.bases[0], &dest).expect("restore");
        assert_eq!(std::fs::read(&dest).expect("read"), content);
        let mut bad = m.bases[0].clone();
        bad.size += 1;
        assert!(other.restore_base(&bad, &dest).is_err(), "a list that does not add up");
        // A wrong block is found by the hash check, and nothing is left behind.
        let mut swapped = m.bases[0].clone();
        swapped.blocks.swap(0, 2);
        let dest2 = d.path().join("second");
        assert!(other.restore_base(&swapped, &dest2).is_err());
        assert!(!dest2.exists());
        let left: Vec<_> = std::fs::read_dir(d.path())
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".second."))
            .collect();
        assert!(left.is_empty(), "no temp file left: {left:?}");
    }

    #[test]
    fn gc_and_verify_cover_the_blocks_of_bases() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("store")).expect("store");
        let mut policy = Policy::new(Default::default());
        let kernel = d.path().join("kernel");
        std::fs::write(&kernel, vec![3u8; 3 << 20]).expect("write");
        let w = store.writer().expect("writer");
        let (base, _) = store.put_base("kernel", &kernel, &w, &mut policy).expect("put");
        let mut m = crate::store::manifest::tests::sample(1);
        m.memory.blocks.clear();
        m.memory.bytes = 0;
        m.bases = vec![base];
        store.commit(&mut m, &w).expect("commit");
        assert_eq!(m.packs.len(), 1, "the base's blocks are in the checkpoint's pack");
        let report = store.gc("vm", 1).expect("gc");
        assert_eq!(report.packs_removed, 0, "a kept checkpoint's base stays");
        assert!(store.verify(Some("vm"), |_, _| {}).expect("verify").is_empty());
        // No checkpoint names it any more: it goes.
        assert_eq!(store.gc("vm", 0).expect("gc").packs_removed, 1);
    }
}
