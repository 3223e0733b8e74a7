//! qmp-client against real QEMU: commands, events, errors, concurrency, crash
//! detection, fd passing and peer identity.

use std::io::Read;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use cutline_tests::{GuestSpec, TestEnv};
use qmp_client::{CloseReason, Qmp, QmpError, QmpOptions};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn query_status_stop_cont_with_events() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("qs", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    assert!(qmp.greeting().version.major >= 10, "QEMU {} is older than 10", qmp.greeting().version);
    assert!(qmp.oob_enabled(), "QEMU 10 offers oob and the client enables it");

    let status = qmp.execute(qapi::qmp::query_status {}).await?;
    assert!(status.running);
    assert_eq!(status.status, qapi::qmp::RunState::running);

    let mut events = qmp.subscribe();
    qmp.execute(qapi::qmp::stop {}).await?;
    let stop = events.wait_for("STOP", |_| true, T).await?;
    assert_eq!(qmp.execute(qapi::qmp::query_status {}).await?.status, qapi::qmp::RunState::paused);
    qmp.execute(qapi::qmp::cont {}).await?;
    let resume = events.wait_for("RESUME", |_| true, T).await?;
    assert!(resume.timestamp_us >= stop.timestamp_us, "RESUME is stamped after STOP");
    assert!(qmp.execute(qapi::qmp::query_status {}).await?.running);

    // The helper subscribes before sending, so the event cannot slip past.
    let (_, ev) = qmp.execute_and_wait("stop", json!({}), "STOP", |_| true, T).await?;
    assert_eq!(ev.name, "STOP");
    Ok(())
}

