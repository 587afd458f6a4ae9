//! The desired rules, written as `nftables` crate statements, one [`ChainSpec`] per chain.
//!
//! Every rule carries a comment `"<what it does> [ambient <i>/<n> <fingerprint>]"`; the
//! fingerprint hashes the chain's rendered rules, so comparing the comments the kernel gives
//! back with [`ChainSpec::fingerprint`] tells whether the chain is the desired one without
//! parsing nft's normalized expressions.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use nftables::expr::{
    BinaryOperation, Elem, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField,
    SetItem, CT,
};
use nftables::schema::{Chain, Rule};
use nftables::stmt::{
    Counter, Limit, Log, LogLevel, Mangle, Match, Meter, NATFamily, Operator, Statement, TProxy,
    NAT,
};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};

use super::{chain, prio, NodeRules, ZtunnelRules};
use crate::consts::{self, mark, port, zt_mark};

/// One rule: a human description (the comment's text) and its statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSpec {
    pub text: &'static str,
    pub expr: Vec<Statement<'static>>,
}

/// One base chain with its hook, priority (policy is always accept) and ordered rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainSpec {
    pub name: &'static str,
    pub kind: NfChainType,
    pub hook: NfHook,
    pub prio: i32,
    pub rules: Vec<RuleSpec>,
}

/// The tag at the end of every rule comment: position `index` (1-based) of `count` rules in
/// a chain whose rendered rules hash to `fingerprint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleTag {
    pub index: usize,
    pub count: usize,
    pub fingerprint: u64,
}

const TAG_OPEN: &str = " [ambient ";
/// nft refuses comments longer than this many bytes.
pub(crate) const COMMENT_MAX: usize = 128;

impl RuleTag {
    /// Reads the tag from the end of a rule comment; `None` for anything else.
    pub fn parse(comment: &str) -> Option<RuleTag> {
        let start = comment.rfind(TAG_OPEN)?;
        let body = comment[start + TAG_OPEN.len()..].strip_suffix(']')?;
        let (pos, fp) = body.split_once(' ')?;
        let (index, count) = pos.split_once('/')?;
        if fp.len() != 16 {
            return None;
        }
        Some(RuleTag {
            index: index.parse().ok()?,
            count: count.parse().ok()?,
            fingerprint: u64::from_str_radix(fp, 16).ok()?,
        })
    }
}

/// `"<text> [ambient <index>/<count> <fingerprint as 16 hex digits>]"`; the text is cut
/// (at a character boundary) so that the whole comment fits nft's limit.
pub fn rule_comment(text: &str, tag: RuleTag) -> String {
    let tag = format!(
        "{TAG_OPEN}{}/{} {:016x}]",
        tag.index, tag.count, tag.fingerprint
    );
    let mut end = text.len().min(COMMENT_MAX.saturating_sub(tag.len()));
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{tag}", &text[..end])
}

/// FNV-1a, 64 bit: tiny, stable across builds and platforms (unlike std's SipHash keys).
fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

impl ChainSpec {
    /// Hash of the chain name and every rule's text and serialized statements, in order.
    pub fn fingerprint(&self) -> u64 {
        let mut h = fnv1a(FNV_OFFSET, self.name.as_bytes());
        for r in &self.rules {
            h = fnv1a(h, b"\n");
            h = fnv1a(h, r.text.as_bytes());
            h = fnv1a(h, b"\0");
            // Serializing these plain data types cannot fail; an (impossible) error still
            // changes the hash instead of panicking.
            let json = serde_json::to_string(&r.expr).unwrap_or_default();
            h = fnv1a(h, json.as_bytes());
        }
        h
    }

