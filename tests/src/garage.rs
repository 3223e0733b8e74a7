//! A real Garage cluster for the tests: three nodes, replication factor 3, consistent
//! mode, `metadata_fsync` and `data_fsync` on, compression off; one bucket and one key.
//!
//! - [`Garage`]: the nodes are processes on this machine, on loopback. They can be killed
//!   (SIGKILL), restarted and have their data wiped. Every node process is killed, by its
//!   own handle, when the cluster is dropped, even by a panic; its files live in the
//!   test's directory.
//! - [`HostedGarage`]: one node in each of several host containers
//!   ([`crate::hosts::Host`]), storage nodes and gateways, talking RPC across the test's
//!   network; each host's processes reach S3 at their own node on loopback. The nodes go
//!   with their containers.

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

/// What differs between nodes' configuration files.
struct NodeConfig<'a> {
    meta: &'a str,
    data: &'a str,
    rpc_bind: &'a str,
    rpc_public: &'a str,
    rpc_secret: &'a str,
    s3_bind: &'a str,
    admin_bind: &'a str,
    /// `id@host:port` of nodes to connect to at start.
    bootstrap: &'a [String],
    /// More top-level settings, one a line.
    tuning: &'a str,
}

/// A node's `garage.toml`: replication factor 3, consistent, fsyncs on, no compression.
fn config_text(c: NodeConfig<'_>) -> String {
    format!(
        "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"lmdb\"\n\
         replication_factor = 3\nconsistency_mode = \"consistent\"\n\
         metadata_fsync = true\ndata_fsync = true\ncompression_level = \"none\"\n\
         rpc_bind_addr = \"{rpc_bind}\"\nrpc_public_addr = \"{rpc_public}\"\n\
         rpc_secret = \"{secret}\"\nbootstrap_peers = {bootstrap:?}\n{tuning}\n[s3_api]\ns3_region = \"{REGION}\"\n\
         api_bind_addr = \"{s3}\"\n\n[admin]\napi_bind_addr = \"{admin}\"\n",
        meta = c.meta,
        data = c.data,
        rpc_bind = c.rpc_bind,
        rpc_public = c.rpc_public,
        secret = c.rpc_secret,
        s3 = c.s3_bind,
        admin = c.admin_bind,
        bootstrap = c.bootstrap,
        tuning = c.tuning,
    )
}

