//! The store's signing key and the tags it puts on manifests: the signed index a
//! single-VM restore trusts (a cluster restore trusts the digest its commit record holds).
//!
//! `STORE/key` holds 32 random bytes, 0600, made once when the store is created. Beside
//! each manifest `vms/NAME/ID.json` lies `ID.hmac`: HMAC-SHA256 under that key of the
//! VM's name, the checkpoint id and the sha256 of the manifest's bytes. Whoever can write
//! the store's files but not read its key cannot make a manifest a restore will accept.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::blocks::hex;
use super::private;

/// Length of the key in bytes.
const KEY_LEN: usize = 32;

/// Errors of the store's key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key cannot be read or made.
    #[error("store key {path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The key file is readable or writable by others than its owner.
    #[error("store key {path} has mode {mode:o}: it must be 0600, readable by its owner alone")]
    Exposed {
        /// The key file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// The key object of a store on a server cannot be read or made.
    #[error("store key object `key` in {store}")]
    Object {
        /// The store.
        store: String,
        /// The cause.
        #[source]
        source: cutline_objects::ObjectsError,
    },
    /// The key file is not a key.
    #[error("store key {path} holds {len} bytes, not {KEY_LEN}")]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
}

/// The key of one store.
#[derive(Clone)]
pub struct Key([u8; KEY_LEN]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// Reads the key at `path`, making it first when there is none (two processes making
    /// it at once agree on one: the key is linked into place, never replaced).
    pub fn open_or_create(path: &Path) -> Result<Key, KeyError> {
        let err = |source| KeyError::Io { path: path.to_owned(), source };
        if !path.exists() {
            let mut bytes = [0u8; KEY_LEN];
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes)).map_err(err)?;
            // Unique per attempt: several stores may be opened at once in one process.
            static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let tmp = path.with_file_name(format!(".key.{}.{seq}", std::process::id()));
            let made = (|| {
                let mut f = private::create(&tmp)?;
                std::io::Write::write_all(&mut f, &bytes)?;
                f.sync_all()?;
                match std::fs::hard_link(&tmp, path) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                }
            })();
            let _ = std::fs::remove_file(&tmp);
            made.map_err(err)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
            }
        }
        Key::open(path)
    }

    /// Reads the key object `key` of a store on a server, making it first when there is
    /// none (a create-only write: concurrent makers agree on one). Whoever can read the
    /// bucket can read it: there, the bucket's access control is what guards manifests.
    pub fn open_or_create_object(objects: &cutline_objects::Objects) -> Result<Key, KeyError> {
        let err = |source| KeyError::Object { store: objects.describe(), source };
        let bytes = match objects.get("key") {
            Ok(b) => b,
            Err(cutline_objects::ObjectsError::NotFound { .. }) => {
                let mut fresh = [0u8; KEY_LEN];
                std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| f.read_exact(&mut fresh))
                    .map_err(|source| KeyError::Io { path: "/dev/urandom".into(), source })?;
                // Another maker may have won: either way, the object now holds the key.
                match objects.put_new("key", &fresh) {
                    Ok(_) | Err(cutline_objects::ObjectsError::Exists { .. }) => {}
                    Err(e) => return Err(err(e)),
                }
                objects.get("key").map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        let key: [u8; KEY_LEN] = bytes.as_slice().try_into().map_err(|_| KeyError::Malformed {
            path: format!("{}/key", objects.describe()).into(),
            len: bytes.len(),
        })?;
        Ok(Key(key))
    }

    /// Reads the key at `path`; refuses one others could read.
    pub fn open(path: &Path) -> Result<Key, KeyError> {
        let err = |source| KeyError::Io { path: path.to_owned(), source };
        let meta = std::fs::metadata(path).map_err(err)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: path.to_owned(), mode });
        }
        let bytes = std::fs::read(path).map_err(err)?;
        let key: [u8; KEY_LEN] =
            bytes.as_slice().try_into().map_err(|_| KeyError::Malformed { path: path.to_owned(), len: bytes.len() })?;
        Ok(Key(key))
    }

    fn mac(&self, name: &str, id: u64, digest: &str) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC: this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        for part in ["cutline-manifest-v1", name, &id.to_string(), digest] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The tag of checkpoint `id` of `name` whose manifest hashes to `digest`, as hex.
    pub fn tag(&self, name: &str, id: u64, digest: &str) -> String {
        hex(&self.mac(name, id, digest).finalize().into_bytes())
    }

    /// True when `tag` (hex) is the tag of (`name`, `id`, `digest`); compared in constant time.
    pub fn verify(&self, name: &str, id: u64, digest: &str, tag: &str) -> bool {
        let Some(bytes) = unhex(tag.trim()) else { return false };
        self.mac(name, id, digest).verify_slice(&bytes).is_ok()
    }
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_once_private_and_verifies_only_its_own_tags() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("key");
        let k = Key::open_or_create(&path).expect("create");
        let again = Key::open_or_create(&path).expect("reopen");
        assert_eq!(k.0, again.0, "the key is made once");
        assert_eq!(std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777, 0o600);

        let t = k.tag("vm", 3, "abc");
        assert!(k.verify("vm", 3, "abc", &t));
        assert!(!k.verify("vm", 3, "abd", &t), "another manifest");
        assert!(!k.verify("vm", 4, "abc", &t), "another checkpoint");
        assert!(!k.verify("vm2", 3, "abc", &t), "another VM");
        assert!(!k.verify("vm", 3, "abc", &t[..62]), "a truncated tag");
        assert!(!k.verify("vm", 3, "abc", "zz"), "not hex");
        let other = Key::open_or_create(&d.path().join("other")).expect("other key");
        assert!(!other.verify("vm", 3, "abc", &t), "another store's key");
    }

    #[test]
    fn opened_at_once_by_many_the_key_is_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("key");
        let keys: Vec<[u8; KEY_LEN]> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| Key::open_or_create(&path).map(|k| k.0))).collect();
            handles.into_iter().map(|h| h.join().expect("thread").expect("key")).collect()
        });
        assert!(keys.iter().all(|k| *k == keys[0]), "every opener reads the one key");
        let left: Vec<_> = std::fs::read_dir(d.path()).expect("ls").flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("key")], "no temp file left");
    }

    #[test]
    fn a_key_others_can_read_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("key");
        Key::open_or_create(&path).expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = Key::open(&path).expect_err("exposed");
        assert!(err.to_string().contains(&path.display().to_string()) && err.to_string().contains("640"), "{err}");
    }
}
