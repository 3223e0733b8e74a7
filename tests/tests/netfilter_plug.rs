//! The output gate's plug qdisc backend, on two tap-backed guests bridged inside a
//! network namespace this test creates (and deletes, with every device in it).
//!
//! The plug qdisc is optional in Linux (CONFIG_NET_SCH_PLUG). On a kernel without it the
//! test checks what can be checked: the attach is refused with `PlugError::Unsupported`,
//! leaves no ifb or redirect behind, and the guests' traffic still flows; it says so on
//! stderr.

use std::time::Duration;

use cutline_tests::netns::{NetNs, tap_name};
use cutline_tests::stream::{self, counters, hold_and_check, wait_flowing};
use cutline_tests::{Guest, GuestSpec, TestEnv, wait_until};
use netfilter::{Bounds, Gate, GateError, PlugConfig, PlugError};

const BOOT: Duration = Duration::from_secs(60);

/// Two streaming guests whose taps are bridged inside `ns`.
async fn tap_pair(env: &TestEnv, ns: &NetNs) -> anyhow::Result<Vec<Guest>> {
    let mut guests = Vec::new();
    for i in 0..2 {
        let tap = tap_name(i);
        let mut spec = GuestSpec::new(&format!("vm{i}"), &["stream"]).setting("srate", 100).setting("tbps", 16 * 1024);
        spec.id = i;
        spec.peers = 2;
        spec.netdev = Some(format!("tap,id=n0,ifname={tap},script=no,downscript=no"));
        spec.extra_args = stream::large_rx_ring();
        guests.push(env.guest(&spec).await?);
        ns.adopt_tap(&tap)?;
    }
    for g in &guests {
        g.control().wait_from(0, "stream ready", |v| v["event"] == "ready" && v["mode"] == "stream", BOOT).await?;
    }
    Ok(guests)
}

/// True when the namespace holds no trace of the plug backend on `tap`.
fn no_plug_left(ns: &NetNs, tap: &str) -> bool {
    let ifbs = ns.links().into_iter().filter(|l| l.starts_with("clifb")).count();
    let ingress = ns.tc(&["qdisc", "show", "dev", tap, "ingress"]).unwrap_or_default();
    ifbs == 0 && ingress.trim().is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plug_backend_holds_a_tap_guest_inside_a_test_namespace() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // Declared first so that it is dropped last, after the guests are killed.
    let ns = NetNs::new()?;
    let guests = tap_pair(&env, &ns).await?;
    wait_flowing(&guests[1], BOOT).await?;
    let tap = tap_name(0);
    let config = PlugConfig { netns: Some(ns.name().to_owned()), ..PlugConfig::new(&[tap.as_str()]) };
    match Gate::attach_plug("vm0", &config, Bounds::default()).await {
        Err(GateError::Plug(PlugError::Unsupported)) => {
            eprintln!("this kernel has no plug qdisc: checked the refusal, the clean-up and the traffic only");
            assert!(no_plug_left(&ns, &tap), "a refused attach leaves nothing behind: {:?}", ns.links());
            let before = counters(&guests[1]).await?;
            let flowing = wait_until(Duration::from_secs(10), || async {
                counters(&guests[1]).await.ok().filter(|c| c.udp_received > before.udp_received + 20)
            })
            .await;
            assert!(flowing.is_some(), "the guests' traffic still flows after the refused attach");
        }
        Err(e) => return Err(e.into()),
        Ok(gate) => {
            assert!(ns.links().iter().any(|l| l.starts_with("clifb")), "{:?}", ns.links());
            let report = hold_and_check(&gate, &guests[0], &guests[1], Duration::from_secs(2)).await?;
            eprintln!("plug, 2 s hold: {report:?}");
            gate.detach().await?;
            assert!(no_plug_left(&ns, &tap), "detach removes the ifb and the redirect: {:?}", ns.links());
        }
    }
    Ok(())
}

#[tokio::test]
async fn plug_backend_refuses_a_missing_tap() -> anyhow::Result<()> {
    cutline_tests::init_tracing();
    let ns = NetNs::new()?;
    let config = PlugConfig { netns: Some(ns.name().to_owned()), ..PlugConfig::new(&["no-such-tap"]) };
    let err = Gate::attach_plug("vm0", &config, Bounds::default()).await.expect_err("no tap");
    assert!(matches!(err, GateError::Plug(PlugError::Command { .. })), "{err:?}");
    let err = Gate::attach_plug("vm0", &PlugConfig::new(&[]), Bounds::default()).await.expect_err("no taps");
    assert!(matches!(err, GateError::Plug(PlugError::NoTap)), "{err:?}");
    assert!(ns.links().iter().all(|l| !l.starts_with("clifb")));
    Ok(())
}
