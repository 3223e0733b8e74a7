//! Disk content as chunks: reading what a backup job copied into its target image,
//! folding it into the previous checkpoint's chunk map, and writing an image back.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::store::manifest::{Disk, ZERO};
use crate::store::{BlockError, Blocks, Hash, Policy};

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
    /// A chunk of the checkpoint lies past the end of its disk.
    #[error("chunk {chunk} of disk {node} lies past its {virtual_size} bytes")]
    OutOfRange {
        /// The node.
        node: String,
        /// The chunk index.
        chunk: u64,
        /// The disk's size.
        virtual_size: u64,
    },
    /// A block operation failed.
    #[error(transparent)]
    Block(#[from] BlockError),
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

/// Creates an empty qcow2 backup target of `size` with cluster size [`CHUNK`].
pub fn create_target(path: &Path, size: u64) -> Result<(), DiskError> {
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

/// Folds the ranges copied into `target` over the chunk map `base`, storing new chunks;
/// `created` gets every block added, even when it fails, for cleanup.
pub fn fold(
    node: &str,
    target: &Path,
    base: &BTreeMap<u64, Hash>,
    virtual_size: u64,
    blocks: &Blocks,
    policy: &mut Policy,
    created: &mut Vec<Hash>,
) -> Result<Folded, DiskError> {
    let ranges = copied_ranges(target)?;
    let file =
        File::open(target).map_err(|source| DiskError::Io { what: "cannot open", path: target.to_owned(), source })?;
    fold_ranges(node, &ranges, &file, target, base, virtual_size, blocks, policy, created)
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
    blocks: &Blocks,
    policy: &mut Policy,
    created: &mut Vec<Hash>,
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
                        let put = blocks.put(data, policy)?;
                        stored += put.stored;
                        if put.stored > 0 {
                            created.push(put.hash.clone());
                        }
                        map.insert(idx, put.hash);
                    }
                }
            }
            off = chunk_end;
        }
    }
    Ok(Folded { map, stored, copied })
}

/// Writes the image of checkpointed `disk` to `path`: a new image of the same format
/// (over the same backing image, if any) holding exactly the checkpoint's chunks.
pub fn write_image(disk: &Disk, blocks: &Blocks, path: &Path, staging: &Path) -> Result<(), DiskError> {
    let io = |what: &'static str, p: &Path| {
        let p = p.to_owned();
        move |source| DiskError::Io { what, path: p, source }
    };
    let _ = std::fs::remove_file(path);
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
    if disk.chunks.is_empty() {
        return Ok(());
    }
    // Runs of consecutive data chunks go through one staging file each; qemu-io writes
    // them (and the zero chunks) through the format driver.
    std::fs::create_dir_all(staging).map_err(io("cannot create", staging))?;
    let mut commands: Vec<String> = Vec::new();
    let mut run_start: Option<(u64, File, PathBuf, u64)> = None;
    let flush = |run: &mut Option<(u64, File, PathBuf, u64)>, commands: &mut Vec<String>| {
        if let Some((start, _, p, len)) = run.take() {
            commands.push(format!("write -q -s {} {start} {len}", p.display()));
        }
    };
    for (idx, hash) in &disk.chunks {
        let (start, len) = disk.chunk_extent(*idx).ok_or_else(|| DiskError::OutOfRange {
            node: disk.node.clone(),
            chunk: *idx,
            virtual_size: disk.virtual_size,
        })?;
        if hash == ZERO {
            flush(&mut run_start, &mut commands);
            commands.push(format!("write -q -z {start} {len}"));
            continue;
        }
        let data = blocks.get(hash)?;
        let contiguous =
            run_start.as_ref().is_some_and(|(s, _, _, l)| s.checked_add(*l) == Some(start) && *l < (8 << 20));
        if !contiguous {
            flush(&mut run_start, &mut commands);
            let p = staging.join(format!("run-{start}"));
            let f = File::create(&p).map_err(io("cannot create", &p))?;
            run_start = Some((start, f, p, 0));
        }
        if let Some((_, f, p, l)) = run_start.as_mut() {
            f.write_all_at(&data, *l).map_err(io("cannot write", p))?;
            *l += data.len() as u64;
        }
    }
    flush(&mut run_start, &mut commands);
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", &disk.format]);
    for c in &commands {
        cmd.args(["-c", c]);
    }
    cmd.arg(path);
    let result = run("qemu-io", path, &mut cmd);
    let _ = std::fs::remove_dir_all(staging);
    let out = result?;
    let text = String::from_utf8_lossy(&out);
    if text.contains("failed") {
        return Err(DiskError::Tool { tool: "qemu-io", path: path.to_owned(), stderr: text.into_owned() });
    }
    File::open(path).and_then(|f| f.sync_all()).map_err(io("cannot sync", path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Estimates;

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
        let d = tempfile::tempdir().expect("tempdir");
        let blocks = Blocks::new(d.path().join("blocks"), d.path().to_owned());
        let target = d.path().join("t");
        std::fs::write(&target, vec![1u8; 2 * CHUNK as usize]).expect("write");
        let file = File::open(&target).expect("open");
        let mut policy = Policy::new(Estimates::default());
        let fold = |ranges: &[Copied], policy: &mut Policy| {
            fold_ranges("n", ranges, &file, &target, &BTreeMap::new(), 1 << 20, &blocks, policy, &mut Vec::new())
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
        let d = tempfile::tempdir().expect("tempdir");
        let blocks = Blocks::new(d.path().join("blocks"), d.path().to_owned());
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
        let mut created = Vec::new();
        let Folded { map, stored, copied } =
            fold("n", &target, &base, 1 << 20, &blocks, &mut policy, &mut created).expect("fold");
        assert_eq!(copied, 2 * CHUNK);
        assert_eq!(map.len(), 3);
        assert_eq!(map[&5], ZERO);
        assert!(stored > 0 && created.len() == 1);

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
        write_image(&disk, &blocks, &img, &d.path().join("staging")).expect("write image");
        let out = Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "read -q -P 0x5a 131072 65536", "-c", "read -q -P 0 0 131072"])
            .arg(&img)
            .output()
            .expect("qemu-io");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && !text.contains("fail"), "{text}");
    }
}
