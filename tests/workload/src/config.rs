//! Configuration from the kernel command line (`cutline.KEY=VALUE` tokens).

use serde::Serialize;
use std::fmt;

/// Default control channel device.
pub const DEFAULT_CONTROL: &str = "/dev/ttyS1";

/// One workload mode; several may run at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Distributed money-transfer ledger over TCP (the consistency oracle).
    Ledger,
    /// Sequential O_DIRECT record journal on a raw block device.
    Journal,
    /// Memory dirtier at a fixed rate.
    Dirtier,
    /// Sequence-numbered UDP datagrams and a checked TCP byte stream to the next guest.
    Stream,
    /// Ticks and commands only.
    Idle,
}

impl Mode {
    /// The mode's name as used on the command line and in status lines.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ledger => "ledger",
            Mode::Journal => "journal",
            Mode::Dirtier => "dirtier",
            Mode::Stream => "stream",
            Mode::Idle => "idle",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ledger" => Some(Mode::Ledger),
            "journal" => Some(Mode::Journal),
            "dirtier" => Some(Mode::Dirtier),
            "stream" => Some(Mode::Stream),
            "idle" => Some(Mode::Idle),
            _ => None,
        }
    }
}

/// The complete workload configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Modes to run (deduplicated, in command-line order; `idle` is dropped when others are given).
    pub modes: Vec<Mode>,
    /// This guest's index, 0..peers-1.
    pub id: u32,
    /// Cluster size.
    pub peers: u32,
    /// Ledger: initial balance per guest.
    pub balance: u64,
    /// Ledger: transfers per second started by this guest (0 = none).
    pub rate: u32,
    /// Ledger: TCP port.
    pub port: u16,
    /// Journal: raw block device path.
    pub disk: String,
    /// Journal: records per second (0 = as fast as possible).
    pub jrate: u32,
    /// Dirtier: MiB of memory to dirty.
    pub mib: u64,
    /// Dirtier: MiB per second written (0 = as fast as possible).
    pub mibps: u64,
    /// Control channel device path (`stdio` = stdin/stdout, `none` = no control channel).
    pub control: String,
    /// Stream: UDP datagrams per second (0 = none).
    pub srate: u32,
    /// Stream: UDP and TCP port.
    pub sport: u16,
    /// Stream: TCP bytes per second (0 = no TCP stream).
    pub tbps: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            modes: vec![Mode::Idle],
            id: 0,
            peers: 1,
            balance: 1_000_000,
            rate: 20,
            port: 7000,
            disk: "/dev/vda".to_string(),
            jrate: 50,
            mib: 64,
            mibps: 8,
            control: DEFAULT_CONTROL.to_string(),
            srate: 100,
            sport: 7200,
            tbps: 16 * 1024,
        }
    }
}

impl Config {
    /// Whether `mode` is among the configured modes.
    pub fn has(&self, mode: Mode) -> bool {
        self.modes.contains(&mode)
    }
}

/// A bad `cutline.*` token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Full key, e.g. `cutline.rate`.
    pub key: String,
    /// The offending value as given.
    pub value: String,
    /// Why it was rejected.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}: {}", self.key, self.value, self.reason)
    }
}

