//! The desired rules as `iptables-restore` lines, one [`ChainRules`] per chain of ours.
//!
//! They mirror the nftables backend's chains (`crate::nft::render`): the same marks, the
//! same order, anti-spoofing before capture. iptables' `MARK` does not stop a chain, so
//! nft's "mark X, return" is two rules with the same match (none of those matches reads the
//! mark being set). Every rule carries `-m comment --comment "<what> [ambient i/n fp]"`
//! (the nft backend's [`RuleTag`]), so a chain is compared by its comments, never by
//! iptables' normalized rule text.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::consts::{self, mark, port, zt_mark};
use crate::nft::{rule_comment, NodeRules, RuleTag, ZtunnelRules};

/// iptables refuses a `--log-prefix` longer than 29 bytes, so the nft backend's
/// [`consts::SPOOF_LOG_PREFIX`] is shortened here.
pub const SPOOF_LOG_PREFIX: &str = "ambient-node spoofed src: ";

/// An address family: `iptables` + the v4 sets, or `ip6tables` + the v6 sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fam {
    V4,
    V6,
}

impl Fam {
    pub const BOTH: [Fam; 2] = [Fam::V4, Fam::V6];

    pub fn of(a: IpAddr) -> Fam {
        if a.is_ipv4() {
            Fam::V4
        } else {
            Fam::V6
        }
    }

    /// The ipset of enrolled addresses (`hash:ip`).
    pub fn pod_set(self) -> &'static str {
        match self {
            Fam::V4 => consts::POD_SET,
            Fam::V6 => consts::POD_SET_V6,
        }
    }

    /// The ipset of `address,input device` pairs (`hash:net,iface`, matched `src,src`).
    pub fn iif_set(self) -> &'static str {
        match self {
            Fam::V4 => consts::POD_IIF_SET,
            Fam::V6 => consts::POD_IIF_SET_V6,
        }
    }

    /// ipset's `family` option.
    pub fn ipset_family(self) -> &'static str {
        match self {
            Fam::V4 => "inet",
            Fam::V6 => "inet6",
        }
    }

    fn host(self, a: IpAddr) -> String {
        match self {
            Fam::V4 => format!("{a}/32"),
            Fam::V6 => format!("{a}/128"),
        }
    }

    fn loopback(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::LOCALHOST.into(),
            Fam::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }
}

/// Our chain names (the built-in chains jump to them).
pub mod chain {
    pub const PREROUTING: &str = "AMBIENT-PREROUTING";
    pub const FORWARD: &str = "AMBIENT-FORWARD";
    pub const INPUT: &str = "AMBIENT-INPUT";
    pub const OUTPUT: &str = "AMBIENT-OUTPUT";
    pub const NAT_PREROUTING: &str = "AMBIENT-NAT-PREROUTING";
    pub const NAT_POSTROUTING: &str = "AMBIENT-NAT-POSTROUTING";
    /// The ztunnel netns's per-source SYN limit (raw: before conntrack).
    pub const SYN_LIMIT: &str = "AMBIENT-SYN-LIMIT";
}

/// The comment of the jump from a built-in chain into ours.
pub const JUMP_COMMENT: &str = "ambient-node";

/// One rule: its description, matches and target (`-j ...`, without the `-j`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLine {
    pub text: &'static str,
    pub matches: String,
    pub target: String,
}

/// One chain of ours: its table, the built-in chain that jumps to it (first rule there) and
/// its rules in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainRules {
    pub table: &'static str,
    pub name: &'static str,
    pub hook: &'static str,
    pub rules: Vec<RuleLine>,
}

/// FNV-1a, 64 bit: stable across builds (the fingerprint is compared with a running kernel's).
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl ChainRules {
    /// Hash of the chain name and every rule's text, matches and target, in order.
    pub fn fingerprint(&self) -> u64 {
        let mut h = fnv1a(0xcbf2_9ce4_8422_2325, self.name.as_bytes());
        for r in &self.rules {
            for part in [r.text, &r.matches, &r.target] {
                h = fnv1a(h, b"\0");
                h = fnv1a(h, part.as_bytes());
            }
        }
        h
    }

    /// The `-A` lines of `iptables-restore`.
    pub fn lines(&self) -> Vec<String> {
        let fingerprint = self.fingerprint();
        let count = self.rules.len();
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let comment = rule_comment(
                    r.text,
                    RuleTag {
                        index: i + 1,
                        count,
                        fingerprint,
                    },
                );
                let matches = if r.matches.is_empty() {
                    String::new()
                } else {
                    format!("{} ", r.matches)
                };
                format!(
                    "-A {} {matches}-m comment --comment \"{comment}\" -j {}",
                    self.name, r.target
                )
            })
            .collect()
    }

    /// The jump rule's spec (after `-I <hook> 1`).
    pub fn jump(&self) -> String {
        format!("-m comment --comment {JUMP_COMMENT} -j {}", self.name)
    }
}

