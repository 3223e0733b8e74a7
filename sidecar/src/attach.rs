//! Attaching to a guest that something else started: who it is and what it has.

use std::path::{Path, PathBuf};

use qmp_client::{PeerIdentity, Qmp, QmpError};
use serde::Serialize;
use serde_json::{Value, json};

/// Errors of attaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The QMP socket could not be reached or is not QEMU.
    #[error("cannot attach to {path}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// A query failed.
    #[error("cannot read the guest's {what}")]
    Query {
        /// What was queried.
        what: &'static str,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// The QEMU process cannot be identified (needed to relaunch it at restore).
    #[error("cannot identify the QEMU process behind {path}")]
    Peer {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: QmpError,
    },
    /// Something in the guest's configuration blocks migration, hence checkpoints.
    #[error("the guest cannot be checkpointed: migration is blocked: {reasons}")]
    Blocked {
        /// QEMU's reasons, naming the devices.
        reasons: String,
    },
    /// A writable disk of a kind cutline cannot restore.
    #[error("disk {device} (node {node}, format {format}) is not supported: {why}")]
    UnsupportedDisk {
        /// Device.
        device: String,
        /// Node.
        node: String,
        /// Format.
        format: String,
        /// Why.
        why: String,
    },
}

/// A dirty bitmap on a block node.
#[derive(Debug, Clone, Serialize)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Stored in the qcow2 image.
    pub persistent: bool,
    /// Marked inconsistent by QEMU (after an unclean exit): unusable.
    pub inconsistent: bool,
    /// Granularity in bytes.
    pub granularity: u64,
}

/// A disk the guest writes.
#[derive(Debug, Clone, Serialize)]
pub struct DiskInfo {
    /// The guest device (qdev id/path, or the legacy drive id).
    pub device: String,
    /// The name QMP commands address the disk by, stable across a relaunch: the drive
    /// name of a legacy `-drive` (its node names are generated anew each start), else
    /// the format node's name.
    pub node: String,
    /// The format node's name in this QEMU (may be generated, like `#block123`).
    pub node_name: String,
    /// Format of that node (`qcow2`, `raw`).
    pub format: String,
    /// The image file.
    pub filename: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// qcow2 cluster size.
    pub cluster_size: Option<u64>,
    /// The backing image: (filename, format).
    pub backing: Option<(String, String)>,
    /// Dirty bitmaps on the node.
    pub bitmaps: Vec<Bitmap>,
}

/// Who the guest is: what a checkpoint records and a restore needs.
#[derive(Debug, Clone, Serialize)]
pub struct VmIdentity {
    /// The QMP socket cutline attached through.
    pub qmp_path: PathBuf,
    /// QEMU version.
    pub qemu_version: String,
    /// QEMU package string.
    pub qemu_package: String,
    /// Machine type (e.g. `pc-q35-10.0`).
    pub machine: String,
    /// Guest RAM in bytes.
    pub ram_bytes: u64,
    /// Run state (`running`, `paused`, ...).
    pub status: String,
    /// Writable disks.
    pub disks: Vec<DiskInfo>,
    /// Read-only block devices (CD-ROMs, read-only drives): not checkpointed.
    pub read_only: Vec<String>,
    /// Network backends from the command line: (id, type).
    pub netdevs: Vec<(String, String)>,
    /// The QEMU process.
    pub pid: i32,
    /// QEMU's argv.
    pub argv: Vec<String>,
    /// QEMU's working directory.
    pub cwd: Option<PathBuf>,
    /// `-pidfile`, if given.
    pub pidfile: Option<String>,
    /// Started with `-daemonize`.
    pub daemonize: bool,
}

/// Connects to the QMP socket at `path`.
pub async fn connect(path: &Path) -> Result<Qmp, AttachError> {
    Qmp::connect(path).await.map_err(|source| AttachError::Connect { path: path.to_owned(), source })
}

async fn query(qmp: &Qmp, what: &'static str, cmd: &str, args: Value) -> Result<Value, AttachError> {
    qmp.execute_raw(cmd, args).await.map_err(|source| AttachError::Query { what, source })
}

