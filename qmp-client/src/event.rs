//! QMP events and subscriptions to them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::{CloseReason, QmpError};

/// One asynchronous QMP event, kept as raw JSON so that events QEMU adds after
/// the `qapi` schema still arrive.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name, e.g. `STOP`, `RESUME`, `MIGRATION`.
    pub name: String,
    /// The event's `data` member (`Null` when it has none).
    pub data: Value,
    /// QEMU's timestamp for the event, in microseconds since the Unix epoch.
    pub timestamp_us: i64,
}

impl Event {
    /// Parses an event message; `None` when `msg` is not an event.
    pub(crate) fn from_message(msg: &Value) -> Option<Event> {
        let name = msg.get("event")?.as_str()?.to_owned();
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        let ts = msg.get("timestamp");
        let secs = ts.and_then(|t| t.get("seconds")).and_then(Value::as_i64).unwrap_or(0);
        let micros = ts.and_then(|t| t.get("microseconds")).and_then(Value::as_i64).unwrap_or(0);
        Some(Event { name, data, timestamp_us: secs.saturating_mul(1_000_000).saturating_add(micros) })
    }

    /// QEMU's timestamp as a `SystemTime`.
    pub fn timestamp(&self) -> SystemTime {
        if self.timestamp_us >= 0 { UNIX_EPOCH + Duration::from_micros(self.timestamp_us as u64) } else { UNIX_EPOCH }
    }

    /// Decodes the event into the `qapi` crate's typed event enum (QEMU 9.1 schema).
    pub fn typed(&self) -> Result<qapi::qmp::Event, serde_json::Error> {
        let mut msg = serde_json::json!({
            "event": self.name,
            "timestamp": {
                "seconds": self.timestamp_us.div_euclid(1_000_000),
                "microseconds": self.timestamp_us.rem_euclid(1_000_000),
            },
        });
        if !self.data.is_null() {
            msg["data"] = self.data.clone();
        }
        serde_json::from_value(msg)
    }
}

/// A subscription to every event QEMU sends from the moment it was made.
///
/// Subscribe *before* issuing the command whose event you wait for: events that
/// arrive in between are queued here, never missed.
#[derive(Debug)]
pub struct EventStream {
    pub(crate) rx: mpsc::UnboundedReceiver<Event>,
    pub(crate) closed: tokio::sync::watch::Receiver<Option<CloseReason>>,
}

impl EventStream {
    /// The next event, or `None` once the connection has closed and every queued event was read.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// Waits for the first event named `name` for which `pred` holds, skipping others.
    pub async fn wait_for<F>(&mut self, name: &str, mut pred: F, timeout: Duration) -> Result<Event, QmpError>
    where
        F: FnMut(&Event) -> bool,
    {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) if ev.name == name && pred(&ev) => return Ok(ev),
                Ok(Some(_)) => continue,
                Ok(None) => {
                    let reason = self.closed.borrow().clone().unwrap_or(CloseReason::Eof);
                    return Err(QmpError::Disconnected { what: format!("event {name}"), reason });
                }
                Err(_) => return Err(QmpError::Timeout { what: format!("event {name}"), after: timeout }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_event_with_timestamp() {
        let msg = serde_json::json!({"event":"STOP","timestamp":{"seconds":10,"microseconds":5}});
        let ev = Event::from_message(&msg).expect("event");
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.timestamp_us, 10_000_005);
        assert!(matches!(ev.typed(), Ok(qapi::qmp::Event::STOP { .. })));
    }

    #[test]
    fn a_reply_is_not_an_event() {
        assert!(Event::from_message(&serde_json::json!({"return":{}})).is_none());
    }
}
