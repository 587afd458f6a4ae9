//! What the kernel holds now, on the node and in the ztunnel netns: policy rules of both
//! families, the routes of the tables the path uses, the tunnel devices, the packet filter of
//! the agent's backend (the nft tables, or the iptables chains and ipsets) and the listening
//! sockets. Read through netlib's observe functions (netlink, `nft -j list`, `iptables-save`,
//! `ipset save`), never from the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ambient_net::consts::{self, rule, table, zt_rule};
use ambient_net::firewall::FirewallKind;
use ambient_net::iptables::{self, ipset, Fam, Observed};
use ambient_net::model::{
    RouteKey, RouteKind, RouteValue, Routes, RuleAction, RuleSpec, TunnelObserved,
};
use ambient_net::nft::{self, ObservedTable};
use ambient_net::nl::Netlink;

use super::OpsError;

/// The kernel's main and local tables.
pub const TABLE_MAIN: u32 = 254;
pub const TABLE_LOCAL: u32 = 255;

/// One network namespace's part of the path.
#[derive(Debug, Clone, Default)]
pub struct NsKernel {
    /// The rules of the priorities the product owns there.
    pub rules: Vec<RuleSpec>,
    /// The routes of the product's tables plus main and local.
    pub routes: Routes,
    /// Tunnel devices by name (absent ones too, as `None`).
    pub tunnels: BTreeMap<String, Option<TunnelObserved>>,
    /// Link names by index.
    pub links: BTreeMap<u32, String>,
    /// The product's nft table (inet `ambient-node` or ip `ztunnel`).
    pub nft: Option<ObservedTable>,
    /// The bridge `ambient-node` table (node only).
    pub nft_bridge: Option<ObservedTable>,
    /// The ztunnel netns' `ip6 ztunnel` table.
    pub nft6: Option<ObservedTable>,
    /// The iptables backend's chains and sets, when the agent runs it.
    pub ipt: Option<IptKernel>,
}

/// The iptables backend's state of one netns.
#[derive(Debug, Clone, Default)]
pub struct IptKernel {
    /// `iptables-save`.
    pub v4: Observed,
    /// `ip6tables-save` (`None` where the kernel or the tools have no IPv6).
    pub v6: Option<Observed>,
    /// The members of our ipsets by set name (node only; the ztunnel netns has none).
    pub sets: BTreeMap<String, BTreeSet<String>>,
}

impl IptKernel {
    fn read(with_sets: bool) -> Result<IptKernel, OpsError> {
        let ipt = |e: iptables::IptablesError| OpsError::Firewall(e.to_string());
        Ok(IptKernel {
            v4: iptables::observe(Fam::V4).map_err(ipt)?,
            v6: iptables::observe(Fam::V6).ok(),
            sets: if with_sets {
                ipset::members().map_err(ipt)?
            } else {
                BTreeMap::new()
            },
        })
    }

    pub fn of(&self, f: Fam) -> Option<&Observed> {
        match f {
            Fam::V4 => Some(&self.v4),
            Fam::V6 => self.v6.as_ref(),
        }
    }

    /// Whether ipset `set` holds `member` (`<ip>` or `<ip>,<device>`).
    pub fn has(&self, set: &str, member: &str) -> bool {
        self.sets.get(set).is_some_and(|m| m.contains(member))
    }
}

/// The node's and (when known) its ztunnel netns' kernel state.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub node: NsKernel,
    pub ztunnel: Option<NsKernel>,
    /// The ztunnel netns path, when the agent knows one and it exists.
    pub ztunnel_netns: Option<PathBuf>,
    /// The packet filter the agent programs (its state's `--firewall`).
    pub firewall: FirewallKind,
    /// The one holding the ztunnel netns' TPROXY rules: ztunnel-init chooses its own
    /// (`--firewall`), so with the agent on iptables it may still be nftables.
    pub zt_firewall: FirewallKind,
}

