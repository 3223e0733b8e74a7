//! The QEMU backend: one `filter-buffer` per netdev on `queue=rx` (what the guest sends),
//! with a `filter-mirror` in front of it that copies the held frames to a chardev socket
//! the gate reads, because QEMU exposes no count of what a filter-buffer holds.
//!
//! For `rx`, QEMU walks a netdev's filters from the tail of its list to the head, so the
//! mirror is inserted *behind* the buffer and sees each frame first. Both start `off`;
//! a hold turns the mirror on, then the buffer; a release turns the buffer off (QEMU
//! flushes the queue in order) and then the mirror. Every object is named after its
//! netdev, so a restarted process finds them again; detach removes them.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qmp_client::{Qmp, QmpError};
use serde_json::{Value, json};

use crate::bounds::Bounds;
use crate::counter::Counter;
use crate::mirror::{MirrorError, MirrorReader};
use crate::netdev::{Refusal, netdevs_of_argv, refusal_of_qemu_error};

/// Prefix of the ids of every QEMU object the gate creates.
pub const ID_PREFIX: &str = "cutline-";

/// How long QEMU may take to accept the gate's connection to a mirror chardev.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the mirror reader may take to drain after a release.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings of the filter-buffer backend.
#[derive(Debug, Clone)]
pub struct FilterBufferConfig {
    /// The netdevs to gate; `None` finds every netdev a NIC of the guest uses.
    pub netdevs: Option<Vec<String>>,
    /// Where the mirror chardev sockets are created (QEMU listens, the gate connects).
    pub socket_dir: PathBuf,
}

impl FilterBufferConfig {
    /// Every netdev of the guest, sockets in `socket_dir`.
    pub fn new(socket_dir: impl Into<PathBuf>) -> FilterBufferConfig {
        FilterBufferConfig { netdevs: None, socket_dir: socket_dir.into() }
    }
}

/// Errors of the filter-buffer backend.
#[derive(Debug, thiserror::Error)]
pub enum FilterBufferError {
    /// Finding the guest's netdevs failed.
    #[error("cannot list the guest's NICs")]
    Discover(#[source] QmpError),
    /// The guest has no netdev to gate.
    #[error("the guest has no netdev (no NIC with a `netdev` property)")]
    NoNetdev,
    /// QEMU's netfilters cannot be put on this netdev; use the plug backend on its tap.
    #[error("netdev {netdev} cannot be gated by QEMU netfilters: {why}; use the plug qdisc backend on its tap")]
    Unsupported {
        /// The netdev.
        netdev: String,
        /// Why QEMU refuses it.
        why: Refusal,
    },
    /// An object with the gate's id exists but is not what the gate would have made.
    #[error("QEMU object {id} exists but is not the gate's ({what})")]
    Foreign {
        /// The object id.
        id: String,
        /// What differs.
        what: String,
    },
    /// The mirror socket path is too long for a unix socket.
    #[error("mirror socket path {0} is longer than a unix socket path may be")]
    SocketPath(PathBuf),
    /// Creating the socket directory failed.
    #[error("cannot create the mirror socket directory {path}")]
    SocketDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU refused a step.
    #[error("{step} for netdev {netdev}")]
    Qmp {
        /// What was being done.
        step: &'static str,
        /// The netdev.
        netdev: String,
        /// QEMU's answer.
        #[source]
        source: QmpError,
    },
    /// QEMU did not accept the connection to a mirror chardev.
    #[error("QEMU did not accept the mirror connection of netdev {netdev} within {ACCEPT_TIMEOUT:?}")]
    Accept {
        /// The netdev.
        netdev: String,
    },
    /// Another process is connected to the mirror: only one gate may drive a guest.
    #[error("the mirror of netdev {netdev} is in use by another process: one gate per guest at a time")]
    Busy {
        /// The netdev.
        netdev: String,
    },
    /// The mirror socket failed.
    #[error("mirror of netdev {netdev}")]
    Mirror {
        /// The netdev.
        netdev: String,
        /// The cause.
        #[source]
        source: MirrorError,
    },
}

/// The QEMU objects of one gated netdev.
#[derive(Debug)]
struct Netdev {
    netdev: String,
    buffer: String,
    mirror: String,
    chardev: String,
    socket: PathBuf,
    reader: Option<MirrorReader>,
}

/// What attach found: whether a previous process left the buffers holding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Found {
    /// Some buffer was on: the guest's packets were being held.
    pub(crate) holding: bool,
    /// Objects were found rather than created.
    pub(crate) adopted: bool,
}

