//! The desired kernel state of a node and of the ztunnel netns, derived from a few inputs, and
//! the diff between desired and observed links, rules and routes. Pure: no I/O here, so the
//! SPEC's tables read straight off the unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::consts::{self, mark, rule, table, zt_mark, zt_rule, TunnelEnd};
use crate::sysctl::Sysctl;

/// Which encapsulation the tunnels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    Geneve,
    Vxlan,
}

/// The operator's choice: `auto` uses Geneve and falls back to VXLAN (same VNIs and port)
/// only when the kernel refuses Geneve with EOPNOTSUPP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelMode {
    Auto,
    Geneve,
    Vxlan,
}

impl std::str::FromStr for TunnelMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "geneve" => Ok(Self::Geneve),
            "vxlan" => Ok(Self::Vxlan),
            _ => Err(format!("tunnel must be auto, geneve or vxlan, not {s:?}")),
        }
    }
}

/// What the node agent decided for the tunnels; ztunnel-init reads it to match the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelChoice {
    pub kind: TunnelKind,
    pub port: u16,
}

/// One tunnel device as it must exist.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub end: TunnelEnd,
    pub kind: TunnelKind,
    pub port: u16,
    pub remote: Ipv4Addr,
    pub mtu: u32,
}

/// What a rule does when it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleAction {
    Lookup(u32),
    Goto(u32),
}

/// An IPv4 policy-routing rule: `priority [fwmark mark/mask] lookup|goto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleSpec {
    pub priority: u32,
    pub fwmark: Option<(u32, u32)>,
    pub action: RuleAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteKind {
    Unicast,
    Local,
}

/// The identity of a route within the tables we own: a table holds one route per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteKey {
    pub table: u32,
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub kind: RouteKind,
}

/// What the route says, by device name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteValue {
    pub dev: String,
    pub gateway: Option<Ipv4Addr>,
    pub src: Option<Ipv4Addr>,
    /// `scope link` (device routes) rather than universe (routes via a gateway).
    pub scope_link: bool,
    pub onlink: bool,
}

pub type Routes = BTreeMap<RouteKey, RouteValue>;

/// Links, rules, routes and sysctls of one namespace. The rules are exactly those with a
/// priority in `owned_priorities`; the routes exactly those in `owned_tables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDesired {
    pub tunnels: Vec<TunnelSpec>,
    pub rules: BTreeSet<RuleSpec>,
    pub routes: Routes,
    pub sysctls: Vec<Sysctl>,
}

/// The ztunnel pod as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ZtunnelEndpoint {
    pub ip: Ipv4Addr,
    /// The ztunnel pod's netns path.
    pub netns: String,
    /// The node-side veth of the ztunnel pod.
    pub host_veth: String,
    /// The bridge that veth is a port of, with a bridge-type primary CNI: routes to the
    /// ztunnel then go via the bridge.
    #[serde(default)]
    pub bridge: Option<String>,
    /// The ztunnel pod interface's MAC (matched on the bridge).
    #[serde(default)]
    pub mac: String,
    /// The MAC of [`Self::bridge`]: frames between pods of the bridge that must be captured
    /// are readdressed to it, so they are routed rather than switched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bridge_mac: Option<String>,
    /// Its MTU: the tunnels' underlay.
    pub veth_mtu: u32,
    /// The node address on the ztunnel's side (its gateway): the tunnels' source.
    pub node_ip: Ipv4Addr,
}

impl ZtunnelEndpoint {
    /// The node device that reaches the ztunnel: its veth, or the bridge it is a port of.
    pub fn route_dev(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.host_veth)
    }
}

/// One captured pod address and the node-side device its traffic uses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodRoute {
    pub ip: Ipv4Addr,
    /// The node's gateway address toward this pod (`src` of its table-100 route).
    pub gateway: Ipv4Addr,
}

