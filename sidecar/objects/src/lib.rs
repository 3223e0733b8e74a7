//! cutline's object storage: everything a store holds (packs, indexes, manifests, commit
//! records) is an object under a key, kept by one of two backends behind one small
//! synchronous interface:
//!
//! - [`Local`]: a directory on this host, the embedded default. A write counts once it
//!   is durable (temp file, fsync, rename, fsync of the directory); files are 0600 and
//!   directories 0700, created that way.
//! - [`S3`]: any S3-compatible server, through the `object_store` crate (path-style
//!   requests; plain HTTP only to a loopback endpoint).
//!
//! Create-only writes ([`Objects::put_new`]) are what commit points rest on. A server may
//! ignore `If-None-Match: *` (Garage 2.5 does, and overwrites): [`Objects::open`] probes
//! it and reports the answer in [`Objects::conditional`], so callers whose safety needs
//! it can name their keys so that two writers never share one (see the coordinator's
//! records). A create that finds the object already there reads it back and compares:
//! the same bytes are a retry that had landed, other bytes are [`ObjectsError::Exists`].

mod key;
mod local;
pub mod location;
pub mod private;
mod s3;

use std::ops::Range;
use std::time::SystemTime;

pub use key::check_key;
pub use local::Local;
pub use location::{Location, S3Config};
pub use s3::S3;

/// Errors of object storage. Each names the object (or the setting) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ObjectsError {
    /// No object under this key.
    #[error("no object {key} in {store}")]
    NotFound {
        /// The key.
        key: String,
        /// The store, for the message.
        store: String,
    },
    /// A create-only write found other bytes already under the key.
    #[error("object {key} in {store} already exists with other content")]
    Exists {
        /// The key.
        key: String,
        /// The store.
        store: String,
    },
    /// A key that cannot name an object.
    #[error("{key:?} is not an object key: {why}")]
    BadKey {
        /// The key.
        key: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The store's location or credentials are unusable.
    #[error("object store settings: {0}")]
    Config(String),
    /// A local file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server refused or failed a request.
    #[error("{what} {key} at {store}")]
    Remote {
        /// What was being done.
        what: &'static str,
        /// The key (or prefix).
        key: String,
        /// The store.
        store: String,
        /// The cause (boxed: object_store's errors are large).
        #[source]
        source: Box<object_store::Error>,
    },
    /// A read returned fewer bytes than the range asked.
    #[error("object {key}: asked bytes {start}..{end}, got {got}")]
    Short {
        /// The key.
        key: String,
        /// Range start.
        start: u64,
        /// Range end.
        end: u64,
        /// Bytes returned.
        got: u64,
    },
}

/// An object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When it was last written.
    pub modified: SystemTime,
}

/// What a create-only write found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The object was written.
    New,
    /// The same bytes were already there (a retry, or the same content put twice).
    Same,
}

/// Whether the backend refuses a create-only write over an existing object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conditional {
    /// The server refuses it atomically.
    Honoured,
    /// The server overwrites: create-only is emulated by a read first, racy between
    /// writers; keys must keep writers apart.
    Ignored,
}

impl std::fmt::Display for Conditional {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conditional::Honoured => "honoured",
            Conditional::Ignored => "ignored",
        })
    }
}

/// An opened object store.
#[derive(Debug, Clone)]
pub enum Objects {
    /// A directory on this host.
    Local(Local),
    /// An S3-compatible server.
    S3(S3),
}

macro_rules! each {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            Objects::Local($b) => $e,
            Objects::S3($b) => $e,
        }
    };
}

impl Objects {
    /// Opens the store at `location`; for a server, checks that the bucket answers and
    /// probes whether it honours create-only writes.
    pub fn open(location: &Location) -> Result<Objects, ObjectsError> {
        match location {
            Location::Local(root) => Local::open(root).map(Objects::Local),
            Location::S3(cfg) => S3::open(cfg).map(Objects::S3),
        }
    }

    /// The store, for messages: a path or `s3://bucket/prefix at endpoint`.
    pub fn describe(&self) -> String {
        each!(self, b => b.describe())
    }

    /// Whether create-only writes are refused by the backend itself.
    pub fn conditional(&self) -> Conditional {
        each!(self, b => b.conditional())
    }

    /// Writes `data` under `key`, replacing what is there; durable when it returns.
    pub fn put(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        check_key(key)?;
        each!(self, b => b.put(key, data))
    }

    /// Writes a large object: on a server as a multipart upload (parts in parallel), on a
    /// local directory as [`Objects::put`].
    pub fn put_multipart(&self, key: &str, data: &[u8]) -> Result<(), ObjectsError> {
        check_key(key)?;
        match self {
            Objects::Local(b) => b.put(key, data),
            Objects::S3(b) => b.put_multipart(key, data),
        }
    }

    /// Writes `data` under `key` only if nothing is there. An object already there with
    /// the same bytes is [`Created::Same`]; with other bytes, [`ObjectsError::Exists`].
    pub fn put_new(&self, key: &str, data: &[u8]) -> Result<Created, ObjectsError> {
        check_key(key)?;
        let found = |existing: Vec<u8>| {
            if existing == data {
                Ok(Created::Same)
            } else {
                Err(ObjectsError::Exists { key: key.to_owned(), store: self.describe() })
            }
        };
        if self.conditional() == Conditional::Ignored {
            match self.get(key) {
                Ok(existing) => return found(existing),
                Err(ObjectsError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        match each!(self, b => b.put_new(key, data)) {
            Ok(()) => Ok(Created::New),
            Err(ObjectsError::Exists { .. }) => found(self.get(key)?),
            Err(e) => Err(e),
        }
    }

    /// The whole object under `key`.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, ObjectsError> {
        check_key(key)?;
        each!(self, b => b.get(key))
    }

    /// Bytes `range` of the object under `key`: exactly that many, or an error.
    pub fn get_range(&self, key: &str, range: Range<u64>) -> Result<Vec<u8>, ObjectsError> {
        check_key(key)?;
        let data = each!(self, b => b.get_range(key, range.clone()))?;
        if data.len() as u64 != range.end.saturating_sub(range.start) {
            return Err(ObjectsError::Short {
                key: key.to_owned(),
                start: range.start,
                end: range.end,
                got: data.len() as u64,
            });
        }
        Ok(data)
    }

    /// The object's size and time, or `None` when there is none.
    pub fn head(&self, key: &str) -> Result<Option<Meta>, ObjectsError> {
        check_key(key)?;
        each!(self, b => b.head(key))
    }

    /// Every object whose key starts with `prefix` (a key prefix ending in `/`, or ""),
    /// sorted by key.
    pub fn list(&self, prefix: &str) -> Result<Vec<Meta>, ObjectsError> {
        if !prefix.is_empty() {
            check_key(prefix.trim_end_matches('/'))?;
        }
        let mut out = each!(self, b => b.list(prefix))?;
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    /// Removes the object under `key`; removing what is not there is not an error.
    pub fn delete(&self, key: &str) -> Result<(), ObjectsError> {
        check_key(key)?;
        each!(self, b => b.delete(key))
    }
}

#[cfg(test)]
mod tests;
