//! Disk content as chunks: reading what a backup job copied into its target image,
//! folding it into the previous checkpoint's chunk map, and writing an image back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::nbd;
use crate::store::manifest::{Disk, ZERO};
use crate::store::{BlockError, Blocks, Hash, Policy, Writer};

/// Chunk size of disk maps: the dirty-bitmap granularity cutline sets, and the
/// cluster size of its backup targets, so copied ranges fall on chunk boundaries.
pub const CHUNK: u64 = 64 << 10;

/// Errors of disk handling.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// qemu-img or qemu-io failed.
    #[error("{tool} failed on {path}: {stderr}")]
    Tool {
        /// The tool.
        tool: &'static str,
        /// The image.
        path: PathBuf,
        /// Its error output.
        stderr: String,
    },
    /// A file operation failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A copied range does not fall on chunk boundaries where it would need data the
    /// checkpoint does not have.
    #[error("copied range at {offset} of disk {node} is not aligned to {CHUNK} bytes")]
    Unaligned {
        /// The node.
        node: String,
        /// The offset.
        offset: u64,
    },
    /// A block operation failed.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The manifest's description of the disk does not hold together.
    #[error("disk {node} of the manifest: {why}")]
    Manifest {
        /// The node.
        node: String,
        /// What is wrong.
        why: String,
    },
    /// Writing the image over NBD failed.
    #[error("cannot write image {path}")]
    Nbd {
        /// The image.
        path: PathBuf,
        /// The cause.
        #[source]
        source: crate::nbd::NbdError,
    },
}