/// One enrolled pod address and the node devices its packets may come from (anti-spoofing):
/// a packet claiming this address is only captured when it arrives where the pod is attached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodSource {
    pub ip: IpAddr,
    /// The pod's host-side veth (found from inside the pod's netns); with a bridge-type
    /// primary, a port of [`Self::bridge`].
    pub veth: String,
    /// The bridge that veth is a port of, if any.
    pub bridge: Option<String>,
}

impl PodSource {
    /// The input device the pod's packets have in the node's IP layer (`iifname` in the inet
    /// table): the veth, or the bridge when the veth is a bridge port (the bridge table then
    /// checks the port).
    pub fn routed_dev(&self) -> &str {
        self.bridge.as_deref().unwrap_or(&self.veth)
    }
}

/// Tunnel MTU: the underlay's minus the encapsulation.
pub fn tunnel_mtu(underlay_mtu: u32) -> u32 {
    underlay_mtu.saturating_sub(consts::TUNNEL_OVERHEAD)
}

fn tunnel(end: TunnelEnd, choice: TunnelChoice, remote: Ipv4Addr, mtu: u32) -> TunnelSpec {
    TunnelSpec {
        end,
        kind: choice.kind,
        port: choice.port,
        remote,
        mtu,
    }
}

fn device_route(dev: &str) -> RouteValue {
    RouteValue {
        dev: dev.into(),
        gateway: None,
        src: None,
        scope_link: true,
        onlink: false,
    }
}

fn via(dev: &str, gateway: Ipv4Addr, src: Option<Ipv4Addr>, onlink: bool) -> RouteValue {
    RouteValue {
        dev: dev.into(),
        gateway: Some(gateway),
        src,
        scope_link: false,
        onlink,
    }
}

fn host_key(table: u32, dst: Ipv4Addr) -> RouteKey {
    RouteKey {
        table,
        dst,
        prefix_len: 32,
        kind: RouteKind::Unicast,
    }
}

fn default_key(table: u32, kind: RouteKind) -> RouteKey {
    RouteKey {
        table,
        dst: Ipv4Addr::UNSPECIFIED,
        prefix_len: 0,
        kind,
    }
}

/// A pod's table-100 route: `<pod ip> via 192.168.126.2 dev istioin src <node gw ip>`.
/// `src` makes host sockets pick the gateway address, which the output chain exempts.
pub fn pod_inbound_route(p: &PodRoute) -> (RouteKey, RouteValue) {
    (
        host_key(table::INBOUND, p.ip),
        via(
            consts::ISTIOIN.name,
            consts::ISTIOIN.peer,
            Some(p.gateway),
            false,
        ),
    )
}

