//! Guests on host containers: two hosts and a switch host on a test network of their own,
//! one ledger + journal guest on each host, the ledger conserved across the switch, and a
//! host killed as by power loss takes its guest with it.

use std::time::{Duration, Instant};

use cutline_tests::hosts::{self, Host, HostImage, Switch, TestNet};
use cutline_tests::{DiskSpec, GuestSpec, TestEnv};

/// Initial ledger balance of each guest.
const BALANCE: u64 = 1_000_000;
/// How long guests under TCG in containers may take to boot.
const BOOT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_on_two_host_containers_share_a_network_and_keep_their_ledger() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let started = Instant::now();
    let image = HostImage::ensure()?;
    eprintln!("host image {image} ensured in {} ms", started.elapsed().as_millis());

    let net = TestNet::create("cutline-hosts")?;
    eprintln!("network {} ({}), subnet {}", net.name(), net.id(), net.subnet()?);
    let (mut containers, network) = (Vec::new(), net.id().to_owned());
    let result = async {
        let switch = Switch::start(&image, &net, "switch", &env.dir().join("switch"), 2, 7000)?;
        containers.push(switch.host().id().to_owned());
        let mut hosts = Vec::new();
        for i in 0..2 {
            let host = Host::start(&image, &net, &format!("host{i}"), &env.dir().join(format!("host{i}")), env.accel)?;
            eprintln!("{} at {} ({})", host.container_name(), host.ip()?, host.id());
            containers.push(host.id().to_owned());
            hosts.push(host);
        }
        let mut guests = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let mut spec = GuestSpec::new(&format!("vm{i}"), &["ledger", "journal"]);
            spec.id = i;
            spec.peers = 2;
            spec.netdev = Some(switch.netdev(i)?);
            spec.disks.push(DiskSpec::qcow2(16));
            let spec = spec.setting("balance", BALANCE).setting("jrate", 20);
            guests.push(host.start_guest(&spec, &env.image).await?);
        }
        for g in &guests {
            g.control().wait_from(0, "ledger ready", |v| v["event"] == "ready" && v["mode"] == "ledger", BOOT).await?;
        }
        let booted = started.elapsed();

        // Transfers cross the switch: the two guests are on different hosts.
        let refs: Vec<_> = guests.iter().collect();
        let deadline = Instant::now() + BOOT;
        let inv = loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let inv = hosts::check(&refs, BALANCE).await?;
            assert!(inv.ledger_ok, "ledger total not conserved: {}", inv.detail);
            assert!(inv.journals_ok, "a journal broke: {}", inv.detail);
            let balances = inv.detail["ledger"]["balances"].as_array().cloned().unwrap_or_default();
            let traded = balances.iter().all(|b| b["sent"].as_u64() >= Some(10) && b["received"].as_u64() >= Some(10));
            if traded {
                break inv;
            }
            assert!(Instant::now() < deadline, "the guests barely traded: {}", inv.detail);
        };
        eprintln!("booted in {} ms; invariants held: {}", booted.as_millis(), inv.detail);
        let learned = switch.learned();
        assert!(learned.iter().all(Option::is_some), "the switch learned every guest: {learned:?}");
        for (i, host) in hosts.iter().enumerate() {
            let addr = learned[i].as_deref().unwrap_or_default();
            assert!(
                addr.starts_with(&format!("{}:", host.ip()?)),
                "port {i} learned {addr}, not {}",
                host.container_name()
            );
        }
        assert!(guests[0].qmp_answers(Duration::from_secs(10)).await, "QMP of vm0 answers through the bind mount");

        // Power loss of host1: its guest's QMP no longer answers; host0's guest runs on.
        hosts[1].kill()?;
        assert!(!hosts[1].is_running()?);
        assert!(!guests[1].qmp_answers(Duration::from_secs(5)).await, "QMP of vm1 answers after its host died");
        assert!(guests[0].qmp_answers(Duration::from_secs(10)).await, "vm0 died with another host");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    drop(net);
    // Every container and the network are gone, removed by id.
    for id in &containers {
        assert!(!hosts::container_exists(id)?, "container {id} remains");
    }
    assert!(!hosts::network_exists(&network)?, "network {network} remains");
    result
}