/// Reads the guest's identity; fails with a clear error when it cannot be checkpointed.
pub async fn identify(qmp: &Qmp, qmp_path: &Path) -> Result<VmIdentity, AttachError> {
    let peer: PeerIdentity = qmp.peer().map_err(|source| AttachError::Peer { path: qmp_path.to_owned(), source })?;
    let status = query(qmp, "run state", "query-status", json!({})).await?;
    let machine = query(qmp, "machine type", "qom-get", json!({"path": "/machine", "property": "type"})).await?;
    let machine = machine.as_str().unwrap_or("").trim_end_matches("-machine").to_owned();
    let mem = query(qmp, "memory size", "query-memory-size-summary", json!({})).await?;
    let ram_bytes = mem["base-memory"].as_u64().unwrap_or(0) + mem["plugged-memory"].as_u64().unwrap_or(0);
    let block = query(qmp, "block devices", "query-block", json!({})).await?;
    let migrate = query(qmp, "migration state", "query-migrate", json!({})).await?;
    if let Some(reasons) = migrate.get("blocked-reasons").and_then(Value::as_array).filter(|r| !r.is_empty()) {
        let reasons = reasons.iter().filter_map(Value::as_str).map(|r| name_devices(r, &block)).collect::<Vec<_>>();
        return Err(AttachError::Blocked { reasons: reasons.join("; ") });
    }
    let nodes = query(qmp, "block nodes", "query-named-block-nodes", json!({"flat": true})).await?;
    let (disks, read_only) = parse_disks(&block, &nodes)?;
    let pidfile = peer.option("pidfile").map(str::to_owned);
    let daemonize = peer.argv.iter().any(|a| a == "-daemonize" || a == "--daemonize");
    Ok(VmIdentity {
        qmp_path: qmp_path.to_owned(),
        qemu_version: qmp.greeting().version.to_string(),
        qemu_package: qmp.greeting().version.package.clone(),
        machine,
        ram_bytes,
        status: status["status"].as_str().unwrap_or("unknown").to_owned(),
        disks,
        read_only,
        netdevs: netdevs(&peer.argv),
        pid: peer.pid,
        argv: peer.argv.clone(),
        cwd: peer.cwd.clone(),
        pidfile,
        daemonize,
    })
}

/// Adds the guest device to a reason that names only a block node (`node '#block140'`).
fn name_devices(reason: &str, block: &Value) -> String {
    for dev in block.as_array().into_iter().flatten() {
        let node = dev.pointer("/inserted/node-name").and_then(Value::as_str).unwrap_or("");
        if !node.is_empty() && reason.contains(&format!("'{node}'")) {
            let device = dev["device"].as_str().filter(|s| !s.is_empty()).or(dev["qdev"].as_str()).unwrap_or("?");
            return format!("{reason} (node {node} is device {device})");
        }
    }
    reason.to_owned()
}