/// The node's desired links, rules, routes and sysctls (SPEC §1–2). Without a ztunnel nothing
/// is captured: no tunnels, rules or routes, only the sysctls that are safe anyway.
pub fn node_desired(
    ztunnel: Option<&ZtunnelEndpoint>,
    choice: TunnelChoice,
    pods: &BTreeSet<PodRoute>,
    pod_host_devs: &BTreeSet<String>,
) -> NetDesired {
    let mut d = NetDesired {
        tunnels: Vec::new(),
        rules: BTreeSet::new(),
        routes: Routes::new(),
        sysctls: vec![Sysctl::new("net.ipv4.ip_forward", "1")],
    };
    let Some(zt) = ztunnel else {
        return d;
    };
    let mtu = tunnel_mtu(zt.veth_mtu);
    d.tunnels = vec![
        tunnel(consts::ISTIOIN, choice, zt.ip, mtu),
        tunnel(consts::ISTIOOUT, choice, zt.ip, mtu),
    ];
    d.rules = [
        RuleSpec {
            priority: rule::SKIP,
            fwmark: Some((mark::SKIP, mark::SKIP)),
            action: RuleAction::Goto(rule::MAIN),
        },
        RuleSpec {
            priority: rule::CAPTURE,
            fwmark: Some((mark::CAPTURE, mark::CAPTURE)),
            action: RuleAction::Lookup(table::OUTBOUND),
        },
        RuleSpec {
            priority: rule::RETURN,
            fwmark: Some((mark::RETURN, mark::RETURN)),
            action: RuleAction::Lookup(table::RETURN),
        },
        RuleSpec {
            priority: rule::INBOUND,
            fwmark: None,
            action: RuleAction::Lookup(table::INBOUND),
        },
    ]
    .into();
    // Each table first routes the ztunnel IP over its veth: the encapsulated packet inherits
    // the capture mark, and without this the tunnel would route into itself.
    let zt_dev = zt.route_dev();
    for t in table::ALL {
        d.routes.insert(host_key(t, zt.ip), device_route(zt_dev));
    }
    d.routes.insert(
        default_key(table::OUTBOUND, RouteKind::Unicast),
        via(consts::ISTIOOUT.name, consts::ISTIOOUT.peer, None, false),
    );
    d.routes.insert(
        default_key(table::RETURN, RouteKind::Unicast),
        via(zt_dev, zt.ip, None, true),
    );
    d.routes.extend(pods.iter().map(pod_inbound_route));
    // Effective rp_filter is max(all, dev): `all` must be 0 for the per-device 0s to count.
    d.sysctls.push(Sysctl::conf("all", "rp_filter", "0"));
    let mut zt_devs = vec![
        zt.host_veth.as_str(),
        consts::ISTIOIN.name,
        consts::ISTIOOUT.name,
    ];
    zt_devs.extend(zt.bridge.as_deref());
    for dev in zt_devs {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
        d.sysctls.push(Sysctl::conf(dev, "accept_local", "1"));
    }
    // Behind a bridge, packets between two of its pods are routed (same-bridge capture) and a
    // captured flow's rest goes back out over the bridge to ztunnel: the node must not send
    // ICMP redirects telling pods to go direct. The kernel ORs `all` with the device.
    if let Some(b) = zt.bridge.as_deref() {
        d.sysctls.push(Sysctl::conf("all", "send_redirects", "0"));
        d.sysctls.push(Sysctl::conf(b, "send_redirects", "0"));
    }
    for dev in pod_host_devs {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
    }
    d
}

/// The ztunnel netns' desired links, rules, routes and sysctls (SPEC §1, §3).
pub fn ztunnel_desired(
    choice: TunnelChoice,
    node_ip: Ipv4Addr,
    pod_iface: &str,
    pod_iface_mtu: u32,
) -> NetDesired {
    let mtu = tunnel_mtu(pod_iface_mtu);
    let mut d = NetDesired {
        tunnels: vec![
            tunnel(consts::PISTIOIN, choice, node_ip, mtu),
            tunnel(consts::PISTIOOUT, choice, node_ip, mtu),
        ],
        rules: [
            RuleSpec {
                priority: zt_rule::TPROXY,
                fwmark: Some((zt_mark::TPROXY, zt_mark::MASK)),
                action: RuleAction::Lookup(zt_rule::TABLE_LOCAL),
            },
            RuleSpec {
                priority: zt_rule::SPOOF_REPLY,
                fwmark: Some((zt_mark::SPOOF_REPLY, zt_mark::MASK)),
                action: RuleAction::Lookup(zt_rule::TABLE_LOCAL),
            },
        ]
        .into(),
        routes: Routes::new(),
        sysctls: Vec::new(),
    };
    d.routes.insert(
        default_key(zt_rule::TABLE_LOCAL, RouteKind::Local),
        RouteValue {
            dev: "lo".into(),
            gateway: None,
            src: None,
            scope_link: false,
            onlink: false,
        },
    );
    for (t, end) in [
        (zt_rule::TABLE_OUTBOUND, consts::PISTIOOUT),
        (zt_rule::TABLE_INBOUND, consts::PISTIOIN),
    ] {
        d.routes
            .insert(host_key(t, node_ip), device_route(pod_iface));
        d.routes.insert(
            default_key(t, RouteKind::Unicast),
            via(end.name, end.peer, None, false),
        );
    }
    for dev in [
        "all",
        "default",
        pod_iface,
        consts::PISTIOIN.name,
        consts::PISTIOOUT.name,
    ] {
        d.sysctls.push(Sysctl::conf(dev, "rp_filter", "0"));
    }
    d
}

