//! The chaos runner against real QEMU and the real daemons: 30 seeded faults of every
//! kind (QEMU, sidecar and coordinator SIGKILLed, every failpoint, a full store) on two
//! 128 MiB TCG guests, every invariant checked after each. Takes about 5 minutes on a
//! 2-core machine under TCG (305 s measured; 350 s before restores were superseded); it runs
//! alone in the `cluster` test group, with its own time limit in .config/nextest.toml.
//! A second run keeps checkpoints and records on a three-node Garage; a third runs the
//! sidecars under two host agents and adds host loss and partitions.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Runs `cutline-chaos ARGS --json`, asserts that it succeeded, returns its report.
fn chaos(args: &[&str]) -> serde_json::Value {
    let started = Instant::now();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cutline-chaos"));
    cmd.args(args).arg("--json").stdin(Stdio::null()).stderr(Stdio::inherit());
    // SAFETY: prctl is async-signal-safe. A killed test sends the runner SIGTERM, on
    // which it stops every process it started (the relaunched QEMUs included).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let out = cmd.output().expect("run cutline-chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("cutline-chaos {args:?} took {:.0} s; report: {stdout}", started.elapsed().as_secs_f64());
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_default();
    assert!(out.status.success(), "cutline-chaos failed ({}): {report:#}", out.status);
    report
}

#[test]
fn forty_faults_of_every_kind_leave_every_invariant_intact() {
    let report = chaos(&["--seed", "1", "--faults", "30"]);
    let kinds = report["kinds"].as_object().map(|k| k.len()).unwrap_or(0);
    assert_eq!(kinds, 5, "every kind of fault was injected: {report:#}");
    assert_eq!(report["faults_run"], 30, "{report:#}");
}

/// The same faults with checkpoints and commit records on a three-node Garage cluster:
/// restores read packs and manifests back from the object store.
#[test]
fn faults_with_the_store_on_garage_leave_every_invariant_intact() {
    let report = chaos(&["--seed", "2", "--faults", "12", "--kinds", "qemu,sidecar,coordinator,failpoint", "--garage"]);
    assert_eq!(report["faults_run"], 12, "{report:#}");
    let kinds = report["kinds"].as_object().map(|k| k.len()).unwrap_or(0);
    assert_eq!(kinds, 4, "every kind but full-store was injected: {report:#}");
}

/// Two host agents, each running the sidecars of its guests under a lease: a host lost as
/// by power loss (its agent, sidecars and QEMUs SIGKILLed) has its VMs restarted on the
/// other host; a coordinator cut off from every host for longer than the lease finds
/// every VM fenced before it runs again; the other kinds as before.
#[test]
fn host_loss_and_partitions_under_host_agents_leave_every_invariant_intact() {
    let report = chaos(&[
        "--seed",
        "4",
        "--faults",
        "12",
        "--hosts",
        "2",
        "--kinds",
        "qemu,sidecar,coordinator,failpoint,host,partition",
    ]);
    assert_eq!(report["faults_run"], 12, "{report:#}");
    for kind in ["host", "partition"] {
        assert!(report["kinds"][kind]["survived"].as_u64() >= Some(1), "{kind} was injected and survived: {report:#}");
    }
}
