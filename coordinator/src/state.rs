//! The coordinator's own durable state: its incarnation, the next epoch number and the
//! membership, in `DIR/state.json` (temp, fsync, rename, fsync of the directory), and the
//! exclusive lock on `DIR/lock` that makes it the one coordinator of that directory.
//!
//! With a shared store (the object store of the records), the state is also kept there,
//! as `coordinator/state.json`, so that a coordinator started on another host with the
//! same store carries on; each start claims its incarnation with a create-only object
//! `coordinator/incarnation/N`, and a coordinator that sees a higher claim than its own
//! has been superseded and stops.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use cutline_objects::{Objects, ObjectsError};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use sidecar::store::private;

/// The state format this code writes and reads.
pub const FORMAT: u32 = 1;

/// Where a member's VM and store are, as it registered them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberInfo {
    /// Its QMP socket.
    pub qmp: String,
    /// Its store.
    pub store: String,
    /// The host it runs on, when a host agent runs its sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Its RAM, as its sidecar last saw it (for placing it on another host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ram_bytes: Option<u64>,
}

/// What survives a restart of the coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Durable {
    /// Format version.
    pub format: u32,
    /// Raised at every start: messages of an earlier incarnation are told apart.
    pub incarnation: u64,
    /// The next epoch number: raised (durably) before an epoch's first message, so that
    /// no number is used twice.
    pub next_epoch: u64,
    /// The members: an epoch waits for every one; only an operator removes one.
    pub members: BTreeMap<String, MemberInfo>,
}

/// Why bytes are not a usable state file.
#[derive(Debug, thiserror::Error)]
pub enum StateParseError {
    /// Not JSON of the state's shape.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// Written by another format version.
    #[error("format {found} (this cutline reads {FORMAT})")]
    Format {
        /// The version found.
        found: u32,
    },
}

impl Durable {
    /// Parses and checks a state file's content.
    pub fn from_bytes(data: &[u8]) -> Result<Durable, StateParseError> {
        let s: Durable = serde_json::from_slice(data)?;
        if s.format != FORMAT {
            return Err(StateParseError::Format { found: s.format });
        }
        Ok(s)
    }
}

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The state could not be written.
    #[error("cannot write the coordinator state")]
    Write(#[source] Box<sidecar::store::StoreError>),
    /// Another coordinator holds the directory.
    #[error("another coordinator uses {dir} (its lock {lock} is held{holder})")]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// ", by pid N" when known.
        holder: String,
    },
    /// The shared store failed.
    #[error("coordinator state in {store}")]
    Shared {
        /// The store.
        store: String,
        /// Cause.
        #[source]
        source: ObjectsError,
    },
    /// Another coordinator claimed this incarnation on the shared store first.
    #[error(
        "another coordinator claimed incarnation {incarnation} on {store} at the same time: two coordinators on one store"
    )]
    Claimed {
        /// The incarnation.
        incarnation: u64,
        /// The store.
        store: String,
    },
    /// The state file is damaged or of another format.
    #[error("coordinator state {path} is unusable: {why}")]
    Bad {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// The state directory, locked for this process's lifetime.
#[derive(Debug)]
pub struct StateDir {
    dir: PathBuf,
    _lock: Flock<File>,
    shared: Option<Objects>,
}

const SHARED_STATE: &str = "coordinator/state.json";
const CLAIMS: &str = "coordinator/incarnation/";
/// Claims of earlier incarnations kept (older ones are deleted).
const CLAIMS_KEPT: u64 = 16;

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_owned();
    move |source| StateError::Io { what, path, source }
}