/// The changes that take observed rules to desired ones: add first, then delete.
pub fn diff_rules(
    desired: &BTreeSet<RuleSpec>,
    observed: &[RuleSpec],
) -> (Vec<RuleSpec>, Vec<RuleSpec>) {
    let have: BTreeSet<_> = observed.iter().copied().collect();
    let add = desired.difference(&have).copied().collect();
    // Duplicates of a desired rule are extra too: delete all but one.
    let mut seen = BTreeSet::new();
    let del = observed
        .iter()
        .filter(|r| !desired.contains(r) || !seen.insert(**r))
        .copied()
        .collect();
    (add, del)
}

/// The changes that take observed routes to desired ones: routes to (re)place (replace is
/// atomic per key) and keys to delete.
pub fn diff_routes(desired: &Routes, observed: &Routes) -> (Routes, Vec<RouteKey>) {
    let put = desired
        .iter()
        .filter(|(k, v)| observed.get(k) != Some(v))
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    let del = observed
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    (put, del)
}

/// What must happen to an existing tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunnelAction {
    Keep,
    /// Only the MTU differs: change it in place.
    SetMtu,
    /// The remote (a new ztunnel pod IP) differs, maybe the MTU too: both change in place,
    /// so the routes through the device stay (re-creating it drops every route via it, a
    /// table-100 route per pod, and waits for the kernel to release the old device).
    SetRemote,
    /// Kind, VNI or port differ: these cannot be changed on a live device.
    Recreate,
}

/// The observed attributes of a tunnel device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelObserved {
    pub kind: Option<TunnelKind>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub remote: Option<Ipv4Addr>,
    pub mtu: Option<u32>,
}

