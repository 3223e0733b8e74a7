//! Pack trailers and index objects, as read back from a store others may write:
//! `parse_index` (an index object: the pack's length, then the trailer) and
//! `parse_trailer` over a pack's last bytes. Whatever is accepted describes chunks that lie,
//! whole, in order and without overflow, inside the pack's chunk area; a decode of any
//! entry over arbitrary bytes never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecar::store::blocks::parse_index;
use sidecar::store::pack::{self, ENTRY, TAIL};

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = parse_index("fuzz", data) {
        let pack_len = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
        let mut next = 0u64;
        for e in &entries {
            assert_eq!(e.offset, next, "contiguous");
            next = e.offset.checked_add(u64::from(e.stored)).expect("no overflow");
        }
        let trailer = (entries.len() * ENTRY + TAIL) as u64;
        assert!(next.checked_add(trailer).is_some_and(|n| n == pack_len), "chunks then the trailer fill the pack");
    }
    if let Ok(entries) = pack::parse_trailer(data, data.len() as u64) {
        for e in &entries {
            let r = e.range();
            let stored = &data[r.start as usize..r.end as usize];
            let _ = pack::decode(e, stored);
        }
    }
});
