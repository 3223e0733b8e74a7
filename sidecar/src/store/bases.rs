//! Base images stored once by hash (seed 001): the read-only files a VM's command line
//! names (kernel, initrd, firmware, device tree, read-only pflash) and the backing images
//! of its disks. A checkpoint then holds everything a relaunch on another host reads.
//!
//! ```text
//! STORE/bases/SHA256.json   the file as 1 MiB blocks (zero blocks not stored)
//! ```
//!
//! A base is read and hashed in one pass, so the index describes exactly the bytes
//! stored even if the file changed meanwhile. Files already seen by this process with
//! the same device, inode, size and modification time are not read again.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::ZERO;
use super::{Hash, Policy, Store, StoreError, blocks, private, write_atomically};

/// Block size of base images: they are large and read-only, so big blocks (few files).
pub const BASE_BLOCK: usize = 1 << 20;
const FORMAT: u32 = 1;
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
}

/// A stored base: its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseIndex {
    /// Format version.
    pub format: u32,
    /// sha256 of the whole file.
    pub sha256: Hash,
    /// File size.
    pub size: u64,
    /// Blocks in order: (hash, length); [`ZERO`] for zeros.
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
    fn base_path(&self, sha256: &str) -> PathBuf {
        self.root().join("bases").join(format!("{sha256}.json"))
    }

    /// Stores the file at `path` once by its hash (a no-op when that content is stored);
    /// returns its hash, size and the bytes newly stored.
    pub fn put_base(&self, path: &Path, policy: &mut Policy) -> Result<(Hash, u64, u64), StoreError> {
        if let Ok(key) = seen_key(path)
            && let Some(h) = seen().lock().ok().and_then(|s| s.get(&key).cloned())
            && self.base_path(&h).exists()
        {
            return Ok((h, key.2, 0));
        }
        let key = seen_key(path).map_err(io(UNREADABLE, path))?;
        let mut f = File::open(path).map_err(io(UNREADABLE, path))?;
        let mut hasher = Sha256::new();
        let mut index = BaseIndex { format: FORMAT, sha256: String::new(), size: 0, blocks: Vec::new() };
        let mut stored = 0;
        let mut buf = vec![0u8; BASE_BLOCK];
        loop {
            let n = crate::memory::read_full(&mut f, &mut buf).map_err(io(UNREADABLE, path))?;
            if n == 0 {
                break;
            }
            let data = &buf[..n];
            hasher.update(data);
            index.size += n as u64;
            if data.iter().all(|b| *b == 0) {
                index.blocks.push((ZERO.to_owned(), n as u64));
                continue;
            }
            let put = self.blocks().put(data, policy)?;
            stored += put.stored;
            index.blocks.push((put.hash, put.len));
        }
        index.sha256 = blocks::hex(&hasher.finalize());
        if let Ok(mut s) = seen().lock() {
            s.insert(key, index.sha256.clone());
        }
        let target = self.base_path(&index.sha256);
        if !target.exists() {
            // The blocks are durable before the index that names them.
            self.sync()?;
            let dir = self.root().join("bases");
            private::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
            let bytes = serde_json::to_vec(&index).map_err(|e| io("cannot encode", &target)(e.into()))?;
            write_atomically(&target, &bytes)?;
        }
        Ok((index.sha256, index.size, stored))
    }

    /// The stored base with content hash `sha256`.
    pub fn base_index(&self, sha256: &str) -> Result<BaseIndex, StoreError> {
        let path = self.base_path(sha256);
        if !blocks::is_block_name(sha256) {
            return Err(io("not a base image hash:", &path)(std::io::ErrorKind::InvalidInput.into()));
        }
        let data = std::fs::read(&path).map_err(io("cannot read", &path))?;
        let index: BaseIndex = serde_json::from_slice(&data).map_err(|e| io("unusable base index", &path)(e.into()))?;
        if index.sha256 != sha256 || index.blocks.iter().map(|(_, n)| *n).sum::<u64>() != index.size {
            return Err(io("base index does not describe its file:", &path)(std::io::ErrorKind::InvalidData.into()));
        }
        Ok(index)
    }

    /// Writes the stored base `sha256` to `dest` (temp file beside it, checked against
    /// its hash, then renamed into place): a relaunch on a host that lacks it.
    pub fn restore_base(&self, sha256: &str, dest: &Path) -> Result<(), StoreError> {
        let index = self.base_index(sha256)?;
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.cutline-tmp"));
        let result = (|| {
            let f = private::create(&tmp).map_err(io("cannot create", &tmp))?;
            let mut hasher = Sha256::new();
            let mut off = 0u64;
            for (hash, len) in &index.blocks {
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
            if blocks::hex(&hasher.finalize()) != sha256 {
                return Err(io("rebuilt base does not match its hash:", &tmp)(std::io::ErrorKind::InvalidData.into()));
            }
            std::fs::rename(&tmp, dest).map_err(io("cannot rename into place", dest))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Content hashes of every stored base.
    pub fn base_hashes(&self) -> Vec<Hash> {
        let mut out: Vec<Hash> = std::fs::read_dir(self.root().join("bases"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_owned))
            .filter(|h| blocks::is_block_name(h))
            .collect();
        out.sort();
        out
    }

    /// Removes the stored base `sha256` (its blocks go with the gc that calls this).
    pub(super) fn remove_base(&self, sha256: &str) -> Result<(), StoreError> {
        let path = self.base_path(sha256);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", &path)(e)),
            _ => Ok(()),
        }
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
        let (sha, size, stored) = store.put_base(&file, &mut policy).expect("put");
        assert_eq!(sha, blocks::sha256_hex(&content));
        assert_eq!(size, content.len() as u64);
        assert!(stored > 0);
        let (again, _, stored_again) = store.put_base(&file, &mut policy).expect("again");
        assert_eq!((again.as_str(), stored_again), (sha.as_str(), 0), "stored once");
        let index = store.base_index(&sha).expect("index");
        assert_eq!(index.blocks[1].0, ZERO, "zero blocks are not stored");
        assert_eq!(store.base_hashes(), vec![sha.clone()]);
        let dest = d.path().join("elsewhere");
        store.restore_base(&sha, &dest).expect("restore");
        assert_eq!(std::fs::read(&dest).expect("read"), content);
        assert!(store.restore_base("ab", &dest).is_err(), "not a hash");
        // A damaged block is found by the hash check, and nothing is left behind.
        let victim = &index.blocks[0].0;
        std::fs::write(store.blocks().path(victim), b"\x00garbage").expect("damage");
        let dest2 = d.path().join("second");
        assert!(store.restore_base(&sha, &dest2).is_err());
        assert!(!dest2.exists() && !d.path().join(".second.cutline-tmp").exists());
    }

    #[test]
    fn gc_keeps_the_bases_kept_checkpoints_name_and_drops_the_rest() {
        let d = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&d.path().join("store")).expect("store");
        let mut policy = Policy::new(Default::default());
        let (kernel, other) = (d.path().join("kernel"), d.path().join("other"));
        std::fs::write(&kernel, vec![3u8; 3 << 20]).expect("write");
        std::fs::write(&other, vec![4u8; 1 << 20]).expect("write");
        let (sha, size, _) = store.put_base(&kernel, &mut policy).expect("put");
        let (sha_other, _, _) = store.put_base(&other, &mut policy).expect("put");
        let mut m = crate::store::manifest::tests::sample(1);
        m.memory.blocks.clear();
        m.memory.bytes = 0;
        m.bases = vec![Base { role: "kernel".into(), path: kernel.display().to_string(), sha256: sha.clone(), size }];
        store.commit(&mut m).expect("commit");
        let report = store.gc("vm", 1).expect("gc");
        assert_eq!(report.blocks_removed, 1, "the unreferenced base's block");
        assert_eq!(store.base_hashes(), vec![sha.clone()], "{sha_other} went");
        assert!(store.verify(Some("vm"), |_, _| {}).expect("verify").is_empty());
        store.restore_base(&sha, &d.path().join("again")).expect("the kept base rebuilds");
        // Its blocks are checked by verify.
        let block = &store.base_index(&sha).expect("index").blocks[0].0;
        std::fs::write(store.blocks().path(block), b"\x00bad").expect("damage");
        let damage = store.verify(Some("vm"), |_, _| {}).expect("verify");
        assert_eq!(damage.len(), 1, "{damage:?}");
        // No checkpoint names it any more: it goes.
        store.gc("vm", 0).expect("gc");
        assert!(store.base_hashes().is_empty());
    }
}