    /// The chain object for `add chain` (base chain, policy accept).
    pub fn chain(&self, family: NfFamily, table: &'static str) -> Chain<'static> {
        Chain {
            family,
            table: Cow::Borrowed(table),
            name: Cow::Borrowed(self.name),
            _type: Some(self.kind),
            hook: Some(self.hook),
            prio: Some(self.prio),
            policy: Some(NfChainPolicy::Accept),
            ..Chain::default()
        }
    }

    /// The rules for `add rule`, each with its tagged comment.
    pub fn rules(&self, family: NfFamily, table: &'static str) -> Vec<Rule<'static>> {
        let fingerprint = self.fingerprint();
        let count = self.rules.len();
        self.rules
            .iter()
            .enumerate()
            .map(|(i, r)| Rule {
                family,
                table: Cow::Borrowed(table),
                chain: Cow::Borrowed(self.name),
                expr: Cow::Owned(r.expr.clone()),
                handle: None,
                index: None,
                comment: Some(Cow::Owned(rule_comment(
                    r.text,
                    RuleTag {
                        index: i + 1,
                        count,
                        fingerprint,
                    },
                ))),
            })
            .collect()
    }
}

// ---- expression helpers -------------------------------------------------------------------

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn ct_mark() -> Expression<'static> {
    Expression::Named(NamedExpression::CT(CT {
        key: Cow::Borrowed("mark"),
        family: None,
        dir: None,
    }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn num(n: u32) -> Expression<'static> {
    Expression::Number(n)
}

fn text(s: impl Into<Cow<'static, str>>) -> Expression<'static> {
    Expression::String(s.into())
}

fn addr(a: impl Into<IpAddr>) -> Expression<'static> {
    text(a.into().to_string())
}

/// An address family of the inet table's rules: IPv6 mirrors IPv4 with the `ip6` payload
/// and the v6 twins of the sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fam {
    V4,
    V6,
}

impl Fam {
    pub(crate) const BOTH: [Fam; 2] = [Fam::V4, Fam::V6];

    fn of(a: IpAddr) -> Fam {
        if a.is_ipv4() {
            Fam::V4
        } else {
            Fam::V6
        }
    }

    /// The payload protocol of the network header: `ip` / `ip6`.
    fn proto(self) -> &'static str {
        match self {
            Fam::V4 => "ip",
            Fam::V6 => "ip6",
        }
    }

    /// `meta nfproto` / `meta protocol` value: `ipv4` / `ipv6`.
    fn nfproto(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4",
            Fam::V6 => "ipv6",
        }
    }

    fn pod_set(self) -> &'static str {
        match self {
            Fam::V4 => consts::POD_SET,
            Fam::V6 => consts::POD_SET_V6,
        }
    }

    fn iif_set(self) -> &'static str {
        match self {
            Fam::V4 => consts::POD_IIF_SET,
            Fam::V6 => consts::POD_IIF_SET_V6,
        }
    }

    fn port_set(self) -> &'static str {
        match self {
            Fam::V4 => consts::POD_PORT_SET,
            Fam::V6 => consts::POD_PORT_SET_V6,
        }
    }

    /// The loopback address TPROXY hands connections to.
    fn loopback(self) -> IpAddr {
        match self {
            Fam::V4 => Ipv4Addr::LOCALHOST.into(),
            Fam::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }
}

fn and(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::AND(a, b)))
}

fn or(a: Expression<'static>, b: Expression<'static>) -> Expression<'static> {
    Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![a, b])))
}

fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::EQ, right)
}

fn ne(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    matches(left, Operator::NEQ, right)
}

fn iifname(name: impl Into<Cow<'static, str>>) -> Statement<'static> {
    eq(meta(MetaKey::Iifname), text(name))
}

fn l4proto(proto: &'static str) -> Statement<'static> {
    eq(meta(MetaKey::L4proto), text(proto))
}

/// `meta mark & bits == bits`
fn mark_has(bits: u32) -> Statement<'static> {
    eq(and(meta(MetaKey::Mark), num(bits)), num(bits))
}

/// `ct mark & bits == bits`
fn ct_mark_has(bits: u32) -> Statement<'static> {
    eq(and(ct_mark(), num(bits)), num(bits))
}

/// `meta mark set meta mark | bits` (never overwrites other bits).
fn mark_or(bits: u32) -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: or(meta(MetaKey::Mark), num(bits)),
    })
}

