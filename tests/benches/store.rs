//! Store v2 throughput beside its baselines, measured in the same run.
//!
//! The input is a first checkpoint's memory file: 1 GiB (`CUTLINE_BENCH_MIB`) with no
//! zero page (zeros cost the store nothing and would flatter it): three quarters random,
//! one quarter text-like that zstd halves. It is stored as a background checkpoint
//! stores it (`memory::save_file`: 64 KiB blocks hashed and compressed on every core,
//! packs of 8 MiB, two uploads in flight), to:
//! - a local store, beside the same bytes written to one file with `write` + `fsync`;
//! - a store on a three-node Garage 2.5 (replication 3, fsync on; needs `garage`
//!   installed), beside a raw multipart upload of the same bytes to the same Garage.
//!
//! Three runs each, interleaved; medians. Ratios are store bandwidth over baseline
//! bandwidth, both over the file's logical size.
//!
//! Then a local store of 1,000 checkpoints (`CUTLINE_BENCH_CHECKPOINTS`) of one VM, each
//! naming 256 blocks of 16 KiB of which 16 are new: `verify` of the whole store beside
//! reading and hashing the same pack files directly, and `gc` down to 10 checkpoints
//! beside deleting the same number of files directly.
//!
//! `cargo bench -p cutline-tests --bench store`

use std::io::Write;
use std::time::{Duration, Instant};

use cutline_objects::Objects;
use sidecar::memory::save_file;
use sidecar::store::manifest::Manifest;
use sidecar::store::{Estimates, Policy, Store};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The input: random, with a text-like quarter.
fn input(path: &std::path::Path, mib: usize) -> anyhow::Result<Vec<u8>> {
    let mut data = vec![0u8; mib << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let random_end = data.len() / 4 * 3;
    for chunk in data[..random_end].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let words = ["ledger ", "journal ", "epoch ", "commit ", "balance ", "vm0 ", "vm1 ", "\n"];
    let mut i = 0usize;
    let mut at = random_end;
    while at < data.len() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = if x.is_multiple_of(5) {
            format!("{} ", x % 100_000)
        } else {
            words[(x as usize + i) % words.len()].to_owned()
        };
        let n = w.len().min(data.len() - at);
        data[at..at + n].copy_from_slice(&w.as_bytes()[..n]);
        at += n;
        i += 1;
    }
    std::fs::File::create(path)?.write_all(&data)?;
    Ok(data)
}

fn store_once(store: &Store, file: &std::path::Path) -> anyhow::Result<(Duration, u64)> {
    let t = Instant::now();
    let w = store.writer()?;
    let mut policy = Policy::new(Estimates::default());
    let stream = save_file(file, &w, &mut policy)?;
    w.finish()?;
    let took = t.elapsed();
    let stored = stream.bytes_stored;
    // Nothing references the packs: a fresh store each run.
    store.drop_packs(&w.abort());
    Ok((took, stored))
}

fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::var("CUTLINE_BENCH_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir_in("/var/tmp")?;
    let file = dir.path().join("memory.ram");
    let data = input(&file, mib)?;
    let mb = data.len() as f64 / 1e6;
    println!("input: {mib} MiB, no zero page, 3/4 random, 1/4 text-like");

    // Local: the store vs write + fsync of one file, in the same run.
    let store = Store::open(&dir.path().join("store"))?;
    let (mut raw, mut packed, mut stored) = (Vec::new(), Vec::new(), 0);
    for run in 0..3 {
        let out = dir.path().join(format!("raw-{run}"));
        let t = Instant::now();
        let mut f = std::fs::File::create(&out)?;
        f.write_all(&data)?;
        f.sync_all()?;
        raw.push(t.elapsed().as_secs_f64());
        std::fs::remove_file(&out)?;
        let (took, s) = store_once(&store, &file)?;
        packed.push(took.as_secs_f64());
        stored = s;
    }
    let (raw_s, packed_s) = (median(raw), median(packed));
    println!(
        "local: store {:.0} MB/s ({:.0} MiB stored), write+fsync {:.0} MB/s; ratio {:.2}",
        mb / packed_s,
        stored as f64 / (1 << 20) as f64,
        mb / raw_s,
        raw_s / packed_s
    );

    many_checkpoints(dir.path())?;

    // Garage: the store vs a raw multipart upload of the same bytes.
    if cutline_tests::garage::binary().is_err() {
        println!("garage: not installed (ci/install.sh --with-garage); skipped");
        return Ok(());
    }
    let g = cutline_tests::garage::Garage::start(&dir.path().join("garage"))?;
    let location = g.location(0, "bench")?;
    let objects = Objects::open(&location)?;
    let store = Store::open_at(&location, &dir.path().join("work"))?;
    let (mut upload, mut packed) = (Vec::new(), Vec::new());
    for run in 0..3 {
        let key = format!("raw/{run}");
        let t = Instant::now();
        objects.put_multipart(&key, &data)?;
        upload.push(t.elapsed().as_secs_f64());
        objects.delete(&key)?;
        let (took, _) = store_once(&store, &file)?;
        packed.push(took.as_secs_f64());
    }
    let (upload_s, packed_s) = (median(upload), median(packed));
    println!(
        "garage: store {:.0} MB/s, raw multipart upload {:.0} MB/s; ratio {:.2}",
        mb / packed_s,
        mb / upload_s,
        upload_s / packed_s
    );
    Ok(())
}

/// verify and gc of a store of many checkpoints, beside the file operations they do.
fn many_checkpoints(dir: &std::path::Path) -> anyhow::Result<()> {
    let n: u64 = std::env::var("CUTLINE_BENCH_CHECKPOINTS").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let root = dir.join("many");
    let store = Store::open(&root)?;
    let mut policy = Policy::new(Estimates { ratio: 1.0, ..Estimates::default() });
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut block = || {
        (0..16 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let mut memory: Vec<Vec<u8>> = (0..256).map(|_| block()).collect();
    let t = Instant::now();
    for id in 1..=n {
        for i in 0..16 {
            memory[((id * 16 + i) % 256) as usize] = block();
        }
        let w = store.writer()?;
        let mut m = Manifest::empty("vm", id);
        for b in &memory {
            let put = w.put(b, &mut policy)?;
            m.memory.bytes += put.len;
            m.memory.blocks.push((put.hash, put.len));
        }
        store.commit(&mut m, &w)?;
    }
    let packs = store.objects().list("packs/")?;
    println!(
        "{n} checkpoints: built in {:.1} s, {} packs, {:.0} MiB",
        t.elapsed().as_secs_f64(),
        packs.len(),
        packs.iter().map(|p| p.size).sum::<u64>() as f64 / (1 << 20) as f64
    );
    let t = Instant::now();
    let damage = store.verify(None, |_, _| {})?;
    let verify_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(damage.is_empty(), "{damage:?}");
    let t = Instant::now();
    for p in &packs {
        use sha2::Digest;
        let bytes = std::fs::read(root.join(&p.key))?;
        std::hint::black_box(sha2::Sha256::digest(&bytes));
    }
    let read_s = t.elapsed().as_secs_f64();
    println!(
        "verify: {verify_s:.2} s; reading and hashing the pack files: {read_s:.2} s; ratio {:.2}",
        read_s / verify_s
    );
    let t = Instant::now();
    let r = store.gc("vm", 10)?;
    let gc_s = t.elapsed().as_secs_f64();
    // Baseline: as many files and manifests created and deleted directly.
    let base = dir.join("files");
    std::fs::create_dir_all(&base)?;
    let count = r.packs_removed as usize + 2 * r.removed.len();
    for i in 0..count {
        std::fs::write(base.join(i.to_string()), b"x")?;
    }
    let t = Instant::now();
    for i in 0..count {
        std::fs::remove_file(base.join(i.to_string()))?;
    }
    let rm_s = t.elapsed().as_secs_f64();
    println!(
        "gc to 10 checkpoints: {gc_s:.2} s ({} checkpoints, {} packs, {:.0} MiB freed); deleting {count} files directly: {rm_s:.2} s",
        r.removed.len(),
        r.packs_removed,
        r.bytes_freed as f64 / (1 << 20) as f64
    );
    Ok(())
}
