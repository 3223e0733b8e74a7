//! A real Garage cluster for the tests: three nodes on loopback, replication factor 3,
//! consistent mode, `metadata_fsync` and `data_fsync` on, compression off; one bucket
//! and one key. Nodes can be killed (SIGKILL), restarted and have their data wiped. Every
//! node process is killed, by its own handle, when the cluster is dropped, even by a
//! panic; its files live in the test's directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// The Garage binary: `$CUTLINE_GARAGE`, `garage` on PATH, or `~/.cargo/bin/garage`
/// (where `ci/install.sh` puts it).
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("CUTLINE_GARAGE") {
        return Ok(PathBuf::from(p));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("garage"))
        .find(|p| p.is_file());
    let cargo = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/garage")).filter(|p| p.is_file());
    on_path.or(cargo).context("no garage binary: run ci/install.sh (it builds Garage 2.5 with cargo install)")
}

/// One node.
struct Node {
    config: PathBuf,
    data: PathBuf,
    s3: u16,
    child: Option<Child>,
    log: PathBuf,
}

/// A three-node Garage cluster with a bucket.
pub struct Garage {
    bin: PathBuf,
    nodes: Vec<Node>,
    /// The bucket.
    pub bucket: String,
    /// The access key id.
    pub key_id: String,
    /// The secret key.
    pub secret: String,
}

/// The S3 region the cluster answers to.
pub const REGION: &str = "garage";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    // /dev/urandom through std: no rand dependency for test secrets.
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Garage {
    /// Starts three nodes under `dir`, lays them out with replication factor 3 and creates
    /// a bucket and a key.
    pub fn start(dir: &Path) -> anyhow::Result<Garage> {
        let bin = binary()?;
        let secret = hex(32);
        let mut nodes = Vec::new();
        for i in 0..3 {
            let base = dir.join(format!("garage{i}"));
            std::fs::create_dir_all(&base)?;
            let (rpc, s3, admin) = (free_port()?, free_port()?, free_port()?);
            let data = base.join("data");
            let config = base.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
                     replication_factor = 3\nconsistency_mode = \"consistent\"\n\
                     metadata_fsync = true\ndata_fsync = true\ncompression_level = \"none\"\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc}\"\nrpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                     rpc_secret = \"{secret}\"\n\n[s3_api]\ns3_region = \"{REGION}\"\n\
                     api_bind_addr = \"127.0.0.1:{s3}\"\n\n[admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                    meta = base.join("meta").display(),
                    data = data.display(),
                ),
            )?;
            nodes.push(Node { config, data, s3, child: None, log: base.join("garage.log") });
        }
        let mut g = Garage { bin, nodes, bucket: "cutline".into(), key_id: String::new(), secret: String::new() };
        for i in 0..3 {
            g.run_node(i)?;
        }
        g.configure().context("configuring the Garage cluster")?;
        Ok(g)
    }

    fn cli(&self, node: usize, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.nodes[node].config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} {args:?}", self.bin.display()))?;
        ensure!(
            out.status.success(),
            "garage {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Retries `f` until it succeeds or `timeout` passes (nodes take a moment to answer).
    fn retry<T>(timeout: Duration, mut f: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            match f() {
                Ok(v) => return Ok(v),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn configure(&mut self) -> anyhow::Result<()> {
        let t = Duration::from_secs(30);
        let ids: Vec<String> = (0..3)
            .map(|i| Self::retry(t, || Ok(self.cli(i, &["node", "id", "-q"])?.trim().to_owned())))
            .collect::<anyhow::Result<_>>()?;
        for id in &ids[1..] {
            Self::retry(t, || self.cli(0, &["node", "connect", id]))?;
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            Self::retry(t, || self.cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]))?;
        }
        Self::retry(t, || self.cli(0, &["layout", "apply", "--version", "1"]))?;
        // A key whose id and secret the test chooses: nothing to parse.
        self.key_id = format!("GK{}", hex(12));
        self.secret = hex(32);
        Self::retry(t, || self.cli(0, &["key", "import", "--yes", "-n", "cutline-test", &self.key_id, &self.secret]))?;
        Self::retry(t, || self.cli(0, &["bucket", "create", &self.bucket]))?;
        Self::retry(t, || {
            self.cli(0, &["bucket", "allow", &self.bucket, "--read", "--write", "--owner", "--key", "cutline-test"])
        })?;
        Ok(())
    }

    fn run_node(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        ensure!(node.child.is_none(), "garage node {i} already runs");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&node.log)?;
        let child = Command::new(&self.bin)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting garage node {i}"))?;
        node.child = Some(child);
        Ok(())
    }

    /// The S3 endpoint of node `i` (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].s3)
    }

    /// The environment a cutline process needs to use the bucket through node `i`.
    pub fn env(&self, i: usize) -> Vec<(String, String)> {
        vec![
            ("CUTLINE_S3_ENDPOINT".into(), self.endpoint(i)),
            ("CUTLINE_S3_REGION".into(), REGION.into()),
            ("AWS_ACCESS_KEY_ID".into(), self.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret.clone()),
        ]
    }

    /// The store URL of the bucket under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// An object store location for the bucket under `prefix`, through node `i`.
    pub fn location(&self, i: usize, prefix: &str) -> anyhow::Result<cutline_objects::Location> {
        let env = self.env(i);
        Ok(cutline_objects::Location::parse(&self.url(prefix), |k| {
            env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
        })?)
    }

    /// SIGKILLs node `i`.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(mut child) = self.nodes[i].child.take() else { bail!("garage node {i} is not running") };
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts node `i` again and waits until it answers.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.run_node(i)?;
        Self::retry(Duration::from_secs(30), || self.cli(i, &["status"]).map(|_| ()))
            .with_context(|| format!("garage node {i} did not come back; its log ends:\n{}", self.log_tail(i)))
    }

    /// Kills node `i`, deletes every block in its data directory (all but the
    /// `garage-marker` Garage refuses to start without; its metadata stays) and starts it
    /// again. Returns how many block files went.
    pub fn wipe_data(&mut self, i: usize) -> anyhow::Result<usize> {
        self.kill(i)?;
        let mut removed = 0;
        for e in std::fs::read_dir(&self.nodes[i].data)? {
            let e = e?;
            if e.file_name() == "garage-marker" {
                continue;
            }
            if e.file_type()?.is_dir() {
                removed += count_files(&e.path());
                std::fs::remove_dir_all(e.path())?;
            } else {
                removed += 1;
                std::fs::remove_file(e.path())?;
            }
        }
        self.restart(i)?;
        Ok(removed)
    }

    /// The last lines of node `i`'s log, for failure messages.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 })
        .sum()
}

impl Drop for Garage {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
