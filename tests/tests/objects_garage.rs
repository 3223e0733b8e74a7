//! The object store against a real three-node Garage cluster: what a server that ignores
//! create-only writes looks like to cutline, and how a store behaves as nodes die, come
//! back and lose their data.

use std::time::{Duration, Instant};

use cutline_objects::{Conditional, Created, Objects, ObjectsError};
use cutline_tests::garage::Garage;

fn open(g: &Garage, node: usize, prefix: &str) -> anyhow::Result<Objects> {
    Ok(Objects::open(&g.location(node, prefix)?)?)
}

/// Retries `f` for up to `within` (a node coming back takes a moment to rejoin).
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, ObjectsError>) -> Result<T, ObjectsError> {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            r => return r,
        }
    }
}

#[test]
fn garage_ignores_create_only_writes_and_cutline_says_so() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let g = Garage::start(dir.path())?;
    let o = eventually(Duration::from_secs(30), || Objects::open(&g.location(0, "t").expect("location")))?;
    assert_eq!(o.conditional(), Conditional::Ignored, "Garage 2.5 overwrites on If-None-Match: *");
    assert!(o.describe().contains("s3://cutline/t"), "{}", o.describe());
    // Create-only is emulated by reading first: a retry of the same bytes is harmless, other
    // bytes are refused naming the object.
    assert_eq!(o.put_new("records/1", b"one")?, Created::New);
    assert_eq!(o.put_new("records/1", b"one")?, Created::Same);
    let err = o.put_new("records/1", b"two").expect_err("other bytes");
    assert!(err.to_string().contains("records/1"), "{err}");
    assert_eq!(o.get("records/1")?, b"one");
    // The rest of the interface.
    let big: Vec<u8> = (0..(6u32 << 20)).map(|i| (i % 251) as u8).collect();
    o.put("packs/ab/big", &big)?;
    assert_eq!(o.get_range("packs/ab/big", 1_000_000..1_000_100)?, &big[1_000_000..1_000_100]);
    assert_eq!(o.head("packs/ab/big")?.map(|m| m.size), Some(big.len() as u64));
    let keys: Vec<String> = o.list("packs/")?.into_iter().map(|m| m.key).collect();
    assert_eq!(keys, ["packs/ab/big"]);
    let other = open(&g, 1, "other")?;
    assert!(other.list("")?.is_empty(), "prefixes keep stores apart: {:?}", other.list("")?);
    o.delete("packs/ab/big")?;
    assert!(o.head("packs/ab/big")?.is_none());
    assert!(matches!(o.get("packs/ab/big"), Err(ObjectsError::NotFound { .. })));
    Ok(())
}

#[test]
fn a_store_on_garage_survives_one_node_pauses_without_two_and_heals() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut g = Garage::start(dir.path())?;
    let o = eventually(Duration::from_secs(30), || Objects::open(&g.location(0, "f").expect("location")))?;
    // Distinct content per object, so each is its own Garage block.
    let payload = |key: &str| -> Vec<u8> {
        let seed = key.bytes().fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(u32::from(b)));
        (0..(1u32 << 20)).map(|i| (i.wrapping_mul(7).wrapping_add(seed) % 251) as u8).collect()
    };
    let data = payload("packs/00/before");
    o.put("packs/00/before", &data)?;

    // One node of three lost: writes and reads go on.
    g.kill(2)?;
    let t = Instant::now();
    o.put("packs/00/one-down", &payload("packs/00/one-down"))?;
    assert_eq!(o.get("packs/00/before")?, data);
    eprintln!("one node down: write + read in {:?}", t.elapsed());

    // Two lost: no quorum. Operations fail, promptly and naming the object.
    g.kill(1)?;
    let t = Instant::now();
    let err = o.put("packs/00/two-down", &data).expect_err("no write quorum");
    let took = t.elapsed();
    eprintln!("two nodes down: the write failed after {took:?}: {}", sidecar::store::error_chain(&err));
    assert!(err.to_string().contains("packs/00/two-down"), "{err}");
    assert!(took < Duration::from_secs(60), "a dead store must fail fast, took {took:?}");

    // A node back: writes resume.
    g.restart(1)?;
    eventually(Duration::from_secs(60), || o.put("packs/00/healed", &payload("packs/00/healed")))
        .map_err(|e| anyhow::anyhow!("{e}; node 1 log:\n{}", g.log_tail(1)))?;
    g.restart(2)?;

    // A node's blocks deleted: reads through it are served from the replicas.
    let removed = g.wipe_data(0)?;
    assert!(removed >= 3, "node 0 held a block of each object: {removed} files");
    eprintln!("node 0: {removed} block files deleted");
    let through_wiped = eventually(Duration::from_secs(60), || Objects::open(&g.location(0, "f").expect("location")))?;
    for key in ["packs/00/before", "packs/00/one-down", "packs/00/healed"] {
        let got = eventually(Duration::from_secs(60), || through_wiped.get(key))?;
        assert!(got == payload(key), "{key} read back different bytes");
    }
    Ok(())
}
