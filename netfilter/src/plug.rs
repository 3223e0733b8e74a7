//! The Linux backend: the `plug` qdisc (the Remus mechanism), for guests whose netdev is a
//! tap that QEMU's netfilters refuse (vhost) or for operators who prefer the host to hold.
//!
//! A qdisc on a tap's egress shapes what the host sends *to* the guest; the guest's own
//! packets arrive on the tap's *ingress*, where no qdisc can queue. So each tap gets an
//! `ifb` device: a `u32` match-all filter on the tap's ingress redirects every frame to the
//! ifb (`mirred egress redirect`), the ifb's root qdisc is `plug`, and what the plug lets
//! go re-enters the host's stack on the tap as if just received. A hold is `plug block`, a
//! release `plug release_indefinite` (in order); the gate counts held packets and bytes
//! from the qdisc's backlog and its drops from the qdisc's drop counter.
//!
//! Everything goes through `tc` and `ip` from iproute2 (`-n NETNS` when the taps live in a
//! network namespace): their netlink encoding of qdisc options is the reference one, and
//! these commands run only at attach, hold, release and while sampling a hold.

use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use crate::bounds::Bounds;

/// Settings of the plug backend.
#[derive(Debug, Clone)]
pub struct PlugConfig {
    /// The guest's tap devices (host side).
    pub taps: Vec<String>,
    /// The network namespace the taps live in, if not the caller's.
    pub netns: Option<String>,
    /// How often the backlog is sampled while holding.
    pub sample_every: Duration,
}

impl PlugConfig {
    /// Gates `taps` in the caller's namespace, sampling every 5 ms while holding.
    pub fn new(taps: &[&str]) -> PlugConfig {
        PlugConfig {
            taps: taps.iter().map(|t| (*t).to_owned()).collect(),
            netns: None,
            sample_every: Duration::from_millis(5),
        }
    }
}

/// Errors of the plug backend.
#[derive(Debug, thiserror::Error)]
pub enum PlugError {
    /// No tap was given.
    #[error("no tap device to gate")]
    NoTap,
    /// `tc` or `ip` could not be run.
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel has no `plug` qdisc (CONFIG_NET_SCH_PLUG).
    #[error("the kernel has no plug qdisc (sch_plug); load it or use the filter-buffer backend")]
    Unsupported,
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed on stderr.
        stderr: String,
    },
    /// A command's output was not what iproute2 prints.
    #[error("cannot read the output of `{command}`: {why}")]
    Output {
        /// The command line.
        command: String,
        /// What was wrong.
        why: String,
    },
}

/// One tap and its ifb.
#[derive(Debug, Clone)]
struct Link {
    tap: String,
    ifb: String,
}

/// A sample of the plugs' queues, summed over the taps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Backlog {
    pub(crate) packets: u64,
    pub(crate) bytes: u64,
    pub(crate) drops: u64,
}

/// The plug backend of one guest.
#[derive(Debug, Clone)]
pub(crate) struct Plug {
    netns: Option<String>,
    links: Vec<Link>,
    /// Drops counted before the current hold.
    drops_before: u64,
}

impl Plug {
    /// Sets up (or finds again) an ifb with an open plug per tap and redirects the taps'
    /// ingress to them. Returns whether a plug was found holding packets.
    pub(crate) async fn attach(config: &PlugConfig, bounds: &Bounds) -> Result<(Plug, bool), PlugError> {
        if config.taps.is_empty() {
            return Err(PlugError::NoTap);
        }
        let mut plug = Plug { netns: config.netns.clone(), links: Vec::new(), drops_before: 0 };
        // The plug drops past its byte limit; give it room beyond the gate's own bound,
        // which the gate enforces by sampling.
        let limit = bounds.max_bytes.saturating_add(bounds.max_bytes / 4).max(1 << 20);
        let mut holding = false;
        for tap in &config.taps {
            let ifindex = plug.ifindex(tap).await?;
            let link = Link { tap: tap.clone(), ifb: format!("clifb{ifindex}") };
            let result = plug.install(&link, limit).await;
            match result {
                Ok(held) => holding |= held,
                Err(e) => {
                    plug.remove(&link).await;
                    for l in std::mem::take(&mut plug.links) {
                        plug.remove(&l).await;
                    }
                    return Err(e);
                }
            }
            plug.links.push(link);
        }
        plug.drops_before = plug.backlog().await?.drops;
        Ok((plug, holding))
    }

    async fn install(&self, link: &Link, limit: u64) -> Result<bool, PlugError> {
        let (ifb, tap) = (link.ifb.as_str(), link.tap.as_str());
        if self.ip(&["link", "show", "dev", ifb]).await.is_err() {
            self.ip(&["link", "add", ifb, "type", "ifb"]).await?;
        }
        self.ip(&["link", "set", ifb, "up"]).await?;
        let root = self.tc_json(&["qdisc", "show", "dev", ifb, "root"]).await?;
        let existing = root.as_array().and_then(|a| a.first()).filter(|q| q["kind"] == "plug").cloned();
        let holding = match existing {
            Some(q) => q["backlog"].as_u64().unwrap_or(0) > 0 || q["qlen"].as_u64().unwrap_or(0) > 0,
            None => {
                let lim = limit.to_string();
                match self.tc(&["qdisc", "replace", "dev", ifb, "root", "plug", "limit", &lim]).await {
                    Err(PlugError::Command { stderr, .. }) if stderr.contains("qdisc kind is unknown") => {
                        return Err(PlugError::Unsupported);
                    }
                    r => r?,
                };
                // A new plug starts plugged: open it before any traffic is sent its way.
                self.tc(&["qdisc", "change", "dev", ifb, "root", "plug", "release_indefinite"]).await?;
                false
            }
        };
        let ingress = self.tc_json(&["qdisc", "show", "dev", tap, "ingress"]).await?;
        if !ingress.as_array().is_some_and(|a| a.iter().any(|q| q["kind"] == "ingress")) {
            self.tc(&["qdisc", "add", "dev", tap, "handle", "ffff:", "ingress"]).await?;
        }
        let filters = self.tc(&["filter", "show", "dev", tap, "parent", "ffff:"]).await?;
        if !filters.contains(&format!("to device {ifb}")) {
            self.tc(&[
                "filter", "add", "dev", tap, "parent", "ffff:", "protocol", "all", "prio", "1", "u32", "match", "u32",
                "0", "0", "action", "mirred", "egress", "redirect", "dev", ifb,
            ])
            .await?;
        }
        Ok(holding)
    }

