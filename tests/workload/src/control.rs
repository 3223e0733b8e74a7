//! Control channel: opening the device in raw mode, splitting lines, parsing commands.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// Longest accepted line (bytes, without the newline); the rest of a longer line is discarded.
pub const MAX_LINE: usize = 4096;

/// A control verb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Report all counters.
    Status,
    /// Stop starting ledger transfers; reply once all sent transfers are acked.
    Quiesce,
    /// Report the ledger balance.
    Balance,
    /// Start ledger transfers again.
    Resume,
    /// Scan the journal disk and compare with the in-memory count.
    Check,
    /// Stop the stream's senders.
    StreamStop,
    /// Start the stream's senders again.
    StreamStart,
}

/// Result of parsing one control line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Blank line (ignored).
    Empty,
    /// A known verb with an optional request token.
    Command {
        /// The verb.
        verb: Verb,
        /// Request token to echo as `"req"`.
        req: Option<String>,
    },
    /// Unknown verb or wrong arguments.
    Bad {
        /// Why the line was rejected.
        what: &'static str,
        /// The offending line (lossily decoded, trimmed, at most 200 chars).
        command: String,
        /// Second token, if any, echoed as `"req"`.
        req: Option<String>,
    },
}

/// Parses `VERB [REQ]`; surrounding whitespace (including `\r`) is ignored.
pub fn parse_command(line: &[u8]) -> Parsed {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let mut words = text.split_ascii_whitespace();
    let Some(word) = words.next() else {
        return Parsed::Empty;
    };
    let req = words.next().map(str::to_string);
    let extra = words.next().is_some();
    let verb = match word {
        "status" => Some(Verb::Status),
        "quiesce" => Some(Verb::Quiesce),
        "balance" => Some(Verb::Balance),
        "resume" => Some(Verb::Resume),
        "check" => Some(Verb::Check),
        "stream-stop" => Some(Verb::StreamStop),
        "stream-start" => Some(Verb::StreamStart),
        _ => None,
    };
    let command: String = text.chars().take(200).collect();
    match verb {
        None => Parsed::Bad { what: "unknown command", command, req },
        Some(_) if extra => Parsed::Bad { what: "too many arguments", command, req },
        Some(verb) => Parsed::Command { verb, req },
    }
}

/// Splits a byte stream into lines, capping each at a maximum length.
#[derive(Debug)]
pub struct LineBuffer {
    buf: Vec<u8>,
    cap: usize,
    overflow: bool,
}

/// One complete line out of a [`LineBuffer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The line without its newline (at most `cap` bytes).
    pub bytes: Vec<u8>,
    /// True when the line was longer than `cap` and its tail was discarded.
    pub truncated: bool,
}

impl LineBuffer {
    /// A splitter keeping at most `cap` bytes per line.
    pub fn new(cap: usize) -> Self {
        LineBuffer { buf: Vec::new(), cap, overflow: false }
    }

    /// Feeds bytes; returns the lines completed by them (`\n` terminates a line).
    pub fn push(&mut self, data: &[u8]) -> Vec<Line> {
        let mut out = Vec::new();
        for &b in data {
            if b == b'\n' {
                out.push(Line {
                    bytes: std::mem::take(&mut self.buf),
                    truncated: std::mem::replace(&mut self.overflow, false),
                });
            } else if self.buf.len() < self.cap {
                self.buf.push(b);
            } else {
                self.overflow = true;
            }
        }
        out
    }
}

/// Opens the control device read+write (no controlling tty) and puts it in raw mode when it is a tty.
pub fn open_control(path: &str) -> io::Result<File> {
    let file = OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(path)?;
    set_raw(&file)?;
    Ok(file)
}

/// Sets raw mode (cfmakeraw: no echo, no line editing, no CR/NL mangling), VMIN=1 VTIME=0.
/// Not-a-tty files are left alone.
pub fn set_raw(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: termios is plain data; zeroed is a valid value that tcgetattr overwrites.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open for the lifetime of `file`; t is a valid termios pointer.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        let e = io::Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) {
            Ok(())
        } else {
            Err(e)
        };
    }
    // SAFETY: t is a valid termios.
    unsafe { libc::cfmakeraw(&mut t) };
    t.c_cflag |= libc::CLOCAL | libc::CREAD;
    t.c_cc[libc::VMIN] = 1;
    t.c_cc[libc::VTIME] = 0;
    // SAFETY: fd is valid; t is a valid termios.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(verb: Verb, req: Option<&str>) -> Parsed {
        Parsed::Command { verb, req: req.map(str::to_string) }
    }

    #[test]
    fn parses_verbs_and_req() {
        assert_eq!(parse_command(b"status"), cmd(Verb::Status, None));
        assert_eq!(parse_command(b"quiesce q-1\r"), cmd(Verb::Quiesce, Some("q-1")));
        assert_eq!(parse_command(b"  balance 7 "), cmd(Verb::Balance, Some("7")));
        assert_eq!(parse_command(b"resume\tx"), cmd(Verb::Resume, Some("x")));
        assert_eq!(parse_command(b"check c9"), cmd(Verb::Check, Some("c9")));
        assert_eq!(parse_command(b"stream-stop s1"), cmd(Verb::StreamStop, Some("s1")));
        assert_eq!(parse_command(b"stream-start"), cmd(Verb::StreamStart, None));
        assert_eq!(parse_command(b""), Parsed::Empty);
        assert_eq!(parse_command(b" \r\0"), Parsed::Empty);
    }

    #[test]
    fn rejects_unknown_and_extra_args() {
        assert_eq!(
            parse_command(b"STATUS r"),
            Parsed::Bad { what: "unknown command", command: "STATUS r".into(), req: Some("r".into()) }
        );
        assert!(matches!(parse_command(b"status a b"), Parsed::Bad { what: "too many arguments", .. }));
        assert!(matches!(parse_command(&[0xff, 0xfe, b'x']), Parsed::Bad { what: "unknown command", .. }));
    }

    #[test]
    fn line_buffer_partial_and_multiple() {
        let mut lb = LineBuffer::new(16);
        assert!(lb.push(b"sta").is_empty());
        let lines = lb.push(b"tus 1\nbal");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].bytes, b"status 1");
        assert!(!lines[0].truncated);
        let lines = lb.push(b"ance\n\nx\n");
        let got: Vec<&[u8]> = lines.iter().map(|l| l.bytes.as_slice()).collect();
        assert_eq!(got, vec![&b"balance"[..], b"", b"x"]);
    }

    #[test]
    fn line_buffer_caps_long_lines() {
        let mut lb = LineBuffer::new(MAX_LINE);
        let long = vec![b'a'; MAX_LINE * 3];
        assert!(lb.push(&long).is_empty());
        let lines = lb.push(b"bbb\nstatus\n");
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].bytes.len(), MAX_LINE);
        assert!(lines[0].truncated);
        assert_eq!(lines[1].bytes, b"status");
        assert!(!lines[1].truncated);
    }
}