/// The filter-buffer backend of one guest.
#[derive(Debug)]
pub(crate) struct FilterBuffer {
    qmp: Qmp,
    netdevs: Vec<Netdev>,
    counter: Arc<Counter>,
}

fn qerr<'a>(step: &'static str, netdev: &'a str) -> impl FnOnce(QmpError) -> FilterBufferError + 'a {
    move |source| FilterBufferError::Qmp { step, netdev: netdev.to_owned(), source }
}

/// Turns a netdev id into something safe for object ids and file names.
fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

impl FilterBuffer {
    /// Installs (or finds again) the filters on every netdev and connects to the mirrors.
    pub(crate) async fn attach(
        qmp: Qmp,
        config: &FilterBufferConfig,
        bounds: &Bounds,
        counter: Arc<Counter>,
    ) -> Result<(FilterBuffer, Found), FilterBufferError> {
        let names = match &config.netdevs {
            Some(n) => n.clone(),
            None => discover(&qmp).await?,
        };
        if names.is_empty() {
            return Err(FilterBufferError::NoNetdev);
        }
        // Refuse what QEMU would refuse before changing anything; QEMU's own refusal below
        // catches netdevs added after launch, which the command line does not show.
        if let Ok(peer) = qmp.peer() {
            for spec in netdevs_of_argv(&peer.argv) {
                if let (true, Some(why)) = (names.contains(&spec.id), spec.refusal()) {
                    return Err(FilterBufferError::Unsupported { netdev: spec.id, why });
                }
            }
        }
        std::fs::create_dir_all(&config.socket_dir)
            .map_err(|source| FilterBufferError::SocketDir { path: config.socket_dir.clone(), source })?;
        let pid = qmp.peer_pid().unwrap_or(0);
        let mut backend = FilterBuffer { qmp, netdevs: Vec::new(), counter };
        let mut found = Found { holding: false, adopted: false };
        let mut created: Vec<(bool, String)> = Vec::new();
        let result = backend.install_all(&names, config, bounds, pid, &mut found, &mut created).await;
        if let Err(e) = result {
            backend.rollback(&created).await;
            return Err(e);
        }
        Ok((backend, found))
    }

    async fn install_all(
        &mut self,
        names: &[String],
        config: &FilterBufferConfig,
        bounds: &Bounds,
        pid: i32,
        found: &mut Found,
        created: &mut Vec<(bool, String)>,
    ) -> Result<(), FilterBufferError> {
        let objects = self.objects().await.map_err(qerr("listing QEMU objects", ""))?;
        let chardevs = self.chardevs().await.map_err(qerr("listing chardevs", ""))?;
        for name in names {
            let tag = sanitize(name);
            let nd = Netdev {
                netdev: name.clone(),
                buffer: format!("{ID_PREFIX}fb-{tag}"),
                mirror: format!("{ID_PREFIX}fm-{tag}"),
                chardev: format!("{ID_PREFIX}fm-{tag}"),
                socket: config.socket_dir.join(format!("fm-{pid}-{tag}.sock")),
                reader: None,
            };
            // Buffer first: the mirror is positioned relative to it.
            if objects.contains(&nd.buffer) {
                let on = self.check_filter(&nd.buffer, "filter-buffer", name).await?;
                found.holding |= on;
                found.adopted = true;
            } else {
                let args = json!({"qom-type": "filter-buffer", "id": nd.buffer, "netdev": name, "queue": "rx",
                    "interval": bounds.qemu_interval_us(), "status": "off"});
                self.object_add(name, args).await?;
                created.push((false, nd.buffer.clone()));
            }
            let socket = match chardevs.iter().find(|(label, _)| *label == nd.chardev) {
                Some((_, filename)) => socket_of_filename(filename).unwrap_or_else(|| nd.socket.clone()),
                None => {
                    if nd.socket.as_os_str().len() >= 108 {
                        return Err(FilterBufferError::SocketPath(nd.socket.clone()));
                    }
                    let _ = std::fs::remove_file(&nd.socket);
                    let args = json!({"id": nd.chardev, "backend": {"type": "socket", "data": {
                        "addr": {"type": "unix", "data": {"path": nd.socket}}, "server": true, "wait": false}}});
                    self.qmp.execute_raw("chardev-add", args).await.map_err(qerr("adding the mirror chardev", name))?;
                    created.push((true, nd.chardev.clone()));
                    nd.socket.clone()
                }
            };
            if objects.contains(&nd.mirror) {
                self.check_filter(&nd.mirror, "filter-mirror", name).await?;
            } else {
                let args = json!({"qom-type": "filter-mirror", "id": nd.mirror, "netdev": name, "queue": "rx",
                    "outdev": nd.chardev, "position": format!("id={}", nd.buffer), "insert": "behind",
                    "status": "off"});
                self.object_add(name, args).await?;
                created.push((false, nd.mirror.clone()));
            }
            self.netdevs.push(Netdev { socket, ..nd });
        }
        for i in 0..self.netdevs.len() {
            self.connect_mirror(i).await?;
        }
        if found.holding {
            // Make the adopted hold whole: every buffer on, every mirror counting from now.
            let mut cmds = Vec::new();
            for nd in &self.netdevs {
                cmds.push(status_cmd(&nd.mirror, true));
                cmds.push(status_cmd(&nd.buffer, true));
            }
            self.run_all("holding the adopted hold", cmds).await?;
        }
        Ok(())
    }