/// Writable disks and read-only devices from `query-block` and `query-named-block-nodes`.
pub fn parse_disks(block: &Value, nodes: &Value) -> Result<(Vec<DiskInfo>, Vec<String>), AttachError> {
    let mut disks = Vec::new();
    let mut read_only = Vec::new();
    for dev in block.as_array().into_iter().flatten() {
        let Some(ins) = dev.get("inserted") else { continue };
        let device = dev["qdev"]
            .as_str()
            .filter(|s| !s.is_empty())
            .or(dev["device"].as_str())
            .unwrap_or("?")
            .trim_start_matches("/machine/peripheral/")
            .trim_end_matches("/virtio-backend")
            .to_owned();
        if ins["ro"].as_bool().unwrap_or(false) {
            read_only.push(device);
            continue;
        }
        let node_name = ins["node-name"].as_str().unwrap_or("").to_owned();
        let node = match dev["device"].as_str() {
            Some(drive) if !drive.is_empty() => drive.to_owned(),
            _ => node_name.clone(),
        };
        let format = ins["drv"].as_str().unwrap_or("").to_owned();
        let image = &ins["image"];
        let filename = image["filename"].as_str().or(ins["file"].as_str()).unwrap_or("").to_owned();
        let backing = image
            .get("backing-image")
            .map(|b| (b["filename"].as_str().unwrap_or("").to_owned(), b["format"].as_str().unwrap_or("").to_owned()));
        let unsupported = |why: &str| AttachError::UnsupportedDisk {
            device: device.clone(),
            node: node.clone(),
            format: format.clone(),
            why: why.to_owned(),
        };
        if !matches!(format.as_str(), "qcow2" | "raw") {
            return Err(unsupported("cutline restores qcow2 and raw images"));
        }
        if filename.is_empty() || filename.contains(':') && !Path::new(&filename).exists() {
            return Err(unsupported("the image is not a local file"));
        }
        if let Some((bf, _)) = &backing
            && image["backing-image"].get("backing-image").is_some()
        {
            return Err(unsupported(&format!("backing chains deeper than one ({bf} has a backing file)")));
        }
        let bitmaps = nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["node-name"] == node_name.as_str())
            .and_then(|n| n["dirty-bitmaps"].as_array())
            .into_iter()
            .flatten()
            .map(|b| Bitmap {
                name: b["name"].as_str().unwrap_or("").to_owned(),
                persistent: b["persistent"].as_bool().unwrap_or(false),
                inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                granularity: b["granularity"].as_u64().unwrap_or(0),
            })
            .collect();
        disks.push(DiskInfo {
            device,
            node,
            node_name,
            format,
            filename,
            virtual_size: image["virtual-size"].as_u64().unwrap_or(0),
            cluster_size: image["cluster-size"].as_u64(),
            backing,
            bitmaps,
        });
    }
    Ok((disks, read_only))
}

/// `-netdev TYPE,id=ID` and `-nic TYPE,...` from argv.
fn netdevs(argv: &[String]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for w in argv.windows(2) {
        if w[0] == "-netdev" || w[0] == "-nic" {
            let mut parts = w[1].split(',');
            let kind = parts.next().unwrap_or("").to_owned();
            let id = parts.find_map(|p| p.strip_prefix("id=")).unwrap_or("").to_owned();
            out.push((id, kind));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_writable_disks_and_skips_cdroms() {
        let block = json!([
            {"device": "", "qdev": "/machine/peripheral/dev0/virtio-backend",
             "inserted": {"node-name": "disk0", "ro": false, "drv": "qcow2", "file": "/v/d.qcow2",
                "image": {"filename": "/v/d.qcow2", "virtual-size": 1048576, "cluster-size": 65536,
                    "backing-image": {"filename": "/v/base.qcow2", "format": "qcow2"}}}},
            {"device": "ide1-cd0", "qdev": "", "inserted": {"node-name": "#block1", "ro": true, "drv": "raw",
                "image": {"filename": "/v/cd.iso", "virtual-size": 1}}},
            {"device": "floppy0", "qdev": ""}
        ]);
        let nodes = json!([{"node-name": "disk0", "dirty-bitmaps": [
            {"name": "cutline-3", "persistent": true, "inconsistent": false, "granularity": 65536}]}]);
        let (disks, ro) = parse_disks(&block, &nodes).expect("parse");
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].device, "dev0");
        assert_eq!(disks[0].backing.as_ref().map(|b| b.0.as_str()), Some("/v/base.qcow2"));
        assert_eq!(disks[0].bitmaps[0].name, "cutline-3");
        assert_eq!(ro, vec!["ide1-cd0"]);
    }

    #[test]
    fn refuses_formats_it_cannot_restore() {
        let block = json!([{"device": "d", "qdev": "", "inserted": {"node-name": "n", "ro": false, "drv": "vmdk",
            "image": {"filename": "/v/d.vmdk", "virtual-size": 1}}}]);
        let err = parse_disks(&block, &json!([])).expect_err("vmdk");
        assert!(err.to_string().contains("vmdk") && err.to_string().contains("d"), "{err}");
    }

    #[test]
    fn lists_netdevs() {
        let argv: Vec<String> =
            ["q", "-netdev", "tap,id=n0,ifname=t0", "-nic", "user,model=e1000"].map(String::from).into();
        assert_eq!(netdevs(&argv), vec![("n0".into(), "tap".into()), ("".into(), "user".into())]);
    }
}
