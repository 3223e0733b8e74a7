//! `cutline-sidecar`: checkpoint, restore, list, verify and gc one VM's checkpoints.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::json;
use sidecar::store::{Store, error_chain};
use sidecar::{VmName, attach, checkpoint, restore};

/// Per-VM agent of cutline: point-in-time checkpoints of a running QEMU guest.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Print one JSON object on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Keep checkpoints in an object store, `s3://BUCKET[/PREFIX]` (endpoint, region and
    /// credentials from CUTLINE_S3_ENDPOINT, CUTLINE_S3_REGION and
    /// CUTLINE_S3_CREDENTIALS_FILE or AWS_*); `--store` is then the local work directory.
    #[arg(long, global = true, env = "CUTLINE_OBJECTS")]
    objects: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Opens the store: `store` itself, or the object store `objects` with `store` as its
/// work directory. `existing` refuses a local directory that is not a store yet.
fn open_store(store: &std::path::Path, objects: Option<&str>, existing: bool) -> anyhow::Result<Store> {
    Ok(match objects {
        Some(o) => Store::open_at(&cutline_objects::Location::from_env(o)?, store)?,
        None if existing => Store::open_existing(store)?,
        None => Store::open(store)?,
    })
}

#[derive(Subcommand)]
enum Cmd {
    /// Run as a cluster member: attach to the VM, register with the coordinator, carry out
    /// its checkpoint and recovery steps, until SIGINT/SIGTERM.
    Serve {
        /// The coordinator: a unix socket path, or tcp:HOST:PORT (TLS and the token:
        /// --tls-ca, --tls-cert, --tls-key, --token-file or CUTLINE_TOKEN).
        #[arg(long)]
        coordinator: sidecar::transport::Endpoint,
        #[command(flatten)]
        transport: sidecar::transport::ClientArgs,
        /// Cluster name.
        #[arg(long, default_value = "default")]
        cluster: String,
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// The VM's QMP unix socket.
        #[arg(long)]
        qmp: PathBuf,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Longest the output gate may hold the VM's packets before it lets them go and
        /// the epoch aborts (raise it with `--output-commit strict`, where holds last until
        /// the commit).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        max_hold: std::time::Duration,
        /// The host this sidecar runs on (set by the host agent that starts it).
        #[arg(long)]
        host: Option<String>,
        /// The host's lease file (set by the host agent): when its lease runs out, this
        /// sidecar kills its VM and exits.
        #[arg(long)]
        lease_file: Option<PathBuf>,
    },
    /// Run the host agent: register this host, hold its lease, run a sidecar per VM the
    /// coordinator gives it (and those named by --vm), and fence its VMs when the lease
    /// runs out.
    Host {
        /// The coordinator: a unix socket path, or tcp:HOST:PORT.
        #[arg(long)]
        coordinator: String,
        #[command(flatten)]
        transport: sidecar::transport::ClientArgs,
        /// Cluster name.
        #[arg(long, default_value = "default")]
        cluster: String,
        /// This host's name (default: the hostname).
        #[arg(long)]
        name: Option<String>,
        /// This host's address, as operators reach it (shown by `cutline status`).
        #[arg(long, default_value = "")]
        address: String,
        /// The host agent's directory: lease file, the VMs it runs, sidecar logs.
        #[arg(long, default_value = "/var/lib/cutline/host")]
        state: PathBuf,
        /// The sidecars' store (with --objects: their local work directory).
        #[arg(long)]
        store: PathBuf,
        /// A VM running here to protect from the start: NAME=QMP_SOCKET (repeatable).
        #[arg(long = "vm", value_name = "NAME=QMP")]
        vms: Vec<String>,
        /// Longest the sidecars' output gates may hold packets.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        max_hold: std::time::Duration,
    },
    /// Show what cutline sees of a running guest (disks, RAM, argv).
    Attach {
        /// The guest's QMP unix socket.
        #[arg(long)]
        qmp: PathBuf,
    },
    /// Take one checkpoint of a running guest.
    Checkpoint {
        /// The guest's QMP unix socket.
        #[arg(long)]
        qmp: PathBuf,
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The VM's name in the store.
        #[arg(long)]
        name: String,
        /// Copy every disk in full.
        #[arg(long)]
        full: bool,
        /// Use stop-and-copy instead of background-snapshot.
        #[arg(long)]
        stop_and_copy: bool,
        /// Send memory as a sequential stream, not a mapped-ram file.
        #[arg(long)]
        stream_memory: bool,
    },
    /// Restore a checkpoint: relaunch QEMU with the recorded argv and the saved state.
    Restore {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The VM's name in the store.
        #[arg(long)]
        name: String,
        /// The checkpoint (default: the newest).
        #[arg(long)]
        checkpoint: Option<u64>,
        /// Leave the restored guest paused.
        #[arg(long)]
        paused: bool,
    },
    /// List checkpoints.
    List {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Only this VM.
        #[arg(long)]
        name: Option<String>,
    },
    /// Re-hash every block; name each damaged one and the checkpoints it breaks.
    Verify {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// Only this VM.
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove checkpoints beyond the newest N and the blocks only they used.
    Gc {
        /// The store directory.
        #[arg(long)]
        store: PathBuf,
        /// The VM's name in the store.
        #[arg(long)]
        name: String,
        /// How many checkpoints to keep.
        #[arg(long)]
        keep: usize,
    },
}

/// Exit codes: 1 failure, 3 damage found, 4 busy.
fn exit_code(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(sidecar::store::StoreError::Busy { .. }) = cause.downcast_ref() {
            return 4;
        }
    }
    1
}

