//! What the kernel holds now, on the node and in the ztunnel netns: policy rules, the routes of
//! the tables the path uses, the tunnel devices, the nft tables and the listening sockets.
//! Read through netlib's observe functions (netlink, `nft -j list`), never from the agent.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use ambient_net::consts::{self, rule, table, zt_rule};
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
}

/// The node's and (when known) its ztunnel netns' kernel state.
#[derive(Debug, Clone, Default)]
pub struct Kernel {
    pub node: NsKernel,
    pub ztunnel: Option<NsKernel>,
    /// The ztunnel netns path, when the agent knows one and it exists.
    pub ztunnel_netns: Option<PathBuf>,
}

impl Kernel {
    /// Reads the node (the calling thread's netns) and, when given, the ztunnel netns.
    pub async fn read(ztunnel_netns: Option<&Path>) -> Result<Kernel, OpsError> {
        let nl = Netlink::current().map_err(|e| OpsError::io("netlink", e))?;
        let mut node = read_ns(
            &nl,
            &rule::ALL,
            &table::ALL,
            &[consts::ISTIOIN.name, consts::ISTIOOUT.name],
        )
        .await?;
        node.nft = nft::observe_node()?;
        node.nft_bridge = nft::observe_node_bridge()?;
        let Some(path) = ztunnel_netns.filter(|p| p.exists()) else {
            return Ok(Kernel {
                node,
                ..Kernel::default()
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
        zt.nft = ambient_net::netns::run_in(path, nft::observe_ztunnel)
            .map_err(|e| OpsError::io(format!("enter {}", path.display()), e))??;
        Ok(Kernel {
            node,
            ztunnel: Some(zt),
            ztunnel_netns: Some(path.to_path_buf()),
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
        nft: None,
        nft_bridge: None,
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
    /// The longest-prefix route for `dst` in `table` (local routes first in the local table).
    pub fn route_in(&self, table: u32, dst: Ipv4Addr) -> Option<(RouteKey, RouteValue)> {
        self.routes
            .iter()
            .filter(|(k, _)| {
                k.table == table
                    && matches!(k.dst, IpAddr::V4(net) if in_prefix(dst, net, k.prefix_len))
            })
            .max_by_key(|(k, _)| (k.prefix_len, k.kind == RouteKind::Local))
            .map(|(k, v)| (*k, v.clone()))
    }

    /// The policy-routing walk for a packet to `dst` with `mark`: the local table (rule 0),
    /// the product's rules by priority (a `lookup` without a matching route falls through, as
    /// in the kernel), then main.
    pub fn lookup(&self, mark: u32, dst: Ipv4Addr) -> Lookup {
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
        // IPv4 only for now: the v6 rules are another walk.
        let mut rules: Vec<RuleSpec> = self.rules.iter().filter(|r| !r.v6).copied().collect();
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
    /// position: the kernel's rules are named by their comments.
    pub fn nft_rule(&self, chain: &str, text: &str) -> Option<(usize, &nft::ObservedRule, usize)> {
        let c = self.nft.as_ref()?.chains.get(chain)?;
        c.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.comment.as_deref().is_some_and(|t| t.contains(text)))
            .map(|(i, r)| (i + 1, r, c.rules.len()))
    }

    /// The comment of the rule with `handle` in table `table` (either node table, by family).
    pub fn comment_of(&self, family: u8, chain: &str, handle: u64) -> Option<String> {
        let t = match family {
            7 => self.nft_bridge.as_ref(),
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

fn in_prefix(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    if len == 0 {
        return true;
    }
    let mask = u32::MAX << (32 - u32::from(len.min(32)));
    u32::from(ip) & mask == u32::from(net) & mask
}

/// The TCP ports listening on `ip` (or on any address) in the calling thread's netns, from
/// `/proc/thread-self/net/tcp` (the netns of the reading thread, unlike `/proc/net`).
pub fn listening_ports() -> std::io::Result<BTreeSet<(Ipv4Addr, u16)>> {
    let text = std::fs::read_to_string("/proc/thread-self/net/tcp")?;
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // st 0A = LISTEN
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (a, p) = f.get(1)?.split_once(':')?;
            let a = u32::from_str_radix(a, 16).ok()?;
            let p = u16::from_str_radix(p, 16).ok()?;
            // The address is printed as the kernel's u32 in host order.
            Some((Ipv4Addr::from(a.to_be()), p))
        })
        .collect())
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
    let mut s = format!("{}: from all", r.priority);
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
        let l = k.lookup(0x100, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!((l.rule.map(|r| r.priority), l.table), (Some(101), 101));
        assert_eq!(l.route.unwrap().1.dev, "istioout");
        // Skip bit wins over capture: 100 goes to main.
        let l = k.lookup(0x300, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!(
            (l.rule.map(|r| r.priority), l.table),
            (Some(100), TABLE_MAIN)
        );
        assert_eq!(l.route.unwrap().1.dev, "eth1");
        // No mark to a local ambient pod: 103, table 100, istioin.
        let l = k.lookup(0, Ipv4Addr::new(10, 244, 1, 3));
        assert_eq!((l.rule.map(|r| r.priority), l.table), (Some(103), 100));
        assert_eq!(
            {
                let (rk, rv) = l.route.unwrap();
                route_text(&rk, &rv)
            },
            "10.244.1.3/32 via 192.168.126.2 dev istioin src 10.244.1.1"
        );
        // No mark, elsewhere: table 100 has no route, so main.
        let l = k.lookup(0, Ipv4Addr::new(10, 244, 2, 9));
        assert_eq!((l.rule, l.table), (None, TABLE_MAIN));
        assert_eq!(
            rule_text(&desired.rules.iter().next().copied().unwrap()),
            "100: from all fwmark 0x200/0x200 goto 32766"
        );
    }

    #[test]
    fn prefixes() {
        assert!(in_prefix(
            Ipv4Addr::new(10, 1, 2, 3),
            Ipv4Addr::new(10, 1, 0, 0),
            16
        ));
        assert!(!in_prefix(
            Ipv4Addr::new(10, 2, 2, 3),
            Ipv4Addr::new(10, 1, 0, 0),
            16
        ));
        assert!(in_prefix(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::UNSPECIFIED,
            0
        ));
        assert!(in_prefix(
            Ipv4Addr::new(1, 2, 3, 4),
            Ipv4Addr::new(1, 2, 3, 4),
            32
        ));
    }
}