/// `ct mark set ct mark | bits`
fn ct_mark_or(bits: u32) -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: ct_mark(),
        value: or(ct_mark(), num(bits)),
    })
}

/// `meta mark set meta mark & ~MASK | value` (ztunnel marks live under 0xfff).
fn zt_mark_set(value: u32) -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: or(and(meta(MetaKey::Mark), num(!zt_mark::MASK)), num(value)),
    })
}

fn ret() -> Statement<'static> {
    Statement::Return(None)
}

fn accept() -> Statement<'static> {
    Statement::Accept(None)
}

fn set_ref(name: &str) -> Expression<'static> {
    text(format!("@{name}"))
}

/// `iifname . ip saddr` (`ip6 saddr`)
fn iif_saddr(f: Fam) -> Expression<'static> {
    Expression::Named(NamedExpression::Concat(vec![
        meta(MetaKey::Iifname),
        payload(f.proto(), "saddr"),
    ]))
}

/// The two rules that drop a packet claiming an enrolled address (of `f`'s pod set) from a
/// device that is not that pod's own (`iif . saddr` not in `own`): the first logs
/// (rate-limited), the second counts and drops.
fn spoof_drop(f: Fam, own: &'static str) -> [RuleSpec; 2] {
    let matches = || {
        vec![
            eq(payload(f.proto(), "saddr"), set_ref(f.pod_set())),
            ne(iif_saddr(f), set_ref(own)),
        ]
    };
    let mut log = matches();
    log.push(Statement::Limit(Limit {
        rate: consts::SPOOF_LOG_PER_MINUTE,
        rate_unit: None,
        per: Some(Cow::Borrowed("minute")),
        burst: Some(consts::SPOOF_LOG_PER_MINUTE),
        burst_unit: None,
        inv: None,
    }));
    log.push(Statement::Log(Some(Log {
        prefix: Some(Cow::Borrowed(consts::SPOOF_LOG_PREFIX)),
        level: Some(LogLevel::Warn),
        ..Log::new(None)
    })));
    let mut drop = matches();
    drop.push(Statement::Counter(Counter::Anonymous(None)));
    drop.push(Statement::Drop(None));
    let (log_text, drop_text) = match f {
        Fam::V4 => (
            "pod address from a device not its own: spoofed, log (rate-limited)",
            "pod address from a device not its own: spoofed, drop",
        ),
        Fam::V6 => (
            "IPv6 pod address from a device not its own: spoofed, log (rate-limited)",
            "IPv6 pod address from a device not its own: spoofed, drop",
        ),
    };
    [rule(log_text, log), rule(drop_text, drop)]
}

fn rule(text: &'static str, expr: Vec<Statement<'static>>) -> RuleSpec {
    RuleSpec { text, expr }
}

fn filter_chain(name: &'static str, hook: NfHook, rules: Vec<RuleSpec>) -> ChainSpec {
    ChainSpec {
        name,
        kind: NfChainType::Filter,
        hook,
        prio: prio::MANGLE,
        rules,
    }
}

// ---- node table (SPEC §2) -----------------------------------------------------------------

/// The node table's chains; `None` gives the same chains without rules (nothing captured).
pub fn node_chains(rules: Option<&NodeRules>) -> Vec<ChainSpec> {
    let r = rules;
    let pre = r.map(node_prerouting).unwrap_or_default();
    let save = r.map(|_| connmark_saves()).unwrap_or_default();
    let out = r.map(node_output).unwrap_or_default();
    let (dnat, snat) = r.map(|_| nat_bypass()).unwrap_or_default();
    vec![
        filter_chain(chain::PREROUTING, NfHook::Prerouting, pre),
        filter_chain(chain::FORWARD, NfHook::Forward, save.clone()),
        filter_chain(chain::INPUT, NfHook::Input, save),
        ChainSpec {
            name: chain::OUTPUT,
            kind: NfChainType::Route,
            hook: NfHook::Output,
            prio: prio::MANGLE,
            rules: out,
        },
        ChainSpec {
            name: chain::NAT_PREROUTING,
            kind: NfChainType::NAT,
            hook: NfHook::Prerouting,
            prio: prio::DSTNAT + prio::NAT_BYPASS_OFFSET,
            rules: dnat,
        },
        ChainSpec {
            name: chain::NAT_POSTROUTING,
            kind: NfChainType::NAT,
            hook: NfHook::Postrouting,
            prio: prio::SRCNAT + prio::NAT_BYPASS_OFFSET,
            rules: snat,
        },
    ]
}