pub fn tunnel_action(want: &TunnelSpec, have: &TunnelObserved) -> TunnelAction {
    if have.kind != Some(want.kind)
        || have.vni != Some(want.end.vni)
        || have.port != Some(want.port)
    {
        TunnelAction::Recreate
    } else if have.remote != Some(want.remote) {
        TunnelAction::SetRemote
    } else if have.mtu != Some(want.mtu) {
        TunnelAction::SetMtu
    } else {
        TunnelAction::Keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
    const VX: TunnelChoice = TunnelChoice {
        kind: TunnelKind::Vxlan,
        port: 6081,
    };

    fn zt() -> ZtunnelEndpoint {
        ZtunnelEndpoint {
            ip: ZT_IP,
            netns: "/run/netns/zt".into(),
            host_veth: "vethzt".into(),
            bridge: None,
            mac: String::new(),
            bridge_mac: None,
            veth_mtu: 1500,
            node_ip: GW,
        }
    }

    fn pods() -> BTreeSet<PodRoute> {
        [PodRoute {
            ip: Ipv4Addr::new(10, 244, 1, 5),
            gateway: GW,
        }]
        .into()
    }

    #[test]
    fn node_rules_are_100_to_103_as_in_the_spec() {
        let d = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        let rules: Vec<_> = d.rules.iter().copied().collect();
        assert_eq!(
            rules,
            vec![
                RuleSpec {
                    priority: 100,
                    fwmark: Some((0x200, 0x200)),
                    action: RuleAction::Goto(32766)
                },
                RuleSpec {
                    priority: 101,
                    fwmark: Some((0x100, 0x100)),
                    action: RuleAction::Lookup(101)
                },
                RuleSpec {
                    priority: 102,
                    fwmark: Some((0x40, 0x40)),
                    action: RuleAction::Lookup(102)
                },
                RuleSpec {
                    priority: 103,
                    fwmark: None,
                    action: RuleAction::Lookup(100)
                },
            ]
        );
    }

    #[test]
    fn node_tables_100_101_102_as_in_the_spec() {
        let d = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        let get = |t, dst: [u8; 4], len| {
            d.routes.get(&RouteKey {
                table: t,
                dst: dst.into(),
                prefix_len: len,
                kind: RouteKind::Unicast,
            })
        };
        for t in [100, 101, 102] {
            assert_eq!(get(t, [10, 244, 1, 2], 32), Some(&device_route("vethzt")));
        }
        assert_eq!(
            get(101, [0, 0, 0, 0], 0),
            Some(&via(
                "istioout",
                Ipv4Addr::new(192, 168, 127, 2),
                None,
                false
            ))
        );
        assert_eq!(
            get(102, [0, 0, 0, 0], 0),
            Some(&via("vethzt", ZT_IP, None, true))
        );
        assert_eq!(
            get(100, [10, 244, 1, 5], 32),
            Some(&via(
                "istioin",
                Ipv4Addr::new(192, 168, 126, 2),
                Some(GW),
                false
            ))
        );
        assert_eq!(d.routes.len(), 6);
    }

    #[test]
    fn node_tunnels_point_at_ztunnel_with_mtu_minus_50() {
        let d = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        assert_eq!(d.tunnels.len(), 2);
        assert_eq!(
            (d.tunnels[0].end.name, d.tunnels[0].end.vni),
            ("istioin", 1000)
        );
        assert_eq!(
            (d.tunnels[1].end.name, d.tunnels[1].end.vni),
            ("istioout", 1001)
        );
        assert!(d
            .tunnels
            .iter()
            .all(|t| t.remote == ZT_IP && t.mtu == 1450 && t.port == 6081));
    }

    #[test]
    fn behind_a_bridge_the_routes_use_the_bridge() {
        let z = ZtunnelEndpoint {
            bridge: Some("cni0".into()),
            ..zt()
        };
        let d = node_desired(Some(&z), VX, &pods(), &BTreeSet::new());
        assert_eq!(
            d.routes.get(&host_key(101, ZT_IP)),
            Some(&device_route("cni0"))
        );
        assert_eq!(
            d.routes.get(&default_key(102, RouteKind::Unicast)),
            Some(&via("cni0", ZT_IP, None, true))
        );
        assert!(d.sysctls.contains(&Sysctl::conf("cni0", "rp_filter", "0")));
        assert!(d
            .sysctls
            .contains(&Sysctl::conf("cni0", "send_redirects", "0")));
        assert!(d
            .sysctls
            .contains(&Sysctl::conf("all", "send_redirects", "0")));
        let ptp = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        assert!(!ptp
            .sysctls
            .iter()
            .any(|s| s.key.ends_with("send_redirects")));
    }

    #[test]
    fn a_pod_behind_a_bridge_is_routed_from_the_bridge() {
        let ptp = PodSource {
            ip: Ipv4Addr::new(10, 244, 1, 5).into(),
            veth: "veth1".into(),
            bridge: None,
        };
        assert_eq!(ptp.routed_dev(), "veth1");
        let bridged = PodSource {
            bridge: Some("cni0".into()),
            ..ptp
        };
        assert_eq!(bridged.routed_dev(), "cni0");
    }

    #[test]
    fn without_ztunnel_nothing_is_captured() {
        let d = node_desired(None, VX, &pods(), &BTreeSet::new());
        assert!(d.tunnels.is_empty() && d.rules.is_empty() && d.routes.is_empty());
    }

    #[test]
    fn node_sysctls_relax_rp_filter_where_spoofed_sources_arrive() {
        let devs = ["vethpod1".to_string()].into();
        let d = node_desired(Some(&zt()), VX, &pods(), &devs);
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.vethzt.rp_filter=0",
            "net.ipv4.conf.vethzt.accept_local=1",
            "net.ipv4.conf.istioin.rp_filter=0",
            "net.ipv4.conf.istioout.accept_local=1",
            "net.ipv4.conf.vethpod1.rp_filter=0",
        ] {
            let (k, v) = key.split_once('=').unwrap();
            assert!(d.sysctls.contains(&Sysctl::new(k, v)), "missing {key}");
        }
    }

    #[test]
    fn ztunnel_netns_rules_and_tables_as_in_the_spec() {
        let d = ztunnel_desired(VX, GW, "eth0", 1500);
        let prios: Vec<_> = d.rules.iter().map(|r| (r.priority, r.fwmark)).collect();
        assert_eq!(
            prios,
            vec![(20000, Some((0x400, 0xfff))), (20003, Some((0x4d3, 0xfff)))]
        );
        assert!(d.rules.iter().all(|r| r.action == RuleAction::Lookup(100)));
        let local = d.routes.get(&default_key(100, RouteKind::Local)).unwrap();
        assert_eq!(local.dev, "lo");
        assert_eq!(
            d.routes.get(&default_key(101, RouteKind::Unicast)).unwrap(),
            &via("pistioout", Ipv4Addr::new(192, 168, 127, 1), None, false)
        );
        assert_eq!(
            d.routes.get(&default_key(102, RouteKind::Unicast)).unwrap(),
            &via("pistioin", Ipv4Addr::new(192, 168, 126, 1), None, false)
        );
        assert_eq!(
            d.routes.get(&host_key(101, GW)).unwrap(),
            &device_route("eth0")
        );
        assert!(d.tunnels.iter().all(|t| t.remote == GW));
    }

    #[test]
    fn rule_diff_adds_missing_and_deletes_extra_and_duplicates() {
        let d = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        let mut observed: Vec<_> = d.rules.iter().copied().collect();
        let r101 = observed.remove(1);
        observed.push(observed[0]);
        let stray = RuleSpec {
            priority: 102,
            fwmark: Some((0x40, 0x40)),
            action: RuleAction::Lookup(7),
        };
        observed.push(stray);
        let (add, del) = diff_rules(&d.rules, &observed);
        assert_eq!(add, vec![r101]);
        assert_eq!(del, vec![observed[0], stray]);
    }

    #[test]
    fn route_diff_replaces_changed_and_deletes_stale() {
        let d = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new());
        let mut observed = d.routes.clone();
        assert_eq!(diff_routes(&d.routes, &observed), (Routes::new(), vec![]));
        let stale = host_key(100, Ipv4Addr::new(10, 244, 1, 9));
        observed.insert(stale, device_route("x"));
        let moved = host_key(101, ZT_IP);
        observed.insert(moved, device_route("old"));
        let (put, del) = diff_routes(&d.routes, &observed);
        assert_eq!(put.keys().copied().collect::<Vec<_>>(), vec![moved]);
        assert_eq!(del, vec![stale]);
    }

    #[test]
    fn tunnel_changes_that_need_a_new_device() {
        let want = node_desired(Some(&zt()), VX, &pods(), &BTreeSet::new()).tunnels[0].clone();
        let have = TunnelObserved {
            kind: Some(TunnelKind::Vxlan),
            vni: Some(1000),
            port: Some(6081),
            remote: Some(ZT_IP),
            mtu: Some(1450),
        };
        assert_eq!(tunnel_action(&want, &have), TunnelAction::Keep);
        let mtu = TunnelObserved {
            mtu: Some(1400),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &mtu), TunnelAction::SetMtu);
        let moved = TunnelObserved {
            remote: Some(GW),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &moved), TunnelAction::SetRemote);
        let other_port = TunnelObserved {
            port: Some(6082),
            ..have.clone()
        };
        assert_eq!(tunnel_action(&want, &other_port), TunnelAction::Recreate);
        let geneve = TunnelObserved {
            kind: Some(TunnelKind::Geneve),
            ..have
        };
        assert_eq!(tunnel_action(&want, &geneve), TunnelAction::Recreate);
    }
}
