//! The coordinator's durable files: commit records (`Record::from_bytes`, what
//! `Catalog::read` runs on a record file) on arbitrary bytes and, past the checksum, the
//! same JSON sealed; and the coordinator state (`Durable::from_bytes`, what
//! `StateDir::load` runs on `state.json`). Whatever is accepted re-encodes and parses
//! equal.
#![no_main]

use coordinator::record::{FORMAT, Record, RecordParseError};
use coordinator::state::Durable;
use libfuzzer_sys::fuzz_target;

fn round_trip(r: &Record) {
    let bytes = r.to_bytes().expect("a record encodes");
    assert_eq!(&Record::from_bytes(&bytes).expect("a re-encoded record parses"), r);
    // What the coordinator reads out of a record at recovery and in `list`.
    for m in &r.members {
        let _ = (m.name.len(), m.checkpoint, m.manifest_digest.len(), m.vt.get(&m.name));
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Record::from_bytes(data) {
        assert_eq!(r.format, FORMAT);
        round_trip(&r);
    }
    if let Ok(mut r) = serde_json::from_slice::<Record>(data) {
        r.seal();
        match Record::from_bytes(&r.to_bytes().expect("a record encodes")) {
            Ok(back) => {
                assert_eq!(back, r, "a sealed record round-trips");
                round_trip(&back);
            }
            Err(RecordParseError::Format { found }) => assert!(found != FORMAT && found == r.format),
            Err(e) => panic!("a sealed record was refused: {e}"),
        }
    }
    if let Ok(s) = Durable::from_bytes(data) {
        let bytes = serde_json::to_vec_pretty(&s).expect("the state encodes");
        assert_eq!(Durable::from_bytes(&bytes).expect("a re-encoded state parses"), s);
    }
});