fn node_prerouting(r: &NodeRules) -> Vec<RuleSpec> {
    let [spoof_log, spoof] = spoof_drop(Fam::V4, Fam::V4.iif_set());
    let [spoof_log6, spoof6] = spoof_drop(Fam::V6, Fam::V6.iif_set());
    let tunnels = Expression::Named(NamedExpression::Set(vec![
        SetItem::Element(text(consts::ISTIOIN.name)),
        SetItem::Element(text(consts::ISTIOOUT.name)),
    ]));
    let mut v = vec![
        rule(
            "decapsulated from the tunnels: skip",
            vec![
                eq(meta(MetaKey::Iifname), tunnels),
                mark_or(mark::SKIP),
                ret(),
            ],
        ),
        rule(
            "the tunnels' own UDP: stop",
            vec![
                eq(payload("udp", "dport"), num(r.tunnel_port.into())),
                ret(),
            ],
        ),
        rule(
            "connection of ztunnel or the node: skip",
            vec![ct_mark_has(mark::OWN), mark_or(mark::SKIP), ret()],
        ),
    ];
    // The "from ztunnel" rules come before the return rule, so that rule needs no "not from
    // ztunnel" condition (which a bridge port could not express as one match). One per
    // address of the ztunnel: a packet of the other family cannot match `ip saddr` (`ip6`).
    for zt_ip in r.ztunnel_ips() {
        v.push(rule(
            match Fam::of(zt_ip) {
                Fam::V4 => "from ztunnel with a pod source: skip, spoofed",
                Fam::V6 => "from ztunnel with an IPv6 pod source: skip, spoofed",
            },
            from_zt(
                r,
                vec![
                    ne(payload(Fam::of(zt_ip).proto(), "saddr"), addr(zt_ip)),
                    mark_or(mark::SPOOFED),
                    ret(),
                ],
            ),
        ));
    }
    v.extend([
        rule(
            "from ztunnel itself: skip, own",
            from_zt(r, vec![mark_or(mark::OWN), ret()]),
        ),
        // Anti-spoofing: after the rules for packets from ztunnel (which sends with pod
        // sources) and the tunnels, an enrolled address must come from its pod's device;
        // before the ztunnel-flow and capture rules, so a spoofed packet is never captured
        // (nor returned to ztunnel) as that pod.
        spoof_log,
        spoof,
        spoof_log6,
        spoof6,
        rule(
            "rest of a ztunnel-spoofed flow: back to ztunnel",
            vec![ct_mark_has(mark::SPOOFED), mark_or(mark::RETURN), ret()],
        ),
        rule(
            "UDP is not captured",
            vec![l4proto("udp"), mark_or(mark::OWN), ret()],
        ),
        rule(
            "TCP from an ambient pod's own device: capture outbound",
            vec![
                l4proto("tcp"),
                eq(iif_saddr(Fam::V4), set_ref(Fam::V4.iif_set())),
                mark_or(mark::CAPTURE),
            ],
        ),
        rule(
            "TCP from an ambient pod's own device (IPv6): capture outbound",
            vec![
                l4proto("tcp"),
                eq(iif_saddr(Fam::V6), set_ref(Fam::V6.iif_set())),
                mark_or(mark::CAPTURE),
            ],
        ),
    ]);
    v
}