impl Kernel {
    /// Reads the node (the calling thread's netns) and, when given, the ztunnel netns, with
    /// the packet filter of `firewall`.
    pub async fn read(
        ztunnel_netns: Option<&Path>,
        firewall: FirewallKind,
    ) -> Result<Kernel, OpsError> {
        let nl = Netlink::current().map_err(|e| OpsError::io("netlink", e))?;
        let mut node = read_ns(
            &nl,
            &rule::ALL,
            &table::ALL,
            &[consts::ISTIOIN.name, consts::ISTIOOUT.name],
        )
        .await?;
        match firewall {
            FirewallKind::Nftables => {
                node.nft = nft::observe_node()?;
                node.nft_bridge = nft::observe_node_bridge()?;
            }
            FirewallKind::Iptables => node.ipt = Some(IptKernel::read(true)?),
        }
        let Some(path) = ztunnel_netns.filter(|p| p.exists()) else {
            return Ok(Kernel {
                node,
                ztunnel: None,
                ztunnel_netns: None,
                firewall,
                zt_firewall: firewall,
            });
        };
        let zl = Netlink::in_netns(path)
            .map_err(|e| OpsError::io(format!("netlink in {}", path.display()), e))?;
        let zt_tables = [
            zt_rule::TABLE_LOCAL,
            zt_rule::TABLE_OUTBOUND,
            zt_rule::TABLE_INBOUND,
        ];
        let mut zt = read_ns(
            &zl,
            &zt_rule::ALL,
            &zt_tables,
            &[consts::PISTIOIN.name, consts::PISTIOOUT.name],
        )
        .await?;
        let enter = |e| OpsError::io(format!("enter {}", path.display()), e);
        zt.nft = ambient_net::netns::run_in(path, nft::observe_ztunnel).map_err(enter)??;
        zt.nft6 = ambient_net::netns::run_in(path, nft::observe_ztunnel6).map_err(enter)??;
        if firewall == FirewallKind::Iptables {
            zt.ipt = ambient_net::netns::run_in(path, || IptKernel::read(false))
                .map_err(enter)?
                .ok();
        }
        let ours = |i: &IptKernel| {
            Fam::BOTH.iter().any(|f| {
                i.of(*f)
                    .is_some_and(|o| o.chain("mangle", iptables::chain::PREROUTING).is_some())
            })
        };
        let zt_firewall = match &zt.ipt {
            Some(i) if ours(i) || (zt.nft.is_none() && zt.nft6.is_none()) => FirewallKind::Iptables,
            _ => FirewallKind::Nftables,
        };
        Ok(Kernel {
            node,
            ztunnel: Some(zt),
            ztunnel_netns: Some(path.to_path_buf()),
            firewall,
            zt_firewall,
        })
    }
}

async fn read_ns(
    nl: &Netlink,
    prios: &[u32],
    tables: &[u32],
    tunnels: &[&str],
) -> Result<NsKernel, OpsError> {
    let mut all_tables = tables.to_vec();
    all_tables.extend([TABLE_MAIN, TABLE_LOCAL]);
    let mut tun = BTreeMap::new();
    for t in tunnels {
        tun.insert(t.to_string(), nl.observe_tunnel(t).await?);
    }
    Ok(NsKernel {
        rules: nl.observe_rules(prios).await?,
        routes: nl.observe_routes(&all_tables).await?,
        tunnels: tun,
        links: nl.link_names().await?,
        ..NsKernel::default()
    })
}

/// Where a route lookup ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// The rule that sent the lookup to the table (`None`: the kernel's own local/main rules).
    pub rule: Option<RuleSpec>,
    pub table: u32,
    pub route: Option<(RouteKey, RouteValue)>,
}

impl NsKernel {
    /// The longest-prefix route for `dst` in `table` of its family (local routes first in the
    /// local table).
    pub fn route_in(&self, table: u32, dst: IpAddr) -> Option<(RouteKey, RouteValue)> {
        self.routes
            .iter()
            .filter(|(k, _)| k.table == table && in_prefix(dst, k.dst, k.prefix_len))
            .max_by_key(|(k, _)| (k.prefix_len, k.kind == RouteKind::Local))
            .map(|(k, v)| (*k, v.clone()))
    }

    /// The policy-routing walk for a packet to `dst` with `mark`: the local table (rule 0),
    /// the product's rules of `dst`'s family by priority (a `lookup` without a matching route
    /// falls through, as in the kernel), then main.
    pub fn lookup(&self, mark: u32, dst: IpAddr) -> Lookup {
        if let Some(r) = self
            .route_in(TABLE_LOCAL, dst)
            .filter(|(k, _)| k.kind == RouteKind::Local)
        {
            return Lookup {
                rule: None,
                table: TABLE_LOCAL,
                route: Some(r),
            };
        }
        let mut rules: Vec<RuleSpec> = self
            .rules
            .iter()
            .filter(|r| r.v6 == dst.is_ipv6())
            .copied()
            .collect();
        rules.sort();
        for r in rules {
            if let Some((m, mask)) = r.fwmark {
                if mark & mask != m {
                    continue;
                }
            }
            match r.action {
                RuleAction::Lookup(t) => {
                    if let Some(route) = self.route_in(t, dst) {
                        return Lookup {
                            rule: Some(r),
                            table: t,
                            route: Some(route),
                        };
                    }
                }
                RuleAction::Goto(_) => {
                    return Lookup {
                        rule: Some(r),
                        table: TABLE_MAIN,
                        route: self.route_in(TABLE_MAIN, dst),
                    }
                }
            }
        }
        Lookup {
            rule: None,
            table: TABLE_MAIN,
            route: self.route_in(TABLE_MAIN, dst),
        }
    }