fn name(s: &str) -> anyhow::Result<VmName> {
    VmName::new(s).map_err(anyhow::Error::msg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .try_init();
    let json = cli.json;
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cutline-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if json {
                println!("{}", json!({"error": error_chain(e.as_ref())}));
            } else {
                eprintln!("cutline-sidecar: {}", error_chain(e.as_ref()));
            }
            ExitCode::from(exit_code(&e))
        }
    }
}

fn print(json: bool, value: serde_json::Value, text: String) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<u8> {
    let json = cli.json;
    let tty = std::io::stderr().is_terminal();
    let mut progress = |msg: &str| {
        if tty && !json {
            eprintln!("  {msg}");
        }
        tracing::debug!("{msg}");
    };
    match cli.cmd {
        Cmd::Host { coordinator, transport, cluster, name: host, address, state, store, vms, max_hold } => {
            let endpoint: sidecar::transport::Endpoint =
                coordinator.parse().map_err(|e: std::convert::Infallible| anyhow::anyhow!("{e}"))?;
            let host = match host {
                Some(h) => h,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname").context("the hostname")?.trim().to_owned(),
            };
            name(&host).context("--name (the host's name)")?;
            let vms = vms
                .iter()
                .map(|v| {
                    let (n, q) =
                        v.split_once('=').ok_or_else(|| anyhow::anyhow!("--vm {v}: expected NAME=QMP_SOCKET"))?;
                    name(n)?;
                    Ok((n.to_owned(), PathBuf::from(q)))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut transport_args = Vec::new();
            for (flag, v) in [
                ("--tls-ca", &transport.tls_ca),
                ("--tls-cert", &transport.tls_cert),
                ("--tls-key", &transport.tls_key),
                ("--token-file", &transport.token_file),
            ] {
                if let Some(p) = v {
                    transport_args.extend([flag.to_owned(), p.display().to_string()]);
                }
            }
            if let Some(n) = &transport.tls_server_name {
                transport_args.extend(["--tls-server-name".to_owned(), n.clone()]);
            }
            let cfg = sidecar::host::Config {
                coordinator: transport.dialer(&endpoint)?,
                coordinator_arg: coordinator,
                transport_args,
                cluster,
                host,
                address,
                state,
                store,
                objects: cli.objects.clone(),
                vms,
                sidecar: std::env::current_exe().context("the sidecar program")?,
                max_hold,
            };
            sidecar::host::run(cfg, sidecar::shutdown_signal()).await?;
        }
        Cmd::Serve { coordinator, transport, cluster, name: n, qmp, store, max_hold, host, lease_file } => {
            let n = name(&n)?;
            let cfg = sidecar::agent::Config {
                coordinator: transport.dialer(&coordinator)?,
                cluster,
                name: n.as_str().to_owned(),
                qmp,
                store,
                objects: cli.objects.as_deref().map(cutline_objects::Location::from_env).transpose()?,
                bounds: netfilter::Bounds { max_hold, ..netfilter::Bounds::default() },
                host,
                lease_file,
            };
            sidecar::agent::run(cfg, sidecar::shutdown_signal()).await?;
        }
        Cmd::Attach { qmp } => {
            let q = attach::connect(&qmp).await?;
            let ident = attach::identify(&q, &qmp).await?;
            let v = serde_json::to_value(&ident)?;
            let disks: Vec<String> = ident
                .disks
                .iter()
                .map(|d| format!("{} ({}, {}, {} MiB)", d.device, d.node, d.format, d.virtual_size >> 20))
                .collect();
            print(
                json,
                v,
                format!(
                    "QEMU {} pid {}, machine {}, {} MiB RAM, {}\nwritable disks: {}",
                    ident.qemu_version,
                    ident.pid,
                    ident.machine,
                    ident.ram_bytes >> 20,
                    ident.status,
                    if disks.is_empty() { "none".into() } else { disks.join(", ") }
                ),
            );
        }
        Cmd::Checkpoint { qmp, store, name: n, full, stop_and_copy, stream_memory } => {
            let n = name(&n)?;
            let store = open_store(&store, cli.objects.as_deref(), false)?;
            let q = attach::connect(&qmp).await?;
            let opts = checkpoint::Options { full, stop_and_copy, stream_memory };
            let m = checkpoint::checkpoint(&q, &store, n.as_str(), &opts, &mut progress).await?;
            let r = checkpoint::Report::of(&m);
            print(
                json,
                serde_json::to_value(&r)?,
                format!(
                    "checkpoint {} of {}: {} mode, guest paused {:.1} ms, took {:.0} ms, stored {} KiB ({} KiB memory of a {} MiB stream{})",
                    r.id,
                    r.name,
                    r.mode,
                    r.pause_ms,
                    r.duration_ms,
                    r.bytes_stored >> 10,
                    r.memory_bytes_stored >> 10,
                    r.memory_bytes >> 20,
                    r.disks
                        .iter()
                        .map(|d| format!(
                            ", disk {} {} {} KiB",
                            d.node,
                            if d.full { "full" } else { "incremental" },
                            d.bytes_stored >> 10
                        ))
                        .collect::<String>()
                ),
            );
        }
        Cmd::Restore { store, name: n, checkpoint, paused } => {
            let n = name(&n)?;
            let store = open_store(&store, cli.objects.as_deref(), true)?;
            let r = restore::restore(&store, n.as_str(), checkpoint, paused, &mut progress).await?;
            print(
                json,
                serde_json::to_value(&r)?,
                format!(
                    "restored checkpoint {} of {} in {:.0} ms: QEMU pid {}{}",
                    r.id,
                    r.name,
                    r.duration_ms,
                    r.pid,
                    if r.paused { ", paused" } else { "" }
                ),
            );
        }
        Cmd::List { store, name: n } => {
            let store = open_store(&store, cli.objects.as_deref(), true)?;
            let names = match n {
                Some(n) => vec![name(&n)?.as_str().to_owned()],
                None => store.names()?,
            };
            let mut rows = Vec::new();
            for n in names {
                for id in store.ids(&n)? {
                    match store.manifest(&n, id) {
                        Ok(m) => rows.push(json!({"name": n, "id": id, "created_unix_ms": m.created_unix_ms,
                            "mode": m.mode, "pause_ms": m.timings.pause_ms, "bytes_stored": m.bytes_stored,
                            "ram_bytes": m.ram_bytes, "disks": m.disks.len(), "parent": m.parent})),
                        Err(e) => rows.push(json!({"name": n, "id": id, "error": error_chain(&e)})),
                    }
                }
            }
            let text = rows
                .iter()
                .map(|r| match r.get("error") {
                    Some(e) => format!("{} {:>6}  DAMAGED: {}", r["name"].as_str().unwrap_or(""), r["id"], e),
                    None => format!(
                        "{} {:>6}  {}  pause {:.1} ms  stored {} KiB",
                        r["name"].as_str().unwrap_or(""),
                        r["id"],
                        r["mode"].as_str().unwrap_or(""),
                        r["pause_ms"].as_f64().unwrap_or(0.0),
                        r["bytes_stored"].as_u64().unwrap_or(0) >> 10
                    ),
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(json, json!({"checkpoints": rows}), if text.is_empty() { "no checkpoints".into() } else { text });
        }
        Cmd::Verify { store, name: n } => {
            let store = open_store(&store, cli.objects.as_deref(), true)?;
            let n = n.map(|n| name(&n)).transpose()?;
            let damage = tokio::task::block_in_place(|| {
                store.verify(n.as_ref().map(VmName::as_str), |done, total| {
                    if tty && !json && (done % 1000 == 0 || done == total) {
                        eprint!("\r  verified {done}/{total} blocks");
                        if done == total {
                            eprintln!();
                        }
                    }
                })
            })
            .context("verify")?;
            let text = if damage.is_empty() {
                "all checkpoints verified".to_owned()
            } else {
                damage
                    .iter()
                    .map(|d| {
                        format!(
                            "{}: {}; breaks {}",
                            d.item,
                            d.why,
                            d.breaks.iter().map(|(n, i)| format!("{n}#{i}")).collect::<Vec<_>>().join(", ")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            print(json, json!({"ok": damage.is_empty(), "damage": damage}), text);
            if !damage.is_empty() {
                return Ok(3);
            }
        }
        Cmd::Gc { store, name: n, keep } => {
            let n = name(&n)?;
            let store = open_store(&store, cli.objects.as_deref(), true)?;
            let r = store.gc(n.as_str(), keep)?;
            print(
                json,
                serde_json::to_value(&r)?,
                format!(
                    "removed checkpoints {:?}, kept {:?}; deleted {} packs ({} KiB), hid {} for later",
                    r.removed,
                    r.kept,
                    r.packs_removed,
                    r.bytes_freed >> 10,
                    r.packs_hidden
                ),
            );
        }
    }
    Ok(0)
}