fn rule(text: &'static str, matches: impl Into<String>, target: impl Into<String>) -> RuleLine {
    RuleLine {
        text,
        matches: matches.into(),
        target: target.into(),
    }
}

/// nft's "mark `bits`, stop" as two rules.
fn mark_stop(text: &'static str, matches: &str, bits: u32) -> [RuleLine; 2] {
    [
        rule(text, matches, or_mark(bits)),
        rule(text, matches, "RETURN"),
    ]
}

fn or_mark(bits: u32) -> String {
    format!("MARK --or-mark 0x{bits:x}")
}

fn has_mark(bits: u32) -> String {
    format!("-m mark --mark 0x{bits:x}/0x{bits:x}")
}

fn has_connmark(bits: u32) -> String {
    format!("-m connmark --mark 0x{bits:x}/0x{bits:x}")
}

// ---- node (SPEC §2) -----------------------------------------------------------------------

/// The node's chains of family `f`; `None` gives the same chains without rules.
pub fn node_chains(rules: Option<&NodeRules>, f: Fam) -> Vec<ChainRules> {
    let pre = rules.map(|r| node_prerouting(r, f)).unwrap_or_default();
    let save = rules.map(|_| connmark_saves()).unwrap_or_default();
    let out = rules.map(|r| node_output(r, f)).unwrap_or_default();
    let bypass = rules.map(|_| nat_bypass()).unwrap_or_default();
    let c = |table, name, hook, rules| ChainRules {
        table,
        name,
        hook,
        rules,
    };
    vec![
        c("mangle", chain::PREROUTING, "PREROUTING", pre),
        c("mangle", chain::FORWARD, "FORWARD", save.clone()),
        c("mangle", chain::INPUT, "INPUT", save),
        c("mangle", chain::OUTPUT, "OUTPUT", out),
        c("nat", chain::NAT_PREROUTING, "PREROUTING", bypass.clone()),
        c("nat", chain::NAT_POSTROUTING, "POSTROUTING", bypass),
    ]
}

/// "Arrived from the ztunnel pod": its veth, or the bridge plus the ztunnel's MAC.
fn from_zt(r: &NodeRules) -> String {
    match &r.ztunnel_bridge {
        None => format!("-i {}", r.ztunnel_veth),
        Some(b) => format!("-i {b} -m mac --mac-source {}", r.ztunnel_mac),
    }
}

fn node_prerouting(r: &NodeRules, f: Fam) -> Vec<RuleLine> {
    let mut v = Vec::new();
    for t in [consts::ISTIOIN.name, consts::ISTIOOUT.name] {
        v.extend(mark_stop(
            "decapsulated from the tunnels: skip",
            &format!("-i {t}"),
            mark::SKIP,
        ));
    }
    v.push(rule(
        "the tunnels' own UDP: stop",
        format!("-p udp -m udp --dport {}", r.tunnel_port),
        "RETURN",
    ));
    v.extend(mark_stop(
        "connection of ztunnel or the node: skip",
        &has_connmark(mark::OWN),
        mark::SKIP,
    ));
    // As in the nft backend: the "from ztunnel" rules come first, so the return rule below
    // needs no "not from ztunnel" condition.
    if let Some(zt_ip) = r.ztunnel_ips().into_iter().find(|a| Fam::of(*a) == f) {
        v.extend(mark_stop(
            "from ztunnel with a pod source: skip, spoofed",
            &format!("{} ! -s {}", from_zt(r), f.host(zt_ip)),
            mark::SPOOFED,
        ));
    }
    v.extend(mark_stop(
        "from ztunnel itself: skip, own",
        &from_zt(r),
        mark::OWN,
    ));
    // Anti-spoofing, before the ztunnel-flow and capture rules: an enrolled address must come
    // from its pod's device (`src,src`: the source address and the input device).
    let spoofed = format!(
        "-m set --match-set {} src -m set ! --match-set {} src,src",
        f.pod_set(),
        f.iif_set()
    );
    v.push(rule(
        "pod address from a device not its own: spoofed, log (rate-limited)",
        format!(
            "{spoofed} -m limit --limit {n}/min --limit-burst {n}",
            n = consts::SPOOF_LOG_PER_MINUTE
        ),
        format!("LOG --log-prefix \"{SPOOF_LOG_PREFIX}\" --log-level 4"),
    ));
    v.push(rule(
        "pod address from a device not its own: spoofed, drop",
        spoofed,
        "DROP",
    ));
    v.extend(mark_stop(
        "rest of a ztunnel-spoofed flow: back to ztunnel",
        &has_connmark(mark::SPOOFED),
        mark::RETURN,
    ));
    v.extend(mark_stop("UDP is not captured", "-p udp", mark::OWN));
    v.push(rule(
        "TCP from an ambient pod's own device: capture outbound",
        format!("-p tcp -m set --match-set {} src,src", f.iif_set()),
        or_mark(mark::CAPTURE),
    ));
    v
}

