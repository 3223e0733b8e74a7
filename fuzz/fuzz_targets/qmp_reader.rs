//! The QMP client's reader: `read_message` (bounded newline-delimited JSON),
//! `Greeting::parse` on the first message, `Event::from_message` and the typed (qapi)
//! decoding of events, and the reader task (`read_loop`) that routes replies to the
//! commands waiting for them by id and events to subscribers, compared with a model of
//! that routing. All through `qmp_client::fuzzing` (feature `fuzzing`), which calls the
//! client's own code.
//!
//! Input: byte 0 chooses the chunking; byte 1 which of the command ids 0..8 wait for a
//! reply; the rest is what QEMU sends.
#![no_main]

use std::collections::BTreeSet;

use cutline_fuzz::{Chunked, block_on, chunk_sizes};
use libfuzzer_sys::fuzz_target;
use qmp_client::fuzzing::{self, Routed};
use qmp_client::{CloseReason, QmpError};
use serde_json::Value;
use tokio::io::BufReader;

/// A reply as the reader task should deliver it, comparable.
#[derive(Debug, PartialEq)]
enum Want {
    Ok(Value),
    Qemu(String, String),
    NotQmp,
    Disconnected(CloseReason),
}

fn want_of(r: &Result<Value, QmpError>) -> Want {
    match r {
        Ok(v) => Want::Ok(v.clone()),
        Err(QmpError::Qemu { class, desc, .. }) => Want::Qemu(class.clone(), desc.clone()),
        Err(QmpError::NotQmp { .. }) => Want::NotQmp,
        Err(QmpError::Disconnected { reason, .. }) => Want::Disconnected(reason.clone()),
        Err(e) => panic!("the reader task delivered {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let [chunking, waiting, stream @ ..] = data else { return };
    let ids: Vec<u64> = (0..8).filter(|i| waiting & (1 << i) != 0).collect();

    // Every message, as `read_message` reads them.
    let mut reader = BufReader::new(Chunked::new(stream.to_vec(), chunk_sizes(*chunking), false));
    let mut msgs = Vec::new();
    let end = loop {
        match block_on(fuzzing::read_message(&mut reader)) {
            Ok(Some(v)) => msgs.push(v),
            Ok(None) => break CloseReason::Eof,
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => break CloseReason::Protocol(e.to_string()),
            Err(e) => break CloseReason::ReadError(e.to_string()),
        }
    };
    assert!(!matches!(end, CloseReason::ReadError(_)), "in-memory reads cannot fail");

    // The handshake's parse of the first message.
    if let Some(first) = msgs.first()
        && let Ok(g) = fuzzing::parse_greeting(first)
    {
        let _ = (g.version.to_string(), g.capabilities.len());
    }

    // The routing a reader task should do.
    let mut open: BTreeSet<u64> = ids.iter().copied().collect();
    let mut replies: Vec<(u64, Want)> = Vec::new();
    let mut events = Vec::new();
    for m in &msgs {
        if let Some(e) = fuzzing::event(m) {
            let _ = (e.timestamp(), e.typed().is_ok());
            events.push(e);
            continue;
        }
        let Some(id) = m.get("id").and_then(Value::as_u64) else { continue };
        if !open.remove(&id) {
            continue;
        }
        replies.push((
            id,
            match (m.get("return"), m.get("error")) {
                (Some(r), _) => Want::Ok(r.clone()),
                (None, Some(e)) => Want::Qemu(
                    e.get("class").and_then(Value::as_str).unwrap_or("GenericError").to_owned(),
                    e.get("desc").and_then(Value::as_str).unwrap_or("(no description)").to_owned(),
                ),
                (None, None) => Want::NotQmp,
            },
        ));
    }
    replies.extend(open.into_iter().map(|id| (id, Want::Disconnected(end.clone()))));
    replies.sort_by_key(|(id, _)| *id);

    // The reader task itself.
    let Routed { replies: got, events: got_events, closed } =
        block_on(fuzzing::route(Chunked::new(stream.to_vec(), chunk_sizes(*chunking), false), &ids));
    let mut got: Vec<(u64, Want)> =
        got.iter().map(|(id, r)| (*id, want_of(r.as_ref().expect("every waiting command is answered")))).collect();
    got.sort_by_key(|(id, _)| *id);
    assert_eq!(got, replies);
    assert_eq!(got_events, events);
    assert_eq!(closed, Some(end));
});