#[tokio::test]
async fn unknown_command_and_bad_arguments_carry_qemu_class() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("err", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    let err = qmp.execute_raw("no-such-command", json!({})).await.expect_err("must fail");
    match &err {
        QmpError::Qemu { command, class, desc } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a QEMU error, got {other:?}"),
    }
    let err = qmp.execute_raw("qom-get", json!({"path": "/nope", "property": "x"})).await.expect_err("must fail");
    assert!(err.qemu_class().is_some(), "{err}");
    // The connection still works after errors.
    qmp.execute(qapi::qmp::query_status {}).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_callers_get_their_own_replies() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("conc", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let qmp = qmp.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                // Different commands per task: a reply routed to the wrong caller shows.
                if i % 2 == 0 {
                    let s = qmp.execute_raw("query-status", json!({})).await?;
                    anyhow::ensure!(s.get("status").is_some(), "task {i} got {s}");
                } else {
                    let n = qmp.execute_raw("query-name", json!({})).await?;
                    anyhow::ensure!(n.get("name") == Some(&json!("conc")), "task {i} got {n}");
                }
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

#[tokio::test]
async fn per_command_timeout_fires() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("tmo", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    // Stop QEMU's process: the command is written but no reply can come.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guest.pid()), nix::sys::signal::Signal::SIGSTOP)?;
    let err =
        qmp.execute_raw_timeout("query-status", json!({}), Duration::from_millis(300)).await.expect_err("timeout");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guest.pid()), nix::sys::signal::Signal::SIGCONT)?;
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    // The late reply is dropped and the connection serves the next command.
    qmp.execute(qapi::qmp::query_status {}).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_is_detected_within_100ms() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let mut guest = env.guest(&GuestSpec::new("crash", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    let mut events = qmp.subscribe();
    let closed = tokio::spawn({
        let qmp = qmp.clone();
        async move {
            let reason = qmp.closed().await;
            (reason, Instant::now())
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed_at = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(guest.pid()), nix::sys::signal::Signal::SIGKILL)?;
    let (reason, seen_at) = closed.await?;
    let detection = seen_at.duration_since(killed_at);
    assert_eq!(reason, CloseReason::Eof);
    assert!(detection < Duration::from_millis(100), "crash seen after {detection:?}");
    eprintln!("crash detected {} µs after SIGKILL", detection.as_micros());
    // Commands and event waits now fail at once with Disconnected.
    let err = qmp.execute(qapi::qmp::query_status {}).await.expect_err("gone");
    assert!(err.is_disconnected(), "{err:?}");
    let err = events.wait_for("STOP", |_| true, T).await.expect_err("gone");
    assert!(err.is_disconnected(), "{err:?}");
    guest.kill();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn getfd_and_migrate_into_a_pipe() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("fd", &["idle"])).await?;
    guest.control().wait_event("start", Duration::from_secs(60)).await?;
    let qmp = guest.qmp().await?;
    let (read_end, write_end) = nix::unistd::pipe()?;
    qmp.getfd("mig", write_end.as_fd()).await?;
    drop(write_end); // QEMU holds its own copy now: EOF comes when QEMU closes it.
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(read_end);
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        let mut head = Vec::new();
        loop {
            match f.read(&mut buf) {
                Ok(0) => return Ok::<_, std::io::Error>((total, head)),
                Ok(n) => {
                    if head.len() < 4 {
                        head.extend_from_slice(&buf[..n.min(4)]);
                    }
                    total += n as u64;
                }
                Err(e) => return Err(e),
            }
        }
    });
    // MIGRATION events are sent only with the `events` capability on.
    qmp.execute_raw("migrate-set-capabilities", json!({"capabilities": [{"capability": "events", "state": true}]}))
        .await?;
    let mut events = qmp.subscribe();
    qmp.execute_raw("migrate", json!({"uri": "fd:mig"})).await?;
    events.wait_for("MIGRATION", |e| e.data["status"] == "completed", Duration::from_secs(60)).await?;
    let (bytes, head) = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
    // QEMU's migration stream starts with the magic "QEVM".
    assert_eq!(&head[..4], b"QEVM");
    let info = qmp.execute_raw("query-migrate", json!({})).await?;
    let ram = info.pointer("/ram/transferred").and_then(serde_json::Value::as_u64).expect("ram.transferred");
    assert!(bytes >= ram && ram > 0, "pipe got {bytes} bytes, QEMU says it sent {ram} bytes of RAM");
    eprintln!("migration stream through the passed fd: {bytes} bytes");

    // add-fd puts a descriptor into an fd set.
    let (_r, w) = nix::unistd::pipe()?;
    let info = qmp.add_fd(w.as_fd(), None, Some("cutline-test")).await?;
    let fdset = info["fdset-id"].as_i64().expect("fdset-id");
    let sets = qmp.execute_raw("query-fdsets", json!({})).await?;
    assert!(sets.as_array().expect("array").iter().any(|s| s["fdset-id"] == fdset), "{sets}");
    Ok(())
}

#[tokio::test]
async fn peer_identity_names_the_qemu_process() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let guest = env.guest(&GuestSpec::new("peer", &["idle"])).await?;
    let qmp = guest.qmp().await?;
    let peer = qmp.peer()?;
    assert_eq!(peer.pid, guest.pid());
    assert_eq!(peer.argv, guest.argv);
    assert_eq!(peer.option("name"), Some("peer"));
    assert_eq!(peer.option("m"), Some("128"));
    Ok(())
}

#[tokio::test]
async fn tcp_qmp_connects_but_refuses_fd_passing() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let mut spec = GuestSpec::new("tcp", &["idle"]);
    spec.extra_args = vec!["-qmp".into(), format!("tcp:127.0.0.1:{port},server=on,wait=off")];
    let _guest = env.guest(&spec).await?;
    let addr = format!("127.0.0.1:{port}");
    let qmp = cutline_tests::wait_until(T, || {
        let addr = addr.clone();
        async move { Qmp::connect_tcp(&addr, QmpOptions::default()).await.ok() }
    })
    .await
    .ok_or_else(|| anyhow::anyhow!("no TCP QMP on {addr}"))?;
    assert!(qmp.execute(qapi::qmp::query_status {}).await?.running);
    let (_r, w) = nix::unistd::pipe()?;
    assert!(matches!(qmp.getfd("x", w.as_fd()).await, Err(QmpError::NotUnix { .. })));
    assert!(matches!(qmp.peer(), Err(QmpError::NotUnix { .. })));
    Ok(())
}