/// forward and input: remember the "own" and "spoofed" marks in the connmark.
fn connmark_saves() -> Vec<RuleLine> {
    [
        ("save own mark in the connmark", mark::OWN),
        ("save spoofed mark in the connmark", mark::SPOOFED),
    ]
    .into_iter()
    .map(|(text, bits)| {
        rule(
            text,
            has_mark(bits),
            format!("CONNMARK --or-mark 0x{bits:x}"),
        )
    })
    .collect()
}

fn node_output(r: &NodeRules, f: Fam) -> Vec<RuleLine> {
    let mut gateways: Vec<IpAddr> = r
        .node_gateways
        .iter()
        .copied()
        .filter(|g| Fam::of(*g) == f)
        .collect();
    gateways.sort();
    gateways.dedup();
    gateways
        .into_iter()
        .map(|gw| {
            rule(
                "from the node gateway address (probes): not captured",
                format!("-s {}", f.host(gw)),
                or_mark(mark::OWN),
            )
        })
        .collect()
}

/// kube-proxy coexistence (SPEC §2): the original's `-m mark --mark 0x100/0x100 -j ACCEPT`.
/// Our chain is jumped to first from nat PREROUTING / POSTROUTING, and an ACCEPT there ends
/// the built-in chain, so kube-proxy's KUBE-SERVICES / KUBE-POSTROUTING jumps (later in the
/// same chain) are never reached for captured connections.
fn nat_bypass() -> Vec<RuleLine> {
    vec![rule(
        "captured: accept before kube-proxy's NAT",
        has_mark(mark::CAPTURE),
        "ACCEPT",
    )]
}

// ---- ztunnel netns (SPEC §3) --------------------------------------------------------------

/// The ztunnel netns's per-source SYN limit of family `f` (raw PREROUTING; as the nft
/// backend's `syn-limit` chain): `hashlimit` keeps one bucket per source address.
pub fn ztunnel_syn_limit_chain(r: &ZtunnelRules, f: Fam) -> Option<ChainRules> {
    let l = r.syn_limit?;
    // Only for a family the pod has (as the TPROXY chain).
    let own = r.own_ips();
    match f {
        Fam::V4 => own.v4.map(drop)?,
        Fam::V6 => own.v6.map(drop)?,
    };
    let (name, text) = consts::syn_limit::names(f == Fam::V6);
    // `pistio+`: pistioin and pistioout (their common prefix, iptables' wildcard), one bucket
    // per source whichever way it came.
    let (a, b) = (consts::PISTIOIN.name, consts::PISTIOOUT.name);
    let common = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    let matches = format!(
        "-i {}+ -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -m hashlimit \
         --hashlimit-above {}/sec --hashlimit-burst {} --hashlimit-mode srcip \
         --hashlimit-name {name} --hashlimit-htable-expire {}",
        &a[..common],
        l.per_second,
        l.burst,
        consts::syn_limit::IDLE_SECONDS * 1000
    );
    let rules = vec![rule(text, matches, "DROP")];
    Some(ChainRules {
        table: "raw",
        name: chain::SYN_LIMIT,
        hook: "PREROUTING",
        rules,
    })
}

/// The ztunnel netns chain of family `f` (mangle, jumped to from PREROUTING); `None` when the
/// pod has no address of that family.
pub fn ztunnel_chain(r: &ZtunnelRules, f: Fam) -> Option<ChainRules> {
    let own: IpAddr = match f {
        Fam::V4 => r.own_ips().v4?.into(),
        Fam::V6 => r.own_ips().v6?.into(),
    };
    let tproxy = |to: u16| {
        format!(
            "TPROXY --on-port {to} --on-ip {} --tproxy-mark 0x{:x}/0x{:x}",
            f.loopback(),
            zt_mark::TPROXY,
            zt_mark::MASK
        )
    };
    let pistioin = consts::PISTIOIN.name;
    let rules = vec![
        rule(
            "inbound HBONE: tproxy 15008",
            format!(
                "-i {pistioin} -p tcp -m tcp --dport {}",
                port::INBOUND_HBONE
            ),
            tproxy(port::INBOUND_HBONE),
        ),
        rule(
            "outbound: tproxy 15001",
            format!("-i {} -p tcp", consts::PISTIOOUT.name),
            tproxy(port::OUTBOUND),
        ),
        rule(
            "inbound plaintext: tproxy 15006",
            format!("-i {pistioin} -p tcp"),
            tproxy(port::INBOUND_PLAINTEXT),
        ),
        rule(
            "reply to a spoofed upstream socket: deliver locally",
            format!("-i {} -p tcp ! -d {}", r.pod_iface, f.host(own)),
            format!(
                "MARK --set-xmark 0x{:x}/0x{:x}",
                zt_mark::SPOOF_REPLY,
                zt_mark::MASK
            ),
        ),
    ];
    Some(ChainRules {
        table: "mangle",
        name: chain::PREROUTING,
        hook: "PREROUTING",
        rules,
    })
}