/// Connects node 0 to the others, gives every node but `gateways` 1 GB in one zone and
/// the gateways no data, applies the layout, and makes `bucket` and a key that may use
/// it. `cli(i, args)` runs the garage CLI against node `i` of `nodes`. Returns the key's
/// id and secret, and the nodes' ids.
fn lay_out(
    cli: &dyn Fn(usize, &[&str]) -> anyhow::Result<String>,
    nodes: usize,
    gateways: &[usize],
    bucket: &str,
) -> anyhow::Result<(String, String, Vec<String>)> {
    let t = Duration::from_secs(30);
    let ids: Vec<String> = (0..nodes)
        .map(|i| retry(t, || Ok(cli(i, &["node", "id", "-q"])?.trim().to_owned())))
        .collect::<anyhow::Result<_>>()?;
    for id in &ids[1..] {
        retry(t, || cli(0, &["node", "connect", id]))?;
    }
    for (i, id) in ids.iter().enumerate() {
        let short = id.split('@').next().unwrap_or(id);
        if gateways.contains(&i) {
            retry(t, || cli(0, &["layout", "assign", "-z", "dc1", "-g", short]))?;
        } else {
            retry(t, || cli(0, &["layout", "assign", "-z", "dc1", "-c", "1G", short]))?;
        }
    }
    retry(t, || cli(0, &["layout", "apply", "--version", "1"]))?;
    // A key whose id and secret the test chooses: nothing to parse.
    let key_id = format!("GK{}", hex(12));
    let secret = hex(32);
    retry(t, || cli(0, &["key", "import", "--yes", "-n", "cutline-test", &key_id, &secret]))?;
    retry(t, || cli(0, &["bucket", "create", bucket]))?;
    retry(t, || cli(0, &["bucket", "allow", bucket, "--read", "--write", "--owner", "--key", "cutline-test"]))?;
    let ids = ids.iter().map(|id| id.split('@').next().unwrap_or(id).to_owned()).collect();
    Ok((key_id, secret, ids))
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
            let (rpc_addr, s3_addr, admin_addr) =
                (format!("127.0.0.1:{rpc}"), format!("127.0.0.1:{s3}"), format!("127.0.0.1:{admin}"));
            let text = config_text(NodeConfig {
                meta: &base.join("meta").display().to_string(),
                data: &data.display().to_string(),
                rpc_bind: &rpc_addr,
                rpc_public: &rpc_addr,
                rpc_secret: &secret,
                s3_bind: &s3_addr,
                admin_bind: &admin_addr,
                bootstrap: &[],
                tuning: "",
            });
            std::fs::write(&config, text)?;
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

    fn configure(&mut self) -> anyhow::Result<()> {
        let (key_id, secret, _) = lay_out(&|i, args| self.cli(i, args), 3, &[], &self.bucket)?;
        (self.key_id, self.secret) = (key_id, secret);
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
        retry(Duration::from_secs(30), || self.cli(i, &["status"]).map(|_| ()))
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

/// A Garage cluster whose nodes run in host containers: a storage node in each host of
/// [`HostedGarage::start`]'s `storage`, a gateway (no data) in each of `gateways`. Every
/// node keeps its files under [`HostedGarage::DIR`] in its host, binds RPC on every
/// address of its host and advertises the host's address on the test network, and
/// serves S3 and its admin API on its host's loopback only: a host's processes reach the
/// bucket at [`HostedGarage::ENDPOINT`], in plain HTTP as cutline allows to loopback.
pub struct HostedGarage {
    /// The bucket.
    pub bucket: String,
    /// The access key id.
    pub key_id: String,
    /// The secret key.
    pub secret: String,
    rpc_secret: String,
    /// The layout version applied last.
    layout: u32,
    /// `id@host:port` of every storage node, by its host's DNS name: the peers a node
    /// started later connects to (its address may have changed, theirs not).
    storage: Vec<String>,
}

impl HostedGarage {
    /// Where a node keeps its configuration, metadata, data and log, in its host.
    pub const DIR: &'static str = "/vms/garage";
    /// Its configuration file, in its host.
    pub const CONFIG: &'static str = "/vms/garage/garage.toml";
    /// The S3 endpoint of a host's own node, from inside that host.
    pub const ENDPOINT: &'static str = "http://127.0.0.1:3900";
    /// The RPC port of every node.
    pub const RPC_PORT: u16 = 3901;
    /// `rpc_timeout_msec` of every node, unless `$CUTLINE_GARAGE_RPC_TIMEOUT_MS` says.
    /// Garage sends a quorum read to two nodes first and asks the third only when one
    /// fails; a node lost without closing its connections (a host's power loss, a
    /// partition) fails only after this timeout (Garage's default: 300 s) or once its
    /// pings have failed (4 × 15 s), and every request that picked it waits meanwhile.
    pub const RPC_TIMEOUT_MS: u64 = 2000;

    /// `rpc_timeout_msec` of the nodes: [`HostedGarage::RPC_TIMEOUT_MS`] or
    /// `$CUTLINE_GARAGE_RPC_TIMEOUT_MS`.
    pub fn rpc_timeout_ms() -> u64 {
        std::env::var("CUTLINE_GARAGE_RPC_TIMEOUT_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(Self::RPC_TIMEOUT_MS)
    }

    /// Starts a node in each of `storage` and `gateways`, lays them out (the storage
    /// nodes with 1 GB each, replication factor 3) and creates the bucket and a key.
    pub fn start(storage: &[&crate::hosts::Host], gateways: &[&crate::hosts::Host]) -> anyhow::Result<HostedGarage> {
        let mut g = HostedGarage {
            bucket: "cutline".into(),
            key_id: String::new(),
            secret: String::new(),
            rpc_secret: hex(32),
            layout: 0,
            storage: Vec::new(),
        };
        let all: Vec<&crate::hosts::Host> = storage.iter().chain(gateways).copied().collect();
        for h in &all {
            g.start_node(h)?;
        }
        let gw: Vec<usize> = (storage.len()..all.len()).collect();
        let (key_id, secret, ids) = lay_out(&|i, args| Self::cli(all[i], args), all.len(), &gw, &g.bucket)
            .context("laying out the Garage cluster in the hosts")?;
        (g.key_id, g.secret, g.layout) = (key_id, secret, 1);
        g.storage =
            storage.iter().zip(ids).map(|(h, id)| format!("{id}@{}:{}", h.container_name(), Self::RPC_PORT)).collect();
        Ok(g)
    }

    /// Writes the node's configuration into `host` (advertising the host's address now)
    /// and starts `garage server` there; returns its pid in the host. A node started
    /// again in the same work directory keeps its identity. Once the cluster is laid
    /// out, a node starts connected to the storage nodes (`bootstrap_peers`, by their
    /// hosts' DNS names): the others know it only at the address it had.
    pub fn start_node(&self, host: &crate::hosts::Host) -> anyhow::Result<u32> {
        let dir = host.host_path(Self::DIR)?;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let rpc_bind = format!("0.0.0.0:{}", Self::RPC_PORT);
        let rpc_public = format!("{}:{}", host.ip()?, Self::RPC_PORT);
        let text = config_text(NodeConfig {
            meta: &format!("{}/meta", Self::DIR),
            data: &format!("{}/data", Self::DIR),
            rpc_bind: &rpc_bind,
            rpc_public: &rpc_public,
            rpc_secret: &self.rpc_secret,
            s3_bind: "127.0.0.1:3900",
            admin_bind: "127.0.0.1:3903",
            bootstrap: &self.storage,
            tuning: &format!("rpc_timeout_msec = {}\n", Self::rpc_timeout_ms()),
        });
        std::fs::write(host.host_path(Self::CONFIG)?, text)?;
        let garage = host.garage()?;
        let spawned = host.spawn(
            &["env", "RUST_LOG=garage=warn", "NO_COLOR=1", garage, "-c", Self::CONFIG, "server"],
            "garage/garage.log",
        )?;
        Ok(spawned.pid)
    }

    /// Adds a gateway node in `host` to the running cluster (`via` is a host whose node
    /// is in it): starts it, connects it, and applies the next layout version.
    pub fn add_gateway(&mut self, host: &crate::hosts::Host, via: &crate::hosts::Host) -> anyhow::Result<u32> {
        let pid = self.start_node(host)?;
        let t = Duration::from_secs(30);
        let id = retry(t, || Ok(Self::cli(host, &["node", "id", "-q"])?.trim().to_owned()))?;
        retry(t, || Self::cli(via, &["node", "connect", &id]))?;
        let short = id.split('@').next().unwrap_or(&id).to_owned();
        retry(t, || Self::cli(via, &["layout", "assign", "-z", "dc1", "-g", &short]))?;
        let next = (self.layout + 1).to_string();
        retry(t, || Self::cli(via, &["layout", "apply", "--version", &next]))?;
        self.layout += 1;
        Ok(pid)
    }

    /// Runs the garage CLI against `host`'s node, in the host.
    pub fn cli(host: &crate::hosts::Host, args: &[&str]) -> anyhow::Result<String> {
        let mut argv = vec![host.garage()?, "-c", Self::CONFIG];
        argv.extend_from_slice(args);
        host.exec_ok(&argv)
    }

    /// The credentials file's text (`access_key_id = …`, `secret_access_key = …`).
    pub fn credentials(&self) -> String {
        format!("access_key_id = {}\nsecret_access_key = {}\n", self.key_id, self.secret)
    }

    /// The environment of a cutline process in a host with a node: its own node's
    /// endpoint, the region, and `credentials_file` (a path in the host).
    pub fn env(&self, credentials_file: &str) -> Vec<String> {
        vec![
            format!("CUTLINE_S3_ENDPOINT={}", Self::ENDPOINT),
            format!("CUTLINE_S3_REGION={REGION}"),
            format!("CUTLINE_S3_CREDENTIALS_FILE={credentials_file}"),
        ]
    }

    /// The store URL of the bucket under `prefix`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }
}
