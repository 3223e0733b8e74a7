//! `cutline`: the coordinator daemon, the commands that ask it, and the demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use coordinator::server::{self, OutputCommit, Rollback};
use coordinator::tls::ServerFiles;
use coordinator::{client, demo};
use serde_json::Value;
use sidecar::proto::Request;
use sidecar::transport::{ClientArgs, Endpoint, Token};

/// Globally consistent checkpoints of a cluster of QEMU VMs, and rollback on failure.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// State directory of the coordinator (records and its default socket).
    #[arg(long, global = true, default_value = "/var/lib/cutline", env = "CUTLINE_STATE")]
    state: PathBuf,
    /// The coordinator's address: a unix socket (default STATE/cutline.sock) or
    /// tcp:HOST:PORT (TLS and the token: --tls-ca, --tls-cert, --tls-key, --token-file or
    /// CUTLINE_TOKEN).
    #[arg(long, global = true, env = "CUTLINE_COORDINATOR")]
    coordinator: Option<String>,
    #[command(flatten)]
    transport: ClientArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the coordinator.
    Serve {
        /// Also listen on TCP, HOST:PORT: always TLS 1.3 with client certificates, and the
        /// token (needs --tls-cert, --tls-key, --tls-client-ca, and --token-file or
        /// CUTLINE_TOKEN).
        #[arg(long, value_name = "HOST:PORT")]
        listen: Option<String>,
        /// The CA certificate (PEM) that must have signed every TCP client's certificate.
        #[arg(long, env = "CUTLINE_TLS_CLIENT_CA", value_name = "PEM")]
        tls_client_ca: Option<PathBuf>,
        /// A peer's TLS handshake and first message must be done within this of its connect.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        first_message_timeout: Duration,
        /// Connections served at once (TLS handshakes under way included); more are refused.
        #[arg(long, default_value_t = 256)]
        max_connections: usize,
        /// Take a checkpoint every this long (e.g. 2s, 500ms).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Committed epochs kept.
        #[arg(long, default_value_t = 2)]
        keep: usize,
        /// Write commit records to this object store (s3://BUCKET/PREFIX, with
        /// CUTLINE_S3_ENDPOINT, CUTLINE_S3_REGION and credentials from
        /// CUTLINE_S3_CREDENTIALS_FILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; or a
        /// directory) rather than under --state.
        #[arg(long, env = "CUTLINE_RECORDS", value_name = "STORE")]
        records: Option<String>,
        /// What a failure rolls back.
        #[arg(long, value_enum, default_value = "cluster")]
        rollback: Rollback,
        /// When held output is released: after every cut (release) or after the commit (strict).
        #[arg(long, value_enum, default_value = "release")]
        output_commit: OutputCommit,
        /// Heartbeat period of the members.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        heartbeat: Duration,
        /// Missing heartbeats for this long make a member's sidecar lost (its VM is failed
        /// only on evidence: its QEMU process gone).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
        timeout: Duration,
        /// Longest a protocol or recovery step may take.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        step_timeout: Duration,
        /// Recovery attempts before the cluster halts (and says why in `status`).
        #[arg(long, default_value_t = 3)]
        recovery_attempts: u32,
        /// The lease a host agent's granted heartbeat buys its host: a host that cannot
        /// renew it in time kills its VMs (fences) on its own.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        lease: Duration,
        /// Waited beyond a silent host's lease before its VMs restart elsewhere: covers
        /// the hosts' clock rates differing and the fence's own time (docs/HOSTS.md).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "2s")]
        lease_margin: Duration,
        /// The host a lost host's VMs go to first (seed 003's backup host), while it is up
        /// and has room; else the host with the most free memory.
        #[arg(long)]
        standby: Option<String>,
    },
    /// Members, health, last committed epoch, what runs now.
    Status,
    /// Take one consistent checkpoint of the cluster now and wait for it.
    Checkpoint,
    /// Committed epochs.
    List,
    /// Roll the whole cluster back to an epoch (default: the last committed one).
    Restore {
        /// The epoch.
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Re-hash every block of an epoch's checkpoints.
    Verify {
        /// The epoch (default: the last committed one).
        #[arg(long)]
        epoch: Option<u64>,
    },
    /// Remove a member from the cluster (an epoch otherwise waits for every member).
    RemoveMember {
        /// The member (VM) name.
        name: String,
    },
    /// Boot 3 guests, checkpoint them, kill one, roll back, check the invariants, report.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon's lifecycle lines are info; the commands that ask it stay quiet.
    let default = if matches!(cli.cmd, Cmd::Serve { .. }) { "info" } else { "warn" };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default.into()))
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cutline: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = cli.json;
    match rt.block_on(run(cli)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(3),
        Err(e) => {
            let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
            if json {
                println!("{}", serde_json::json!({"error": chain.join(": ")}));
            } else {
                eprintln!("cutline: {}", chain.join(": "));
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let addr = cli.coordinator.clone().unwrap_or_else(|| cli.state.join("cutline.sock").display().to_string());
    let endpoint: Endpoint = addr.parse()?;
    // The TLS material and the token are read only by the commands that ask.
    let ask = |r: Request| {
        let dialer = cli.transport.dialer(&endpoint);
        async move { anyhow::Ok(client::ask(&dialer?, r).await?) }
    };
    let out = |v: &Value, text: String| {
        if cli.json {
            println!("{v}");
        } else {
            println!("{text}");
        }
    };
    match cli.cmd {
        Cmd::Serve {
            listen,
            tls_client_ca,
            first_message_timeout,
            max_connections,
            interval,
            keep,
            records,
            rollback,
            output_commit,
            heartbeat,
            timeout,
            step_timeout,
            recovery_attempts,
            lease,
            lease_margin,
            standby,
        } => {
            if lease <= heartbeat * 2 {
                anyhow::bail!(
                    "--lease {lease:?} must be more than twice --heartbeat {heartbeat:?}, or a host fences between two heartbeats"
                );
            }
            sidecar::store::private::create_dir_all(&cli.state)?;
            let mut cfg = server::Config::new(&cli.state);
            if let Some(a) = cli.coordinator.as_deref().filter(|a| !a.starts_with("tcp:")) {
                cfg.socket = PathBuf::from(a);
            }
            if let Some(addr) = listen {
                let t = &cli.transport;
                let tls =
                    ServerFiles::from_flags(t.tls_cert.as_deref(), t.tls_key.as_deref(), tls_client_ca.as_deref())?;
                let token = Token::load(t.token_file.as_deref())?;
                cfg.tcp = Some(server::Tcp { addr, tls, token });
            }
            cfg.first_message_timeout = first_message_timeout;
            cfg.max_connections = max_connections.max(1);
            cfg.interval = interval;
            cfg.keep = keep.max(1);
            cfg.records = records.as_deref().map(cutline_objects::Location::from_env).transpose()?;
            cfg.rollback = rollback;
            cfg.output_commit = output_commit;
            cfg.heartbeat = heartbeat;
            cfg.failure_timeout = timeout;
            cfg.step_timeout = step_timeout;
            cfg.recovery_attempts = recovery_attempts.max(1);
            cfg.lease = lease;
            cfg.lease_margin = lease_margin;
            cfg.standby = standby;
            server::run(cfg, sidecar::shutdown_signal()).await?;
        }
        Cmd::Status => {
            let v = ask(Request::Status).await?;
            let f = &v["figures"];
            let mut text = format!(
                "cluster {} (incarnation {}): last committed epoch {}, now {}\n",
                v["cluster"].as_str().unwrap_or(""),
                v["incarnation"],
                v["last_committed"],
                v["now"].as_str().unwrap_or("")
            );
            if v["phase"]["state"] == "halted" {
                text.push_str(&format!("  HALTED: {}\n", v["phase"]["reason"].as_str().unwrap_or("")));
            }
            if let Some(p) = v["paused_vms"].as_array().filter(|p| !p.is_empty()) {
                text.push_str(&format!("  paused VMs: {}\n", Value::from(p.clone())));
            }
            if f["aborted_in_a_row"].as_u64().unwrap_or(0) > 0 {
                text.push_str(&format!(
                    "  checkpoints failing: {} epoch(s) aborted since the last commit; last: {}\n",
                    f["aborted_in_a_row"],
                    f["recent"]["aborted"]["last"]
                        .as_array()
                        .and_then(|a| a.last())
                        .map_or("", |a| a["reason"].as_str().unwrap_or(""))
                ));
            }
            text.push_str(&format!(
                "  epochs committed {}, aborted {}; recoveries {} (p50 {} ms); halts {}\n",
                f["epochs_committed"], f["epochs_aborted"], f["recoveries"], f["recovery_ms"]["p50"], f["halts"]
            ));
            for m in v["members"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "  {:<12} {:<28} on {:<12} pid {:<8} heartbeat {:.0} ms ago\n",
                    m["name"].as_str().unwrap_or(""),
                    m["health"].as_str().unwrap_or(""),
                    m["host"].as_str().unwrap_or("-"),
                    m["pid"],
                    m["last_heartbeat_ms"].as_f64().unwrap_or(0.0)
                ));
            }
            for h in v["hosts"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "  host {:<12} {:<5} {:<16} {} cores, {} MiB free, lease renewed {:.0} ms ago, runs {}\n",
                    h["name"].as_str().unwrap_or(""),
                    h["state"]["state"].as_str().unwrap_or(""),
                    h["address"].as_str().unwrap_or(""),
                    h["cores"],
                    h["mem_available"].as_u64().unwrap_or(0) >> 20,
                    h["since_grant_ms"].as_f64().unwrap_or(0.0),
                    h["vms"]
                ));
            }
            out(&v, text.trim_end().to_owned());
        }
        Cmd::Checkpoint => {
            let v = ask(Request::Checkpoint).await?;
            let mut text = format!(
                "epoch {} committed (whole epoch {:.1} ms, cut {:.1} ms)\n",
                v["epoch"],
                v["timings"]["total_ms"].as_f64().unwrap_or(0.0),
                v["timings"]["cut_ms"].as_f64().unwrap_or(0.0)
            );
            for m in v["members"].as_array().into_iter().flatten() {
                text.push_str(&format!(
                    "  {:<12} checkpoint {:<6} pause {:>6.1} ms  network hold {:>6.1} ms  stored {} KiB\n",
                    m["name"].as_str().unwrap_or(""),
                    m["checkpoint"],
                    m["pause_ms"].as_f64().unwrap_or(0.0),
                    m["hold_ms"].as_f64().unwrap_or(0.0),
                    m["bytes_stored"].as_u64().unwrap_or(0) >> 10
                ));
            }
            out(&v, text.trim_end().to_owned());
        }
        Cmd::List => {
            let v = ask(Request::List).await?;
            let text = v["epochs"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    format!(
                        "epoch {:>6}  members {}  committed at {}",
                        r["epoch"],
                        r["members"].as_array().map_or(0, Vec::len),
                        r["committed_unix_ms"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            out(&v, if text.is_empty() { "no committed epochs".into() } else { text });
        }
        Cmd::Restore { epoch } => {
            let v = ask(Request::Restore { epoch }).await?;
            out(
                &v,
                format!(
                    "cluster rolled back to epoch {} in {:.0} ms",
                    v["epoch"],
                    v["recovery_ms"].as_f64().unwrap_or(0.0)
                ),
            );
        }
        Cmd::Verify { epoch } => {
            let v = ask(Request::Verify { epoch }).await?;
            let ok = v["ok"] == true;
            out(
                &v,
                if ok {
                    format!("epoch {} verified", v["epoch"])
                } else {
                    format!("epoch {} is damaged: {}", v["epoch"], v["damage"])
                },
            );
            return Ok(ok);
        }
        Cmd::RemoveMember { name } => {
            let v = ask(Request::RemoveMember { name: name.clone() }).await?;
            out(&v, format!("{name} removed from the cluster"));
        }
        Cmd::Demo => {
            return demo::run(demo::DemoConfig { json: cli.json, ..demo::DemoConfig::default() }).await;
        }
    }
    Ok(true)
}