    /// The rule of the product's chain `chain` whose comment contains `text`, with its
    /// position: the kernel's rules are named by their comments. `v6`: the ztunnel netns'
    /// `ip6 ztunnel` table (the node's inet table holds both families).
    /// Of several such rules, the IPv6 one (its comment says so) when `v6`, else the other.
    pub fn nft_rule(
        &self,
        v6_table: bool,
        v6: bool,
        chain: &str,
        text: &str,
    ) -> Option<(usize, &nft::ObservedRule, usize)> {
        let t = if v6_table && self.nft6.is_some() {
            self.nft6.as_ref()
        } else {
            self.nft.as_ref()
        };
        let c = t?.chains.get(chain)?;
        let comment = |r: &nft::ObservedRule| r.comment.clone().unwrap_or_default();
        let found: Vec<(usize, &nft::ObservedRule)> = c
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| comment(r).contains(text))
            .collect();
        found
            .iter()
            .find(|(_, r)| comment(r).contains("IPv6") == v6)
            .or(found.first())
            .map(|(i, r)| (i + 1, *r, c.rules.len()))
    }

    /// The rule of the iptables backend's chain `table`/`chain` of family `f` whose comment
    /// contains `text`, with its position and its `-A` text.
    pub fn ipt_rule(
        &self,
        f: Fam,
        table: &str,
        chain: &str,
        text: &str,
    ) -> Option<(usize, &str, usize)> {
        let rules = self.ipt.as_ref()?.of(f)?.chain(table, chain)?;
        rules
            .iter()
            .enumerate()
            .find(|(_, r)| ipt_comment(r).is_some_and(|c| c.contains(text)))
            .map(|(i, r)| (i + 1, r.as_str(), rules.len()))
    }

    /// The comment of the rule with `handle` in table `table` (either node table, by family).
    pub fn comment_of(&self, family: u8, chain: &str, handle: u64) -> Option<String> {
        let t = match family {
            7 => self.nft_bridge.as_ref(),
            10 if self.nft6.is_some() => self.nft6.as_ref(),
            _ => self.nft.as_ref(),
        }?;
        t.chains
            .get(chain)?
            .rules
            .iter()
            .find(|r| r.handle == Some(handle))
            .and_then(|r| r.comment.clone())
    }
}

/// A saved rule's comment, its escapes undone (`iptables-save` writes `pod\'s`).
pub fn ipt_comment(rule: &str) -> Option<String> {
    iptables::comment_of(rule).map(|c| c.replace("\\'", "'").replace("\\\"", "\""))
}

/// Whether `ip` is in `net/len` (false across families).
fn in_prefix(ip: IpAddr, net: IpAddr, len: u8) -> bool {
    let (ip, net, bits) = match (ip, net) {
        (IpAddr::V4(i), IpAddr::V4(n)) => (u128::from(u32::from(i)), u128::from(u32::from(n)), 32),
        (IpAddr::V6(i), IpAddr::V6(n)) => (u128::from(i), u128::from(n), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    ip >> shift == net >> shift
}

/// The TCP sockets listening in the calling thread's netns, both families, from
/// `/proc/thread-self/net/tcp{,6}` (the netns of the reading thread, unlike `/proc/net`).
pub fn listening_ports() -> std::io::Result<BTreeSet<(IpAddr, u16)>> {
    let mut out = parse_listening(&std::fs::read_to_string("/proc/thread-self/net/tcp")?);
    // No IPv6 in the kernel: no tcp6 file.
    if let Ok(t) = std::fs::read_to_string("/proc/thread-self/net/tcp6") {
        out.extend(parse_listening(&t));
    }
    Ok(out)
}

fn parse_listening(text: &str) -> BTreeSet<(IpAddr, u16)> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // st 0A = LISTEN
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (a, p) = f.get(1)?.split_once(':')?;
            let p = u16::from_str_radix(p, 16).ok()?;
            // Addresses are printed as the kernel's u32 words in host order.
            let ip: IpAddr = match a.len() {
                8 => Ipv4Addr::from(u32::from_str_radix(a, 16).ok()?.to_be()).into(),
                32 => {
                    let mut b = [0u8; 16];
                    for i in 0..4 {
                        let w = u32::from_str_radix(a.get(i * 8..i * 8 + 8)?, 16).ok()?;
                        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_be().to_be_bytes());
                    }
                    Ipv6Addr::from(b).into()
                }
                _ => return None,
            };
            Some((ip, p))
        })
        .collect()
}