    /// Best-effort removal of one link's redirect and ifb.
    async fn remove(&self, link: &Link) {
        let _ = self.tc(&["qdisc", "del", "dev", &link.tap, "handle", "ffff:", "ingress"]).await;
        let _ = self.ip(&["link", "del", &link.ifb]).await;
    }

    /// Plugs every tap's queue.
    pub(crate) async fn hold(&mut self) -> Result<(), PlugError> {
        self.drops_before = self.backlog().await?.drops;
        for l in &self.links {
            self.tc(&["qdisc", "change", "dev", &l.ifb, "root", "plug", "block"]).await?;
        }
        Ok(())
    }

    /// Unplugs every tap's queue; the packets leave in order.
    pub(crate) async fn release(&mut self) -> Result<(), PlugError> {
        for l in &self.links {
            self.tc(&["qdisc", "change", "dev", &l.ifb, "root", "plug", "release_indefinite"]).await?;
        }
        Ok(())
    }

    /// Drops the qdiscs counted since the current hold began.
    pub(crate) fn drops_since_hold(&self, now: &Backlog) -> u64 {
        now.drops.saturating_sub(self.drops_before)
    }

    /// What the plugs hold now, summed.
    pub(crate) async fn backlog(&self) -> Result<Backlog, PlugError> {
        let mut sum = Backlog::default();
        for l in &self.links {
            let v = self.tc_json(&["-s", "qdisc", "show", "dev", &l.ifb, "root"]).await?;
            let q = v.as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null);
            sum.packets += q["qlen"].as_u64().unwrap_or(0);
            sum.bytes += q["backlog"].as_u64().unwrap_or(0);
            sum.drops += q["drops"].as_u64().unwrap_or(0);
        }
        Ok(sum)
    }

    /// Releases, waits (up to `drain`) for the queues to empty, then removes the redirects
    /// and the ifbs, so that no held packet is dropped with its device.
    pub(crate) async fn detach(self, drain: Duration) -> Result<(), PlugError> {
        self.release_all_quietly().await;
        let deadline = tokio::time::Instant::now() + drain;
        while tokio::time::Instant::now() < deadline {
            match self.backlog().await {
                Ok(b) if b.packets == 0 => break,
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(_) => break,
            }
        }
        let mut first_error = None;
        for l in &self.links {
            if let Err(e) = self.tc(&["qdisc", "del", "dev", &l.tap, "handle", "ffff:", "ingress"]).await {
                first_error.get_or_insert(e);
            }
            if let Err(e) = self.ip(&["link", "del", &l.ifb]).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn release_all_quietly(&self) {
        for l in &self.links {
            let _ = self.tc(&["qdisc", "change", "dev", &l.ifb, "root", "plug", "release_indefinite"]).await;
        }
    }

    /// The taps gated.
    pub(crate) fn taps(&self) -> Vec<String> {
        self.links.iter().map(|l| l.tap.clone()).collect()
    }

    async fn ifindex(&self, tap: &str) -> Result<u64, PlugError> {
        let args = ["-j", "link", "show", "dev", tap];
        let out = self.run("ip", &args).await?;
        let v: Value = serde_json::from_str(&out)
            .map_err(|e| PlugError::Output { command: format!("ip {}", args.join(" ")), why: e.to_string() })?;
        v.as_array()
            .and_then(|a| a.first())
            .and_then(|l| l["ifindex"].as_u64())
            .ok_or_else(|| PlugError::Output { command: format!("ip {}", args.join(" ")), why: "no ifindex".into() })
    }

    async fn ip(&self, args: &[&str]) -> Result<String, PlugError> {
        self.run("ip", args).await
    }

    async fn tc(&self, args: &[&str]) -> Result<String, PlugError> {
        self.run("tc", args).await
    }

    async fn tc_json(&self, args: &[&str]) -> Result<Value, PlugError> {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.run("tc", &full).await?;
        if out.trim().is_empty() {
            return Ok(Value::Array(Vec::new()));
        }
        serde_json::from_str(&out)
            .map_err(|e| PlugError::Output { command: format!("tc {}", full.join(" ")), why: e.to_string() })
    }

    async fn run(&self, program: &'static str, args: &[&str]) -> Result<String, PlugError> {
        let mut cmd = Command::new(program);
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        cmd.args(args).kill_on_drop(true);
        let out = cmd.output().await.map_err(|source| PlugError::Spawn { program, source })?;
        if !out.status.success() {
            return Err(PlugError::Command {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