/// The node's bridge table (anti-spoofing on bridge ports); `None` gives the chain without
/// rules. With a bridge-type primary every pod's packets reach routing with the bridge as
/// input device, so the inet table cannot tell two pods of one bridge apart; here `iifname` is
/// the bridge port, the pod's host veth. Only IPv4 packets claiming an enrolled address are
/// looked at: ARP, IPv6 (ND), other pods' traffic and frames the node sends pass untouched.
///
/// Same-bridge capture (with [`NodeRules::bridge_mac`]): after the anti-spoofing rules, a TCP
/// IPv4 frame the bridge would switch to another port (`meta pkttype other`: unicast, not
/// addressed to the bridge) whose source or destination is an enrolled pod is readdressed to
/// the bridge (`ether daddr set <bridge mac>`, `meta pkttype set host`): the bridge delivers
/// it up to the IP layer with the bridge as input device, exactly like a frame the pod sent to
/// its gateway, and the inet table captures it (source enrolled: mark 0x100, `istioout`;
/// destination enrolled: rule 103, table 100, `istioin`). ARP, IPv6/ND, broadcast, multicast,
/// UDP, frames between two pods that are not enrolled and everything from the ztunnel's port
/// (the first rule returns) are switched as before.
pub fn bridge_chains(rules: Option<&NodeRules>) -> Vec<ChainSpec> {
    let rules = rules
        .map(|r| {
            let mut v = vec![rule(
                "from the ztunnel's port: pod sources are ztunnel's, not spoofed",
                vec![iifname(r.ztunnel_veth.clone()), ret()],
            )];
            for f in Fam::BOTH {
                v.extend(spoof_drop(f, f.port_set()));
            }
            if let (Some(_), Some(mac)) = (&r.ztunnel_bridge, &r.bridge_mac) {
                for f in Fam::BOTH {
                    let (from, to) = match f {
                        Fam::V4 => (
                            "TCP from an ambient pod to a pod of the bridge: up to the IP layer (capture)",
                            "TCP to an ambient pod from a pod of the bridge: up to the IP layer (capture)",
                        ),
                        Fam::V6 => (
                            "IPv6 TCP from an ambient pod to a pod of the bridge: up to the IP layer",
                            "IPv6 TCP to an ambient pod from a pod of the bridge: up to the IP layer",
                        ),
                    };
                    v.push(rule(from, to_ip_layer(f, "saddr", mac)));
                    v.push(rule(to, to_ip_layer(f, "daddr", mac)));
                }
            }
            v
        })
        .unwrap_or_default();
    vec![ChainSpec {
        name: chain::PREROUTING,
        kind: NfChainType::Filter,
        hook: NfHook::Prerouting,
        prio: prio::BRIDGE_FILTER,
        rules,
    }]
}