    /// Removes what a failed attach created, newest first.
    async fn rollback(&mut self, created: &[(bool, String)]) {
        self.netdevs.clear();
        for (chardev, id) in created.iter().rev() {
            let r = if *chardev {
                self.qmp.execute_raw("chardev-remove", json!({"id": id})).await
            } else {
                self.qmp.execute_raw("object-del", json!({"id": id})).await
            };
            if let Err(e) = r {
                tracing::warn!(%id, %e, "cannot undo a step of a failed attach");
            }
        }
    }

    async fn object_add(&self, netdev: &str, args: Value) -> Result<(), FilterBufferError> {
        match self.qmp.execute_raw("object-add", args).await {
            Ok(_) => Ok(()),
            Err(QmpError::Qemu { desc, .. }) if refusal_of_qemu_error(&desc).is_some() => {
                let why = refusal_of_qemu_error(&desc).unwrap_or(Refusal::Vhost);
                Err(FilterBufferError::Unsupported { netdev: netdev.to_owned(), why })
            }
            Err(e) => Err(FilterBufferError::Qmp { step: "adding a netfilter", netdev: netdev.to_owned(), source: e }),
        }
    }

    /// Checks that an existing object is the gate's filter on `netdev`; returns whether it is on.
    async fn check_filter(&self, id: &str, kind: &str, netdev: &str) -> Result<bool, FilterBufferError> {
        let path = format!("/objects/{id}");
        let get = |prop: &'static str| {
            let qmp = self.qmp.clone();
            let path = path.clone();
            async move { qmp.execute_raw("qom-get", json!({"path": path, "property": prop})).await }
        };
        let foreign = |what: String| FilterBufferError::Foreign { id: id.to_owned(), what };
        let ty = get("type").await.map_err(qerr("reading an existing filter", netdev))?;
        if ty != kind {
            return Err(foreign(format!("type {ty}, expected {kind}")));
        }
        let nd = get("netdev").await.map_err(qerr("reading an existing filter", netdev))?;
        let queue = get("queue").await.map_err(qerr("reading an existing filter", netdev))?;
        if nd != netdev || queue != "rx" {
            return Err(foreign(format!("netdev {nd} queue {queue}, expected {netdev} rx")));
        }
        let status = get("status").await.map_err(qerr("reading an existing filter", netdev))?;
        Ok(status == "on")
    }

    async fn objects(&self) -> Result<HashSet<String>, QmpError> {
        let list = self.qmp.execute_raw("qom-list", json!({"path": "/objects"})).await?;
        Ok(names_of(&list).into_iter().map(|(n, _)| n).collect())
    }

    /// (label, filename) of every chardev.
    async fn chardevs(&self) -> Result<Vec<(String, String)>, QmpError> {
        let list = self.qmp.execute_raw("query-chardev", json!({})).await?;
        Ok(list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["label"].as_str()?.to_owned(), c["filename"].as_str()?.to_owned())))
            .collect())
    }

    /// Connects (again) to netdev `i`'s mirror chardev and waits until QEMU has accepted,
    /// so that no mirrored frame is written to a socket nobody holds.
    async fn connect_mirror(&mut self, i: usize) -> Result<(), FilterBufferError> {
        let (netdev, chardev, socket) = {
            let nd = &self.netdevs[i];
            (nd.netdev.clone(), nd.chardev.clone(), nd.socket.clone())
        };
        self.netdevs[i].reader = None;
        // QEMU serves one client per chardev. Wait until nobody is connected (a process
        // that died is noticed at once), so that "connected" below means us.
        let deadline = tokio::time::Instant::now() + ACCEPT_TIMEOUT;
        loop {
            let chardevs = self.chardevs().await.map_err(qerr("reading the mirror chardev", &netdev))?;
            if chardevs.iter().any(|(l, f)| *l == chardev && f.starts_with("disconnected:")) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FilterBufferError::Busy { netdev });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let reader = MirrorReader::connect(&socket, self.counter.clone())
            .await
            .map_err(|source| FilterBufferError::Mirror { netdev: netdev.clone(), source })?;
        let deadline = tokio::time::Instant::now() + ACCEPT_TIMEOUT;
        loop {
            let chardevs = self.chardevs().await.map_err(qerr("reading the mirror chardev", &netdev))?;
            let accepted = chardevs.iter().any(|(l, f)| *l == chardev && !f.starts_with("disconnected:"));
            if accepted {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FilterBufferError::Accept { netdev });
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.netdevs[i].reader = Some(reader);
        self.counter.set_lost(false);
        tracing::debug!(%netdev, socket = %socket.display(), "mirror connected");
        Ok(())
    }

    /// Reconnects every mirror whose socket closed (e.g. after a previous reader failed).
    async fn ensure_mirrors(&mut self) -> Result<(), FilterBufferError> {
        for i in 0..self.netdevs.len() {
            if !self.netdevs[i].reader.as_ref().is_some_and(MirrorReader::is_alive) {
                tracing::info!(netdev = %self.netdevs[i].netdev, "reconnecting the mirror");
                self.connect_mirror(i).await?;
            }
        }
        Ok(())
    }

    async fn run_all(&self, step: &'static str, cmds: Vec<(String, Value)>) -> Result<(), FilterBufferError> {
        let refs: Vec<(&str, Value)> = cmds.iter().map(|(c, a)| (c.as_str(), a.clone())).collect();
        let results = self.qmp.execute_raw_pipelined(&refs).await;
        for (r, (_, args)) in results.into_iter().zip(cmds) {
            r.map_err(|source| FilterBufferError::Qmp {
                step,
                netdev: args["path"].as_str().unwrap_or_default().to_owned(),
                source,
            })?;
        }
        Ok(())
    }

    /// Starts holding: every mirror on, then every buffer on, in one round trip.
    pub(crate) async fn hold(&mut self) -> Result<(), FilterBufferError> {
        self.ensure_mirrors().await?;
        self.counter.reset();
        self.counter.set_lost(false);
        let mut cmds: Vec<_> = self.netdevs.iter().map(|nd| status_cmd(&nd.mirror, true)).collect();
        cmds.extend(self.netdevs.iter().map(|nd| status_cmd(&nd.buffer, true)));
        self.run_all("turning the gate's filters on", cmds).await
    }

    /// Releases: every buffer off (QEMU flushes it in order), then every mirror off, then
    /// reads the mirrors to the end so that the counter holds the whole hold.
    pub(crate) async fn release(&mut self) -> Result<(), FilterBufferError> {
        let mut cmds: Vec<_> = self.netdevs.iter().map(|nd| status_cmd(&nd.buffer, false)).collect();
        cmds.extend(self.netdevs.iter().map(|nd| status_cmd(&nd.mirror, false)));
        self.run_all("turning the gate's filters off", cmds).await?;
        // The packets are on their way whatever happens now: a mirror that cannot be read
        // to the end costs the report its exact count, not the release.
        for nd in &self.netdevs {
            if let Some(r) = &nd.reader
                && let Err(e) = r.drain(DRAIN_TIMEOUT).await
            {
                tracing::warn!(netdev = %nd.netdev, %e, "mirror not drained: the hold's count may be short");
                self.counter.set_lost(true);
            }
        }
        Ok(())
    }

    /// Removes every object the gate installed. A buffer that is on is turned off first,
    /// so that QEMU flushes (never drops) what it holds.
    pub(crate) async fn detach(mut self) -> Result<(), FilterBufferError> {
        let mut first_error = None;
        let netdevs = std::mem::take(&mut self.netdevs);
        for mut nd in netdevs {
            nd.reader = None;
            let steps: [(&'static str, &str, Value); 4] = [
                ("releasing the buffer", "qom-set", status_cmd(&nd.buffer, false).1),
                ("removing the mirror", "object-del", json!({"id": nd.mirror})),
                ("removing the mirror chardev", "chardev-remove", json!({"id": nd.chardev})),
                ("removing the buffer", "object-del", json!({"id": nd.buffer})),
            ];
            for (step, cmd, args) in steps {
                if let Err(source) = self.qmp.execute_raw(cmd, args).await {
                    tracing::warn!(netdev = %nd.netdev, step, %source, "detach step failed");
                    first_error.get_or_insert(FilterBufferError::Qmp { step, netdev: nd.netdev.clone(), source });
                }
            }
            let _ = std::fs::remove_file(&nd.socket);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The gated netdevs.
    pub(crate) fn netdevs(&self) -> Vec<String> {
        self.netdevs.iter().map(|n| n.netdev.clone()).collect()
    }

    /// The QEMU object ids of the buffers, by netdev.
    pub(crate) fn buffer_ids(&self) -> Vec<String> {
        self.netdevs.iter().map(|n| n.buffer.clone()).collect()
    }
}

fn status_cmd(id: &str, on: bool) -> (String, Value) {
    let value = if on { "on" } else { "off" };
    ("qom-set".to_owned(), json!({"path": format!("/objects/{id}"), "property": "status", "value": value}))
}

/// (name, type) of a `qom-list` answer.
fn names_of(list: &Value) -> Vec<(String, String)> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["name"].as_str()?.to_owned(), p["type"].as_str()?.to_owned())))
        .collect()
}

