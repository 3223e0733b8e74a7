//! Status lines: `CUTLINE {json}\n`, written to stdout (the console) and the control channel.

use serde_json::Value;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Prefix of every status line.
pub const PREFIX: &str = "CUTLINE ";

/// Locks a mutex, ignoring poisoning (a panic already reported itself as a fatal status).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One status event: a name plus ordered extra fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    name: String,
    fields: Vec<(String, Value)>,
}

impl Event {
    /// A new event named `name` (the JSON "event" field).
    pub fn new(name: &str) -> Self {
        Event { name: name.to_string(), fields: Vec::new() }
    }

    /// Adds a field (keys `event`, `id` and `t_ms` are reserved and must not be used).
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.push((key.to_string(), value.into()));
        self
    }

    /// Adds `"req":K` when a request token was given.
    pub fn req(self, req: Option<&str>) -> Self {
        match req {
            Some(r) => self.with("req", r),
            None => self,
        }
    }

    /// Appends several fields.
    pub fn extend(mut self, fields: Vec<(String, Value)>) -> Self {
        self.fields.extend(fields);
        self
    }

    /// The event name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Renders the full line `CUTLINE {"event":..,"id":..,"t_ms":..,...}\n`.
    pub fn render(&self, id: u32, t_ms: u64) -> String {
        let mut s = String::with_capacity(128);
        s.push_str(PREFIX);
        s.push_str("{\"event\":");
        s.push_str(&Value::from(self.name.as_str()).to_string());
        s.push_str(&format!(",\"id\":{id},\"t_ms\":{t_ms}"));
        for (k, v) in &self.fields {
            s.push(',');
            s.push_str(&Value::from(k.as_str()).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push_str("}\n");
        s
    }
}

/// Writes status lines to stdout and (optionally) the control channel, one write per line.
pub struct StatusWriter {
    id: u32,
    start: Instant,
    control: Option<Arc<File>>,
    mutex: Mutex<()>,
}

static GLOBAL: OnceLock<Arc<StatusWriter>> = OnceLock::new();

impl StatusWriter {
    /// A writer for guest `id`; `start` is time zero of `t_ms`.
    pub fn new(id: u32, start: Instant, control: Option<Arc<File>>) -> Self {
        StatusWriter { id, start, control, mutex: Mutex::new(()) }
    }

    /// Milliseconds since the workload started (monotonic clock).
    pub fn t_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Emits one status line; write errors are ignored (there is nowhere to report them).
    pub fn emit(&self, ev: Event) {
        let _g = lock(&self.mutex);
        self.write_line(&ev);
    }

    /// Like [`emit`](Self::emit) but gives up instead of blocking on the mutex (for the panic hook).
    fn try_emit(&self, ev: &Event) -> bool {
        match self.mutex.try_lock() {
            Ok(_g) => {
                self.write_line(ev);
                true
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let _g = p.into_inner();
                self.write_line(ev);
                true
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    fn write_line(&self, ev: &Event) {
        let line = ev.render(self.id, self.t_ms());
        write_fd_all(libc::STDOUT_FILENO, line.as_bytes());
        if let Some(c) = &self.control {
            let _ = (&**c).write_all(line.as_bytes());
        }
    }

    /// Makes this writer the one used by [`fatal_forever`] callers without a handle and the panic hook.
    pub fn install_global(self: &Arc<Self>) {
        let _ = GLOBAL.set(Arc::clone(self));
    }
}

/// Writes all of `buf` to a raw fd (a single write() unless the kernel takes less).
fn write_fd_all(fd: libc::c_int, mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid readable slice of buf.len() bytes.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        buf = &buf[usize::try_from(n).unwrap_or(buf.len()).min(buf.len())..];
    }
}

/// Sleeps forever; the workload runs as PID 1 and must never exit.
pub fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Emits a `fatal` event and puts the calling thread to sleep forever.
pub fn fatal_forever(status: &StatusWriter, ev: Event) -> ! {
    status.emit(ev);
    sleep_forever()
}

/// Installs a panic hook that reports panics as `{"event":"fatal","what":"panic",...}`.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let ev = Event::new("fatal")
            .with("what", "panic")
            .with("message", info.to_string())
            .with("thread", std::thread::current().name().unwrap_or("unnamed").to_string());
        let written = GLOBAL.get().is_some_and(|s| s.try_emit(&ev));
        if !written {
            write_fd_all(libc::STDOUT_FILENO, ev.render(0, 0).as_bytes());
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_ordered_compact_json() {
        let ev = Event::new("tick")
            .with("seq", 3)
            .with("quiesced", false)
            .with("what", "a \"quoted\"\nthing")
            .req(Some("r1"));
        let line = ev.render(2, 1234);
        assert!(line.starts_with("CUTLINE {\"event\":\"tick\",\"id\":2,\"t_ms\":1234,\"seq\":3"));
        assert!(line.ends_with("\"req\":\"r1\"}\n"));
        assert_eq!(line.matches('\n').count(), 1);
        let v: Value = serde_json::from_str(&line[PREFIX.len()..]).expect("valid json");
        assert_eq!(v["event"], "tick");
        assert_eq!(v["id"], 2);
        assert_eq!(v["what"], "a \"quoted\"\nthing");
        assert_eq!(v["req"], "r1");
    }

    #[test]
    fn no_req_field_without_token() {
        let line = Event::new("resumed").req(None).render(0, 0);
        assert!(!line.contains("req"));
    }
}