impl StateDir {
    /// Locks `dir` (created if needed) or says who holds it.
    pub fn lock(dir: &Path) -> Result<StateDir, StateError> {
        private::create_dir_all(dir).map_err(io("cannot create", dir))?;
        let path = dir.join("lock");
        let f = private::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io("cannot open", &path))?;
        match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
            Ok(mut l) => {
                let _ = l.set_len(0);
                let _ = write!(l, "{}", std::process::id());
                Ok(StateDir { dir: dir.to_owned(), _lock: l, shared: None })
            }
            Err(_) => {
                let holder = std::fs::read_to_string(&path).ok().filter(|s| !s.trim().is_empty());
                Err(StateError::Locked {
                    dir: dir.to_owned(),
                    lock: path,
                    holder: holder.map(|p| format!(", by pid {}", p.trim())).unwrap_or_default(),
                })
            }
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// Keeps the state in `objects` too (the records' store).
    pub fn with_shared(mut self, objects: Objects) -> StateDir {
        self.shared = Some(objects);
        self
    }

    fn shared_err(&self) -> impl FnOnce(ObjectsError) -> StateError + use<> {
        let store = self.shared.as_ref().map(Objects::describe).unwrap_or_default();
        move |source| StateError::Shared { store, source }
    }

    /// Reads the state: of the local file and the shared store's copy, the one of the
    /// higher incarnation (a fresh state when neither was written).
    pub fn load(&self) -> Result<Durable, StateError> {
        let local = self.load_local()?;
        let Some(o) = &self.shared else { return Ok(local) };
        match o.get(SHARED_STATE) {
            Ok(data) => {
                let shared = Durable::from_bytes(&data).map_err(|e| StateError::Bad {
                    path: PathBuf::from(format!("{}/{SHARED_STATE}", o.describe())),
                    why: e.to_string(),
                })?;
                Ok(if shared.incarnation >= local.incarnation { shared } else { local })
            }
            Err(ObjectsError::NotFound { .. }) => Ok(local),
            Err(e) => Err(self.shared_err()(e)),
        }
    }

    /// Claims `incarnation` on the shared store (create-only): refused when another
    /// coordinator claimed it. Older claims beyond the last few are deleted.
    pub fn claim(&self, incarnation: u64, who: &str) -> Result<(), StateError> {
        let Some(o) = &self.shared else { return Ok(()) };
        let key = format!("{CLAIMS}{incarnation:010}");
        match o.put_new(&key, who.as_bytes()) {
            Ok(cutline_objects::Created::New) => {}
            Ok(cutline_objects::Created::Same) | Err(ObjectsError::Exists { .. }) => {
                return Err(StateError::Claimed { incarnation, store: o.describe() });
            }
            Err(e) => return Err(self.shared_err()(e)),
        }
        // A server that ignores create-only writes lets two racing claims both "succeed":
        // the one read back names who won.
        if o.get(&key).map_err(self.shared_err())? != who.as_bytes() {
            return Err(StateError::Claimed { incarnation, store: o.describe() });
        }
        for m in o.list(CLAIMS).unwrap_or_default() {
            if parse_claim(&m.key).is_some_and(|i| i + CLAIMS_KEPT < incarnation) {
                let _ = o.delete(&m.key);
            }
        }
        Ok(())
    }

    /// The highest incarnation claimed on the shared store, if above `mine` (or `mine`
    /// itself, when its claim no longer names `who`): then another coordinator has taken
    /// over, and this one must stop.
    pub fn superseded(&self, mine: u64, who: &str) -> Result<Option<u64>, StateError> {
        let Some(o) = &self.shared else { return Ok(None) };
        let top = o.list(CLAIMS).map_err(self.shared_err())?.iter().filter_map(|m| parse_claim(&m.key)).max();
        if top.is_some_and(|t| t > mine) {
            return Ok(top);
        }
        match o.get(&format!("{CLAIMS}{mine:010}")) {
            Ok(data) if data != who.as_bytes() => Ok(Some(mine)),
            Ok(_) | Err(ObjectsError::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.shared_err()(e)),
        }
    }