/// Splits a kernel command line into tokens; double quotes group (and are removed).
pub fn tokenize(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    for c in cmdline.chars() {
        if c == '"' {
            in_quotes = !in_quotes;
            have = true;
        } else if c.is_whitespace() && !in_quotes {
            if have {
                out.push(std::mem::take(&mut cur));
                have = false;
            }
        } else {
            cur.push(c);
            have = true;
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// The `cutline.*` tokens as (full key, value) pairs; a token without `=` gets an empty value
/// and a `None` marker so the parser can reject it.
fn cutline_pairs(cmdline: &str) -> Vec<(String, Option<String>)> {
    tokenize(cmdline)
        .into_iter()
        .filter(|t| t.starts_with("cutline."))
        .map(|t| match t.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (t, None),
        })
        .collect()
}

/// The control device named on the command line (or the default), even if other keys are bad.
pub fn control_path(cmdline: &str) -> String {
    cutline_pairs(cmdline)
        .into_iter()
        .filter(|(k, _)| k == "cutline.control")
        .filter_map(|(_, v)| v)
        .rfind(|v| !v.is_empty())
        .unwrap_or_else(|| DEFAULT_CONTROL.to_string())
}

fn num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ConfigError> {
    value.parse().map_err(|_| ConfigError {
        key: key.to_string(),
        value: value.to_string(),
        reason: "not a valid number".to_string(),
    })
}

fn bad(key: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError { key: key.to_string(), value: value.to_string(), reason: reason.to_string() }
}

/// Parses every `cutline.*` token of `cmdline` (later tokens override earlier ones);
/// other tokens are ignored.
pub fn parse(cmdline: &str) -> Result<Config, ConfigError> {
    let mut cfg = Config::default();
    for (key, value) in cutline_pairs(cmdline) {
        let Some(value) = value else {
            return Err(bad(&key, "", "missing '=VALUE'"));
        };
        let v = value.as_str();
        match key.as_str() {
            "cutline.mode" => {
                let mut modes = Vec::new();
                for part in v.split(',') {
                    let m = Mode::parse(part).ok_or_else(|| bad(&key, v, &format!("unknown mode '{part}'")))?;
                    if !modes.contains(&m) {
                        modes.push(m);
                    }
                }
                if modes.len() > 1 {
                    modes.retain(|m| *m != Mode::Idle);
                }
                cfg.modes = modes;
            }
            "cutline.id" => cfg.id = num(&key, v)?,
            "cutline.peers" => {
                cfg.peers = num(&key, v)?;
                if !(1..=254).contains(&cfg.peers) {
                    return Err(bad(&key, v, "must be 1..=254"));
                }
            }
            "cutline.balance" => cfg.balance = num(&key, v)?,
            "cutline.rate" => cfg.rate = num(&key, v)?,
            "cutline.port" => {
                cfg.port = num(&key, v)?;
                if cfg.port == 0 {
                    return Err(bad(&key, v, "must not be 0"));
                }
            }
            "cutline.disk" => {
                if !v.starts_with('/') {
                    return Err(bad(&key, v, "must be an absolute path"));
                }
                cfg.disk = value;
            }
            "cutline.jrate" => cfg.jrate = num(&key, v)?,
            "cutline.mib" => {
                cfg.mib = num(&key, v)?;
                if !(1..=1 << 20).contains(&cfg.mib) {
                    return Err(bad(&key, v, "must be 1..=1048576"));
                }
            }
            "cutline.mibps" => cfg.mibps = num(&key, v)?,
            "cutline.srate" => cfg.srate = num(&key, v)?,
            "cutline.sport" => {
                cfg.sport = num(&key, v)?;
                if cfg.sport == 0 {
                    return Err(bad(&key, v, "must not be 0"));
                }
            }
            "cutline.tbps" => cfg.tbps = num(&key, v)?,
            "cutline.control" => {
                if v != "stdio" && v != "none" && !v.starts_with('/') {
                    return Err(bad(&key, v, "must be an absolute path, 'stdio' or 'none'"));
                }
                cfg.control = value;
            }
            _ => return Err(bad(&key, v, "unknown key")),
        }
    }
    if cfg.id >= cfg.peers {
        return Err(bad("cutline.id", &cfg.id.to_string(), &format!("must be below cutline.peers={}", cfg.peers)));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_no_cutline_tokens() {
        let cfg = parse("console=ttyS0 root=/dev/ram0 quiet").expect("parse");
        assert_eq!(cfg, Config::default());
        assert_eq!(cfg.modes, vec![Mode::Idle]);
    }

    #[test]
    fn full_line() {
        let cfg = parse(
            "console=ttyS0 cutline.mode=ledger,journal cutline.id=2 cutline.peers=3 \
             cutline.balance=500 cutline.rate=7 cutline.port=7100 cutline.disk=/dev/vdb \
             cutline.jrate=0 cutline.mib=16 cutline.mibps=2 cutline.control=/dev/hvc1\n",
        )
        .expect("parse");
        assert_eq!(cfg.modes, vec![Mode::Ledger, Mode::Journal]);
        assert_eq!((cfg.id, cfg.peers), (2, 3));
        assert_eq!((cfg.balance, cfg.rate, cfg.port), (500, 7, 7100));
        assert_eq!((cfg.disk.as_str(), cfg.jrate), ("/dev/vdb", 0));
        assert_eq!((cfg.mib, cfg.mibps), (16, 2));
        assert_eq!(cfg.control, "/dev/hvc1");
        assert!(cfg.has(Mode::Journal) && !cfg.has(Mode::Dirtier));
    }

    #[test]
    fn stream_settings() {
        let cfg = parse("cutline.mode=stream cutline.peers=2 cutline.srate=500 cutline.sport=7300 cutline.tbps=0")
            .expect("parse");
        assert_eq!(cfg.modes, vec![Mode::Stream]);
        assert_eq!((cfg.srate, cfg.sport, cfg.tbps), (500, 7300, 0));
        assert!(parse("cutline.sport=0").is_err());
    }

    #[test]
    fn modes_dedup_and_idle_dropped() {
        let cfg = parse("cutline.mode=idle,dirtier,dirtier").expect("parse");
        assert_eq!(cfg.modes, vec![Mode::Dirtier]);
        let cfg = parse("cutline.mode=idle").expect("parse");
        assert_eq!(cfg.modes, vec![Mode::Idle]);
    }

    #[test]
    fn later_token_wins_and_quotes() {
        let cfg = parse("cutline.rate=1 \"cutline.disk=/dev/vdc\" cutline.rate=9").expect("parse");
        assert_eq!(cfg.rate, 9);
        assert_eq!(cfg.disk, "/dev/vdc");
    }

    #[test]
    fn errors_name_key_and_value() {
        let e = parse("cutline.rate=fast").expect_err("bad number");
        assert_eq!((e.key.as_str(), e.value.as_str()), ("cutline.rate", "fast"));
        let e = parse("cutline.colour=blue").expect_err("unknown key");
        assert_eq!((e.key.as_str(), e.value.as_str()), ("cutline.colour", "blue"));
        let e = parse("cutline.mode=ledger,banana").expect_err("unknown mode");
        assert_eq!(e.value, "ledger,banana");
        let e = parse("cutline.mode=").expect_err("empty mode");
        assert_eq!(e.key, "cutline.mode");
        let e = parse("cutline.peers=2 cutline.id=2").expect_err("id too big");
        assert_eq!(e.key, "cutline.id");
        assert!(parse("cutline.peers=0").is_err());
        assert!(parse("cutline.port=0").is_err());
        assert!(parse("cutline.mib=0").is_err());
        assert!(parse("cutline.disk=vda").is_err());
        assert!(parse("cutline.id").is_err());
        assert!(parse("cutline.balance=-1").is_err());
    }

    #[test]
    fn control_path_survives_bad_keys() {
        assert_eq!(control_path("cutline.bogus=1"), DEFAULT_CONTROL);
        assert_eq!(control_path("cutline.bogus=1 cutline.control=/dev/hvc0"), "/dev/hvc0");
    }

    #[test]
    fn tokenizer() {
        assert_eq!(tokenize("  a=1\tb=\"x y\"  c "), vec!["a=1", "b=x y", "c"]);
        assert!(tokenize("   ").is_empty());
    }
}