fn run(tool: &'static str, path: &Path, cmd: &mut Command) -> Result<Vec<u8>, DiskError> {
    let out = cmd.output().map_err(|source| DiskError::Io { what: "cannot run", path: tool.into(), source })?;
    if !out.status.success() {
        return Err(DiskError::Tool {
            tool,
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// Creates an empty qcow2 backup target of `size` with cluster size [`CHUNK`], 0600 (the
/// file is made first; qemu-img keeps the mode of the file it truncates).
pub fn create_target(path: &Path, size: u64) -> Result<(), DiskError> {
    crate::store::private::create(path).map_err(|source| DiskError::Io {
        what: "cannot create",
        path: path.to_owned(),
        source,
    })?;
    run(
        "qemu-img",
        path,
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", &format!("cluster_size={CHUNK}")])
            .arg(path)
            .arg(size.to_string()),
    )
    .map(|_| ())
}

#[derive(Debug, Deserialize)]
struct Extent {
    start: u64,
    length: u64,
    #[serde(default)]
    present: Option<bool>,
    #[serde(default)]
    depth: u64,
    zero: bool,
    data: bool,
    #[serde(default)]
    offset: Option<u64>,
}

/// One copied range of a target: zeros, or data at a host offset of the target file.
#[derive(Debug, Clone, PartialEq)]
pub struct Copied {
    /// Guest offset.
    pub start: u64,
    /// Length.
    pub length: u64,
    /// Host offset of the data in the target file; `None` for zeros.
    pub host: Option<u64>,
}

/// The ranges a backup job wrote into `target` (a qcow2 without backing).
pub fn copied_ranges(target: &Path) -> Result<Vec<Copied>, DiskError> {
    let out =
        run("qemu-img", target, Command::new("qemu-img").args(["map", "--output=json", "-f", "qcow2"]).arg(target))?;
    parse_map(&out).map_err(|e| DiskError::Tool {
        tool: "qemu-img map",
        path: target.to_owned(),
        stderr: e.to_string(),
    })
}

/// The copied ranges in `qemu-img map --output=json` of a backup target.
pub fn parse_map(json: &[u8]) -> Result<Vec<Copied>, serde_json::Error> {
    let extents: Vec<Extent> = serde_json::from_slice(json)?;
    Ok(extents
        .into_iter()
        .filter(|e| e.present.unwrap_or(e.data || e.depth == 0 && !e.zero))
        .map(|e| Copied { start: e.start, length: e.length, host: if e.data { e.offset } else { None } })
        .collect())
}

/// The result of folding a backup target over a chunk map.
#[derive(Debug)]
pub struct Folded {
    /// The new chunk map.
    pub map: BTreeMap<u64, Hash>,
    /// Bytes newly stored.
    pub stored: u64,
    /// Bytes QEMU copied.
    pub copied: u64,
}

/// Folds the ranges copied into `target` over the chunk map `base`, storing new chunks.
pub fn fold(
    node: &str,
    target: &Path,
    base: &BTreeMap<u64, Hash>,
    virtual_size: u64,
    writer: &Writer,
    policy: &mut Policy,
) -> Result<Folded, DiskError> {
    let ranges = copied_ranges(target)?;
    let file =
        File::open(target).map_err(|source| DiskError::Io { what: "cannot open", path: target.to_owned(), source })?;
    fold_ranges(node, &ranges, &file, target, base, virtual_size, writer, policy)
}

/// [`fold`] of ranges already read: the data of `ranges` is in `file` (the target at `target`).
#[allow(clippy::too_many_arguments)]
pub fn fold_ranges(
    node: &str,
    ranges: &[Copied],
    file: &File,
    target: &Path,
    base: &BTreeMap<u64, Hash>,
    virtual_size: u64,
    writer: &Writer,
    policy: &mut Policy,
) -> Result<Folded, DiskError> {
    let mut map = base.clone();
    let (mut stored, mut copied) = (0u64, 0u64);
    let mut buf = vec![0u8; CHUNK as usize];
    for r in ranges.iter().cloned() {
        copied = copied.saturating_add(r.length);
        let end = r.start.saturating_add(r.length).min(virtual_size);
        let mut off = r.start;
        while off < end {
            let idx = off / CHUNK;
            let chunk_start = idx * CHUNK;
            let chunk_len = CHUNK.min(virtual_size - chunk_start);
            let chunk_end = chunk_start + chunk_len;
            if off != chunk_start || end < chunk_end {
                return Err(DiskError::Unaligned { node: node.to_owned(), offset: off });
            }
            let data = &mut buf[..chunk_len as usize];
            match r.host {
                None => {
                    map.insert(idx, ZERO.to_owned());
                }
                Some(host) => {
                    let at = host
                        .checked_add(off - r.start)
                        .ok_or(DiskError::Unaligned { node: node.to_owned(), offset: off })?;
                    file.read_exact_at(data, at).map_err(|source| DiskError::Io {
                        what: "cannot read backup target",
                        path: target.to_owned(),
                        source,
                    })?;
                    if data.iter().all(|b| *b == 0) {
                        map.insert(idx, ZERO.to_owned());
                    } else {
                        let put = writer.put(data, policy)?;
                        stored += put.stored;
                        map.insert(idx, put.hash);
                    }
                }
            }
            off = chunk_end;
        }
    }
    Ok(Folded { map, stored, copied })
}

/// Where each chunk of a checkpointed disk goes: its offset and length in the image, once
/// the manifest's figures are checked ([`Disk::check`]: chunk size, ascending indices,
/// inside the virtual size, no overflow), even when the manifest was read unchecked.
pub fn chunk_ranges(disk: &Disk) -> Result<Vec<(u64, u64, &str)>, DiskError> {
    disk.check().map_err(|e| DiskError::Manifest { node: disk.node.clone(), why: e.to_string() })?;
    Ok(disk
        .chunks
        .iter()
        .filter_map(|(idx, hash)| disk.chunk_extent(*idx).map(|(start, len)| (start, len, hash.as_str())))
        .collect())
}

/// Writes the image of checkpointed `disk` to `path`: a new image of the same format
/// (over the same backing image, if any) holding exactly the checkpoint's chunks. The
/// chunks go through qemu-nbd and the format driver, so neither the disk's size nor how
/// fragmented it is meets an argv or staging limit.
pub fn write_image(disk: &Disk, blocks: &Blocks, path: &Path) -> Result<(), DiskError> {
    let ranges = chunk_ranges(disk)?;
    let io = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| DiskError::Io { what, path: p, source }
    };
    let _ = std::fs::remove_file(path);
    // Made 0600 here; qemu-img keeps the mode of the file it truncates.
    crate::store::private::create(path).map_err(io("cannot create", path))?;
    let mut create = Command::new("qemu-img");
    create.args(["create", "-q", "-f", &disk.format]);
    if disk.format == "qcow2" {
        let cluster = disk.cluster_size.unwrap_or(CHUNK);
        create.args(["-o", &format!("cluster_size={cluster}")]);
    }
    if let Some(b) = &disk.backing {
        create.args(["-b", &b.filename, "-F", &b.format]);
    }
    create.arg(path).arg(disk.virtual_size.to_string());
    run("qemu-img", path, &mut create)?;
    if !ranges.is_empty() {
        let nbd = |source| DiskError::Nbd { path: path.to_owned(), source };
        let mut server = nbd::Server::start(path, &disk.format).map_err(nbd)?;
        let mut client = server.connect().map_err(nbd)?;
        let mut pending = Pending::default();
        for (start, len, hash) in ranges {
            if hash == ZERO {
                pending.zeroes(&mut client, start, len).map_err(nbd)?;
                continue;
            }
            let data = blocks.get(hash)?;
            if data.len() as u64 != len {
                return Err(DiskError::Manifest {
                    node: disk.node.clone(),
                    why: format!("chunk at {start} should hold {len} bytes, its block {hash} holds {}", data.len()),
                });
            }
            pending.data(&mut client, start, &data).map_err(nbd)?;
        }
        pending.flush(&mut client).map_err(nbd)?;
        client.flush_and_close().map_err(nbd)?;
        server.finish().map_err(nbd)?;
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(io("cannot sync", path))
}

/// Gives the rebuilt image `new` the owner, group and mode of the image `original` it
/// will replace, and its SELinux label where it has one: a restore run as root leaves the
/// user's image theirs. Nothing to take when `original` is gone.
pub fn take_identity(original: &Path, new: &Path) -> Result<(), DiskError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = std::fs::metadata(original) else { return Ok(()) };
    let err = |what: &'static str| {
        let p = new.to_owned();
        move |source| DiskError::Io { what, path: p, source }
    };
    if !std::fs::metadata(new).is_ok_and(|m| m.uid() == meta.uid() && m.gid() == meta.gid()) {
        std::os::unix::fs::chown(new, Some(meta.uid()), Some(meta.gid())).map_err(err("cannot set the owner of"))?;
    }
    std::fs::set_permissions(new, std::fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(err("cannot set the mode of"))?;
    const LABEL: &str = "security.selinux";
    if let Ok(Some(label)) = xattr::get(original, LABEL) {
        xattr::set(new, LABEL, &label).map_err(err("cannot set the SELinux label of"))?;
    }
    Ok(())
}

/// Adjacent chunks of one kind, sent as one request.
#[derive(Default)]
struct Pending {
    start: u64,
    data: Vec<u8>,
    zero_len: u64,
}

impl Pending {
    fn end(&self) -> u64 {
        self.start + self.data.len() as u64 + self.zero_len
    }

    fn data(&mut self, c: &mut nbd::Client, start: u64, bytes: &[u8]) -> Result<(), nbd::NbdError> {
        let joins = self.zero_len == 0 && self.end() == start;
        if !joins || self.data.len() + bytes.len() > nbd::MAX_REQUEST as usize {
            self.flush(c)?;
            self.start = start;
        }
        self.data.extend_from_slice(bytes);
        Ok(())
    }

    fn zeroes(&mut self, c: &mut nbd::Client, start: u64, len: u64) -> Result<(), nbd::NbdError> {
        let joins = self.data.is_empty() && self.end() == start;
        if !joins || self.zero_len + len > u64::from(nbd::MAX_REQUEST) {
            self.flush(c)?;
            self.start = start;
        }
        self.zero_len += len;
        Ok(())
    }

    fn flush(&mut self, c: &mut nbd::Client) -> Result<(), nbd::NbdError> {
        if !self.data.is_empty() {
            c.write(self.start, &self.data)?;
        } else if self.zero_len > 0 {
            c.write_zeroes(self.start, self.zero_len)?;
        }
        self.data.clear();
        self.zero_len = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Estimates;

    fn disk(chunks: Vec<(u64, Hash)>, virtual_size: u64) -> Disk {
        Disk {
            node: "n".into(),
            device: "d".into(),
            filename: "x".into(),
            format: "qcow2".into(),
            virtual_size,
            cluster_size: Some(CHUNK),
            chunk_size: CHUNK,
            backing: None,
            chunks,
            full: true,
            full_reason: None,
            bytes_stored: 0,
            bytes_copied: 0,
        }
    }

    #[test]
    fn chunk_figures_from_a_manifest_are_checked() {
        let z = || ZERO.to_owned();
        let ok = disk(vec![(0, z()), (2, z())], 2 * CHUNK + 100);
        assert_eq!(chunk_ranges(&ok).expect("ranges"), vec![(0, CHUNK, ZERO), (2 * CHUNK, 100, ZERO)]);
        for (bad, why) in [
            (disk(vec![(3, z())], 3 * CHUNK), "lies past"),
            (disk(vec![(u64::MAX / 2, z())], u64::MAX), "lies past"),
            (disk(vec![(2, z()), (1, z())], 4 * CHUNK), "out of order"),
            (disk(vec![(1, z()), (1, z())], 4 * CHUNK), "out of order"),
            (Disk { chunk_size: 4096, ..disk(vec![], CHUNK) }, "chunk size"),
        ] {
            let err = chunk_ranges(&bad).expect_err(why);
            assert!(err.to_string().contains(why), "{err}");
        }
    }

    /// A 4 GiB disk in 40,960 runs: every even chunk zeroed (they must read as zeros over
    /// the backing image, not through it), every eighth a data chunk, the rest absent. The
    /// earlier code passed one qemu-io `-c` per run: about 2.4 MB of arguments, over this
    /// machine's 2 MiB ARG_MAX (E2BIG).
    #[test]
    fn a_4_gib_disk_in_many_runs_is_written_back() {
        let (d, blocks) = crate::store::blocks::tests::temp_blocks();
        let writer = Writer::new(blocks.clone(), std::time::Duration::ZERO);
        let mut policy = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
        let size: u64 = 4 << 30;
        let base = d.path().join("base.raw");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "raw"])
            .arg(&base)
            .arg(size.to_string())
            .output()
            .expect("qemu-img");
        assert!(out.status.success());
        // The backing image holds 0xee where the checkpoint says zeros.
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -q -P 0xee 0 131072"])
            .arg(&base)
            .output()
            .expect("qemu-io");
        assert!(out.status.success());
        let mut chunks = Vec::new();
        let mut data_at = Vec::new();
        for idx in 0..size / CHUNK {
            if idx % 2 == 0 {
                chunks.push((idx, ZERO.to_owned()));
            } else if idx % 8 == 1 {
                let chunk = vec![(idx % 251) as u8; CHUNK as usize];
                chunks.push((idx, writer.put(&chunk, &mut policy).expect("put").hash));
                data_at.push(idx);
            }
        }
        assert!(chunks.len() == 40_960 && data_at.len() == 8192);
        writer.finish().expect("stored");
        writer.publish();
        let disk = Disk {
            backing: Some(crate::store::manifest::Backing {
                filename: base.display().to_string(),
                format: "raw".into(),
                sha256: crate::store::blocks::sha256_hex(b"not checked here"),
                size,
            }),
            ..disk(chunks, size)
        };
        let img = d.path().join("big.qcow2");
        write_image(&disk, &blocks, &img).expect("write image");
        let last = data_at[data_at.len() - 1];
        let pattern_last = last % 251;
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -q -P 0 0 65536"])
            .args(["-c", &format!("read -q -P 1 {CHUNK} 65536")])
            .args(["-c", &format!("read -q -P {pattern_last} {} 65536", last * CHUNK)])
            .args(["-c", &format!("read -q -P 0 {} 65536", (last + 1) * CHUNK)])
            .arg(&img)
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("fail"), "{text}");
    }

    #[test]
    fn a_rebuilt_image_takes_the_identity_of_the_one_it_replaces() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().expect("tempdir");
        let (original, new) = (d.path().join("orig"), d.path().join("new"));
        std::fs::write(&original, b"o").expect("write");
        std::fs::set_permissions(&original, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        std::os::unix::fs::chown(&original, Some(1234), Some(4321)).expect("chown (tests run as root)");
        crate::store::private::create(&new).expect("create");
        take_identity(&original, &new).expect("identity");
        let m = std::fs::metadata(&new).expect("stat");
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1234, 4321, 0o640));
    }

    #[test]
    fn a_map_parses_and_ranges_that_overflow_are_refused() {
        let map = br#"[{"start": 0, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
            {"start": 65536, "length": 65536, "depth": 0, "present": true, "zero": true, "data": false},
            {"start": 131072, "length": 917504, "depth": 0, "present": false, "zero": true, "data": false}]"#;
        let ranges = parse_map(map).expect("parse");
        assert_eq!(
            ranges,
            [
                Copied { start: 0, length: CHUNK, host: Some(327680) },
                Copied { start: CHUNK, length: CHUNK, host: None }
            ]
        );
        assert!(parse_map(b"[{\"start\": -1}]").is_err());
        let (d, blocks) = crate::store::blocks::tests::temp_blocks();
        let writer = Writer::new(blocks, std::time::Duration::ZERO);
        let target = d.path().join("t");
        std::fs::write(&target, vec![1u8; 2 * CHUNK as usize]).expect("write");
        let file = File::open(&target).expect("open");
        let mut policy = Policy::new(Estimates::default());
        let fold = |ranges: &[Copied], policy: &mut Policy| {
            fold_ranges("n", ranges, &file, &target, &BTreeMap::new(), 1 << 20, &writer, policy)
        };
        // start + length and host + offset used to overflow.
        let huge = [Copied { start: CHUNK, length: u64::MAX, host: Some(u64::MAX - 10) }];
        assert!(fold(&huge, &mut policy).is_err(), "an error, not an overflow");
        let zeros = [Copied { start: 0, length: u64::MAX, host: None }];
        let folded = fold(&zeros, &mut policy).expect("zeros to the end of the disk");
        assert_eq!((folded.map.len(), folded.copied), (16, u64::MAX));
        let data = [Copied { start: CHUNK, length: CHUNK, host: Some(0) }];
        assert_eq!(fold(&data, &mut policy).expect("data").map.len(), 1);
    }

    #[test]
    fn copied_ranges_fold_into_chunks_and_write_back() {
        let (d, blocks) = crate::store::blocks::tests::temp_blocks();
        let writer = Writer::new(blocks.clone(), std::time::Duration::ZERO);
        let mut policy = Policy::new(Estimates::default());
        let target = d.path().join("t.qcow2");
        create_target(&target, 1 << 20).expect("create");
        // Simulate a backup job: write chunk 2 with data, chunk 5 with zeros.
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -q -P 0x5a 131072 65536", "-c", "write -q -z 327680 65536"])
            .arg(&target)
            .output()
            .expect("qemu-io");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut base = BTreeMap::new();
        base.insert(0, ZERO.to_owned());
        let Folded { map, stored, copied } = fold("n", &target, &base, 1 << 20, &writer, &mut policy).expect("fold");
        assert_eq!(copied, 2 * CHUNK);
        assert_eq!(map.len(), 3);
        assert_eq!(map[&5], ZERO);
        assert!(stored > 0);
        writer.finish().expect("stored");
        writer.publish();

        let disk = Disk {
            node: "n".into(),
            device: "d".into(),
            filename: "x".into(),
            format: "qcow2".into(),
            virtual_size: 1 << 20,
            cluster_size: Some(CHUNK),
            chunk_size: CHUNK,
            backing: None,
            chunks: map.into_iter().collect(),
            full: true,
            full_reason: None,
            bytes_stored: stored,
            bytes_copied: copied,
        };
        let img = d.path().join("restored.qcow2");
        write_image(&disk, &blocks, &img).expect("write image");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -q -P 0x5a 131072 65536", "-c", "read -q -P 0 0 131072"])
            .arg(&img)
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("fail"), "{text}");
    }
}