/// `meta pkttype other meta protocol ip meta l4proto tcp ip <field> @ztunnel-pods-ips
/// ether daddr set <bridge mac> meta pkttype set host` (IPv6: `ip6`, the v6 set; neighbour
/// discovery is ICMPv6, never TCP, so it is switched as before).
fn to_ip_layer(f: Fam, field: &'static str, bridge_mac: &str) -> Vec<Statement<'static>> {
    let protocol = match f {
        Fam::V4 => "ip",
        Fam::V6 => "ip6",
    };
    vec![
        eq(meta(MetaKey::Pkttype), text("other")),
        eq(meta(MetaKey::Protocol), text(protocol)),
        l4proto("tcp"),
        eq(payload(f.proto(), field), set_ref(f.pod_set())),
        Statement::Mangle(Mangle {
            key: payload("ether", "daddr"),
            value: text(bridge_mac.to_string()),
        }),
        Statement::Mangle(Mangle {
            key: meta(MetaKey::Pkttype),
            value: text("host"),
        }),
    ]
}

/// Prefixes `rest` with the match for "arrived from the ztunnel pod": its veth, or, when the
/// veth is a bridge port, the bridge plus the ztunnel's MAC (routing sees the bridge).
fn from_zt(r: &NodeRules, rest: Vec<Statement<'static>>) -> Vec<Statement<'static>> {
    let mut m = match &r.ztunnel_bridge {
        None => vec![eq(meta(MetaKey::Iifname), text(r.ztunnel_veth.clone()))],
        Some(b) => vec![
            eq(meta(MetaKey::Iifname), text(b.clone())),
            eq(payload("ether", "saddr"), text(r.ztunnel_mac.clone())),
        ],
    };
    m.extend(rest);
    m
}

/// forward and input: remember the "own" and "spoofed" marks in the connmark.
fn connmark_saves() -> Vec<RuleSpec> {
    vec![
        rule(
            "save own mark in the connmark",
            vec![mark_has(mark::OWN), ct_mark_or(mark::OWN)],
        ),
        rule(
            "save spoofed mark in the connmark",
            vec![mark_has(mark::SPOOFED), ct_mark_or(mark::SPOOFED)],
        ),
    ]
}

fn node_output(r: &NodeRules) -> Vec<RuleSpec> {
    let mut gateways = r.node_gateways.clone();
    gateways.sort();
    gateways.dedup();
    gateways
        .into_iter()
        .map(|gw| {
            rule(
                "from the node gateway address (probes): not captured",
                vec![
                    eq(payload(Fam::of(gw).proto(), "saddr"), addr(gw)),
                    mark_or(mark::OWN),
                ],
            )
        })
        .collect()
}

/// kube-proxy coexistence (SPEC §2, last paragraph).
///
/// An `accept` here would not stop kube-proxy's NAT chains (they are in another table). What
/// does: a NAT binding made earlier. The kernel runs the NAT chains of one hook in priority
/// order and stops as soon as the connection has a binding for that manipulation
/// (`nf_nat_inet_fn`), so an identity DNAT at dstnat-10 keeps the ClusterIP as destination
/// for ztunnel, and an identity SNAT at srcnat-10 keeps masquerade off. The kernel accepts
/// `dnat ip to ip daddr` / `snat ip to ip saddr` in an inet table (nft 1.0.6, kernel 6.18):
/// the address is taken from the packet itself. `meta nfproto ipv4` is explicit so that an
/// IPv6 packet can never reach an IPv4 NAT statement; the IPv6 twins (`dnat ip6 to ip6 daddr`)
/// do the same for v6 Services.
fn nat_bypass() -> (Vec<RuleSpec>, Vec<RuleSpec>) {
    let identity = |f: Fam, field: &'static str| NAT {
        addr: Some(payload(f.proto(), field)),
        family: Some(match f {
            Fam::V4 => NATFamily::IP,
            Fam::V6 => NATFamily::IP6,
        }),
        port: None,
        flags: None,
    };
    let nfproto = |f: Fam| eq(meta(MetaKey::Nfproto), text(f.nfproto()));
    let dnat = |f: Fam, text: &'static str| {
        rule(
            text,
            vec![
                nfproto(f),
                mark_has(mark::CAPTURE),
                Statement::DNAT(Some(identity(f, "daddr"))),
            ],
        )
    };
    let snat = |f: Fam, text: &'static str| {
        rule(
            text,
            vec![
                nfproto(f),
                mark_has(mark::CAPTURE),
                Statement::SNAT(Some(identity(f, "saddr"))),
            ],
        )
    };
    (
        vec![
            dnat(
                Fam::V4,
                "captured: identity DNAT, later DNAT (kube-proxy) is skipped",
            ),
            dnat(
                Fam::V6,
                "captured IPv6: identity DNAT, later DNAT (kube-proxy) is skipped",
            ),
        ],
        vec![
            snat(
                Fam::V4,
                "captured: identity SNAT, later masquerade is skipped",
            ),
            snat(
                Fam::V6,
                "captured IPv6: identity SNAT, later masquerade is skipped",
            ),
        ],
    )
}

// ---- ztunnel netns table (SPEC §3) --------------------------------------------------------

/// The IPv4 table's chain (`table ip ztunnel`).
pub fn ztunnel_chains(r: &ZtunnelRules) -> Vec<ChainSpec> {
    ztunnel_chains_of(r, Fam::V4)
}

