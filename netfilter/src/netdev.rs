//! What QEMU's command line says about a guest's netdevs: enough to tell, before touching
//! anything, which of them QEMU's netfilters refuse (vhost, multiqueue; net/filter.c).

use serde_json::Value;

/// One `-netdev` of QEMU's command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetdevSpec {
    /// The netdev id.
    pub id: String,
    /// The backend type: `tap`, `dgram`, `user`, `vhost-user`...
    pub kind: String,
    /// The datapath runs in the kernel or another process (vhost), bypassing QEMU's netfilters.
    pub vhost: bool,
    /// Number of queue pairs.
    pub queues: u32,
}

/// Why QEMU's netfilters cannot be put on a netdev.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The netdev uses vhost: packets bypass QEMU.
    Vhost,
    /// The netdev has several queues.
    Multiqueue,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Vhost => "it uses vhost, whose packets bypass QEMU",
            Refusal::Multiqueue => "it is multiqueue",
        })
    }
}

impl NetdevSpec {
    /// Why QEMU netfilters would refuse this netdev, if they would.
    pub fn refusal(&self) -> Option<Refusal> {
        if self.vhost {
            Some(Refusal::Vhost)
        } else if self.queues > 1 {
            Some(Refusal::Multiqueue)
        } else {
            None
        }
    }

    /// Parses the value of a `-netdev` option: `tap,id=n0,vhost=on` or its JSON form.
    pub fn parse(value: &str) -> Option<NetdevSpec> {
        if value.trim_start().starts_with('{') {
            return Self::parse_json(value);
        }
        let mut parts = split_keyval(value).into_iter();
        let first = parts.next()?;
        let mut kind = None;
        let mut pairs = Vec::new();
        match first.split_once('=') {
            Some(("type", t)) => kind = Some(t.to_owned()),
            Some((k, v)) => pairs.push((k.to_owned(), v.to_owned())),
            None => kind = Some(first.clone()),
        }
        for p in parts {
            match p.split_once('=') {
                Some(("type", t)) => kind = Some(t.to_owned()),
                Some((k, v)) => pairs.push((k.to_owned(), v.to_owned())),
                None => pairs.push((p.clone(), "on".to_owned())),
            }
        }
        let get = |k: &str| pairs.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
        let kind = kind?;
        let id = get("id")?.to_owned();
        let on = |k: &str| get(k).is_some_and(|v| matches!(v, "on" | "yes" | "true" | "y"));
        let vhost = matches!(kind.as_str(), "vhost-user" | "vhost-vdpa")
            || on("vhost")
            || on("vhostforce")
            || get("vhostfd").is_some()
            || get("vhostfds").is_some();
        let listed = |k: &str| get(k).map(|v| v.split(':').count() as u32);
        let queues = get("queues").and_then(|q| q.parse().ok()).or(listed("fds")).unwrap_or(1);
        Some(NetdevSpec { id, kind, vhost, queues })
    }

    fn parse_json(value: &str) -> Option<NetdevSpec> {
        let v: Value = serde_json::from_str(value).ok()?;
        let kind = v.get("type")?.as_str()?.to_owned();
        let id = v.get("id")?.as_str()?.to_owned();
        let flag = |k: &str| v.get(k).is_some_and(|x| x.as_bool() == Some(true) || x.as_str() == Some("on"));
        let vhost = matches!(kind.as_str(), "vhost-user" | "vhost-vdpa")
            || flag("vhost")
            || flag("vhostforce")
            || v.get("vhostfd").is_some()
            || v.get("vhostfds").is_some();
        let queues = v
            .get("queues")
            .and_then(Value::as_u64)
            .map(|q| q as u32)
            .or_else(|| v.get("fds").and_then(Value::as_str).map(|f| f.split(':').count() as u32))
            .unwrap_or(1);
        Some(NetdevSpec { id, kind, vhost, queues })
    }
}

/// Splits QEMU's keyval syntax at commas; `,,` is an escaped comma.
fn split_keyval(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

/// Every `-netdev` of a QEMU command line (`argv[0]` first), in order.
pub fn netdevs_of_argv(argv: &[String]) -> Vec<NetdevSpec> {
    let mut out = Vec::new();
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let value = match a.as_str() {
            "-netdev" | "--netdev" => it.next().map(String::as_str),
            _ => a.strip_prefix("-netdev=").or_else(|| a.strip_prefix("--netdev=")),
        };
        if let Some(spec) = value.and_then(NetdevSpec::parse) {
            out.push(spec);
        }
    }
    out
}

/// Classifies QEMU's refusal of a netfilter (`object-add` error text, net/filter.c).
pub fn refusal_of_qemu_error(desc: &str) -> Option<Refusal> {
    let d = desc.to_ascii_lowercase();
    if d.contains("vhost is not supported") {
        Some(Refusal::Vhost)
    } else if d.contains("multiqueue is not supported") {
        Some(Refusal::Multiqueue)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        std::iter::once("qemu-system-x86_64").chain(args.iter().copied()).map(String::from).collect()
    }

    #[test]
    fn plain_dgram_and_tap_are_accepted() {
        let specs = netdevs_of_argv(&argv(&[
            "-m",
            "128",
            "-netdev",
            "dgram,id=n0,local.type=inet,local.host=127.0.0.1",
            "-netdev=tap,id=n1,ifname=tap0,script=no",
        ]));
        assert_eq!(specs.len(), 2);
        assert_eq!((specs[0].id.as_str(), specs[0].kind.as_str()), ("n0", "dgram"));
        assert_eq!(specs[1].kind, "tap");
        assert!(specs.iter().all(|s| s.refusal().is_none()));
    }

    #[test]
    fn vhost_and_multiqueue_are_refused() {
        let s = NetdevSpec::parse("tap,id=v,vhost=on").expect("spec");
        assert_eq!(s.refusal(), Some(Refusal::Vhost));
        let s = NetdevSpec::parse("type=tap,id=q,queues=4").expect("spec");
        assert_eq!(s.refusal(), Some(Refusal::Multiqueue));
        let s = NetdevSpec::parse("tap,id=f,fds=3:4").expect("spec");
        assert_eq!(s.queues, 2);
        let s = NetdevSpec::parse("vhost-user,id=u,chardev=c").expect("spec");
        assert_eq!(s.refusal(), Some(Refusal::Vhost));
        let s = NetdevSpec::parse("tap,id=off,vhost=off").expect("spec");
        assert_eq!(s.refusal(), None);
    }

    #[test]
    fn json_form_and_escaped_commas() {
        let s = NetdevSpec::parse(r#"{"type":"tap","id":"j","vhost":true}"#).expect("spec");
        assert_eq!((s.id.as_str(), s.refusal()), ("j", Some(Refusal::Vhost)));
        let s = NetdevSpec::parse(r#"{"type":"tap","id":"k","queues":2}"#).expect("spec");
        assert_eq!(s.refusal(), Some(Refusal::Multiqueue));
        let s = NetdevSpec::parse("tap,id=e,script=/a,,b").expect("spec");
        assert_eq!(s.id, "e");
        assert!(NetdevSpec::parse("tap,ifname=x").is_none(), "no id");
    }

    #[test]
    fn classifies_qemu_refusals() {
        assert_eq!(refusal_of_qemu_error("Vhost is not supported"), Some(Refusal::Vhost));
        assert_eq!(refusal_of_qemu_error("multiqueue is not supported"), Some(Refusal::Multiqueue));
        assert_eq!(refusal_of_qemu_error("Parameter 'netdev' expects a network backend id"), None);
    }
}
