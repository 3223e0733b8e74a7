//! The local backend: one file per object under a root directory. A write is durable
//! before it returns (temp file, fsync, rename or link, fsync of the directory), files
//! are 0600 and directories 0700. Work files live in `ROOT/.tmp` (no key starts a
//! component with `.`), on the same filesystem so renames are atomic.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Conditional, Meta, ObjectsError, private};

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct Local {
    root: PathBuf,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ObjectsError + use<> {
    let path = path.display().to_string();
    move |source| ObjectsError::Io { what, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), ObjectsError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("cannot sync", dir))
}

impl Local {
    /// Opens (creating if needed, 0700) the directory `root`.
    pub fn open(root: &Path) -> Result<Local, ObjectsError> {
        private::create_dir_all(&root.join(".tmp")).map_err(io("cannot create", root))?;
        Ok(Local { root: root.to_owned() })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn describe(&self) -> String {
        self.root.display().to_string()
    }

    pub(crate) fn conditional(&self) -> Conditional {
        Conditional::Honoured
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A durable temp file holding `data`; unique per write, even within one process.
    fn staged(&self, data: &[u8]) -> Result<PathBuf, ObjectsError> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(".tmp").join(format!("put-{}-{seq}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = private::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("cannot write", &tmp)(e)
        })?;
        Ok(tmp)
    }

    /// Creates the missing directories of `dir` (0700), each made durable in its parent.
    fn ensure_dir(&self, dir: &Path) -> Result<(), ObjectsError> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.ensure_dir(parent)?;
        }
        match private::create_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
            Err(e) => return Err(io("cannot create", dir)(e)),
        }
        match dir.parent() {
            Some(parent) => sync_dir(parent),
            None => Ok(()),
        }
    }

    fn parent_of<'a>(&self, path: &'a Path) -> &'a Path {
        path.parent().unwrap_or(Path::new("."))
    }

    pub(crate) fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        let path = self.path(key);
        let dir = self.parent_of(&path);
        self.ensure_dir(dir)?;
        let tmp = self.staged(data)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io("cannot rename into place", &path)(e)
        })?;
        sync_dir(dir)
    }

    pub(crate) fn put_new(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        let path = self.path(key);
        let dir = self.parent_of(&path);
        self.ensure_dir(dir)?;
        let tmp = self.staged(data)?;
        // link(2) refuses an existing name atomically: the create-only write.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(dir),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                Err(ObjectsError::Exists { key: key.to_owned(), store: self.describe() })
            }
            Err(e) => Err(io("cannot link into place", &path)(e)),
        }
    }

    fn not_found(&self, key: &str) -> ObjectsError {
        ObjectsError::NotFound { key: key.to_owned(), store: self.describe() }
    }

    pub(crate) fn get(&self, key: &str) -> Result<Vec<u8>, ObjectsError> {
        let path = self.path(key);
        std::fs::read(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => self.not_found(key),
            _ => io("cannot read", &path)(e),
        })
    }

    pub(crate) fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, ObjectsError> {
        let path = self.path(key);
        let f = File::open(&path).map_err(|e| match e.kind() {
            ErrorKind::NotFound => self.not_found(key),
            _ => io("cannot open", &path)(e),
        })?;
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| io("range too large in", &path)(ErrorKind::InvalidInput.into()))?;
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match f.read_at(&mut buf[got..], range.start + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(io("cannot read", &path)(e)),
            }
        }
        buf.truncate(got);
        Ok(buf)
    }

    pub(crate) fn head(&self, key: &str) -> Result<Option<Meta>, ObjectsError> {
        let path = self.path(key);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => Ok(Some(Meta {
                key: key.to_owned(),
                size: m.len(),
                modified: m.modified().map_err(io("cannot stat", &path))?,
            })),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("cannot stat", &path)(e)),
        }
    }

    pub(crate) fn list(&self, prefix: &str) -> Result<Vec<Meta>, ObjectsError> {
        // Walk from the deepest directory the prefix names whole.
        let dir_part = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let mut out = Vec::new();
        let mut stack = vec![(self.root.join(dir_part), dir_part.to_owned())];
        while let Some((dir, rel)) = stack.pop() {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(io("cannot list", &dir)(e)),
            };
            for e in entries {
                let e = e.map_err(io("cannot list", &dir))?;
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with('.') {
                    continue;
                }
                let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
                let kind = e.file_type().map_err(io("cannot stat", &e.path()))?;
                if kind.is_dir() {
                    if prefix.starts_with(&format!("{key}/")) || key.starts_with(prefix) {
                        stack.push((e.path(), key));
                    }
                } else if kind.is_file() && key.starts_with(prefix) {
                    let m = e.metadata().map_err(io("cannot stat", &e.path()))?;
                    let modified = m.modified().map_err(io("cannot stat", &e.path()))?;
                    out.push(Meta { key, size: m.len(), modified });
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn delete(&self, key: &str) -> Result<(), ObjectsError> {
        let path = self.path(key);
        match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(self.parent_of(&path)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("cannot remove", &path)(e)),
        }
    }
}