/// The one-line form of a route, as `ip route` would print it.
pub fn route_text(k: &RouteKey, v: &RouteValue) -> String {
    let mut s = match k.kind {
        RouteKind::Local => "local ".to_string(),
        RouteKind::Unicast => String::new(),
    };
    if k.prefix_len == 0 && k.kind == RouteKind::Unicast {
        s += "default";
    } else {
        s += &format!("{}/{}", k.dst, k.prefix_len);
    }
    if let Some(g) = v.gateway {
        s += &format!(" via {g}");
    }
    s += &format!(" dev {}", v.dev);
    if v.scope_link {
        s += " scope link";
    }
    if v.onlink {
        s += " onlink";
    }
    if let Some(src) = v.src {
        s += &format!(" src {src}");
    }
    s
}

/// The one-line form of a rule, as `ip rule` would print it.
pub fn rule_text(r: &RuleSpec) -> String {
    let mut s = format!("{}{}: from all", if r.v6 { "-6 " } else { "" }, r.priority);
    if let Some((m, mask)) = r.fwmark {
        s += &format!(" fwmark {m:#x}/{mask:#x}");
    }
    match r.action {
        RuleAction::Lookup(t) => s + &format!(" lookup {t}"),
        RuleAction::Goto(p) => s + &format!(" goto {p}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(table: u32, dst: [u8; 4], len: u8) -> RouteKey {
        RouteKey {
            table,
            dst: dst.into(),
            prefix_len: len,
            kind: RouteKind::Unicast,
        }
    }

    fn dev(d: &str) -> RouteValue {
        RouteValue {
            dev: d.into(),
            gateway: None,
            src: None,
            scope_link: true,
            onlink: false,
        }
    }

    #[test]
    fn the_walk_follows_marks_priorities_and_falls_through() {
        let desired = ambient_net::model::node_desired(
            Some(&ambient_net::model::ZtunnelEndpoint {
                ip: Ipv4Addr::new(10, 244, 1, 2).into(),
                ip6: None,
                netns: String::new(),
                host_veth: "vethzt".into(),
                bridge: None,
                mac: String::new(),
                bridge_mac: None,
                veth_mtu: 1500,
                node_ip: Ipv4Addr::new(10, 244, 1, 1).into(),
                node_ip6: None,
            }),
            ambient_net::model::TunnelChoice {
                kind: ambient_net::model::TunnelKind::Vxlan,
                port: 6081,
            },
            &[ambient_net::model::PodRoute {
                ip: Ipv4Addr::new(10, 244, 1, 3).into(),
                gateway: Ipv4Addr::new(10, 244, 1, 1).into(),
            }]
            .into(),
            &BTreeSet::new(),
            &BTreeSet::new(),
        );
        let mut k = NsKernel {
            rules: desired.rules.iter().copied().collect(),
            routes: desired.routes.clone(),
            ..NsKernel::default()
        };
        k.routes
            .insert(key(TABLE_MAIN, [10, 244, 2, 0], 24), dev("eth1"));
        // Captured: 101, default via istioout.
        let l = k.lookup(0x100, Ipv4Addr::new(10, 244, 2, 3).into());
        assert_eq!((l.rule.map(|r| r.priority), l.table), (Some(101), 101));
        assert_eq!(l.route.unwrap().1.dev, "istioout");
        // Skip bit wins over capture: 100 goes to main.
        let l = k.lookup(0x300, Ipv4Addr::new(10, 244, 2, 3).into());
        assert_eq!(
            (l.rule.map(|r| r.priority), l.table),
            (Some(100), TABLE_MAIN)
        );
        assert_eq!(l.route.unwrap().1.dev, "eth1");
        // No mark to a local ambient pod: 103, table 100, istioin.
        let l = k.lookup(0, Ipv4Addr::new(10, 244, 1, 3).into());
        assert_eq!((l.rule.map(|r| r.priority), l.table), (Some(103), 100));
        assert_eq!(
            {
                let (rk, rv) = l.route.unwrap();
                route_text(&rk, &rv)
            },
            "10.244.1.3/32 via 192.168.126.2 dev istioin src 10.244.1.1"
        );
        // No mark, elsewhere: table 100 has no route, so main.
        let l = k.lookup(0, Ipv4Addr::new(10, 244, 2, 9).into());
        assert_eq!((l.rule, l.table), (None, TABLE_MAIN));
        assert_eq!(
            rule_text(&desired.rules.iter().next().copied().unwrap()),
            "100: from all fwmark 0x200/0x200 goto 32766"
        );
    }

    #[test]
    fn prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(in_prefix(ip("10.1.2.3"), ip("10.1.0.0"), 16));
        assert!(!in_prefix(ip("10.2.2.3"), ip("10.1.0.0"), 16));
        assert!(in_prefix(ip("1.2.3.4"), ip("0.0.0.0"), 0));
        assert!(in_prefix(ip("1.2.3.4"), ip("1.2.3.4"), 32));
        assert!(in_prefix(ip("fd00:10:244:1::3"), ip("fd00:10:244:1::"), 64));
        assert!(!in_prefix(
            ip("fd00:10:244:2::3"),
            ip("fd00:10:244:1::"),
            64
        ));
        assert!(in_prefix(ip("fd00::3"), ip("::"), 0));
        // Never across families, not even for a default route.
        assert!(!in_prefix(ip("10.1.2.3"), ip("::"), 0));
        assert!(!in_prefix(ip("fd00::3"), ip("0.0.0.0"), 0));
    }

    #[test]
    fn listening_sockets_of_both_families() {
        let v4 = "  sl  local_address rem_address   st\n   0: 0100007F:3A99 00000000:0000 0A 0\n   1: 0100007F:1F90 0200007F:1234 01 0\n";
        let v6 = "  sl  local_address rem_address   st\n   0: 00000000000000000000000001000000:3AB0 00000000000000000000000000000000:0000 0A 0\n";
        let mut got = parse_listening(v4);
        got.extend(parse_listening(v6));
        let want: BTreeSet<(IpAddr, u16)> = [
            (IpAddr::from(Ipv4Addr::LOCALHOST), 15001),
            (IpAddr::from(Ipv6Addr::LOCALHOST), 15024),
        ]
        .into();
        assert_eq!(got, want);
        assert!(parse_listening("x\n 0: zz:1 0 0A\n").is_empty());
    }

    #[test]
    fn the_v6_walk_takes_the_v6_rules_and_tables() {
        let rule = |priority, fwmark, t, v6| RuleSpec {
            priority,
            fwmark,
            action: RuleAction::Lookup(t),
            v6,
        };
        let mut k = NsKernel {
            rules: vec![
                rule(101, Some((0x100, 0x100)), 101, false),
                rule(101, Some((0x100, 0x100)), 101, true),
                rule(103, None, 100, true),
            ],
            ..NsKernel::default()
        };
        let k6 = |a: &str, len| RouteKey {
            table: 101,
            dst: a.parse().unwrap(),
            prefix_len: len,
            kind: RouteKind::Unicast,
        };
        k.routes.insert(key(101, [0, 0, 0, 0], 0), dev("istioout"));
        k.routes.insert(k6("::", 0), dev("istioout6"));
        k.routes.insert(
            RouteKey {
                table: 100,
                ..k6("fd00:10:244:1::3", 128)
            },
            dev("istioin"),
        );
        let l = k.lookup(0x100, "fd00:10:244:2::3".parse().unwrap());
        assert_eq!(l.rule.map(|r| (r.priority, r.v6)), Some((101, true)));
        assert_eq!(l.route.unwrap().1.dev, "istioout6");
        let l = k.lookup(0, "fd00:10:244:1::3".parse().unwrap());
        assert_eq!(l.rule.map(|r| (r.priority, r.v6)), Some((103, true)));
        // A v4 default route never answers a v6 lookup.
        let l = k.lookup(0x100, Ipv4Addr::new(10, 244, 2, 3).into());
        assert_eq!(l.route.unwrap().1.dev, "istioout");
        assert_eq!(
            rule_text(&rule(103, None, 100, true)),
            "-6 103: from all lookup 100"
        );
    }
}