/// The IPv6 table's chain (`table ip6 ztunnel`): the same rules, TPROXY to `[::1]`.
pub fn ztunnel_chains6(r: &ZtunnelRules) -> Vec<ChainSpec> {
    ztunnel_chains_of(r, Fam::V6)
}

fn ztunnel_chains_of(r: &ZtunnelRules, f: Fam) -> Vec<ChainSpec> {
    let tproxy = |to: u16| {
        Statement::TProxy(TProxy {
            family: Some(Cow::Borrowed(f.proto())),
            port: to,
            addr: Some(Cow::Owned(f.loopback().to_string())),
        })
    };
    let own = match f {
        Fam::V4 => r.own_ips().v4.map(IpAddr::V4),
        Fam::V6 => r.own_ips().v6.map(IpAddr::V6),
    };
    let mut rules = vec![
        rule(
            "inbound HBONE: tproxy 15008",
            vec![
                iifname(consts::PISTIOIN.name),
                eq(payload("tcp", "dport"), num(port::INBOUND_HBONE.into())),
                tproxy(port::INBOUND_HBONE),
                zt_mark_set(zt_mark::TPROXY),
                accept(),
            ],
        ),
        rule(
            "outbound: tproxy 15001",
            vec![
                iifname(consts::PISTIOOUT.name),
                l4proto("tcp"),
                tproxy(port::OUTBOUND),
                zt_mark_set(zt_mark::TPROXY),
                accept(),
            ],
        ),
        rule(
            "inbound plaintext: tproxy 15006",
            vec![
                iifname(consts::PISTIOIN.name),
                l4proto("tcp"),
                tproxy(port::INBOUND_PLAINTEXT),
                zt_mark_set(zt_mark::TPROXY),
                accept(),
            ],
        ),
    ];
    if let Some(own) = own {
        rules.push(rule(
            "reply to a spoofed upstream socket: deliver locally",
            vec![
                iifname(r.pod_iface.clone()),
                l4proto("tcp"),
                ne(payload(f.proto(), "daddr"), addr(own)),
                zt_mark_set(zt_mark::SPOOF_REPLY),
            ],
        ));
    }
    let mut chains = vec![filter_chain(chain::PREROUTING, NfHook::Prerouting, rules)];
    if let Some(l) = r.syn_limit {
        chains.push(ChainSpec {
            prio: prio::RAW,
            ..filter_chain(chain::SYN_LIMIT, NfHook::Prerouting, vec![syn_limit(f, l)])
        });
    }
    chains
}

/// A captured connection's SYN from a source over its rate: dropped (counted), before
/// conntrack and TPROXY. One token bucket per source address, in a meter (a dynamic set)
/// whose idle entries expire; a full meter limits nobody rather than everybody.
fn syn_limit(f: Fam, l: super::SynLimit) -> RuleSpec {
    let captured = Expression::Named(NamedExpression::Set(vec![
        SetItem::Element(text(consts::PISTIOIN.name)),
        SetItem::Element(text(consts::PISTIOOUT.name)),
    ]));
    let flags = and(
        payload("tcp", "flags"),
        Expression::List(vec![text("fin"), text("syn"), text("rst"), text("ack")]),
    );
    let (meter, text_) = consts::syn_limit::names(f == Fam::V6);
    rule(
        text_,
        vec![
            eq(meta(MetaKey::Iifname), captured),
            eq(flags, text("syn")),
            Statement::Meter(Meter {
                name: Cow::Borrowed(meter),
                key: Expression::Named(NamedExpression::Elem(Elem {
                    val: Box::new(payload(f.proto(), "saddr")),
                    timeout: Some(consts::syn_limit::IDLE_SECONDS),
                    expires: None,
                    comment: None,
                    counter: None,
                })),
                stmt: Box::new(Statement::Limit(Limit {
                    rate: l.per_second,
                    rate_unit: None,
                    per: Some(Cow::Borrowed("second")),
                    burst: Some(l.burst),
                    burst_unit: None,
                    inv: Some(true),
                })),
            }),
            Statement::Counter(Counter::Anonymous(None)),
            Statement::Drop(None),
        ],
    )
}