    fn load_local(&self) -> Result<Durable, StateError> {
        let path = self.file();
        match std::fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(Durable { format: FORMAT, incarnation: 0, next_epoch: 1, members: BTreeMap::new() })
            }
            Err(e) => Err(StateError::Io { what: "cannot read", path, source: e }),
            Ok(data) => Durable::from_bytes(&data).map_err(|e| StateError::Bad { path, why: e.to_string() }),
        }
    }

    /// Writes `state` atomically and durably.
    pub fn save(&self, state: &Durable) -> Result<(), StateError> {
        let path = self.file();
        let data =
            serde_json::to_vec_pretty(state).map_err(|e| StateError::Bad { path: path.clone(), why: e.to_string() })?;
        sidecar::store::write_atomically(&path, &data).map_err(|e| StateError::Write(Box::new(e)))?;
        if let Some(o) = &self.shared {
            o.put(SHARED_STATE, &data).map_err(self.shared_err())?;
        }
        Ok(())
    }
}

/// `coordinator/incarnation/0000000007`: 7.
fn parse_claim(key: &str) -> Option<u64> {
    key.strip_prefix(CLAIMS)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_and_a_second_coordinator_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = StateDir::lock(d.path()).expect("lock");
        let mut st = s.load().expect("fresh");
        assert_eq!((st.incarnation, st.next_epoch), (0, 1));
        st.incarnation = 3;
        st.next_epoch = 12;
        st.members
            .insert("vm0".into(), MemberInfo { qmp: "/q".into(), store: "/s".into(), host: None, ram_bytes: None });
        s.save(&st).expect("save");
        let err = StateDir::lock(d.path()).expect_err("held");
        assert!(err.to_string().contains(&format!("by pid {}", std::process::id())), "{err}");
        drop(s);
        let s = StateDir::lock(d.path()).expect("free again");
        assert_eq!(s.load().expect("load"), st);
    }

    #[test]
    fn state_parses_from_bytes_and_refuses_other_formats() {
        let st = Durable { format: FORMAT, incarnation: 2, next_epoch: 5, members: BTreeMap::new() };
        let bytes = serde_json::to_vec_pretty(&st).expect("json");
        assert_eq!(Durable::from_bytes(&bytes).expect("parse"), st);
        let other = Durable { format: 7, ..st };
        let err = Durable::from_bytes(&serde_json::to_vec(&other).expect("json")).expect_err("format");
        assert_eq!(err.to_string(), "format 7 (this cutline reads 1)");
        assert!(matches!(Durable::from_bytes(b"[]"), Err(StateParseError::Json(_))));
    }

    #[test]
    fn a_coordinator_on_another_host_carries_on_from_the_shared_store_and_supersedes_the_first() {
        let shared = tempfile::tempdir().expect("tempdir");
        let objects = || Objects::Local(cutline_objects::Local::open(shared.path()).expect("objects"));
        let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
        let first = StateDir::lock(a.path()).expect("lock a").with_shared(objects());
        let mut st = first.load().expect("fresh");
        st.incarnation += 1;
        first.claim(st.incarnation, "host a").expect("claim 1");
        st.next_epoch = 9;
        st.members.insert(
            "vm0".into(),
            MemberInfo { qmp: "/q".into(), store: "/s".into(), host: Some("a".into()), ram_bytes: None },
        );
        first.save(&st).expect("save");
        // Another host, its own empty state directory, the same store.
        let second = StateDir::lock(b.path()).expect("lock b").with_shared(objects());
        let mut st2 = second.load().expect("load");
        assert_eq!(st2, st, "carries on from the shared copy");
        assert!(matches!(second.claim(st2.incarnation, "host b"), Err(StateError::Claimed { incarnation: 1, .. })));
        st2.incarnation += 1;
        second.claim(st2.incarnation, "host b").expect("claim 2");
        second.save(&st2).expect("save");
        assert_eq!(first.superseded(1, "host a").expect("list"), Some(2), "the first sees it was superseded");
        assert_eq!(second.superseded(2, "host b").expect("list"), None);
        assert_eq!(second.superseded(2, "host c").expect("list"), Some(2), "its claim names another");
    }

    #[test]
    fn a_damaged_state_is_refused_naming_the_file() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = StateDir::lock(d.path()).expect("lock");
        std::fs::write(d.path().join("state.json"), b"{\"format\":1,").expect("write");
        let err = s.load().expect_err("damaged");
        assert!(err.to_string().contains("state.json"), "{err}");
    }
}
