//! Where a store lives: a local directory, or `s3://BUCKET[/PREFIX]` on an S3-compatible
//! server whose endpoint, region and credentials come from the environment or a file.
//!
//! | variable                         | meaning                                             |
//! |----------------------------------|-----------------------------------------------------|
//! | `CUTLINE_S3_ENDPOINT`            | `https://host:port` (`http://` only to loopback)    |
//! | `CUTLINE_S3_REGION`              | the region the server expects (default `us-east-1`) |
//! | `CUTLINE_S3_CREDENTIALS_FILE`    | a file of `access_key_id = …` and `secret_access_key = …` lines, readable by its owner alone |
//! | `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` | the credentials, when no file is named  |

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::ObjectsError;

/// Where a store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this host.
    Local(PathBuf),
    /// A bucket on an S3-compatible server.
    S3(S3Config),
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Local(p) => write!(f, "Local({})", p.display()),
            Location::S3(c) => write!(f, "S3({})", c.describe()),
        }
    }
}

/// An S3 bucket, its server and the credentials to reach it.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port`.
    pub endpoint: String,
    /// The bucket.
    pub bucket: String,
    /// A key prefix inside the bucket ("" or ending without `/`).
    pub prefix: String,
    /// The region the server expects.
    pub region: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (never printed).
    pub secret_access_key: String,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

fn config(why: impl Into<String>) -> ObjectsError {
    ObjectsError::Config(why.into())
}

impl S3Config {
    /// `s3://bucket/prefix at endpoint`, for messages (no secrets).
    pub fn describe(&self) -> String {
        let prefix = if self.prefix.is_empty() { String::new() } else { format!("/{}", self.prefix) };
        format!("s3://{}{prefix} at {}", self.bucket, self.endpoint)
    }

    /// Checks the endpoint: a URL with a host, and plain HTTP only to a loopback address
    /// (credentials and checkpoints would otherwise cross the network in the clear).
    pub fn check(&self) -> Result<(), ObjectsError> {
        let url = url::Url::parse(&self.endpoint)
            .map_err(|e| config(format!("endpoint {:?} is not a URL: {e}", self.endpoint)))?;
        let host = url.host_str().ok_or_else(|| config(format!("endpoint {} has no host", self.endpoint)))?;
        match url.scheme() {
            "https" => {}
            "http" => {
                let loopback = host == "localhost"
                    || host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(config(format!(
                        "endpoint {} is plain HTTP to a host that is not loopback: use https",
                        self.endpoint
                    )));
                }
            }
            other => {
                return Err(config(format!("endpoint {}: scheme {other} is neither http nor https", self.endpoint)));
            }
        }
        if self.bucket.is_empty() {
            return Err(config("no bucket named"));
        }
        if self.access_key_id.is_empty() || self.secret_access_key.is_empty() {
            return Err(config(format!("no credentials for {}", self.describe())));
        }
        Ok(())
    }
}

impl Location {
    /// Parses `store`: `s3://BUCKET[/PREFIX]` (its server and credentials from `env`), a
    /// `file://` URL or a path.
    pub fn parse(store: &str, env: impl Fn(&str) -> Option<String>) -> Result<Location, ObjectsError> {
        if let Some(rest) = store.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let endpoint = env("CUTLINE_S3_ENDPOINT")
                .ok_or_else(|| config(format!("{store}: set CUTLINE_S3_ENDPOINT to the server's URL")))?;
            let region = env("CUTLINE_S3_REGION").unwrap_or_else(|| "us-east-1".into());
            let (access_key_id, secret_access_key) = match env("CUTLINE_S3_CREDENTIALS_FILE") {
                Some(file) => read_credentials(Path::new(&file))?,
                None => {
                    (env("AWS_ACCESS_KEY_ID").unwrap_or_default(), env("AWS_SECRET_ACCESS_KEY").unwrap_or_default())
                }
            };
            let cfg = S3Config {
                endpoint,
                bucket: bucket.to_owned(),
                prefix: prefix.trim_matches('/').to_owned(),
                region,
                access_key_id,
                secret_access_key,
            };
            cfg.check()?;
            return Ok(Location::S3(cfg));
        }
        let path = store.strip_prefix("file://").unwrap_or(store);
        if path.is_empty() {
            return Err(config("an empty store path"));
        }
        Ok(Location::Local(PathBuf::from(path)))
    }

    /// [`Location::parse`] with the process environment.
    pub fn from_env(store: &str) -> Result<Location, ObjectsError> {
        Location::parse(store, |k| std::env::var(k).ok())
    }

    /// The local directory, for a local store.
    pub fn local_root(&self) -> Option<&Path> {
        match self {
            Location::Local(p) => Some(p),
            Location::S3(_) => None,
        }
    }
}

/// Reads `access_key_id = …` and `secret_access_key = …` from `path`, refusing a file
/// group or others can read.
pub fn read_credentials(path: &Path) -> Result<(String, String), ObjectsError> {
    let io = |source| ObjectsError::Io { what: "cannot read credentials", path: path.display().to_string(), source };
    let mode = std::fs::metadata(path).map_err(io)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(config(format!(
            "credentials file {} is readable by others (mode {:o}): chmod 0600 it",
            path.display(),
            mode & 0o7777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let (mut id, mut secret) = (String::new(), String::new());
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let Some((k, v)) = line.split_once('=') else {
            return Err(config(format!("credentials file {}: a line without '='", path.display())));
        };
        match k.trim() {
            "access_key_id" => id = v.trim().to_owned(),
            "secret_access_key" => secret = v.trim().to_owned(),
            other => return Err(config(format!("credentials file {}: unknown setting {other}", path.display()))),
        }
    }
    Ok((id, secret))
}
