//! Restore's image rebuild through qemu-nbd beside a baseline from the same run: the
//! same content written into a raw staging file and converted by `qemu-img convert`.
//! A 1 GiB qcow2 disk: 4,096 data chunks of 64 KiB (256 MiB, 64 distinct contents), 8,192
//! zero chunks, the rest absent; 3 runs each, interleaved.
//!
//! `cargo bench -p cutline-tests --bench image`

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::Instant;

use sidecar::disk::{CHUNK, write_image};
use sidecar::store::manifest::{Disk, ZERO};
use sidecar::store::{Estimates, Policy, Store};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let d = tempfile::tempdir()?;
    let store = Store::open(&d.path().join("store"))?;
    let blocks = store.blocks().clone();
    let writer = store.writer()?;
    let mut policy = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
    let size: u64 = 1 << 30;
    let mut chunks = Vec::new();
    for idx in 0..size / CHUNK {
        match idx % 4 {
            0 => chunks.push((idx, writer.put(&vec![(idx % 64) as u8 + 1; CHUNK as usize], &mut policy)?.hash)),
            1 | 2 => chunks.push((idx, ZERO.to_owned())),
            _ => {}
        }
    }
    writer.finish()?;
    writer.publish();
    let disk = Disk {
        node: "disk0".into(),
        device: "dev0".into(),
        filename: "disk0.qcow2".into(),
        format: "qcow2".into(),
        virtual_size: size,
        cluster_size: Some(CHUNK),
        chunk_size: CHUNK,
        backing: None,
        chunks,
        full: true,
        full_reason: None,
        bytes_stored: 0,
        bytes_copied: 0,
    };
    let (mut nbd, mut convert) = (Vec::new(), Vec::new());
    for run in 0..3 {
        let img = d.path().join(format!("nbd-{run}.qcow2"));
        let t = Instant::now();
        write_image(&disk, &blocks, &img)?;
        nbd.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&img)?;

        // Baseline: the chunks into a sparse raw staging file, then qemu-img convert.
        let t = Instant::now();
        let raw = d.path().join(format!("stage-{run}.raw"));
        let f = std::fs::File::create(&raw)?;
        f.set_len(size)?;
        for (idx, hash) in &disk.chunks {
            if hash != ZERO {
                f.write_all_at(&blocks.get(hash)?, idx * CHUNK)?;
            }
        }
        let img = d.path().join(format!("convert-{run}.qcow2"));
        let out = Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=65536"])
            .arg(&raw)
            .arg(&img)
            .output()?;
        anyhow::ensure!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::File::open(&img)?.sync_all()?;
        convert.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&img)?;
        std::fs::remove_file(&raw)?;
    }
    let (n, c) = (median(nbd), median(convert));
    println!("image rebuild, 1 GiB qcow2, 256 MiB of data in 4,096 runs + 4,096 zero runs (median of 3):");
    println!("  qemu-nbd + cutline's NBD client:              {n:8.0} ms");
    println!("  raw staging + qemu-img convert (baseline):    {c:8.0} ms");
    println!("  ratio:                                        {:8.2}", n / c);
    Ok(())
}