/// Every netdev a NIC of the guest uses, from the QOM tree.
async fn discover(qmp: &Qmp) -> Result<Vec<String>, FilterBufferError> {
    let mut found = Vec::new();
    for parent in ["/machine/peripheral", "/machine/peripheral-anon"] {
        let list = qmp.execute_raw("qom-list", json!({"path": parent})).await.map_err(FilterBufferError::Discover)?;
        for (name, ty) in names_of(&list) {
            if !ty.starts_with("child<") {
                continue;
            }
            let path = format!("{parent}/{name}");
            // Devices without a `netdev` property are not NICs.
            if let Ok(Value::String(netdev)) =
                qmp.execute_raw("qom-get", json!({"path": path, "property": "netdev"})).await
                && !netdev.is_empty()
                && !found.contains(&netdev)
            {
                found.push(netdev);
            }
        }
    }
    Ok(found)
}

/// The socket path of a unix server chardev's `filename` (`[disconnected:]unix:PATH,server=on`).
fn socket_of_filename(filename: &str) -> Option<PathBuf> {
    let rest = filename.strip_prefix("disconnected:").unwrap_or(filename);
    let path = rest.strip_prefix("unix:")?;
    let path = path.split(",server").next().unwrap_or(path);
    Some(Path::new(path).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chardev_filenames_give_their_socket() {
        assert_eq!(
            socket_of_filename("disconnected:unix:/run/x/fm-1-n0.sock,server=on"),
            Some(PathBuf::from("/run/x/fm-1-n0.sock"))
        );
        assert_eq!(socket_of_filename("unix:/a.sock,server=on"), Some(PathBuf::from("/a.sock")));
        assert_eq!(socket_of_filename("pty:/dev/pts/3"), None);
    }

    #[test]
    fn ids_are_safe() {
        assert_eq!(sanitize("n0"), "n0");
        assert_eq!(sanitize("net/a b"), "net_a_b");
    }

    #[test]
    fn status_commands_address_objects() {
        let (cmd, args) = status_cmd("cutline-fb-n0", true);
        assert_eq!(cmd, "qom-set");
        assert_eq!(args, json!({"path": "/objects/cutline-fb-n0", "property": "status", "value": "on"}));
    }
}
